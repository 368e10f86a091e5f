# The C++ kernel's API, declared once (csrc/mab/kernel.hpp). Every function runs without the GIL.
from libc.stdint cimport int64_t, uint64_t


cdef extern from "mab/kernel.hpp" namespace "mab" nogil:
    ctypedef struct RngState:
        uint64_t lanes[4][8]
        uint64_t scalar[4]

    enum Status:
        kOk
        kNoMemory

    void rng_seed(RngState* st, const uint64_t* key, size_t n_key) noexcept
    int sample_beta_fill(RngState* st, const double* alpha, const double* beta, size_t n, double* out) noexcept
    int top_k_indices(const double* samples, size_t n, size_t k, int64_t* idx) noexcept
    int current_isa() noexcept
    int best_isa() noexcept
    int set_isa(int isa) noexcept
    int isa_request() noexcept
