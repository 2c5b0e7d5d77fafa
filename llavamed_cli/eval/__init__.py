"""``llavamed eval``: VQA answers and metrics, LLM-judged chat scores, summaries."""

import typer

app = typer.Typer(help="Evaluate: VQA metrics, LLM-judged chat scores, summaries.", no_args_is_help=True)

# Each module registers its command on ``app`` when imported (keep one import per command module).
