# The module exports only cdef functions (see _cyutil.pxd); nothing is visible from Python.
