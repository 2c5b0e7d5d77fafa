"""The attention-backend policy: on CUDA, cuDNN attention (a graph built per new shape, per thread)
is turned off for the process unless ``LLAVAMED_CUDNN_SDPA=1``; on CPU nothing changes. The flag
is PyTorch's own process setting, which a CPU build carries too, so the policy is checked here;
what it buys is measured by ``benchmarks/gpu_suite.py`` on a GPU."""

from __future__ import annotations

import pytest

from serve_helpers import tiny_engine  # noqa: F401  (a fixture)


@pytest.fixture
def cudnn_flag():
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield torch.backends.cuda.cudnn_sdp_enabled
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_turns_cudnn_attention_off_and_cpu_leaves_it(cudnn_flag, monkeypatch):
    from llavamed_core.model.checkpoint import CUDNN_SDPA_ENV, use_shape_free_sdpa

    monkeypatch.delenv(CUDNN_SDPA_ENV, raising=False)
    assert use_shape_free_sdpa("cpu") is False and cudnn_flag()
    assert use_shape_free_sdpa("cuda:0") is True and not cudnn_flag()
    assert use_shape_free_sdpa("cuda") is True and not cudnn_flag()  # idempotent


def test_the_variable_keeps_cudnn_attention(cudnn_flag, monkeypatch):
    from llavamed_core.model.checkpoint import CUDNN_SDPA_ENV, use_shape_free_sdpa

    monkeypatch.setenv(CUDNN_SDPA_ENV, "1")
    assert use_shape_free_sdpa("cuda") is False and cudnn_flag()


def test_a_cpu_engine_leaves_the_flag(cudnn_flag, tiny_engine):
    """The engine applies the policy for its own device only (here CPU: untouched)."""
    from llavamed_core.infer import Engine

    Engine(tiny_engine.model, tiny_engine.processor)
    assert cudnn_flag()
