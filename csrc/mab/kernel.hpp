// Batched Thompson sampling: Beta(alpha_i, beta_i) draws for many arms, and the top k of them.
//
// Plain C++, no Python: functions take raw pointers, lengths and a caller-owned RngState, write into
// caller-owned buffers, never throw, and return a Status. They hold no global mutable state except the
// instruction-set choice, which is fixed once at load time (by the CPU, lowered by MAB_KERNEL_ISA) or by
// set_isa, for tests.
//
// Preconditions (checked by the caller, not here):
//   - every alpha[i] and beta[i] is finite and > 0;
//   - alpha, beta and out have n elements; out does not alias the inputs;
//   - 0 <= k <= n for top_k_indices;
//   - one RngState is used by one thread at a time.
// Output: every sample lies in [0, 1]. For a given state, the output is the same on every instruction
// set: the three builds run the same eight-lane algorithm with floating-point contraction disabled.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mab/rng.hpp"

namespace mab {

enum Status : int {
    kOk = 0,
    kNoMemory = 1,
};

// Instruction sets the eight-lane kernel is compiled for, chosen at run time.
enum Isa : int {
    kIsaBaseline = 0,  // x86-64 SSE2 or any other target GCC compiles for
    kIsaAvx2 = 1,
    kIsaAvx512 = 2,
    kIsaUnset = -1,    // isa_request: MAB_KERNEL_ISA is not set
    kIsaUnknown = -2,  // isa_request: MAB_KERNEL_ISA names no instruction set; ignored
};

// Fills out[i] with a draw from Beta(alpha[i], beta[i]) for i < n.
int sample_beta_fill(RngState* st, const double* alpha, const double* beta, std::size_t n, double* out) noexcept;

// Writes into idx[0..k) the indices of the k largest samples[i], largest first; ties go to the lower
// index, so the order equals a stable argsort of -samples. O(n + k log k).
int top_k_indices(const double* samples, std::size_t n, std::size_t k, int64_t* idx) noexcept;

// The instruction set in use, the best one this CPU supports, and a way to choose a lower one (tests
// compare the builds). set_isa returns the set actually in use, never more than the CPU supports.
int current_isa() noexcept;
int best_isa() noexcept;
int set_isa(int isa) noexcept;

// The instruction set the environment variable MAB_KERNEL_ISA asked for at load time ("sse2" or
// "baseline", "avx2", "avx512"), or kIsaUnset / kIsaUnknown. The set in use starts as the lower of the
// request and best_isa(): the override is for benchmarks and tests, and can only lower the choice.
int isa_request() noexcept;

}  // namespace mab
