"""``llavamed instruct``: generate instruction conversations from figure captions with an LLM."""

import typer

app = typer.Typer(help="Generate instruction-following conversations from figure captions with an LLM.",
                  no_args_is_help=True)

# Each module registers its command on ``app`` when imported (keep one import per command module).
from . import gen  # noqa: E402,F401
from . import post  # noqa: E402,F401
