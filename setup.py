"""Build collapse_ext._C: C++ CPU kernels always, CUDA kernels when possible.

CUDA objects are built whenever torch is a CUDA build and nvcc is found, GPU or not
(FORCE_CUDA=1 forces them, USE_CUDA=0 skips them). TORCH_CUDA_ARCH_LIST overrides the
default targets, Ampere (8.0, which also runs on 8.6/8.9) and Hopper (9.0, with PTX).

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension must be
compiled against the torch that will import it, not one pip fetches into an isolated build
environment. The facts of the build that ``collapse_ext.build_info()`` reports (torch and
CUDA versions, arch list, compiler) are compiled into ``_C`` (csrc/ops.cpp); the arch list
reaches it as a define. Editable builds keep their objects in ``build/editable`` so that
reinstalling recompiles only changed sources.
"""

import glob
import importlib.util
import os
import re
import sys

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


def read_version():
    with open(os.path.join(HERE, "collapse_ext", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def arch_list_define():
    """TORCH_CUDA_ARCH_LIST as a -D for csrc/ops.cpp, ';' written ':' (the compile command
    goes through a shell); None when the list holds anything but arch names."""
    archs = re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    if not archs or not all(re.fullmatch(r"[0-9A-Za-z.+]+", a) for a in archs):
        return None
    return "-DCOLLAPSE_EXT_CUDA_ARCH_LIST=" + ":".join(archs)


class BuildExt(BuildExtension):
    """torch's BuildExtension with a persistent object directory for editable installs
    (pip gives them a fresh temporary one)."""

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(HERE, "build", "editable")


def openmp_flags():
    """-fopenmp where torch runs on OpenMP (GCC/Clang on Linux). ATen's at::parallel_for is a
    header template: compiled without OpenMP it runs serially in the extension, whatever
    torch.get_num_threads() says. The extension then uses torch's libgomp (same soname,
    already loaded)."""
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def extension():
    cpp = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No errno from libm: sqrt can then be vectorised (pairwise_stats' lane loop); nothing
    # reads errno.
    cxx = ["-O3", "-fno-math-errno"] + openmp_flags()
    link = openmp_flags()
    if not want_cuda():
        return CppExtension("collapse_ext._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cxx.append("-DCOLLAPSE_EXT_WITH_CUDA")
    archs = arch_list_define()
    if archs:
        cxx.append(archs)
    nvcc = ["-O3", "-DCOLLAPSE_EXT_WITH_CUDA", "-lineinfo"]
    return CUDAExtension(
        "collapse_ext._C",
        cpp + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(HERE, "csrc")] + pip_cuda_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    name="collapse_ext",
    version=read_version(),
    description="Fused neural-collapse statistics, metrics and the Layer-Peeled Model for PyTorch",
    packages=find_packages(include=["collapse_ext", "collapse_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"plot": ["matplotlib"], "data": ["scikit-learn"]},
    entry_points={"console_scripts": ["collapse-ext=collapse_ext.cli:main"]},
)
