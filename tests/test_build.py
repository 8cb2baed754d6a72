import os
import re
import shutil
import types

import pytest
import torch

import collapse_ext
from collapse_ext import _C, _ops

BUILD_KEYS = {
    "torch_built",
    "cuda_compiled",
    "cuda_built",
    "cuda_arch_list",
    "openmp_compiled",
    "openmp_threads",
    "compiler",
}


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


def test_c_is_a_pybind11_module_with_the_build_facts():
    # pybind11 functions are builtins whose docstring starts with the signature pybind11 writes.
    for fn, signature in ((_C.build_info, "build_info() -> dict"), (_C.cuda_compiled, "cuda_compiled() -> bool")):
        assert isinstance(fn, types.BuiltinFunctionType)
        assert fn.__module__ == "collapse_ext._C"
        assert fn.__doc__.startswith(signature)


def test_c_build_info_keys_and_values():
    info = _C.build_info()
    assert isinstance(info, dict) and set(info) == BUILD_KEYS
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["torch_built"])
    assert info["cuda_compiled"] is _C.cuda_compiled()
    assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] == torch.get_num_threads()
    assert isinstance(info["compiler"], str) and re.match(r"(gcc|clang|msvc) \S", info["compiler"])
    if info["cuda_compiled"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_built"])
        archs = info["cuda_arch_list"]
        assert archs is None or re.fullmatch(r"[0-9A-Za-z.+]+(;[0-9A-Za-z.+]+)*", archs)
    else:
        assert info["cuda_built"] is None and info["cuda_arch_list"] is None


def test_openmp_threads_is_read_when_asked():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.build_info()["openmp_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_python_build_info_extends_the_compiled_one():
    info = collapse_ext.build_info()
    compiled = _C.build_info()
    assert {k: info[k] for k in BUILD_KEYS} == compiled
    assert info["version"] == collapse_ext.__version__
    assert info["torch_running"] == torch.__version__
    assert info["cuda_running"] == torch.version.cuda
    assert collapse_ext.cuda_compiled() is compiled["cuda_compiled"]


def test_importing_c_registers_the_ops():
    # TORCH_LIBRARY registers at load time, alongside the pybind11 module init.
    for name in ("class_stats", "within_scatter", "class_accumulate", "pairwise_stats", "nearest_centre", "lpm_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"collapse_ext::{name}", "CPU")
