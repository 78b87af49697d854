#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "interactions/cuda/tile.cuh"
#include "interactions/interactions.h"

namespace mechinterp::interactions {

namespace {

// The transform of a table larger than one tile takes few sweeps over memory instead of n: the
// first sweep transforms the low kLowBits players of every 2^kLowBits contiguous entries; each
// later sweep transforms kHighGroupBits more players on tiles of 2^kHighGroupBits rows, spaced
// 2^first_player apart, of 128 contiguous bytes (so loads stay coalesced). For n = 28 that is
// 3 sweeps instead of 28.
constexpr int kHighGroupBits = 2 * kRegisterBits;
constexpr int kSmallThreads = 256;

// Where the entries of a tile live in the table. Tile bits [0, col_bits) are contiguous columns;
// tile bits [col_bits, col_bits + active) are the transformed players, table bits
// [bit_lo, bit_lo + active); the tile bits above them (when fewer than a full group of players
// is left) are more rows, table bits [col_bits, tile_bits - active). The block index fills the
// remaining table bits, below bit_lo first.
struct TileGeometry {
  int col_bits;
  int active;
  int bit_lo;
  int block_low_bits;  // bit_lo - (tile_bits - active)
  int rounds;          // 2 or 3
  int round_base[3];   // the register bits of each round; the first loads from and the last
                       // stores to global memory, so both must keep warps on contiguous entries
};

template <int kTileBits>
__device__ __forceinline__ std::int64_t table_index(std::uint32_t u, std::int64_t block,
                                                    const TileGeometry& g) {
  const std::int64_t column = u & ((1u << g.col_bits) - 1);
  const std::int64_t row = (u >> g.col_bits) & ((1u << g.active) - 1);
  const std::int64_t extra = u >> (g.col_bits + g.active);
  const std::int64_t block_low = block & ((std::int64_t{1} << g.block_low_bits) - 1);
  const std::int64_t block_high = block >> g.block_low_bits;
  return column | (extra << g.col_bits) | (block_low << (kTileBits - g.active)) |
         (row << g.bit_lo) | (block_high << (g.bit_lo + g.active));
}

template <typename T, bool kSuperset, bool kNegate, int kTileBits>
__global__ void __launch_bounds__(1 << (kTileBits - kRegisterBits))
    MoebiusTileKernel(T* __restrict__ table, TileGeometry g) {
  __shared__ T tile[padded_tile_size<kTileBits>()];
  const std::uint32_t thread = threadIdx.x;
  const std::int64_t block = blockIdx.x;
  const int first = g.col_bits;
  const int end = g.col_bits + g.active;
  T x[kPerThread];
#pragma unroll
  for (int round = 0; round < 3; ++round) {
    if (round >= g.rounds) break;
    const int base = g.round_base[round];
    if (round == 0) {
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        x[r] = table[table_index<kTileBits>(tile_index(thread, r, base), block, g)];
      }
    } else {
      __syncthreads();  // the previous round's stores are visible
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) x[r] = tile[padded(tile_index(thread, r, base))];
    }
    register_butterflies<T, kSuperset, kNegate>(x, base, first, end);
    if (round + 1 == g.rounds) {
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        table[table_index<kTileBits>(tile_index(thread, r, base), block, g)] = x[r];
      }
    } else {
      // Each thread writes back the slots it read, so no other thread reads them this round.
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) tile[padded(tile_index(thread, r, base))] = x[r];
    }
  }
}

// Tables of fewer than 2^kLowBits entries: one block, all in shared memory.
template <typename T, bool kSuperset, bool kNegate>
__global__ void __launch_bounds__(kSmallThreads) MoebiusSmallKernel(T* __restrict__ table, int n) {
  __shared__ T values[1 << (kLowBits - 1)];
  const int size = 1 << n;
  for (int i = threadIdx.x; i < size; i += kSmallThreads) values[i] = table[i];
  for (int player = 0; player < n; ++player) {
    __syncthreads();
    const int bit = 1 << player;
    for (int pair = threadIdx.x; pair < size / 2; pair += kSmallThreads) {
      const int lo = ((pair & ~(bit - 1)) << 1) | (pair & (bit - 1));
      butterfly<T, kSuperset, kNegate>(values[lo], values[lo | bit]);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < size; i += kSmallThreads) table[i] = values[i];
}

template <typename T, bool kSuperset, bool kNegate>
void launch(T* table, int n, cudaStream_t stream) {
  if (n < kLowBits) {
    MoebiusSmallKernel<T, kSuperset, kNegate><<<1, kSmallThreads, 0, stream>>>(table, n);
    MECHINTERP_CUDA_LAUNCH_CHECK();
    return;
  }
  // Sweep 1: register bits 8..11 first (threads on contiguous entries for the loads), then 0..3,
  // then 4..7 (half-warps on 16 contiguous entries for the stores).
  const TileGeometry low{0, kLowBits, 0, 0, 3, {8, 0, 4}};
  MoebiusTileKernel<T, kSuperset, kNegate, kLowBits>
      <<<static_cast<unsigned>(std::int64_t{1} << (n - kLowBits)),
         1 << (kLowBits - kRegisterBits), 0, stream>>>(table, low);
  MECHINTERP_CUDA_LAUNCH_CHECK();
  // Later sweeps: 128-byte columns, kHighGroupBits players in two register rounds.
  constexpr int kColBits = sizeof(T) == 8 ? 4 : 5;
  constexpr int kTileBits = kColBits + kHighGroupBits;
  for (int bit_lo = kLowBits; bit_lo < n; bit_lo += kHighGroupBits) {
    const int active = std::min(kHighGroupBits, n - bit_lo);
    const TileGeometry high{kColBits, active, bit_lo, bit_lo - (kTileBits - active), 2,
                            {kColBits, kColBits + kRegisterBits, 0}};
    MoebiusTileKernel<T, kSuperset, kNegate, kTileBits>
        <<<static_cast<unsigned>(std::int64_t{1} << (n - kTileBits)),
           1 << (kTileBits - kRegisterBits), 0, stream>>>(table, high);
    MECHINTERP_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

template <typename T>
void launch_moebius_cuda(T* table, int n, MoebiusKind kind, cudaStream_t stream) {
  switch (kind) {
    case MoebiusKind::Moebius: launch<T, false, true>(table, n, stream); break;
    case MoebiusKind::Zeta: launch<T, false, false>(table, n, stream); break;
    case MoebiusKind::MoebiusAdjoint: launch<T, true, true>(table, n, stream); break;
    case MoebiusKind::ZetaAdjoint: launch<T, true, false>(table, n, stream); break;
  }
}

template void launch_moebius_cuda<double>(double*, int, MoebiusKind, cudaStream_t);
template void launch_moebius_cuda<float>(float*, int, MoebiusKind, cudaStream_t);

}  // namespace mechinterp::interactions
