// examples/torch/csrc/module.cpp: the Python module kvq_torch._C. Its import registers the ops
// (TORCH_LIBRARY_FRAGMENT in dense_ops.cu and paged_ops.cu); it has no functions of its own.
#include <Python.h>

static PyModuleDef kvq_torch_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kvq_torch_module); }
