"""What this copy of collapse_ext was built with and what it runs on.

The build facts come from the compiled extension itself (``_C.build_info()``, written in
csrc/ops.cpp from the headers and defines of the build), so they cannot disagree with
the ``_C`` that is loaded; this module adds the facts of the running process.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _C
from ._version import __version__

__all__ = ["build_info"]


def build_info() -> dict[str, Any]:
    """A dict: ``version``; ``torch_built`` / ``torch_running`` (the torch the extension was
    compiled against, ``major.minor.patch`` from its headers, and ``torch.__version__`` of
    the one imported now: the first should be the second without its local suffix);
    ``cuda_compiled``; ``cuda_built`` (CUDA_VERSION of the toolkit compiled against, as
    "13.0"; None for a CPU-only build) and ``cuda_running`` (``torch.version.cuda``);
    ``cuda_arch_list`` (TORCH_CUDA_ARCH_LIST of the build, None without CUDA);
    ``openmp_compiled`` (the CPU kernels were built with OpenMP: their parallel loops use
    ATen's threads; False means they run serially), ``openmp_threads`` (ATen's intra-op
    threads now); ``compiler`` (the C++ compiler's name
    and version)."""
    built = _C.build_info()
    return {
        "version": __version__,
        "torch_built": built["torch_built"],
        "torch_running": torch.__version__,
        "cuda_compiled": built["cuda_compiled"],
        "cuda_built": built["cuda_built"],
        "cuda_running": torch.version.cuda,
        "cuda_arch_list": built["cuda_arch_list"],
        "openmp_compiled": built["openmp_compiled"],
        "openmp_threads": built["openmp_threads"],
        "compiler": built["compiler"],
    }
