"""``llavamed data view``: write one image, DICOM or NIfTI file as the 8-bit picture the model sees.

    llavamed data view scan.dcm --out view.png --window lung
    llavamed data view brain.nii.gz --out view.png --plane coronal --slice 40
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import _console
from .._options import FrameOpt, JsonOpt, PlaneOpt, SliceOpt, VolumeOpt, WindowOpt, image_options
from . import app


@app.command("view")
def view(
    file: Annotated[Path, typer.Argument(help="Image, DICOM (.dcm) or NIfTI (.nii, .nii.gz) file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    window: WindowOpt = None,
    frame: FrameOpt = None,
    slice_index: SliceOpt = None,
    plane: PlaneOpt = "axial",
    volume: VolumeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the picture the model sees (before its own resize/pad) as a PNG."""
    from llavamed_core.images import save_view

    path, info = save_view(file, out, image_options(window, frame, slice_index, plane, volume))
    output = _console.Output(json_out)
    output.result(dict(info.to_dict(), out=str(path)))
    if output.json_mode:
        return  # the line below describes the rendering for a person
    d = info.to_dict()
    shown = (f"window {d['window'][0]:g},{d['window'][1]:g} ({info.window_source})" if info.window
             else "as stored" if info.window_source == "none" else info.window_source)
    where = (f", frame {info.frame} of {info.frames}" if info.kind == "dicom" and info.frames else
             f", {info.plane} slice {info.slice_index} of {info.slices}" if info.kind == "nifti" else "")
    _console.info(f"{info.kind} {info.width}x{info.height}{where}, {shown}")
    output.text(str(path))
