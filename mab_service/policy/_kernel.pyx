# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython boundary of the Beta kernel.

Each call has three steps: with the GIL, validate the parameters, coerce them to contiguous float64 and
allocate the outputs; then one ``with nogil`` block with one kernel call for all arms; then return the
arrays. RNG state is never shared between threads: a seeded call builds its own state on the stack, an
unseeded call uses its thread's stream (created on first use from OS entropy, and again in a forked child).
"""
import operator
import os
import threading
import warnings

import numpy as np

cimport numpy as cnp
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cnp.import_array()

cdef dict _ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}
cdef dict _ISA_CODES = {name: code for code, name in _ISA_NAMES.items()}
cdef object _MAX_SEED = 2**64

if isa_request() == -2:
    # MAB_KERNEL_ISA (a benchmark and test override, read by the kernel at load) names no instruction set.
    warnings.warn(
        f"MAB_KERNEL_ISA must be sse2, avx2 or avx512; ignored, the kernel uses {_ISA_NAMES[current_isa()]}",
        RuntimeWarning,
    )


cdef class _Stream:
    """One thread's RNG state for unseeded calls."""

    cdef RngState state

    def __cinit__(self):
        cdef uint64_t key[4]
        entropy = os.urandom(sizeof(key))
        memcpy(key, <const char*>entropy, sizeof(key))
        rng_seed(&self.state, key, 4)


cdef object _local = threading.local()


def _new_thread_streams():
    # A forked child must not replay its parent's stream.
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_new_thread_streams)


cdef _Stream _thread_stream():
    cdef _Stream stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _Stream()
        _local.stream = stream
    return stream


cdef int _raise_on_status(int status) except -1:
    # Kernel status codes become Python exceptions here and only here.
    if status == kOk:
        return 0
    if status == kNoMemory:
        raise MemoryError("the Beta kernel could not allocate its scratch space")
    raise RuntimeError(f"the Beta kernel returned unknown status {status}")


cdef inline bint _is_number_type(int typenum) noexcept:
    return (
        cnp.PyTypeNum_ISBOOL(typenum)
        or cnp.PyTypeNum_ISINTEGER(typenum)
        or cnp.PyTypeNum_ISFLOAT(typenum)
        or typenum == cnp.NPY_OBJECT
    )


cdef cnp.ndarray _shape_array(object values, str name):
    cdef cnp.ndarray raw, arr
    try:
        raw = values if cnp.PyArray_Check(values) else np.asarray(values)
        # Numbers only: a cast to float64 would parse strings, drop imaginary parts and turn datetimes into
        # counts of their unit, all without a word. Object arrays go item by item through float().
        if not _is_number_type(cnp.PyArray_TYPE(raw)):
            raise TypeError(f"got dtype {(<object>raw).dtype}")
        arr = np.ascontiguousarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        # OverflowError: an int too large for a double, such as 10**400.
        raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    # Both shapes: ascontiguousarray makes a 0-d array 1-d, and an object array of arrays gains a dimension.
    if raw.ndim != 1 or arr.ndim != 1:
        shape = (<object>raw).shape if raw.ndim != 1 else (<object>arr).shape
        raise ValueError(f"{name} must be one-dimensional (got shape {shape})")
    cdef const double* p = <const double*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = arr.shape[0]
    cdef Py_ssize_t i
    for i in range(n):
        # Written so that NaN fails too: every comparison with NaN is false.
        if not (p[i] > 0.0 and p[i] < INFINITY):
            raise ValueError(f"{name} must be finite and > 0 at index {i} (got {p[i]!r})")
    return arr


cdef tuple _checked_pair(object alpha, object beta):
    cdef cnp.ndarray a = _shape_array(alpha, "alpha")
    cdef cnp.ndarray b = _shape_array(beta, "beta")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"alpha and beta must have the same length (got {a.shape[0]} and {b.shape[0]})")
    return a, b


cdef void _seed_state(RngState* st, object seed) except *:
    if isinstance(seed, bool):
        raise ValueError(f"seed must be an integer in [0, 2**64) (got {seed!r})")
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer in [0, 2**64) (got {seed!r})") from None
    if not 0 <= value < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64) (got {value})")
    cdef uint64_t key = value
    rng_seed(st, &key, 1)


cdef cnp.ndarray _empty(Py_ssize_t n, int typenum):
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, typenum, 0)


cdef cnp.ndarray _checked_out(object out, cnp.ndarray a, cnp.ndarray b):
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy array (got {type(out).__name__})")
    cdef cnp.ndarray arr = <cnp.ndarray>out
    if arr.dtype != np.float64 or arr.ndim != 1 or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError("out must be a writeable, contiguous, one-dimensional float64 array")
    if arr.shape[0] != a.shape[0]:
        raise ValueError(f"out must have the same length as alpha (got {arr.shape[0]} and {a.shape[0]})")
    if np.may_share_memory(arr, a) or np.may_share_memory(arr, b):
        raise ValueError("out must not overlap alpha or beta")
    return arr


def sample_beta(alpha, beta, *, seed=None, out=None):
    cdef cnp.ndarray a, b
    a, b = _checked_pair(alpha, beta)
    cdef size_t n = <size_t>a.shape[0]
    if out is None:
        out = _empty(n, cnp.NPY_FLOAT64)
    else:
        out = _checked_out(out, a, b)
    cdef RngState seeded
    cdef RngState* st
    cdef _Stream stream
    if seed is None:
        stream = _thread_stream()
        st = &stream.state
    else:
        _seed_state(&seeded, seed)
        st = &seeded
    cdef const double* pa = <const double*>cnp.PyArray_DATA(a)
    cdef const double* pb = <const double*>cnp.PyArray_DATA(b)
    cdef double* po = <double*>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef int status
    with nogil:
        status = sample_beta_fill(st, pa, pb, n, po)
    _raise_on_status(status)
    return out


def sample_top_k(alpha, beta, k, *, seed=None):
    cdef cnp.ndarray a, b
    a, b = _checked_pair(alpha, beta)
    cdef Py_ssize_t n = a.shape[0]
    if isinstance(k, bool):
        raise ValueError(f"k must be an integer in [0, {n}] (got {k!r})")
    try:
        k_value = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer in [0, {n}] (got {k!r})") from None
    if not 0 <= k_value <= n:
        raise ValueError(f"k must be an integer in [0, {n}] (got {k_value})")
    cdef Py_ssize_t kk = k_value
    cdef cnp.ndarray samples = _empty(n, cnp.NPY_FLOAT64)
    cdef cnp.ndarray indices = _empty(kk, cnp.NPY_INT64)
    cdef cnp.ndarray scores = _empty(kk, cnp.NPY_FLOAT64)
    cdef RngState seeded
    cdef RngState* st
    cdef _Stream stream
    if seed is None:
        stream = _thread_stream()
        st = &stream.state
    else:
        _seed_state(&seeded, seed)
        st = &seeded
    cdef const double* pa = <const double*>cnp.PyArray_DATA(a)
    cdef const double* pb = <const double*>cnp.PyArray_DATA(b)
    cdef double* ps = <double*>cnp.PyArray_DATA(samples)
    cdef int64_t* pi = <int64_t*>cnp.PyArray_DATA(indices)
    cdef double* pk = <double*>cnp.PyArray_DATA(scores)
    cdef int status
    cdef Py_ssize_t i
    with nogil:
        status = sample_beta_fill(st, pa, pb, <size_t>n, ps)
        if status == kOk:
            status = top_k_indices(ps, <size_t>n, <size_t>kk, pi)
        if status == kOk:
            for i in range(kk):
                pk[i] = ps[pi[i]]
    _raise_on_status(status)
    return indices, scores


def isa():
    """The instruction set the kernel runs on: ``"avx512"``, ``"avx2"`` or ``"baseline"``."""
    return _ISA_NAMES[current_isa()]


def best_isa_name():
    """The best instruction set this CPU supports."""
    return _ISA_NAMES[best_isa()]


def use_isa(name):
    """Choose the instruction set (capped at what the CPU supports); returns the one now in use."""
    if name not in _ISA_CODES:
        raise ValueError(f"isa must be one of {sorted(_ISA_CODES)} (got {name!r})")
    return _ISA_NAMES[set_isa(_ISA_CODES[name])]
