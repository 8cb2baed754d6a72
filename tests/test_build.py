import os
import shutil

import pytest
import torch

import collapse_ext
from collapse_ext import _ops


class _OnCuda:
    """Stands in for a CUDA tensor on a machine without a GPU: check_backend reads only
    .is_cpu and .device."""

    is_cpu = False
    device = torch.device("cuda", 0)


def test_cuda_tensor_on_cpu_only_build_gives_clear_error(monkeypatch):
    monkeypatch.setattr(_ops, "cuda_compiled", lambda: False)
    with pytest.raises(RuntimeError, match="`features` is on cuda:0, but collapse_ext was built without CUDA"):
        _ops.check_backend(_OnCuda(), "features")


def test_unsupported_device_is_named():
    class OnXla:
        is_cpu = False
        device = torch.device("xla", 0)

    with pytest.raises(RuntimeError, match="`labels` is on xla:0; collapse_ext supports cpu and cuda"):
        _ops.check_backend(OnXla(), "labels")


@pytest.mark.skipif(
    os.environ.get("CI") != "true"
    or not torch.version.cuda
    or shutil.which("nvcc", path="/usr/local/cuda/bin") is None,
    reason="CI with a CUDA build of torch and nvcc must have compiled the .cu files",
)
def test_cuda_sources_were_compiled():
    assert collapse_ext.cuda_compiled(), "torch is a CUDA build and nvcc exists, yet the .cu files were not built"


def test_ops_are_registered():
    for name in ("class_stats", "within_scatter"):
        assert hasattr(torch.ops.collapse_ext, name)
