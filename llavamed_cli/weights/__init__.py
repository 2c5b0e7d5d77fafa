"""``llavamed weights``: build, convert, delta and merge checkpoints."""

import typer

app = typer.Typer(help="Build, convert, apply deltas to and merge checkpoints.", no_args_is_help=True)

# Each module registers its command on ``app`` when imported (keep one import per command module).
from . import init  # noqa: E402,F401
from . import delta  # noqa: E402,F401
from . import convert  # noqa: E402,F401
from . import merge_lora  # noqa: E402,F401
