// Every schema of the collapse_ext operator library, and the Python module init.
// Backends register their kernels in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu.
#include <Python.h>
#include <torch/library.h>

namespace {

// setup.py defines COLLAPSE_EXT_WITH_CUDA when it compiles the .cu files, so Python can
// say "built without CUDA" instead of the dispatcher's missing-kernel message.
PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef COLLAPSE_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "True when the CUDA kernels were compiled."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(collapse_ext, m) {
  // Streaming sufficient statistics.
  m.def("class_stats(Tensor features, Tensor labels, int num_classes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "within_scatter(Tensor features, Tensor labels, Tensor means, Tensor? basis=None) -> Tensor");
  m.def(
      "class_accumulate(Tensor features, Tensor labels, Tensor counts, Tensor(a!) means, Tensor(b!) pending, "
      "Tensor(c!) sums, Tensor(d!) sqsums, float limit) -> (Tensor, Tensor)");

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
