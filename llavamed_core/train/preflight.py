"""Checks run before training starts that need no model and no data: logging integrations and
output paths.

- :func:`check_report_to` refuses ``--report-to tensorboard`` (or ``wandb``, …) when the package
  is not installed, naming the ``pip install`` that fixes it, instead of failing inside the
  Trainer after the data is loaded and the model built.
- :func:`check_outputs` refuses an ``--out`` or ``--run-dir`` that is, contains or lies inside the
  input checkpoint, data file or image folder (``--overwrite`` would delete it).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import ConfigError, DependencyError
from ..io import check_out_not_overlapping

__all__ = ["INTEGRATIONS", "check_report_to", "check_outputs", "check_before_training"]

INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "azure_ml": (("azureml",), "azureml-core"),
    "dagshub": (("dagshub",), "dagshub"),
    "flyte": (("flytekit",), "flytekit"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
"""``--report-to`` name → (modules any one of which makes it work, the package to install)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(report_to: str | None) -> list[str]:
    """The integrations of a ``--report-to`` value, each checked to be installed.

    Args:
        report_to: ``none``, ``all``, or comma-separated names (``tensorboard,wandb``).

    Returns:
        The names (``[]`` for ``none``).

    Raises:
        ConfigError: an unknown name.
        DependencyError: a named integration whose package is missing (with the pip command).
    """
    names = [n.strip() for n in (report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]) or names == ["all"]:
        return [] if names != ["all"] else names
    for name in names:
        if name in ("none", "all"):
            raise ConfigError(f"--report-to {report_to}: '{name}' cannot be combined with other names",
                              "use --report-to none, --report-to all, or a list of integrations")
        if name not in INTEGRATIONS:
            raise ConfigError(f"--report-to {report_to}: unknown integration '{name}'",
                              f"use none, all, or some of {', '.join(INTEGRATIONS)}")
        modules, package = INTEGRATIONS[name]
        if not any(_installed(m) for m in modules):
            raise DependencyError(f"--report-to {name}: the '{package}' package is not installed",
                                  f"pip install {package}, or drop --report-to {name}")
    return names


def check_outputs(cfg: Any) -> None:
    """Refuse an ``--out`` or ``--run-dir`` overlapping the model, data or images (symlinks resolved).

    Raises:
        ConfigError: naming both options.
    """
    inputs = [("--model", cfg.model), ("--data", cfg.data), ("--images", cfg.images)]
    check_out_not_overlapping(cfg.out, inputs, "--out")
    check_out_not_overlapping(cfg.resolved_run_dir, inputs, "--run-dir")


def check_before_training(cfg: Any) -> None:
    """:func:`check_report_to` and :func:`check_outputs` for a :class:`~.config.TrainConfig`."""
    check_report_to(cfg.report_to)
    check_outputs(cfg)
