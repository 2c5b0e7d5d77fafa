"""The root ``llavamed`` app: composes one Typer sub-app per command group.

Run: ``llavamed --help``. Nothing imported here may import torch or transformers; commands import
the heavy parts of the core inside their bodies so ``--help`` and tab completion stay instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llavamed_core import __version__

from ._errors import LlavamedGroup
from ._examples import add_examples
from .chat import chat_command
from .config import app as config_app
from .demo import demo_command
from .data import app as data_app
from .eval import app as eval_app
from .train import app as train_app
from .instruct import app as instruct_app
from .serve import serve_command
from .weights import app as weights_app

app = typer.Typer(
    name="llavamed",
    cls=LlavamedGroup,
    help="LLaVA-Med, end to end: data, instruction generation, weights, training, chat, serving, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llavamed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """LLaVA-Med, end to end. Set LLAVAMED_DEBUG=1 to see tracebacks."""


# Command groups (one package each) and top-level commands. One line per group or command:
#   groups:   app.add_typer(x_app, name="x")        (import its `app` above)
#   commands: app.command("chat")(chat_command)     (a function in llavamed_cli/chat.py)
app.add_typer(data_app, name="data")
app.add_typer(weights_app, name="weights")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")
app.add_typer(instruct_app, name="instruct")
app.add_typer(config_app, name="config")
app.command("chat")(chat_command)
app.command("demo")(demo_command)
app.command("serve")(serve_command)
add_examples(app)  # one or two examples at the end of every command's --help


def run() -> None:
    """Console-script entry point."""
    from llavamed_core.quick_exit import freeze_objects_at_exit

    freeze_objects_at_exit()
    app()


if __name__ == "__main__":  # pragma: no cover
    run()
