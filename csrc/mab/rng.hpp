// Pseudo-random number generation for the Beta kernel.
//
// xoshiro256+ (Blackman & Vigna) is the generator: 256 bits of state, period 2^256 - 1, and the variant its
// authors recommend for floating-point output, since only its upper 52 bits are used. The kernel runs
// eight independent streams side by side (one per SIMD lane) plus one scalar stream for the rare
// rejections, all seeded from one key by SplitMix64, the seeding function the xoshiro authors recommend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mab {

constexpr int kLanes = 8;

// State of one sampler: eight lane streams stored word-major (lanes[w][l] is word w of lane l) so that a
// word of all lanes loads as one vector, and one scalar stream.
struct RngState {
    uint64_t lanes[4][kLanes];
    uint64_t scalar[4];
};

inline uint64_t splitmix64_next(uint64_t& x) noexcept {
    uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Expands a key of any length into a full state. Every key word is mixed into the SplitMix64 counter,
// so keys that differ in any bit give unrelated states; 36 outputs of SplitMix64 then fill the nine
// streams. Overlap between streams of 2^256 period is not a practical concern at this size.
inline void rng_seed(RngState* st, const uint64_t* key, std::size_t n_key) noexcept {
    uint64_t x = 0x243F6A8885A308D3ULL;  // digits of pi: a fixed, arbitrary starting point
    for (std::size_t i = 0; i < n_key; ++i) {
        x ^= key[i];
        x = splitmix64_next(x);
    }
    x ^= static_cast<uint64_t>(n_key);
    for (int l = 0; l < kLanes; ++l)
        for (int w = 0; w < 4; ++w) st->lanes[w][l] = splitmix64_next(x);
    for (int w = 0; w < 4; ++w) st->scalar[w] = splitmix64_next(x);
    // An all-zero state would be a fixed point of xoshiro. SplitMix64 is a bijection of its counter, so
    // four zero outputs in a row cannot happen in practice; the guard keeps the invariant explicit.
    for (int l = 0; l < kLanes; ++l)
        if ((st->lanes[0][l] | st->lanes[1][l] | st->lanes[2][l] | st->lanes[3][l]) == 0) st->lanes[0][l] = 1;
    if ((st->scalar[0] | st->scalar[1] | st->scalar[2] | st->scalar[3]) == 0) st->scalar[0] = 1;
}

inline uint64_t rotl64(uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }

inline uint64_t xoshiro256p_next(uint64_t* s) noexcept {
    const uint64_t result = s[0] + s[3];
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

// A uniform double in (0, 1]: the top 52 bits as the mantissa of a number in [1, 2), then 2 - m.
// Excluding 0 keeps log(u) finite; the two ends differ from [0, 1) only on a set of measure zero.
inline double unit_open0(uint64_t bits) noexcept {
    const uint64_t m = (bits >> 12) | 0x3FF0000000000000ULL;
    double d;
    std::memcpy(&d, &m, sizeof d);
    return 2.0 - d;
}

}  // namespace mab
