"""Options shared by several commands, as ``Annotated`` aliases (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the machine-readable result on stdout.")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (a standard HF Llava checkpoint).")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Folder the records' image paths are relative to.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: CUDA if present, else CPU).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
