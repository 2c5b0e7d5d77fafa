"""``llavamed train``: the three LLaVA-Med stages (align → instruct → finetune) on the HF Trainer."""

import typer

app = typer.Typer(help="Train: align (projector), instruct (projector + LM), finetune (a downstream set).",
                  no_args_is_help=True)

# One module registers the three stage commands (they share every option).
from . import stages  # noqa: E402,F401
