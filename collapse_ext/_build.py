"""What this copy of collapse_ext was built with and what it runs on.

setup.py writes ``_build_config.py`` beside this file when it builds ``_C`` (torch and
CUDA versions, arch list, compiler); a copy without it (a checkout built some other way)
reports those build fields as None.
"""

from __future__ import annotations

from typing import Any

import torch

from ._ops import cuda_compiled
from ._version import __version__

__all__ = ["build_info"]


def _recorded() -> dict[str, Any]:
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:
        return {}
    return dict(BUILD_CONFIG)


def build_info() -> dict[str, Any]:
    """A dict: ``version``; ``torch_built`` / ``torch_running`` (the torch the extension was
    compiled against, and the one imported now: they should agree); ``cuda_compiled``;
    ``cuda_built`` (nvcc's CUDA release, None for a CPU-only build) and ``cuda_running``
    (``torch.version.cuda``); ``cuda_arch_list`` (TORCH_CUDA_ARCH_LIST of the build);
    ``openmp_threads`` (``torch.get_num_threads()`` now); ``compiler`` (first line of the
    C++ compiler's ``--version``); ``build_config`` ("recorded" or "missing")."""
    recorded = _recorded()
    compiled = cuda_compiled()
    return {
        "version": __version__,
        "torch_built": recorded.get("torch"),
        "torch_running": torch.__version__,
        "cuda_compiled": compiled,
        "cuda_built": recorded.get("cuda") if compiled else None,
        "cuda_running": torch.version.cuda,
        "cuda_arch_list": recorded.get("cuda_arch_list") if compiled else None,
        "openmp_threads": torch.get_num_threads(),
        "compiler": recorded.get("compiler"),
        "build_config": "recorded" if recorded else "missing",
    }
