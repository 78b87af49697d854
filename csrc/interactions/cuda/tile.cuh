// Device helpers shared by the CUDA subset transforms: butterflies on values held in registers and
// the placement of those values in a tile.
//
// A block transforms a tile of 2^kTileBits table entries in rounds. In each round a thread holds
// kPerThread = 16 entries in registers: those whose tile index has the thread's id in every bit
// except the four bits [base, base + 4), which enumerate the 16. The four butterflies along those
// bits then run in registers; between rounds the tile goes through shared memory.
#pragma once

#include <cstdint>

namespace mechinterp::interactions {

constexpr int kRegisterBits = 4;
constexpr int kPerThread = 1 << kRegisterBits;

// Tile index of a thread's entry `r` in a round whose register bits start at `base`.
__device__ __forceinline__ std::uint32_t tile_index(std::uint32_t thread, int r, int base) {
  const std::uint32_t below = thread & ((1u << base) - 1);
  return below | (static_cast<std::uint32_t>(r) << base) |
         ((thread >> base) << (base + kRegisterBits));
}

// Shared-memory slot of a tile index: one pad word every 16 entries keeps the rounds whose
// threads stride by 16 entries free of bank conflicts.
__device__ __forceinline__ std::uint32_t padded(std::uint32_t index) { return index + (index >> 4); }

template <int kTileBits>
__host__ __device__ constexpr int padded_tile_size() {
  return (1 << kTileBits) + (1 << (kTileBits - 4));
}

// lo is a coalition without some player, hi the same coalition with it: subset maps update hi from
// lo, superset maps (the adjoints) lo from hi.
template <typename T, bool kSuperset, bool kNegate>
__device__ __forceinline__ void butterfly(T& lo, T& hi) {
  if constexpr (kSuperset) {
    lo = kNegate ? lo - hi : lo + hi;
  } else {
    hi = kNegate ? hi - lo : hi + lo;
  }
}

// The butterflies along the register bits [base, base + 4) that fall in the transformed tile
// bits [first, end).
template <typename T, bool kSuperset, bool kNegate>
__device__ __forceinline__ void register_butterflies(T (&x)[kPerThread], int base, int first,
                                                     int end) {
#pragma unroll
  for (int q = 0; q < kRegisterBits; ++q) {
    if (base + q < first || base + q >= end) continue;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      if ((r & (1 << q)) == 0) butterfly<T, kSuperset, kNegate>(x[r], x[r | (1 << q)]);
    }
  }
}

}  // namespace mechinterp::interactions
