// Python entry point of mildnet._C, compiled only by setup.py. Importing the module loads this shared library,
// whose static initialisers (TORCH_LIBRARY in the kernel sources) register the mildnet ops with the dispatcher.
// The kernels themselves never see Python.
#include <Python.h>

static PyModuleDef mildnet_module = {PyModuleDef_HEAD_INIT, "_C", "mildnet fused kernels (ops live in torch.ops.mildnet)",
                                     -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mildnet_module); }
