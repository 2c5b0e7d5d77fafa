"""``llavamed data``: get, prepare, synthesise and validate data. One module per command."""

import typer

app = typer.Typer(help="Get, prepare, synthesise, validate and view data.", no_args_is_help=True)

# Each module registers its command on ``app`` when imported (keep one import per command module).
from . import synth, validate  # noqa: E402,F401
from . import download  # noqa: E402,F401
from . import extract  # noqa: E402,F401
from . import prepare  # noqa: E402,F401
from . import view  # noqa: E402,F401
