# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The cold halves of the helpers every Cython boundary shares (_cyutil.pxd holds the inline ones).

Errors are raised here, out of the inline per-id code, so that each module's loops stay small; their wording is
the one the modules used before they shared it, names and all (``candidates[3]``, ``ids[0]``, ``alpha0``).
"""
import numpy as np

cimport numpy as cnp
from cpython.exc cimport PyErr_Clear

cnp.import_array()


cdef str _where(str name, Py_ssize_t i):
    return f"{name}[{i}]" if i >= 0 else name


cdef int not_a_str(str name, Py_ssize_t i, PyObject* item) except -1:
    raise TypeError(f"{_where(name, i)} must be a string (got {type(<object>item).__name__})")


cdef int not_utf8(str name, Py_ssize_t i) except -1:
    # Called with the UnicodeEncodeError of PyUnicode_AsUTF8AndSize set: it becomes ours.
    PyErr_Clear()
    raise ValueError(f"{_where(name, i)} is not valid Unicode (it holds a lone surrogate)")


cdef int not_positive(double x, str name) except -1:
    raise ValueError(f"{name} must be finite and > 0 (got {x!r})")


cdef cnp.ndarray parameters(object values, str name, str unit):
    """A C-contiguous float64 copy of ``values`` (one the caller cannot change while a table is built without the
    GIL), every item finite and > 0; ValueError naming ``name`` and the first bad ``unit`` ("row", "index")."""
    cdef cnp.ndarray arr
    try:
        arr = np.array(values, dtype=np.float64, order="C")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (got shape {(<object>arr).shape})")
    cdef const double* p = <const double*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t i
    for i in range(arr.shape[0]):
        if not beta_ok(p[i]):
            raise ValueError(f"{name} must be finite and > 0 at {unit} {i} (got {p[i]!r})")
    return arr
