// Dispatch, the exact scalar finish of rejected lanes, and top-k selection. See kernel.hpp.
#include "mab/kernel.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__)
#include <immintrin.h>  // lane_bits in beta_simd.inc: movemask and mask-register tests
#endif

namespace mab {
namespace {

constexpr double kTwoPi = 6.28318530717958647692;

// One standard normal from the scalar stream (Box-Muller, one of the pair). Used only on the rare
// rejections, so simplicity beats speed here.
double scalar_normal(uint64_t* s) noexcept {
    const double u1 = unit_open0(xoshiro256p_next(s));
    const double u2 = unit_open0(xoshiro256p_next(s));
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

// Decides one Marsaglia-Tsang candidate (normal x, uniform u) for Gamma(shape), shape >= 1, exactly:
// the squeeze first, then the full test log(u) < x^2/2 + d (1 - v + log v). Returns false on rejection.
bool gamma_accept(double shape, double x, double u, double* out) noexcept {
    const double d = shape - 1.0 / 3.0;
    const double c = 1.0 / std::sqrt(9.0 * d);
    double v = 1.0 + c * x;
    if (v <= 0.0) return false;  // the transform is not monotone there: always reject
    v = v * v * v;
    const double x2 = x * x;
    if (u < 1.0 - 0.0331 * (x2 * x2) || std::log(u) < 0.5 * x2 + d * (1.0 - v + std::log(v))) {
        *out = d * v;
        return true;
    }
    return false;
}

// Gamma(shape), shape >= 1, continuing from a candidate the vector pass could not accept.
double gamma_finish(uint64_t* s, double shape, double x, double u) noexcept {
    double g;
    while (!gamma_accept(shape, x, u, &g)) {
        x = scalar_normal(s);
        u = unit_open0(xoshiro256p_next(s));
    }
    return g;
}

// What the vector pass knows about one lane: the shapes as given and as drawn (shape + 1 below 1), the
// gamma candidates, their normals and uniforms, and whether the squeeze accepted them.
struct LaneDraw {
    double alpha, beta, shape_x, shape_y, x, y, zx, zy, ux, uy;
    bool ok_x, ok_y;
};

// log(Y') - log(X'), where X' and Y' are X and Y boosted by U^(1/shape) for a shape below 1: with ux and uy
// the boost uniforms (read only for a shape below 1). NaN only when both sides are -inf, which needs a shape
// below kLogSafeShape.
inline double boosted_log_odds(double x, double y, double alpha, double beta, double ux, double uy) noexcept {
    double lx = std::log(x), ly = std::log(y);
    if (alpha < 1.0) lx += std::log(ux) / alpha;
    if (beta < 1.0) ly += std::log(uy) / beta;
    return ly - lx;
}

// Shapes from here up keep log(U) / shape finite (|log U| <= 52 log 2 for U from unit_open0), so the log odds
// are never NaN and a lane's draws are known before its ratio is formed.
constexpr double kLogSafeShape = 1e-300;

double finish_lane(uint64_t* s, const LaneDraw& d) noexcept {
    const double x = d.ok_x ? d.x : gamma_finish(s, d.shape_x, d.zx, d.ux);
    const double y = d.ok_y ? d.y : gamma_finish(s, d.shape_y, d.zy, d.uy);
    const bool boost_x = d.alpha < 1.0, boost_y = d.beta < 1.0;
    if (!boost_x && !boost_y) {
        // x and y are finite, but their sum overflows when the shapes add up to more than the largest
        // double; the sum of their halves cannot.
        const double sum = x + y;
        return std::isinf(sum) ? (0.5 * x) / (0.5 * x + 0.5 * y) : x / sum;
    }

    // A shape below 1: Gamma(a) = Gamma(a + 1) * U^(1/a). For tiny shapes both factors underflow to 0
    // in linear space (0/0), so the ratio is formed in log space: X / (X + Y) = 1 / (1 + exp(ly - lx)).
    const double ux = boost_x ? unit_open0(xoshiro256p_next(s)) : 1.0;
    const double uy = boost_y ? unit_open0(xoshiro256p_next(s)) : 1.0;
    const double diff = boosted_log_odds(x, y, d.alpha, d.beta, ux, uy);
    if (std::isnan(diff)) {
        // Both logs are -inf: shapes so small (subnormal) that even log space overflows. In that limit
        // Beta(a, b) is Bernoulli(a / (a + b)) on {0, 1}.
        const double p = d.alpha / (d.alpha + d.beta);
        return unit_open0(xoshiro256p_next(s)) <= p ? 1.0 : 0.0;
    }
    return 1.0 / (1.0 + std::exp(diff));  // exp overflow gives +inf and so 0, as it should
}

// The lanes of a pass that need only the boost: both candidates accepted, a shape below 1, none below
// kLogSafeShape (every lane of a segment new to its arms: alpha = m * mu is about 0.5). finish_lane would draw
// their boost uniforms and then form the ratio, three logarithms and an exponential in one dependent chain per
// lane. Here the uniforms are drawn at the lane's turn in the scalar stream, exactly as finish_lane draws them,
// and the ratios are formed after the pass's other lanes are finished, in a loop whose iterations do not depend
// on each other, so that the processor overlaps the lanes' logarithms. Same stream, same arithmetic, same bits.
struct BoostLanes {
    static constexpr std::size_t kMax = 64;  // one pass of beta_fill
    std::size_t count = 0;
    int lane[kMax];
    double x[kMax], y[kMax], alpha[kMax], beta[kMax], ux[kMax], uy[kMax];

    static bool wants(const LaneDraw& d) noexcept {
        return d.ok_x && d.ok_y && (d.alpha < 1.0 || d.beta < 1.0) && d.alpha >= kLogSafeShape &&
               d.beta >= kLogSafeShape;
    }

    void defer(uint64_t* s, const LaneDraw& d, int at) noexcept {
        const std::size_t k = count++;
        lane[k] = at;
        x[k] = d.x;
        y[k] = d.y;
        alpha[k] = d.alpha;
        beta[k] = d.beta;
        ux[k] = d.alpha < 1.0 ? unit_open0(xoshiro256p_next(s)) : 1.0;
        uy[k] = d.beta < 1.0 ? unit_open0(xoshiro256p_next(s)) : 1.0;
    }

    void finish(double* out) const noexcept {
        for (std::size_t k = 0; k < count; ++k)
            out[lane[k]] = 1.0 / (1.0 + std::exp(boosted_log_odds(x[k], y[k], alpha[k], beta[k], ux[k], uy[k])));
    }
};

}  // namespace
}  // namespace mab

// The eight-lane pass, once per instruction set. GCC only: other compilers get the baseline build.
#define MAB_SIMD_NS baseline
#define MAB_SIMD_BYTES 16
#include "mab/beta_simd.inc"
#undef MAB_SIMD_NS
#undef MAB_SIMD_BYTES

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MAB_HAVE_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define MAB_SIMD_NS avx2
#define MAB_SIMD_BYTES 32
#include "mab/beta_simd.inc"
#undef MAB_SIMD_NS
#undef MAB_SIMD_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define MAB_SIMD_NS avx512
#define MAB_SIMD_BYTES 64
#include "mab/beta_simd.inc"
#undef MAB_SIMD_NS
#undef MAB_SIMD_BYTES
#pragma GCC pop_options
#endif

namespace mab {
namespace {

int detect_isa() noexcept {
#ifdef MAB_HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return kIsaAvx512;
    if (__builtin_cpu_supports("avx2")) return kIsaAvx2;
#endif
    return kIsaBaseline;
}

// MAB_KERNEL_ISA, read once at load, lowers the instruction set for benchmarks and tests (one process can
// then measure or check the AVX2 build on an AVX-512 machine): "sse2" (or "baseline"), "avx2", "avx512".
int parse_isa_request() noexcept {
    const char* value = std::getenv("MAB_KERNEL_ISA");
    if (value == nullptr || *value == '\0') return kIsaUnset;
    if (std::strcmp(value, "sse2") == 0 || std::strcmp(value, "baseline") == 0) return kIsaBaseline;
    if (std::strcmp(value, "avx2") == 0) return kIsaAvx2;
    if (std::strcmp(value, "avx512") == 0) return kIsaAvx512;
    return kIsaUnknown;
}

const int g_best_isa = detect_isa();
const int g_isa_request = parse_isa_request();
std::atomic<int> g_isa{g_isa_request >= 0 ? std::min(g_isa_request, g_best_isa) : g_best_isa};

struct Keyed {
    double sample;
    int64_t index;
};

// The ranking order: larger sample first, ties to the lower index. A strict total order on the pairs.
inline bool ranks_before(const Keyed& a, const Keyed& b) noexcept {
    return (a.sample > b.sample) | ((a.sample == b.sample) & (a.index < b.index));
}

// Samples are random, so the comparisons of a quickselect or a sort mispredict about half the time, and
// those mispredictions cost more than the rest of ranking. Both steps below are written without
// data-dependent branches.

// Moves the pivot's rank-mates apart: items in [lo, hi) that rank before `pivot` go to the front, the
// rest after, in scratch; returns how many went to the front. Every item is written to both ends and
// only the write that belongs advances its cursor, so the loop has no branch on the data. A stray write
// lands on a slot that a later item (or the same one) overwrites.
std::size_t partition_before(Keyed* items, Keyed* scratch, std::size_t lo, std::size_t hi, Keyed pivot) noexcept {
    const std::size_t m = hi - lo;
    std::size_t front = 0, back = 0;
    for (std::size_t i = lo; i < hi; ++i) {
        const Keyed x = items[i];
        const bool before = ranks_before(x, pivot);
        scratch[front] = x;
        scratch[m - 1 - back] = x;
        front += before;
        back += !before;
    }
    std::memcpy(items + lo, scratch, m * sizeof(Keyed));
    return front;
}

const Keyed& median_of_three(const Keyed& a, const Keyed& b, const Keyed& c) noexcept {
    if (ranks_before(a, b)) return ranks_before(b, c) ? b : (ranks_before(a, c) ? c : a);
    return ranks_before(a, c) ? a : (ranks_before(b, c) ? c : b);
}

// Rearranges items so that the k that rank first are items[0..k), in no particular order. A quickselect
// with median-of-three pivots; if it takes too many rounds (it will not on random samples) the rest is
// left to std::nth_element, which guarantees linear time.
void select_first_k(Keyed* items, Keyed* scratch, std::size_t n, std::size_t k) noexcept {
    std::size_t lo = 0, hi = n;
    for (int round = 0; hi - lo > 16; ++round) {
        if (round > 64) {
            std::nth_element(items + lo, items + (k - 1), items + hi, ranks_before);
            return;
        }
        const Keyed pivot = median_of_three(items[lo], items[lo + (hi - lo) / 2], items[hi - 1]);
        const std::size_t mid = lo + partition_before(items, scratch, lo, hi, pivot);
        // Put the pivot at the head of the back part, so each round settles at least one item.
        for (std::size_t i = mid; i < hi; ++i) {
            if (items[i].index == pivot.index) {
                std::swap(items[i], items[mid]);
                break;
            }
        }
        if (k <= mid) {
            hi = mid;
        } else if (k == mid + 1) {
            return;
        } else {
            lo = mid + 1;
        }
    }
    std::sort(items + lo, items + hi, ranks_before);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MAB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MAB_CLONES
#endif

// rank[i] = how many of the k (sample, index) pairs rank before pair i: k^2 branch-free comparisons over
// two plain arrays, which GCC vectorises (compiled for each instruction set; the counts are the same).
MAB_CLONES void count_ranks(const double* sample, const int64_t* index, std::size_t k, int64_t* rank) noexcept {
    for (std::size_t i = 0; i < k; ++i) {
        const double si = sample[i];
        const int64_t ii = index[i];
        int64_t r = 0;
        for (std::size_t j = 0; j < k; ++j) r += (sample[j] > si) | ((sample[j] == si) & (index[j] < ii));
        rank[i] = r;
    }
}

// Writes the indices of items[0..k) in ranking order: by counting ranks for small k, by sorting beyond.
void write_ranked(Keyed* items, std::size_t k, int64_t* idx) noexcept {
    constexpr std::size_t kCountUpTo = 256;
    if (k > kCountUpTo) {
        std::sort(items, items + k, ranks_before);
        for (std::size_t i = 0; i < k; ++i) idx[i] = items[i].index;
        return;
    }
    double sample[kCountUpTo];
    int64_t index[kCountUpTo], rank[kCountUpTo];
    for (std::size_t i = 0; i < k; ++i) {
        sample[i] = items[i].sample;
        index[i] = items[i].index;
    }
    count_ranks(sample, index, k, rank);
    for (std::size_t i = 0; i < k; ++i) idx[rank[i]] = index[i];
}

}  // namespace

int sample_beta_fill(RngState* st, const double* alpha, const double* beta, std::size_t n, double* out) noexcept {
    switch (g_isa.load(std::memory_order_relaxed)) {
#ifdef MAB_HAVE_X86_DISPATCH
        case kIsaAvx512:
            avx512::beta_fill(st, alpha, beta, n, out);
            break;
        case kIsaAvx2:
            avx2::beta_fill(st, alpha, beta, n, out);
            break;
#endif
        default:
            baseline::beta_fill(st, alpha, beta, n, out);
    }
    return kOk;
}

int top_k_indices(const double* samples, std::size_t n, std::size_t k, int64_t* idx) noexcept {
    if (k == 0) return kOk;
    constexpr std::size_t kStackItems = 2048;  // 2 x 32 KiB: a request's candidates fit without allocating
    Keyed on_stack[2 * kStackItems];
    Keyed* items = on_stack;
    if (n > kStackItems) {
        items = new (std::nothrow) Keyed[2 * n];
        if (items == nullptr) return kNoMemory;
    }
    Keyed* scratch = items + n;
    for (std::size_t i = 0; i < n; ++i) items[i] = Keyed{samples[i], static_cast<int64_t>(i)};
    select_first_k(items, scratch, n, k);
    write_ranked(items, k, idx);
    if (items != on_stack) delete[] items;
    return kOk;
}

int current_isa() noexcept { return g_isa.load(std::memory_order_relaxed); }

int best_isa() noexcept { return g_best_isa; }

int isa_request() noexcept { return g_isa_request; }

int set_isa(int isa) noexcept {
    const int chosen = std::clamp(isa, static_cast<int>(kIsaBaseline), g_best_isa);
    g_isa.store(chosen, std::memory_order_relaxed);
    return chosen;
}

}  // namespace mab
