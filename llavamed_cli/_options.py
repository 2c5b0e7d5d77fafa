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

# How a DICOM or NIfTI file becomes one picture (llavamed_core.images.ImageOptions); chat, eval vqa
# and data view take them all. Build the options object with image_options(...).
WindowOpt = Annotated[Optional[str], typer.Option("--window", help="DICOM/NIfTI window: CENTER,WIDTH in real units (HU for CT), or lung, mediastinum, bone, brain, abdomen (default: the file's own window, else its full range).")]
FrameOpt = Annotated[Optional[int], typer.Option("--frame", help="DICOM: frame of a multi-frame file, from 0 (default: the middle frame).")]
SliceOpt = Annotated[Optional[int], typer.Option("--slice", help="NIfTI: slice along the plane's axis, from 0 (default: the middle slice).")]
PlaneOpt = Annotated[str, typer.Option("--plane", help="NIfTI: axial, coronal or sagittal.")]
VolumeOpt = Annotated[Optional[int], typer.Option("--volume", help="NIfTI: volume of a 4-D file, from 0 (required for 4-D files).")]


def image_options(window: Optional[str], frame: Optional[int], slice_index: Optional[int],
                  plane: str, volume: Optional[int]):
    """The core's ImageOptions from the five image flags (a bad value is a one-line ConfigError)."""
    from llavamed_core.images import ImageOptions

    return ImageOptions(window=window, frame=frame, slice_index=slice_index, plane=plane, volume=volume)
