"""``llavamed eval``: VQA answers and metrics, LLM-judged chat scores, summaries."""

import typer

app = typer.Typer(help="Evaluate: VQA metrics, LLM-judged chat scores, summaries.", no_args_is_help=True)

# Each module registers its command on ``app`` when imported (keep one import per command module).
from . import vqa  # noqa: E402,F401
from . import gpt_score  # noqa: E402,F401
from . import summarize  # noqa: E402,F401
