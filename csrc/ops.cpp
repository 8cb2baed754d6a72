// Every schema of the collapse_ext operator library, and the pybind11 module `_C`.
// Backends register their kernels in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; the ops
// are reached through torch.ops.collapse_ext, registered when the library is loaded.
// The module itself holds only the facts of this build that a bug report needs. Nothing
// crosses it but Python ints, strings and bools (no tensors, no torch/python.h), so it
// does not depend on the pybind11 internals of the torch it runs with, and it is the only
// file that includes Python headers.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

#ifdef COLLAPSE_EXT_WITH_CUDA
#include <cuda.h>
#endif

namespace py = pybind11;

#define COLLAPSE_STR_(x) #x
#define COLLAPSE_STR(x) COLLAPSE_STR_(x)

namespace {

// setup.py defines COLLAPSE_EXT_WITH_CUDA when it compiles the .cu files, so Python can
// say "built without CUDA" instead of the dispatcher's missing-kernel message.
constexpr bool kCudaCompiled =
#ifdef COLLAPSE_EXT_WITH_CUDA
    true;
#else
    false;
#endif

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " COLLAPSE_STR(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["torch_built"] = COLLAPSE_STR(TORCH_VERSION_MAJOR) "." COLLAPSE_STR(TORCH_VERSION_MINOR) "." COLLAPSE_STR(
      TORCH_VERSION_PATCH);
  info["cuda_compiled"] = kCudaCompiled;
#ifdef COLLAPSE_EXT_WITH_CUDA
  // CUDA_VERSION of the toolkit headers compiled against: 13000 -> "13.0".
  info["cuda_built"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
#else
  info["cuda_built"] = py::none();
#endif
#if defined(COLLAPSE_EXT_WITH_CUDA) && defined(COLLAPSE_EXT_CUDA_ARCH_LIST)
  // setup.py passes TORCH_CUDA_ARCH_LIST with ':' for ';', which a shell would split on.
  std::string archs = COLLAPSE_STR(COLLAPSE_EXT_CUDA_ARCH_LIST);
  std::replace(archs.begin(), archs.end(), ':', ';');
  info["cuda_arch_list"] = archs;
#else
  info["cuda_arch_list"] = py::none();
#endif
  info["openmp_threads"] = at::get_num_threads();
  // at::parallel_for is a header template: without OpenMP in this build it runs serially
  // here whatever torch's thread count.
#ifdef _OPENMP
  info["openmp_compiled"] = true;
#else
  info["openmp_compiled"] = false;
#endif
  info["compiler"] = compiler();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "collapse_ext's compiled extension: the ops (torch.ops.collapse_ext) and the facts of its build.";
  m.def("cuda_compiled", [] { return kCudaCompiled; }, "True when the CUDA kernels were compiled.");
  m.def("build_info", &build_info,
        "What this extension was compiled with and the threads it runs on, as a dict: torch_built "
        "(torch/version.h), cuda_compiled, cuda_built (CUDA_VERSION of the toolkit, None without CUDA), "
        "cuda_arch_list (TORCH_CUDA_ARCH_LIST of the build, None without CUDA), openmp_compiled (whether the "
        "kernels' at::parallel_for runs on threads), openmp_threads "
        "(at::get_num_threads() now) and compiler.");
}

TORCH_LIBRARY(collapse_ext, m) {
  // Streaming sufficient statistics.
  m.def("class_stats(Tensor features, Tensor labels, int num_classes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "within_scatter(Tensor features, Tensor labels, Tensor means, Tensor? basis=None) -> Tensor");
  m.def(
      "class_accumulate(Tensor features, Tensor labels, Tensor counts, Tensor(a!) means, Tensor(b!) pending, "
      "Tensor(c!) sums, Tensor(d!) sqsums, float limit, bool return_centred=True) -> (Tensor, Tensor)");
  m.def(
      "class_fold(Tensor(a!) counts, Tensor(b!) means, Tensor(c!) pending, Tensor(d!) sums, Tensor(e!) sqsums, "
      "Tensor(f!) sqdev) -> ()");

  // Pairwise and nearest-centre metrics.
  m.def(
      "pairwise_stats(Tensor rows, Tensor? variances=None, Tensor? subset=None, float riesz_s=1.0, "
      "float cdnv_p=1.0) -> Tensor");
  m.def(
      "nearest_centre(Tensor features, Tensor labels, Tensor means, Tensor? weight=None, Tensor? bias=None, "
      "Tensor? present=None, bool assignments=False) -> (Tensor, Tensor)");

  // Layer-Peeled Model.
  m.def(
      "lpm_step(Tensor W, Tensor H, Tensor W_prev, Tensor H_prev, Tensor theta, Tensor weights, "
      "Tensor E_W, Tensor E_H, Tensor step, int num_iters, str loss=\"ce\", bool momentum=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
