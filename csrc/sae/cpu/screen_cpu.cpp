// The screened top-k of a float32 encode on the CPU.
//
// A bfloat16 GEMM (several times faster than float32 on CPUs with bf16 instructions) gives every
// latent's pre-activation within a proven bound E. Only latents whose interval can reach the
// row's k-th largest lower end are computed again exactly, so the result is the float32 top-k,
// not an approximation of it.
//
// The bound, per row r and latent j. The screen h~ comes from x~ = bf16(x) and w~ = bf16(w)
// (rounded to nearest), exact products summed in float32, and one rounding to bf16 (u = 2^-8).
// With dx = x - x~ and dw = w - w~, x.w - x~.w~ = x~.dw + dx.w~ + dx.dw exactly, so by
// Cauchy-Schwarz
//   |x.w - h~| <= ||x~|| ||dw|| + ||dx|| ||w~|| + ||dx|| ||dw||      the roundings to bf16
//               + gamma_2d ||x~|| ||w~||                            the float32 sums
//               + u/(1-u) |h~|                                      the result's rounding
//               + 2^-125 (sqrt(d) (||x~|| + ||w~||) + d)            subnormals flushed to zero
// with gamma_n = n 2^-24 / (1 - n 2^-24) and d = d_in (2d: some GEMMs add pairs of products
// before the accumulator). Using the actual residual norms, not u ||x||, makes the intervals
// about half as wide as the textbook bound, and the recomputed latents as few.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common/dispatch.h"
#include "sae/cpu/ranking.h"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

// Loops the compiler vectorises, built for AVX-512 and AVX2 besides the baseline and picked at
// load time (the package is built for any x86-64).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MECHINTERP_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MECHINTERP_VECTOR_CLONES
#endif

// x . w in double: each float product is exact in double, so the only rounding is in the sums,
// about 2^-53 d relative, far below the float32 rounding of the result.
MECHINTERP_VECTOR_CLONES
double dot_double(const float* __restrict x, const float* __restrict w, std::int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      acc[l] += static_cast<double>(x[i + l]) * static_cast<double>(w[i + l]);
    }
  }
  double total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) total += static_cast<double>(x[i]) * static_cast<double>(w[i]);
  return total;
}

// Per latent, the parts of the interval radius that do not depend on the row, and per row the
// parts that do, each rounded up to float32:
//   radius = row.bf16_part * bf16_norm + row.residual_part * residual_norm
//            + abs_scale_u * (|h~| + row.flush_part) + bias_part + kMargin * |centre|.
// Besides the bound above they cover the float32 arithmetic of the scan (a few roundings of
// 2^-24, inside the 2^-20 slack and the 2^-21 terms) and the one rounding of the exact value to
// float32 that the ranking sees (kMargin).
struct ColumnTerms {
  std::vector<float> bias;           // b (0 without one)
  std::vector<float> scale;          // s (1 without one)
  std::vector<float> bf16_norm;      // |s| ||w~_j||
  std::vector<float> residual_norm;  // |s| ||dw_j||
  std::vector<float> abs_scale_u;    // |s| (u / (1 - u) + 2^-21)
  std::vector<float> bias_part;      // |s| 2^-21 |b|
};

struct RowTerms {
  float bf16_part;      // ||dx|| + gamma ||x~|| + 2^-125 sqrt(d)
  float residual_part;  // ||x~|| + ||dx||
  float flush_part;     // 2^-125 (sqrt(d) ||x~|| + d) / (u / (1 - u) + 2^-21)
};

constexpr double kSlack = 1.0 + 1.0 / (1 << 20);
constexpr float kMargin = 1.0f / (1 << 20);
constexpr double kFlush = 1.0 / (1ull << 62) / (1ull << 62) / 2;  // 2^-125

float round_up(double v) { return static_cast<float>(v * kSlack); }

double gamma_sums(std::int64_t d_in) {
  const double n = 2.0 * static_cast<double>(d_in) * std::ldexp(1.0, -24);
  return n / (1.0 - n);
}

double rounding_u() {
  const double u = std::ldexp(1.0, -8);
  return u / (1 - u) + std::ldexp(1.0, -21);
}

ColumnTerms column_terms(const ScreenParams& p) {
  const double u1 = rounding_u();
  ColumnTerms t;
  const auto size = static_cast<std::size_t>(p.d_sae);
  t.bias.assign(size, 0.0f);
  t.scale.assign(size, 1.0f);
  if (p.bias) std::copy(p.bias, p.bias + p.d_sae, t.bias.begin());
  if (p.scale) std::copy(p.scale, p.scale + p.d_sae, t.scale.begin());
  t.bf16_norm.resize(size);
  t.residual_norm.resize(size);
  t.abs_scale_u.resize(size);
  t.bias_part.resize(size);
  for (std::int64_t j = 0; j < p.d_sae; ++j) {
    const auto at = static_cast<std::size_t>(j);
    const double s = std::fabs(static_cast<double>(t.scale[at]));
    t.bf16_norm[at] = round_up(s * p.norms[j]);
    t.residual_norm[at] = round_up(s * p.norms[p.d_sae + j]);
    t.abs_scale_u[at] = round_up(s * u1);
    t.bias_part[at] = round_up(s * std::ldexp(std::fabs(static_cast<double>(t.bias[at])), -21));
  }
  return t;
}

// ||x~|| and ||dx|| in double for one row, and the row's parts of the radius.
RowTerms row_terms(const float* x, std::int64_t d_in) {
  double bf16_sq = 0;
  double residual_sq = 0;
  for (std::int64_t i = 0; i < d_in; ++i) {
    const double rounded = bfloat16_bits_to_float(float_to_bfloat16_bits(x[i]));
    const double residual = static_cast<double>(x[i]) - rounded;
    bf16_sq += rounded * rounded;
    residual_sq += residual * residual;
  }
  const double bf16 = std::sqrt(bf16_sq);
  const double residual = std::sqrt(residual_sq);
  const double sqrt_d = std::sqrt(static_cast<double>(d_in));
  return {round_up(residual + gamma_sums(d_in) * bf16 + kFlush * sqrt_d),
          round_up(bf16 + residual),
          round_up(kFlush * (sqrt_d * bf16 + static_cast<double>(d_in)) / rounding_u())};
}

inline float bf16_to_float(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// Every latent's interval [low, high] for one row. An inf or NaN anywhere makes an end NaN or
// infinite: a NaN low never raises the cut and a NaN or +inf high never falls below it, so such
// latents are recomputed, and a row of them is computed in full.
MECHINTERP_VECTOR_CLONES
void row_intervals(const std::uint16_t* __restrict screen, RowTerms row, std::int64_t d_sae,
                   const float* __restrict bias, const float* __restrict scale,
                   const float* __restrict bf16_norm, const float* __restrict residual_norm,
                   const float* __restrict abs_scale_u, const float* __restrict bias_part,
                   float* __restrict low, float* __restrict high) {
  for (std::int64_t j = 0; j < d_sae; ++j) {
    const float h = bf16_to_float(screen[j]);
    const float centre = (h + bias[j]) * scale[j];
    const float radius = row.bf16_part * bf16_norm[j] + row.residual_part * residual_norm[j] +
                         abs_scale_u[j] * (std::fabs(h) + row.flush_part) + bias_part[j] +
                         kMargin * std::fabs(centre);
    low[j] = centre - radius;
    high[j] = centre + radius;
  }
}

// Whether any of the 16 values from v is above bar, or (Reaching) not below it, NaN included:
// one vector compare where the ISA has one.
template <bool Reaching>
inline bool any_above(const float* v, float bar) {
  bool any = false;
  for (int l = 0; l < 16; ++l) any |= Reaching ? !(v[l] < bar) : v[l] > bar;
  return any;
}

// The k-th largest of low[0, n): a running bar (-inf until k are held) over a buffer of up to 2k
// values, cut back to the best k whenever it fills; -inf when n < k.
float kth_largest(const float* low, std::int64_t n, std::int64_t k, std::vector<float>& held) {
  held.clear();
  float bar = -std::numeric_limits<float>::infinity();
  auto take = [&](float v) {
    if (!(v > bar)) return;
    held.push_back(v);
    if (static_cast<std::int64_t>(held.size()) == 2 * k) {
      std::nth_element(held.begin(), held.begin() + (k - 1), held.end(), std::greater<float>());
      held.resize(static_cast<std::size_t>(k));
      bar = held.back();
    }
  };
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    if (any_above<false>(low + j, bar)) {
      for (int l = 0; l < 16; ++l) take(low[j + l]);
    }
  }
  for (; j < n; ++j) take(low[j]);
  if (static_cast<std::int64_t>(held.size()) < k) return -std::numeric_limits<float>::infinity();
  std::nth_element(held.begin(), held.begin() + (k - 1), held.end(), std::greater<float>());
  return held[static_cast<std::size_t>(k - 1)];
}

// One row's exact value of latent j, rounded once to float32 as the ranking sees it.
inline float exact_value(const float* x, const ScreenParams& p, std::int64_t j) {
  double v = dot_double(x, p.w_t + j * p.d_in, p.d_in);
  if (p.bias) v += p.bias[j];
  if (p.scale) v *= p.scale[j];
  return static_cast<float>(v);
}

}  // namespace

// Per row: every latent's interval, the k-th largest lower end L, and the latents whose upper
// end reaches L, recomputed exactly and ranked. Every latent of the true top k is among them:
// the k-th largest lower end is at most the true k-th value, which each of them reaches.
std::int64_t screened_topk_cpu(const BFloat16* screen, const float* x, float* out_values,
                               std::int32_t* out_index, const ScreenParams& p) {
  const ColumnTerms t = column_terms(p);
  std::int64_t recomputed = 0;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel reduction(+ : recomputed) if (p.rows > 1)
#endif
  {
    std::vector<float> low(static_cast<std::size_t>(p.d_sae));
    std::vector<float> high(static_cast<std::size_t>(p.d_sae));
    std::vector<float> held;
    held.reserve(static_cast<std::size_t>(2 * p.k));
    std::vector<std::int32_t> reaching;
    std::vector<Candidate> ranked;
#if defined(MECHINTERP_OPENMP)
#pragma omp for schedule(dynamic, 4)
#endif
    for (std::int64_t r = 0; r < p.rows; ++r) {
      const auto* row = reinterpret_cast<const std::uint16_t*>(screen + r * p.screen_row_stride);
      const float* xr = x + r * p.x_row_stride;
      row_intervals(row, row_terms(xr, p.d_in), p.d_sae, t.bias.data(), t.scale.data(),
                    t.bf16_norm.data(), t.residual_norm.data(), t.abs_scale_u.data(),
                    t.bias_part.data(), low.data(), high.data());
      const float cut = kth_largest(low.data(), p.d_sae, p.k, held);
      reaching.clear();
      for (std::int64_t j = 0; j < p.d_sae; j += 16) {
        if (j + 16 <= p.d_sae && !any_above<true>(high.data() + j, cut)) continue;
        for (std::int64_t l = j; l < std::min(j + 16, p.d_sae); ++l) {
          if (!(high[static_cast<std::size_t>(l)] < cut)) {
            reaching.push_back(static_cast<std::int32_t>(l));
          }
        }
      }
      // The rows of W^T are read from memory at random: start each a few latents ahead.
      constexpr std::size_t kAhead = 4;
      ranked.clear();
      for (std::size_t c = 0; c < reaching.size(); ++c) {
        if (c + kAhead < reaching.size()) {
          const float* next = p.w_t + reaching[c + kAhead] * p.d_in;
          for (std::int64_t i = 0; i < p.d_in; i += 16) __builtin_prefetch(next + i);
        }
        ranked.push_back({float_key_host(exact_value(xr, p, reaching[c])), reaching[c]});
      }
      recomputed += static_cast<std::int64_t>(reaching.size());
      write_best(ranked, p.k, out_values + r * p.out_row_stride,
                 out_index + r * p.out_row_stride);
    }
  }
  return recomputed;
}

}  // namespace mechinterp::sae
