// lemon_ext._C: native kernels of the lemon_ext op namespace. Schemas live in Python
// (lemon_ext/ops/_schema.py, torch.library) so the API imports without this module.
#include <Python.h>

extern "C" {
// A module with no Python-level functions: importing it registers the kernels through static
// initialisers (TORCH_LIBRARY_IMPL in the other translation units).
static struct PyModuleDef lemon_ext_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lemon_ext_module); }
}
