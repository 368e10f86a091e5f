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
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint32_t

from mab_service._cyutil cimport (
    STACK_IDS, empty, free_scratch, id_view, id_views, list_item, list_size, parameters, positive, scratch,
)

from mab_service.ids import MAX_ID_BYTES, id_message, id_problem

cnp.import_array()

# Read once: the per-id check runs in C++ against this number.
cdef size_t _max_id_bytes = MAX_ID_BYTES


cdef extern from "Python.h":
    # Borrowed-pointer forms, so unique() builds its list with no reference counting beyond the one it keeps.
    void list_set_item "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject* item)
    object list_new "PyList_New"(Py_ssize_t n)
    void incref "Py_INCREF"(PyObject* o)


cdef int _raise_on_status(int status) except -1:
    # Status codes become Python exceptions here and only here.
    if status == kIdOk:
        return 0
    if status == kIdNoMemory:
        raise MemoryError("the id table could not allocate memory")
    if status == kIdTooMany:
        raise ValueError(f"at most {kMaxIds} ids and 4 GiB of id bytes are supported")
    raise RuntimeError(f"the id table returned unknown status {status}")


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
        cdef cnp.ndarray a = parameters(alpha, "alpha", "row")
        cdef cnp.ndarray b = parameters(beta, "beta", "row")
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
        if not id_view(<PyObject*>id, &ref, None, -1):
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
        if not id_view(<PyObject*>id, &ref, None, -1) or find_row(self.table, ref, &a, &b) < 0:
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
        cdef double pa = positive(prior_alpha, "prior_alpha")
        cdef double pb = positive(prior_beta, "prior_beta")
        cdef Py_ssize_t n = list_size(ids)
        cdef cnp.ndarray alpha = empty(n, cnp.NPY_FLOAT64)
        cdef cnp.ndarray beta = empty(n, cnp.NPY_FLOAT64)
        cdef IdRef on_stack[STACK_IDS]
        cdef IdRef* refs = <IdRef*>scratch(on_stack, n, sizeof(IdRef))
        cdef size_t known = 0
        try:
            id_views(ids, n, refs, "candidates")
            _raise_on_status(gather_params_fill(
                self.table, refs, <size_t>n, pa, pb,
                <double*>cnp.PyArray_DATA(alpha), <double*>cnp.PyArray_DATA(beta), &known))
        finally:
            free_scratch(refs, on_stack)
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
    cdef IdRef* refs = <IdRef*>scratch(refs_on_stack, n, sizeof(IdRef))
    cdef uint32_t* keep = NULL
    cdef size_t kept = 0, bad
    cdef Py_ssize_t j
    cdef PyObject* item
    cdef list out
    try:
        keep = <uint32_t*>scratch(keep_on_stack, n, sizeof(uint32_t))
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
        free_scratch(refs, refs_on_stack)
        free_scratch(keep, keep_on_stack)


def _hash(id):
    """The seeded hash of one id (tests check that it differs between processes)."""
    cdef IdRef ref
    if not id_view(<PyObject*>id, &ref, None, -1):
        raise TypeError(f"id must be an encodable str (got {type(id).__name__})")
    return hash_id(ref)
