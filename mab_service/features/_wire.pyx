# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Decoding of Feature Store 2.0's batched answers straight from their wire bytes.

A ``StreamingFetchFeatureValuesResponse`` carries up to 100 keys, each with a list of (name, value) pairs.
Through the protobuf runtime every key costs a few microseconds of Python attribute access (five nested
messages per key); here one pass over the bytes pulls out, per key, the two features a mapping needs, into
arrays. The layout read (field numbers from google/cloud/aiplatform/v1beta1/feature_online_store_service.proto
and featurestore_online_service.proto; anything else is skipped by its wire type):

    StreamingFetchFeatureValuesResponse: 1 status {1 code, 2 message}, 2 data (repeated), 3 data_keys_with_error
    data (FetchFeatureValuesResponse): 3 key_values {1 features (repeated) {1 name, 2 value}}, 4 data_key {1 key}
    value (FeatureValue): 2 double_value (fixed64), 5 int64_value (varint)

Every call keeps the GIL (it builds str objects); it reads only the bytes object it is given. ``encode_request``
writes the requests the same way, and ``take_positions`` matches answered keys to the positions of a read.
"""
import numpy as np

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy

cnp.import_array()

#: ``present`` bits: which of the two features a key's answer holds.
FIRST = 1
SECOND = 2

cdef enum:
    VARINT = 0
    FIXED64 = 1
    LEN = 2
    FIXED32 = 5


cdef inline int _varint(const uint8_t* buf, Py_ssize_t* pos, Py_ssize_t end, uint64_t* out) except -1:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while True:
        if pos[0] >= end or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = buf[pos[0]]
        pos[0] += 1
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = value
            return 0
        shift += 7


cdef inline int _field(const uint8_t* buf, Py_ssize_t* pos, Py_ssize_t end, uint64_t* number, int* wire) except -1:
    cdef uint64_t tag
    _varint(buf, pos, end, &tag)
    number[0] = tag >> 3
    wire[0] = <int>(tag & 7)
    return 0


cdef inline int _length(const uint8_t* buf, Py_ssize_t* pos, Py_ssize_t end, Py_ssize_t* stop) except -1:
    """Read a length prefix; ``stop`` is where the length-delimited payload ends."""
    cdef uint64_t n
    _varint(buf, pos, end, &n)
    if n > <uint64_t>(end - pos[0]):
        raise ValueError("a length past the end of the message")
    stop[0] = pos[0] + <Py_ssize_t>n
    return 0


cdef inline int _skip(const uint8_t* buf, Py_ssize_t* pos, Py_ssize_t end, int wire) except -1:
    cdef uint64_t ignored
    cdef Py_ssize_t stop
    if wire == VARINT:
        _varint(buf, pos, end, &ignored)
    elif wire == FIXED64:
        if end - pos[0] < 8:
            raise ValueError("a truncated fixed64")
        pos[0] += 8
    elif wire == LEN:
        _length(buf, pos, end, &stop)
        pos[0] = stop
    elif wire == FIXED32:
        if end - pos[0] < 4:
            raise ValueError("a truncated fixed32")
        pos[0] += 4
    else:
        raise ValueError(f"wire type {wire} is not expected here")
    return 0


cdef int _value(const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, double* out) except -1:
    """A FeatureValue: 1 if it holds a double or an int64 (written to ``out``), else 0 (empty or another type)."""
    cdef uint64_t number, raw
    cdef int wire
    cdef int found = 0
    cdef double d
    while pos < end:
        _field(buf, &pos, end, &number, &wire)
        if number == 2 and wire == FIXED64:
            if end - pos < 8:
                raise ValueError("a truncated double")
            memcpy(&d, buf + pos, 8)  # little-endian on every platform we build for
            pos += 8
            out[0] = d
            found = 1
        elif number == 5 and wire == VARINT:
            _varint(buf, &pos, end, &raw)
            out[0] = <double>(<int64_t>raw)
            found = 1
        else:
            _skip(buf, &pos, end, wire)
    return found


cdef int _pairs(
    const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end, const char* first, Py_ssize_t first_len,
    const char* second, Py_ssize_t second_len, double* a, double* b
) except -1:
    """A FeatureNameValuePairList: the ``present`` bits of the two named features, their values in a and b."""
    cdef uint64_t number, inner_number
    cdef int wire, inner_wire
    cdef Py_ssize_t stop, inner_stop, name_at, name_len, value_at, value_end
    cdef int present = 0
    while pos < end:
        _field(buf, &pos, end, &number, &wire)
        if number != 1 or wire != LEN:
            _skip(buf, &pos, end, wire)
            continue
        _length(buf, &pos, end, &stop)
        name_at = name_len = value_at = value_end = -1
        while pos < stop:
            _field(buf, &pos, stop, &inner_number, &inner_wire)
            if inner_wire == LEN and (inner_number == 1 or inner_number == 2):
                _length(buf, &pos, stop, &inner_stop)
                if inner_number == 1:
                    name_at, name_len = pos, inner_stop - pos
                else:
                    value_at, value_end = pos, inner_stop
                pos = inner_stop
            else:
                _skip(buf, &pos, stop, inner_wire)
        if name_at >= 0 and value_at >= 0:
            if name_len == first_len and memcmp(buf + name_at, first, first_len) == 0:
                if _value(buf, value_at, value_end, a):
                    present |= FIRST
            elif name_len == second_len and memcmp(buf + name_at, second, second_len) == 0:
                if _value(buf, value_at, value_end, b):
                    present |= SECOND
        pos = stop
    return present


def decode_answer(bytes answer, bytes first, bytes second):
    """One StreamingFetchFeatureValuesResponse, from its wire bytes.

    Args:
        answer: The serialised message.
        first: UTF-8 name of the first feature to read (alpha, or clicks).
        second: UTF-8 name of the second (beta, or impressions).

    Returns:
        ``(code, message, keys, first_values, second_values, present, missing)``: the status code and message;
        per key of ``data``, in order, its id, the two features' values (as doubles) and which of them it holds
        (``FIRST | SECOND`` bits); and the keys listed in ``data_keys_with_error``.

    Raises:
        ValueError: If the bytes are not such a message.
    """
    cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(answer)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(answer)
    cdef Py_ssize_t pos = 0, stop, inner_stop, key_stop
    cdef uint64_t number, inner_number, code = 0
    cdef int wire, inner_wire
    # Each entry of ``data`` takes more than 8 bytes, so this bounds the keys of one message.
    cdef Py_ssize_t capacity = end // 8 + 1
    cdef cnp.ndarray first_values = np.zeros(capacity, dtype=np.float64)  # 0.0 where a feature is absent
    cdef cnp.ndarray second_values = np.zeros(capacity, dtype=np.float64)
    cdef cnp.ndarray present = np.zeros(capacity, dtype=np.uint8)
    cdef double* a = <double*>cnp.PyArray_DATA(first_values)
    cdef double* b = <double*>cnp.PyArray_DATA(second_values)
    cdef uint8_t* bits = <uint8_t*>cnp.PyArray_DATA(present)
    cdef const char* first_name = PyBytes_AS_STRING(first)
    cdef const char* second_name = PyBytes_AS_STRING(second)
    cdef Py_ssize_t first_len = PyBytes_GET_SIZE(first), second_len = PyBytes_GET_SIZE(second)
    cdef Py_ssize_t n = 0, pairs_at, pairs_end
    cdef object key
    keys = []
    missing = []
    message = ""
    while pos < end:
        _field(buf, &pos, end, &number, &wire)
        if wire != LEN or number not in (1, 2, 3):
            _skip(buf, &pos, end, wire)
            continue
        _length(buf, &pos, end, &stop)
        if number == 1:  # status
            while pos < stop:
                _field(buf, &pos, stop, &inner_number, &inner_wire)
                if inner_number == 1 and inner_wire == VARINT:
                    _varint(buf, &pos, stop, &code)
                elif inner_number == 2 and inner_wire == LEN:
                    _length(buf, &pos, stop, &inner_stop)
                    message = PyUnicode_DecodeUTF8(<const char*>buf + pos, inner_stop - pos, "replace")
                    pos = inner_stop
                else:
                    _skip(buf, &pos, stop, inner_wire)
        elif number == 2:  # data: one key's answer
            key = None
            pairs_at = pairs_end = -1
            while pos < stop:
                _field(buf, &pos, stop, &inner_number, &inner_wire)
                if inner_wire == LEN and (inner_number == 3 or inner_number == 4):
                    _length(buf, &pos, stop, &inner_stop)
                    if inner_number == 3:
                        pairs_at, pairs_end = pos, inner_stop
                    else:
                        key = _key(buf, pos, inner_stop)
                    pos = inner_stop
                else:
                    _skip(buf, &pos, stop, inner_wire)
            if key is not None:
                if n >= capacity:
                    raise ValueError("more keys than the message can hold")
                keys.append(key)
                bits[n] = 0
                if pairs_at >= 0:
                    bits[n] = <uint8_t>_pairs(
                        buf, pairs_at, pairs_end, first_name, first_len, second_name, second_len, &a[n], &b[n]
                    )
                n += 1
        else:  # data_keys_with_error
            key = _key(buf, pos, stop)
            if key is not None:
                missing.append(key)
        pos = stop
    return <int>code, message, keys, first_values[:n], second_values[:n], present[:n], missing


cdef object _key(const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end):
    """The ``key`` (field 1) of a FeatureViewDataKey, or None if it has none (a composite key)."""
    cdef uint64_t number
    cdef int wire
    cdef Py_ssize_t stop
    while pos < end:
        _field(buf, &pos, end, &number, &wire)
        if number == 1 and wire == LEN:
            _length(buf, &pos, end, &stop)
            return PyUnicode_DecodeUTF8(<const char*>buf + pos, stop - pos, "strict")
        _skip(buf, &pos, end, wire)
    return None


cdef inline Py_ssize_t _varint_size(Py_ssize_t n):
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


cdef inline Py_ssize_t _put_varint(char* out, Py_ssize_t n):
    cdef Py_ssize_t i = 0
    while n >= 0x80:
        out[i] = <char>((n & 0x7F) | 0x80)
        n >>= 7
        i += 1
    out[i] = <char>n
    return i + 1


def encode_request(bytes head, object keys, int tag=0x12):
    """A StreamingFetchFeatureValuesRequest: ``head`` (its other fields, already encoded) followed by one
    ``data_keys`` entry (field 2, a FeatureViewDataKey with ``key``, field 1) per key of ``keys``.

    Args:
        head: The encoded ``feature_view`` and ``data_format`` fields.
        keys: The keys, str (an iterable: a dict's keys will do).
        tag: The tag of the key field: 0x12 (``data_keys``, field 2); 0x32 is ``data_key`` (field 6) of the
            one-key FetchFeatureValuesRequest.

    Returns:
        The serialised message.
    """
    cdef list encoded = [k.encode("utf-8") for k in keys]
    cdef Py_ssize_t size = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t n, inner
    cdef bytes key
    for key in encoded:
        n = PyBytes_GET_SIZE(key)
        inner = 1 + _varint_size(n) + n
        size += 1 + _varint_size(inner) + inner
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    p += PyBytes_GET_SIZE(head)
    for key in encoded:
        n = PyBytes_GET_SIZE(key)
        inner = 1 + _varint_size(n) + n
        p[0] = <char>tag
        p += 1
        p += _put_varint(p, inner)
        p[0] = 0x0A
        p += 1
        p += _put_varint(p, n)
        memcpy(p, PyBytes_AS_STRING(key), n)
        p += n
    return out


def take_positions(list keys, dict waiting):
    """Pop each of ``keys`` from ``waiting`` (key -> position); returns the positions, -1 where a key was not there."""
    cdef Py_ssize_t n = len(keys)
    cdef cnp.ndarray out = np.empty(n, dtype=np.intp)
    cdef cnp.npy_intp* p = <cnp.npy_intp*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t i
    cdef object value
    for i in range(n):
        value = waiting.pop(keys[i], None)
        p[i] = -1 if value is None else <cnp.npy_intp>value
    return out


def decode_values(bytes answer, bytes first, bytes second):
    """One FetchFeatureValuesResponse (the one-key-per-call API), from its wire bytes.

    Returns:
        ``(present, first_value, second_value)``: the ``FIRST | SECOND`` bits of the features the key's answer
        holds, and their values as doubles (0.0 where absent).

    Raises:
        ValueError: If the bytes are not such a message.
    """
    cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(answer)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(answer)
    cdef Py_ssize_t pos = 0, stop
    cdef uint64_t number
    cdef int wire
    cdef int present = 0
    cdef double a = 0.0, b = 0.0
    while pos < end:
        _field(buf, &pos, end, &number, &wire)
        if number == 3 and wire == LEN:
            _length(buf, &pos, end, &stop)
            present |= _pairs(
                buf, pos, stop, PyBytes_AS_STRING(first), PyBytes_GET_SIZE(first), PyBytes_AS_STRING(second),
                PyBytes_GET_SIZE(second), &a, &b
            )
            pos = stop
        else:
            _skip(buf, &pos, end, wire)
    return present, a, b
