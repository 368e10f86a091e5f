# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython boundary of the id table (csrc/mab/id_index.hpp).

Each request call has three steps: with the GIL, check the list and turn every str into a view of its UTF-8
bytes (no copy: a compact ASCII str holds them already, any other str caches them on first use); then one
C++ call for all ids; then wrap the result. Request calls keep the GIL: the work is a few microseconds, and
the views borrow from list items that another thread could free if the GIL were released. Building a table
copies its inputs first, so that it can release the GIL for the long part.
"""
import numpy as np

cimport numpy as cnp
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint32_t

from mab_service.ids import MAX_ID_BYTES, id_message, id_problem

cnp.import_array()

# Read once: the per-id check runs in C++ against this number.
cdef size_t _max_id_bytes = MAX_ID_BYTES


cdef extern from "Python.h":
    # Borrowed-pointer forms, so the per-id loop does no reference counting.
    Py_ssize_t list_size "PyList_GET_SIZE"(object lst)
    PyObject* list_item "PyList_GET_ITEM"(object lst, Py_ssize_t i)
    void list_set_item "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject* item)
    object list_new "PyList_New"(Py_ssize_t n)
    void incref "Py_INCREF"(PyObject* o)
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
    # Requests of up to this many ids use scratch on the stack (20 bytes per id); larger ones allocate it.
    STACK_IDS = 512


cdef int _raise_on_status(int status) except -1:
    # Status codes become Python exceptions here and only here.
    if status == kIdOk:
        return 0
    if status == kIdNoMemory:
        raise MemoryError("the id table could not allocate memory")
    if status == kIdTooMany:
        raise ValueError(f"at most {kMaxIds} ids and 4 GiB of id bytes are supported")
    raise RuntimeError(f"the id table returned unknown status {status}")


cdef int _not_a_str(str name, Py_ssize_t i, PyObject* item) except -1:
    raise TypeError(f"{name}[{i}] must be a string (got {type(<object>item).__name__})")


cdef int _not_utf8(str name, Py_ssize_t i) except -1:
    # Only a lone surrogate makes a str unencodable (orjson never produces one); other errors, such as
    # MemoryError, propagate as they are.
    if PyErr_ExceptionMatches(UnicodeEncodeError):
        PyErr_Clear()
        raise ValueError(f"{name}[{i}] is not valid Unicode (it holds a lone surrogate)")
    return -1


cdef int id_views(list ids, Py_ssize_t n, IdRef* refs, str name) except -1:
    """Fill refs[i] with the UTF-8 bytes of ids[i]. Unless it raises, no Python code runs here, so the list
    cannot change while the views are taken."""
    cdef Py_ssize_t i, size
    cdef PyObject* item
    cdef const char* data
    for i in range(n):
        item = list_item(ids, i)
        if not is_str(item):
            _not_a_str(name, i, item)
        data = ascii_bytes(item, &size)
        if data == NULL:
            data = utf8_and_size(item, &size)
            if data == NULL:
                _not_utf8(name, i)
        refs[i].data = data
        refs[i].size = <size_t>size
    return 0


cdef int _view(object id, IdRef* ref) except -1:
    """One id's bytes; 0 if it is not a str or not encodable (so no table can hold it), else 1."""
    cdef Py_ssize_t size
    cdef const char* data
    if not isinstance(id, str):
        return 0
    data = utf8_and_size(<PyObject*>id, &size)
    if data == NULL:
        if PyErr_ExceptionMatches(UnicodeEncodeError):
            PyErr_Clear()
            return 0
        return -1
    ref.data = data
    ref.size = <size_t>size
    return 1


cdef void* _scratch(void* on_stack, Py_ssize_t n, size_t item_bytes) except NULL:
    if n <= STACK_IDS:
        return on_stack
    cdef void* p = PyMem_Malloc(<size_t>n * item_bytes)
    if p == NULL:
        raise MemoryError()
    return p


cdef cnp.ndarray _parameters(object values, str name):
    cdef cnp.ndarray arr
    try:
        # A copy the caller cannot change while the table is built without the GIL.
        arr = np.array(values, dtype=np.float64, order="C")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (got shape {(<object>arr).shape})")
    cdef const double* p = <const double*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t i
    for i in range(arr.shape[0]):
        # Written so that NaN fails too: every comparison with NaN is false.
        if not (p[i] > 0.0 and p[i] < INFINITY):
            raise ValueError(f"{name} must be finite and > 0 at row {i} (got {p[i]!r})")
    return arr


cdef double _prior(object value, str name) except? -1.0:
    cdef double x = value
    if not (x > 0.0 and x < INFINITY):
        raise ValueError(f"{name} must be finite and > 0 (got {x!r})")
    return x


cdef cnp.ndarray _empty(Py_ssize_t n):
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, cnp.NPY_FLOAT64, 0)


cdef class IdIndex:
    """An immutable map from entity id to its Beta parameters (alpha, beta), held in C++.

    Args:
        ids: Distinct ids, one per row.
        alpha: Positive finite numbers, one per id.
        beta: Positive finite numbers, one per id.

    Raises:
        TypeError: If ``ids`` is not iterable or an id is not a str.
        ValueError: If an id occurs twice, the lengths differ, or a parameter is not finite and > 0.
    """

    def __cinit__(self, *args, **kwargs):
        # Start as an empty table so that no method ever sees NULL, even if __init__ fails or is skipped.
        cdef size_t unused
        _raise_on_status(build_id_table(NULL, NULL, NULL, 0, &self.table, &unused, &unused))

    def __dealloc__(self):
        destroy_id_table(self.table)

    def __init__(self, ids, alpha, beta):
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a sequence of str (got {type(ids).__name__})")
        # Our own list: nobody else can drop its items while the table is built without the GIL.
        cdef list own = list(ids)
        cdef Py_ssize_t n = len(own)
        cdef cnp.ndarray a = _parameters(alpha, "alpha")
        cdef cnp.ndarray b = _parameters(beta, "beta")
        if a.shape[0] != n or b.shape[0] != n:
            raise ValueError(
                f"ids, alpha and beta must have the same length (got {n}, {a.shape[0]} and {b.shape[0]})"
            )
        cdef IdRef* refs = <IdRef*>PyMem_Malloc(<size_t>max(n, 1) * sizeof(IdRef))
        if refs == NULL:
            raise MemoryError()
        cdef IdTable* table = NULL
        cdef size_t first = 0, second = 0
        cdef int status = kIdOk
        cdef const double* pa = <const double*>cnp.PyArray_DATA(a)
        cdef const double* pb = <const double*>cnp.PyArray_DATA(b)
        try:
            id_views(own, n, refs, "ids")
            with nogil:
                status = build_id_table(refs, pa, pb, <size_t>n, &table, &first, &second)
        finally:
            PyMem_Free(refs)
        if status == kIdDuplicate:
            raise ValueError(f"duplicate id {own[second]!r} at positions {first} and {second}")
        _raise_on_status(status)
        destroy_id_table(self.table)
        self.table = table

    def __len__(self):
        return id_table_size(self.table)

    def __contains__(self, id):
        cdef IdRef ref
        cdef double a, b
        if not _view(id, &ref):
            return False
        return find_row(self.table, ref, &a, &b) >= 0

    def __repr__(self):
        return f"IdIndex(<{id_table_size(self.table)} ids>)"

    def get(self, id):
        """The parameters ``(alpha, beta)`` of one id, or None if the index does not hold it.

        Raises:
            TypeError: If ``id`` is not a str.
        """
        cdef IdRef ref
        cdef double a, b
        if not isinstance(id, str):
            raise TypeError(f"id must be a string (got {type(id).__name__})")
        if not _view(id, &ref) or find_row(self.table, ref, &a, &b) < 0:
            return None
        return (a, b)

    def gather(self, ids, prior_alpha, prior_beta):
        """The parameters of every id, with the prior for ids the index does not hold.

        Args:
            ids: Candidate ids; duplicates are looked up each time.
            prior_alpha: Finite and > 0.
            prior_beta: Finite and > 0.

        Returns:
            ``(alpha, beta, known)``: float64 arrays aligned with ``ids``, and how many ids were found.

        Raises:
            TypeError: If ``ids`` is not a list or an item is not a str.
            ValueError: If a prior is not finite and > 0, or an id holds a lone surrogate.
        """
        if not isinstance(ids, list):
            raise TypeError(f"ids must be a list (got {type(ids).__name__})")
        cdef double pa = _prior(prior_alpha, "prior_alpha")
        cdef double pb = _prior(prior_beta, "prior_beta")
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray alpha = _empty(n)
        cdef cnp.ndarray beta = _empty(n)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>_scratch(on_stack, n, sizeof(IdRef))
        cdef size_t known = 0
        try:
            id_views(ids, n, refs, "candidates")
            _raise_on_status(gather_params_fill(
                self.table, refs, <size_t>n, pa, pb,
                <double*>cnp.PyArray_DATA(alpha), <double*>cnp.PyArray_DATA(beta), &known))
        finally:
            if refs != on_stack:
                PyMem_Free(refs)
        return alpha, beta, known

    @property
    def memory_bytes(self):
        """Bytes held by the C++ table: hash slots, (alpha, beta) pairs and the id arena."""
        return id_table_memory_bytes(self.table)


def unique(ids):
    """The distinct ids in order of first occurrence; ``ids`` itself (no copy) when there are no duplicates.

    Every id must keep the id rule (``mab_service.ids``), checked in the same C++ pass over the bytes.

    Raises:
        TypeError: If ``ids`` is not a list or an item is not a str.
        ValueError: If an id breaks the id rule ("candidates[3] must be 1 to 1024 bytes ... (got 2000 bytes)") or
            holds a lone surrogate.
    """
    if not isinstance(ids, list):
        raise TypeError(f"ids must be a list (got {type(ids).__name__})")
    cdef Py_ssize_t n = list_size(ids)
    cdef IdRef refs_on_stack[STACK_IDS]
    cdef uint32_t keep_on_stack[STACK_IDS]
    cdef IdRef* refs = <IdRef*>_scratch(refs_on_stack, n, sizeof(IdRef))
    cdef uint32_t* keep = NULL
    cdef size_t kept = 0, bad
    cdef Py_ssize_t j
    cdef PyObject* item
    cdef list out
    try:
        keep = <uint32_t*>_scratch(keep_on_stack, n, sizeof(uint32_t))
        id_views(ids, n, refs, "candidates")
        bad = first_bad_id(refs, <size_t>n, _max_id_bytes)
        if bad < <size_t>n:
            # Rare, so the wording is left to Python: the id's own problem, in the rule's words.
            raise ValueError(id_message(f"candidates[{bad}]", id_problem(ids[bad])))
        _raise_on_status(unique_indices_fill(refs, <size_t>n, keep, &kept))
        if kept == <size_t>n:
            return ids
        out = list_new(<Py_ssize_t>kept)
        # Creating a list may run the garbage collector, and so a finaliser that shrinks ids.
        if list_size(ids) != n:
            raise RuntimeError("ids changed while unique() ran")
        for j in range(<Py_ssize_t>kept):
            item = list_item(ids, keep[j])
            incref(item)
            list_set_item(out, j, item)
        return out
    finally:
        if refs != refs_on_stack:
            PyMem_Free(refs)
        if keep != NULL and keep != keep_on_stack:
            PyMem_Free(keep)


def _hash(id):
    """The seeded hash of one id (tests check that it differs between processes)."""
    cdef IdRef ref
    if not _view(id, &ref):
        raise TypeError(f"id must be an encodable str (got {type(id).__name__})")
    return hash_id(ref)
