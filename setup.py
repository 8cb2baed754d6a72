"""Build collapse_ext._C: C++ CPU kernels always, CUDA kernels when possible.

CUDA objects are built whenever torch is a CUDA build and nvcc is found, GPU or not
(FORCE_CUDA=1 forces them, USE_CUDA=0 skips them). TORCH_CUDA_ARCH_LIST overrides the
default targets, Ampere (8.0, which also runs on 8.6/8.9) and Hopper (9.0, with PTX).
"""

import glob
import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("USE_CUDA") == "0":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def pip_cuda_includes():
    """Headers of the pip CUDA packages (cuBLAS, cuSPARSE) that torch's wheel depends on."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
    return found


def extension():
    cpp = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    if not want_cuda():
        return CppExtension("collapse_ext._C", cpp, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cxx.append("-DCOLLAPSE_EXT_WITH_CUDA")
    nvcc = ["-O3", "-DCOLLAPSE_EXT_WITH_CUDA", "-lineinfo"]
    return CUDAExtension(
        "collapse_ext._C",
        cpp + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(HERE, "csrc")] + pip_cuda_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    name="collapse_ext",
    version="0.1.0",
    description="Fused neural-collapse statistics, metrics and the Layer-Peeled Model for PyTorch",
    packages=find_packages(include=["collapse_ext", "collapse_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"plot": ["matplotlib"], "data": ["scikit-learn"]},
    entry_points={"console_scripts": ["collapse-ext=collapse_ext.cli:main"]},
)
