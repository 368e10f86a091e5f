# cython: boundscheck=False, wraparound=False, cdivision=True
"""The native /predict answer on a node: from the request's bytes to the answer's bytes, with no Python object per
candidate.

``NativeAnswer.rank`` reads the body (yyjson, ``csrc/mab/answer.cpp``), drops repeated candidates, looks the
candidates (and their segment keys) up in the node's shared arm table, draws the Thompson samples and ranks, in one
call. Between it and ``commit`` the loop does what is per request, not per candidate, and may refuse: the client's
share of held events and of new arms (``NodeLoop.answered_native``). ``hold`` holds the event in the shared ring;
``commit`` counts the impressions (for the segment too), frames the journal's event record and writes the answer;
``decision`` writes the decision log's record. A body ``rank`` does not take (``answer.hpp`` says which) goes to the
Python path, which answers it or names what is wrong, as it always has: the answers are the same bit for bit (a
seed gives the same ranking and scores), and the error answers are the Python path's own.

One object per worker, used from the event loop's thread only, between two awaits: its scratch (sized for the
largest request at start) holds one request at a time.
"""

import time
import zlib

cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, intptr_t, uint32_t, uint64_t
from libc.string cimport memcpy
from libcpp.string cimport string

from mab_service._cyutil cimport IdRef
from mab_service.features._index cimport unique_indices_fill
from mab_service.learning._arms cimport (
    ArmTable,
    arm_add_counts,
    arm_add_impressions,
    arm_find_or_insert,
    arm_gather_fill,
    arm_gather_segment_fill,
    kArmOk,
    kArmRuntime,
    segment_keys_bytes,
    segment_keys_fill,
)
from mab_service.learning._events cimport EventRing, hold_event, kHoldRecorded, kHoldRefused
from mab_service.policy._kernel cimport RngState, kOk, rng_seed, sample_beta_fill, top_k_indices

from mab_service.ids import MAX_EVENT_ID_CHARS, MAX_ID_BYTES, MAX_SEGMENT_BYTES
from mab_service.learning.decisions import FIELDS, MAGIC, NARROW, NARROW_MAX, PREFIX, ROWS, SEGMENT, WIDE
from mab_service.learning.journal import frame
from mab_service.schemas import MAX_USER_ID_CHARS

cnp.import_array()


cdef extern from "mab/answer.hpp" namespace "mab" nogil:
    ctypedef struct PredictBody:
        void* doc
        size_t n_candidates
        IdRef user_id
        IdRef event_id
        IdRef segment
        uint64_t top_k
        uint64_t seed
        bint has_seed

    ctypedef struct PredictRules:
        size_t max_candidates
        size_t max_id_bytes
        size_t max_user_id_chars
        size_t max_event_id_chars
        size_t max_segment_bytes

    enum:
        kPredictParsed
        kPredictFallback

    int predict_parse(const char* data, size_t size, const PredictRules& rules, void* pool, size_t pool_size,
                      PredictBody* out) noexcept
    int predict_candidates(const PredictBody* body, const PredictRules& rules, IdRef* ids) noexcept
    void predict_free(PredictBody* body) noexcept
    void write_answer(string& out, IdRef user_id, const IdRef* ids, const int64_t* ranking, const double* scores,
                      size_t k, IdRef event_id) noexcept
    void write_journal_event(string& out, double t, IdRef event_id, const IdRef* ids, const int64_t* ranking,
                             size_t held, IdRef segment) noexcept
    void write_unnamed(string& out, const IdRef* ids, const int32_t* rows, size_t n) noexcept
    bint write_decision_arrays(string& out, const double* alpha, const double* beta, size_t n, const int64_t* ranking,
                               size_t k, bint wide) noexcept


#: The document pool: a body whose parse needs more memory than this (over ~40 KB) allocates its own.
DEF POOL_BYTES = 1 << 19

cdef object _crc32 = zlib.crc32
cdef object _time = time.time
cdef object _perf = time.perf_counter


cdef inline bytes _bytes(const string& s):
    return PyBytes_FromStringAndSize(s.data(), <Py_ssize_t>s.size())


cdef inline str _text(IdRef ref):
    return (<bytes>PyBytes_FromStringAndSize(ref.data, <Py_ssize_t>ref.size)).decode()


cdef class NativeAnswer:
    """One worker's native /predict over the node's arm table and event ring.

    Args:
        arms: The node's shared arm table (the posteriors rank from it, and its impressions are counted in it).
        events: The node's shared ring of held events.
        max_candidates: The most candidates a request may hold (``max_candidates``); scratch is sized for it.
        prior_alpha, prior_beta: The prior of arms the table does not hold; finite and > 0.
        segment_weight: Pseudo-impressions of an arm's global mean within a segment (``segment_prior_weight``).
        max_held_ids: The most returned ids an event holds (``max_held_ids``).
    """

    cdef ArmTable arms
    cdef EventRing events
    cdef PredictRules rules
    cdef double prior_alpha, prior_beta, segment_weight
    cdef size_t max_held
    cdef PredictBody body
    cdef void* pool
    cdef IdRef* all_refs
    cdef IdRef* refs
    cdef IdRef* keys
    cdef IdRef* picked
    cdef char* key_bytes
    cdef size_t key_capacity
    cdef uint32_t* keep
    cdef double* alpha
    cdef double* beta
    cdef double* samples
    cdef double* scores
    cdef double* counts
    cdef int32_t* rows
    cdef int32_t* pair_rows
    cdef int64_t* ranking
    cdef string out
    cdef readonly size_t n
    cdef readonly size_t k
    cdef readonly size_t held
    cdef readonly size_t new_arms
    cdef readonly uint64_t seed
    cdef readonly double t
    cdef readonly double fetch_s
    cdef readonly double sample_s
    cdef readonly double encode_s
    cdef int64_t segment_row

    def __cinit__(self, ArmTable arms, EventRing events, size_t max_candidates, double prior_alpha,
                  double prior_beta, double segment_weight, size_t max_held_ids):
        if not (prior_alpha > 0 and prior_beta > 0 and segment_weight > 0):
            raise ValueError("priors and the segment weight must be > 0")
        self.arms = arms
        self.events = events
        self.rules.max_candidates = max_candidates
        self.rules.max_id_bytes = MAX_ID_BYTES
        self.rules.max_user_id_chars = MAX_USER_ID_CHARS
        self.rules.max_event_id_chars = MAX_EVENT_ID_CHARS
        self.rules.max_segment_bytes = MAX_SEGMENT_BYTES
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self.segment_weight = segment_weight
        self.max_held = max_held_ids
        cdef size_t m = max_candidates if max_candidates > 0 else 1
        self.pool = PyMem_Malloc(POOL_BYTES)
        self.all_refs = <IdRef*>PyMem_Malloc(m * sizeof(IdRef))
        self.refs = <IdRef*>PyMem_Malloc(m * sizeof(IdRef))
        self.keys = <IdRef*>PyMem_Malloc(m * sizeof(IdRef))
        self.picked = <IdRef*>PyMem_Malloc(m * sizeof(IdRef))
        self.keep = <uint32_t*>PyMem_Malloc(m * sizeof(uint32_t))
        self.alpha = <double*>PyMem_Malloc(m * sizeof(double))
        self.beta = <double*>PyMem_Malloc(m * sizeof(double))
        self.samples = <double*>PyMem_Malloc(m * sizeof(double))
        self.scores = <double*>PyMem_Malloc(m * sizeof(double))
        self.counts = <double*>PyMem_Malloc(2 * m * sizeof(double))
        self.rows = <int32_t*>PyMem_Malloc(m * sizeof(int32_t))
        self.pair_rows = <int32_t*>PyMem_Malloc(m * sizeof(int32_t))
        self.ranking = <int64_t*>PyMem_Malloc(m * sizeof(int64_t))
        if (self.pool == NULL or self.all_refs == NULL or self.refs == NULL or self.keys == NULL
                or self.picked == NULL or self.keep == NULL or self.alpha == NULL or self.beta == NULL
                or self.samples == NULL or self.scores == NULL or self.counts == NULL or self.rows == NULL
                or self.pair_rows == NULL or self.ranking == NULL):
            raise MemoryError()
        self.body.doc = NULL
        self.out.reserve(1 << 16)

    def __dealloc__(self):
        predict_free(&self.body)
        cdef void* owned[15]
        owned[:] = [self.pool, self.all_refs, self.refs, self.keys, self.picked, self.keep, self.alpha, self.beta,
                    self.samples, self.scores, self.counts, self.rows, self.pair_rows, self.ranking, self.key_bytes]
        cdef int i
        for i in range(15):
            PyMem_Free(owned[i])

    def rank(self, bytes body, uint64_t seed):
        """Read ``body``, look its candidates up and rank them; False if the Python path must answer it instead.

        ``seed`` is the draw's seed when the body gives none. Afterwards ``held`` is how many returned ids the event
        would hold and ``new_arms`` how many of those the arm table lacks.
        """
        predict_free(&self.body)
        cdef const char* data = body
        # The document is yyjson's own copy of the body: its views outlive ``body``.
        if predict_parse(data, <size_t>len(body), self.rules, self.pool, POOL_BYTES, &self.body) != kPredictParsed:
            return False
        cdef size_t n_all = self.body.n_candidates, n = 0, i
        if predict_candidates(&self.body, self.rules, self.all_refs) != kPredictParsed:
            predict_free(&self.body)
            return False
        started = _perf()
        cdef double t = _time()
        cdef size_t known = 0
        cdef int status
        cdef IdRef segment = self.body.segment
        cdef size_t need
        with nogil:
            status = unique_indices_fill(self.all_refs, n_all, self.keep, &n)
            for i in range(n):
                self.refs[i] = self.all_refs[self.keep[i]]
        if status != 0:
            predict_free(&self.body)
            raise MemoryError()
        if segment.size:
            need = segment_keys_bytes(segment, self.refs, n)
            if need > self.key_capacity:
                PyMem_Free(self.key_bytes)
                self.key_bytes = <char*>PyMem_Malloc(need)
                self.key_capacity = need if self.key_bytes != NULL else 0
                if self.key_bytes == NULL:
                    predict_free(&self.body)
                    raise MemoryError()
            with nogil:
                segment_keys_fill(segment, self.refs, n, self.key_bytes, self.keys)
                arm_gather_segment_fill(self.arms.table, self.refs, self.keys, n, self.segment_weight,
                                        self.prior_alpha, self.prior_beta, t, self.alpha, self.beta, self.rows,
                                        self.pair_rows, self.counts, &known)
        else:
            with nogil:
                arm_gather_fill(self.arms.table, self.refs, n, self.prior_alpha, self.prior_beta, t, self.alpha,
                                self.beta, self.rows, &known)
        sampling = _perf()
        cdef uint64_t top_k = self.body.top_k
        cdef size_t k = n if top_k == 0 or top_k > n else <size_t>top_k
        if self.body.has_seed:
            seed = self.body.seed
        cdef RngState st
        with nogil:
            rng_seed(&st, &seed, 1)
            status = sample_beta_fill(&st, self.alpha, self.beta, n, self.samples)
            if status == kOk:
                status = top_k_indices(self.samples, n, k, self.ranking)
            if status == kOk:
                for i in range(k):
                    self.scores[i] = self.samples[self.ranking[i]]
        if status != kOk:  # a parameter the kernel refuses: the Python path checks and replaces it
            predict_free(&self.body)
            return False
        done = _perf()
        self.fetch_s = sampling - started
        self.sample_s = done - sampling
        self.n = n
        self.k = k
        self.t = t
        self.seed = seed
        cdef size_t held = min(k, self.max_held), new = 0
        for i in range(held):
            new += self.rows[self.ranking[i]] < 0
        self.held = held
        self.new_arms = new
        return True

    @property
    def candidates(self):
        """The distinct candidates of the request ``rank`` took, in order (for tests; the answer path never asks)."""
        return [_text(self.refs[i]) for i in range(self.n)]

    @property
    def event_id(self):
        """The client's own event id in the body, or None."""
        return _text(self.body.event_id) if self.body.event_id.size else None

    @property
    def segment(self):
        """The body's segment, or None."""
        return _text(self.body.segment) if self.body.segment.size else None

    def segment_tag(self):
        """The word the event is held with, that its rewards find the segment by: the row of the segment's own key
        plus one (0 without a segment, or when the segments' room is full)."""
        cdef IdRef segment = self.body.segment
        if not segment.size:
            return 0
        cdef IdRef key
        cdef string k = b"\0"
        k.append(segment.data, segment.size)
        key.data = k.data()
        key.size = k.size()
        cdef int64_t row = -1
        arm_find_or_insert(self.arms.table, key, self.prior_alpha, self.prior_beta, kArmRuntime, &row)
        self.segment_row = row
        return row + 1

    def hold(self, str event_id, double now, uint64_t tag):
        """Hold the ranked answer's event under ``event_id``: True, or False if the ring holds that id already."""
        cdef bytes raw = event_id.encode()
        cdef IdRef eid
        eid.data = raw
        eid.size = len(raw)
        cdef size_t i
        for i in range(self.held):
            self.picked[i] = self.refs[self.ranking[i]]
        self.events._check_open()
        cdef int status = hold_event(&self.events.ring, eid, self.picked, self.held, NULL, tag, now, now)
        if status == kHoldRecorded:
            return True
        if status == kHoldRefused:
            return False
        raise ValueError(f"the event ring refused an event of {self.held} ids (status {status})")

    def commit(self, str event_id, double now):
        """Count the held ids' impressions made at ``now`` and give ``(failed, segment_failed, journal record,
        answer)``: the picks the table (and the segments' budget) could not count, the journal's framed event record
        and the answer's bytes."""
        cdef size_t failed = 0, segment_failed = 0, m = 0, i
        cdef intptr_t* picks = <intptr_t*>self.ranking  # int64 and intptr_t are one type here
        for i in range(self.held):
            if self.rows[self.ranking[i]] < 0:
                self.picked[m] = self.refs[self.ranking[i]]
                m += 1
        status = arm_add_impressions(self.arms.table, self.picked, self.rows, picks, self.held, self.prior_alpha,
                                     self.prior_beta, kArmRuntime, now, &failed)
        if status != kArmOk:
            raise MemoryError("the arm table could not count the impressions")
        cdef IdRef segment = self.body.segment
        if segment.size:
            m = 0
            for i in range(self.held):
                if self.pair_rows[self.ranking[i]] < 0:
                    self.picked[m] = self.keys[self.ranking[i]]
                    m += 1
            status = arm_add_impressions(self.arms.table, self.picked, self.pair_rows, picks, self.held,
                                         self.prior_alpha, self.prior_beta, kArmRuntime, now, &segment_failed)
            if status != kArmOk:
                raise MemoryError("the arm table could not count the segment's impressions")
            if self.segment_row >= 0:
                arm_add_counts(self.arms.table, <size_t>self.segment_row, <double>self.held, 0.0, now)
        cdef bytes raw = event_id.encode()
        cdef IdRef eid
        eid.data = raw
        eid.size = len(raw)
        self.out.clear()
        write_journal_event(self.out, now, eid, self.refs, self.ranking, self.held, segment)
        record = frame(_bytes(self.out))
        encoding = _perf()
        self.out.clear()
        write_answer(self.out, self.body.user_id, self.refs, self.ranking, self.scores, self.k, eid)
        answer = _bytes(self.out)
        self.encode_s = _perf() - encoding
        return failed, segment_failed, record, answer

    def decision(self, str event_id, double now, double sample_rate):
        """The decision log's record of the answer (decisions.encode's, with the candidates as rows): its size and
        pieces (the rows as an array, which the log's writer names)."""
        cdef size_t n = self.n
        cdef IdRef segment = self.body.segment
        cdef int flags = ROWS | (SEGMENT if segment.size else 0)
        cdef bint wide = n > NARROW_MAX
        if wide:
            flags |= WIDE
        self.out.clear()
        write_unnamed(self.out, self.refs, self.rows, n)
        inline = _bytes(self.out)
        cdef cnp.npy_intp size = <cnp.npy_intp>n
        cdef cnp.ndarray rows = cnp.PyArray_SimpleNew(1, &size, cnp.NPY_INT32)
        memcpy(cnp.PyArray_DATA(rows), self.rows, n * sizeof(int32_t))
        self.out.clear()
        if write_decision_arrays(self.out, self.alpha, self.beta, n, self.ranking, self.k, wide):
            flags |= NARROW
        arrays = _bytes(self.out)
        event = event_id.encode()
        user = PyBytes_FromStringAndSize(self.body.user_id.data, <Py_ssize_t>self.body.user_id.size)
        place = PyBytes_FromStringAndSize(segment.data, <Py_ssize_t>segment.size) if segment.size else b""
        fields = FIELDS.pack(n, self.k, len(inline), len(event), len(user), len(place), flags, now, self.seed,
                             self.body.top_k, sample_rate) + event + user + place
        head = PREFIX.pack(MAGIC, _crc32(fields)) + fields + inline
        return len(head) + 4 * n + len(arrays), (head, rows, arrays, b"", b"")


cdef extern from "mab/answer.hpp" namespace "mab" nogil:
    size_t format_double(double value, char* out) noexcept


def json_double(double value):
    """``value`` as the answer and the journal write it (orjson's form); for the tests that hold them to orjson."""
    cdef char buffer[32]
    return PyBytes_FromStringAndSize(buffer, <Py_ssize_t>format_double(value, buffer))
