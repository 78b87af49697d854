// Subsets as bitmasks, and their place in the canonical order that every interaction result uses
// (mechinterp/interactions/subsets.py): by size, then lexicographically by sorted players, as
// itertools.combinations lists them. Usable on host and device.
#pragma once

#include <cstdint>

#if !defined(MECHINTERP_HD)
#if defined(__CUDACC__)
#define MECHINTERP_HD __host__ __device__ __forceinline__
#else
#define MECHINTERP_HD inline
#endif
#endif

namespace mechinterp::interactions {

MECHINTERP_HD int popcount(std::uint64_t mask) {
#if defined(__CUDA_ARCH__)
  return __popcll(mask);
#else
  return __builtin_popcountll(mask);
#endif
}

// C(a, b), exact for a <= 62 (each partial product is a binomial times at most a).
MECHINTERP_HD std::int64_t binomial(int a, int b) {
  if (b < 0 || b > a) return 0;
  if (b > a - b) b = a - b;
  std::int64_t result = 1;
  for (int i = 1; i <= b; ++i) result = result * (a - b + i) / i;
  return result;
}

// Subsets of n players with at most k players (0 for k < 0).
MECHINTERP_HD std::int64_t count_up_to(int n, int k) {
  std::int64_t count = 0;
  for (int s = 0; s <= k && s <= n; ++s) count += binomial(n, s);
  return count;
}

// Position of `mask` among the subsets of n players of its size, in combinations order.
// With players c_1 < ... < c_t, the subsets listed after it are counted by
// sum_i C(n - 1 - c_i, t - i + 1), and there are C(n, t) in all.
MECHINTERP_HD std::int64_t lex_rank(std::uint64_t mask, int n) {
  const int t = popcount(mask);
  std::int64_t after = 0;
  int i = 1;
  for (int player = 0; player < n; ++player) {
    if ((mask >> player) & 1u) after += binomial(n - 1 - player, t - i++ + 1);
  }
  return binomial(n, t) - 1 - after;
}

// Position of `mask` in the canonical order of all subsets of n players.
MECHINTERP_HD std::int64_t canonical_rank(std::uint64_t mask, int n) {
  return count_up_to(n, popcount(mask) - 1) + lex_rank(mask, n);
}

// The subset of t players of n at position `rank` of combinations order.
MECHINTERP_HD std::uint64_t lex_unrank(std::int64_t rank, int n, int t) {
  std::uint64_t mask = 0;
  int player = 0;
  for (int i = 1; i <= t; ++i, ++player) {
    // C(n - 1 - player, t - i) subsets have `player` as their i-th smallest.
    for (std::int64_t with = binomial(n - 1 - player, t - i); rank >= with;
         with = binomial(n - 1 - player, t - i)) {
      rank -= with;
      ++player;
    }
    mask |= std::uint64_t{1} << player;
  }
  return mask;
}

// `bits` with a zero inserted at each set bit of `holes`, so that `spread | holes` walks the
// supersets of `holes` as `bits` counts up (holes ascending keeps earlier insertions in place).
MECHINTERP_HD std::uint64_t spread_around(std::uint64_t bits, std::uint64_t holes) {
  while (holes != 0) {
    const std::uint64_t low = holes & (~holes + 1);  // lowest hole
    bits = ((bits & ~(low - 1)) << 1) | (bits & (low - 1));
    holes &= holes - 1;
  }
  return bits;
}

}  // namespace mechinterp::interactions
