// The Python entry point of fsskern._C: a module with no methods. Importing it loads the
// library, which runs every TORCH_LIBRARY registration. (Not part of the CMake/libtorch build.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
