// Makes the operator library importable as the Python module fastspike._C:
// importing it loads the shared library, whose static TORCH_LIBRARY
// registrations define the fastspike:: operators. There is nothing else in
// the module; the Python API lives in fastspike/ops.py. Only setup.py and the
// JIT build compile this file; CMake builds a plain library for C++ users.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
