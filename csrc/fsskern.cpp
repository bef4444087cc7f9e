// The fsskern operator library. Each op declares its schema in its own ops/<op>.cpp with
// TORCH_LIBRARY_FRAGMENT; this file opens the namespace, answers what the build contains, and
// gives Python a module to import (importing fsskern._C runs every registration).
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef FSSKERN_WITH_CUDA
#define FSSKERN_WITH_CUDA 0
#endif

namespace fsskern {

std::string build_info() {
  std::string info = "cuda=" + std::to_string(FSSKERN_WITH_CUDA);
  info += ";cpu_dispatch=";
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  info += "x86-64-v4,x86-64-v3,default";
#else
  info += "default";
#endif
  info += ";compiler=" __VERSION__;
  return info;
}

TORCH_LIBRARY(fsskern, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace fsskern

extern "C" {
// A module with no methods: importing it loads the library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
