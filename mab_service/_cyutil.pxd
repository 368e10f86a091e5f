# What every Cython boundary shares, defined once: views of ids' UTF-8 bytes, scratch on the stack or the heap,
# and the checks of Beta parameters. The per-id and per-request helpers are `cdef inline` here, so that each
# module compiles them into its own loops (no call through a pointer per id); the cold ones (raising, copying
# arrays) live in _cyutil.pyx and are called through the module's C API.
cimport numpy as cnp
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.math cimport INFINITY


cdef extern from "mab/id_index.hpp" namespace "mab" nogil:
    # A borrowed view of one id's UTF-8 bytes, as every C++ table takes it.
    ctypedef struct IdRef:
        const char* data
        size_t size


cdef extern from "Python.h":
    # Borrowed-pointer forms, so the per-id loops do no reference counting.
    Py_ssize_t list_size "PyList_GET_SIZE"(object lst)
    PyObject* list_item "PyList_GET_ITEM"(object lst, Py_ssize_t i)
    bint is_str "PyUnicode_Check"(PyObject* o)
    const char* utf8_and_size "PyUnicode_AsUTF8AndSize"(PyObject* o, Py_ssize_t* size)


cdef extern from *:
    """
    /* What PyUnicode_AsUTF8AndSize does first, inlined: a compact ASCII str (every id orjson makes from an
       ASCII string) keeps its bytes right after its header, so they are its UTF-8. NULL for any other str. */
    static inline const char* mab_ascii_bytes(PyObject* o, Py_ssize_t* size) {
        if (!PyUnicode_IS_COMPACT_ASCII(o)) return NULL;
        *size = PyUnicode_GET_LENGTH(o);
        return (const char*)PyUnicode_DATA(o);
    }
    """
    const char* ascii_bytes "mab_ascii_bytes"(PyObject* o, Py_ssize_t* size)


cdef enum:
    # Requests of up to this many ids take their scratch arrays from the caller's stack; larger ones allocate.
    STACK_IDS = 512


# Cold paths, defined in _cyutil.pyx.
cdef int not_a_str(str name, Py_ssize_t i, PyObject* item) except -1
cdef int not_utf8(str name, Py_ssize_t i) except -1
cdef int not_positive(double x, str name) except -1
cdef cnp.ndarray parameters(object values, str name, str unit)


cdef inline bint beta_ok(double x) noexcept nogil:
    # A valid Beta parameter: finite and > 0. NaN fails both comparisons. Bitwise &, so that loops over arrays
    # have no branch per element and can be vectorised.
    return (x > 0.0) & (x < INFINITY)


cdef inline int id_view(PyObject* item, IdRef* ref, str name, Py_ssize_t i) except -1:
    """Fill ref with the UTF-8 bytes of item, borrowed from the str (a compact ASCII str holds them already, any
    other caches them on first use). Returns 1.

    A non-str or a str holding a lone surrogate (no UTF-8 form) raises TypeError/ValueError naming ``name[i]``
    (``name`` alone when i < 0); with name None it returns 0 instead, for lookups that simply find nothing.
    """
    cdef Py_ssize_t size
    cdef const char* data
    if not is_str(item):
        if name is None:
            return 0
        not_a_str(name, i, item)
    data = ascii_bytes(item, &size)
    if data == NULL:
        data = utf8_and_size(item, &size)
        if data == NULL:
            # Only a lone surrogate makes a str unencodable (orjson never produces one); other errors, such as
            # MemoryError, propagate as they are.
            if not PyErr_ExceptionMatches(UnicodeEncodeError):
                return -1
            if name is None:
                PyErr_Clear()
                return 0
            not_utf8(name, i)
    ref.data = data
    ref.size = <size_t>size
    return 1


cdef inline int id_views(list ids, Py_ssize_t n, IdRef* refs, str name) except -1:
    """Fill refs[i] with the UTF-8 bytes of ids[i], raising errors that name ``name[i]``. Unless it raises, no
    Python code runs here, so the list cannot change while the views are taken."""
    cdef Py_ssize_t i
    for i in range(n):
        id_view(list_item(ids, i), &refs[i], name, i)
    return 0


cdef inline void* scratch(void* on_stack, Py_ssize_t n, size_t item_bytes) except NULL:
    """on_stack (an array of STACK_IDS items) if n items fit in it, else n items from the heap: free the result
    with free_scratch."""
    if n <= STACK_IDS:
        return on_stack
    cdef void* p = PyMem_Malloc(<size_t>n * item_bytes)
    if p == NULL:
        raise MemoryError()
    return p


cdef inline void free_scratch(void* p, void* on_stack) noexcept:
    # NULL (scratch not taken yet) and the stack array are left alone.
    if p != NULL and p != on_stack:
        PyMem_Free(p)


cdef inline double positive(object value, str name) except? -1.0:
    """value as a double, if it is finite and > 0 (a prior, say); ValueError naming ``name`` otherwise."""
    cdef double x = value
    if not beta_ok(x):
        not_positive(x, name)
    return x


cdef inline cnp.ndarray empty(Py_ssize_t n, int typenum):
    """A new one-dimensional array of n items of ``typenum``, uninitialised."""
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, typenum, 0)
