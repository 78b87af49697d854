// Exact transforms over tables indexed by coalitions.
//
// A table over the coalitions of n players has 2^n entries; entry S is the coalition whose
// bitmask is S (bit i set = player i in it). Tables are 1-D, contiguous, float64 or float32.
// 16-bit floats are refused: these sums grow like 2^n and cancel heavily.
//
// moebius: table [2^n], in place, one of four linear maps, each O(n 2^n):
//   Moebius         m(S) = sum_{T subset S}   (-1)^{|S|-|T|} v(T)   (Harsanyi dividends of v)
//   Zeta            v(S) = sum_{T subset S}   m(T)                  (the inverse of Moebius)
//   MoebiusAdjoint  y(T) = sum_{S superset T} (-1)^{|S|-|T|} x(S)   (transpose of Moebius)
//   ZetaAdjoint     y(T) = sum_{S superset T} x(S)                  (transpose of Zeta)
//   Each is n rounds of butterflies, one per player i, over the pairs (S, S | 1 << i) with bit i
//   clear in S: subset maps update the upper element from the lower, adjoints the lower from the
//   upper; Moebius maps subtract, Zeta maps add.
//
// superset_weighted_sums:
//   dividends [2^n]; weights [n + 1, order + 1] float64; out [count_up_to(n, order)] like
//   dividends; scratch [superset_scratch_size(n, order)] of the accumulation type.
//   out[T] = sum_{S superset T} dividends[S] * weights[|S|, |T|] for every T with |T| <= order,
//   listed by size, then in lexicographic order of the sorted players (itertools.combinations).
//   Two levels, so the table is read once: the low kLowBits bits of S are summed inside blocks of
//   2^kLowBits entries by a superset transform of the weighted block (one per output size t),
//   which keeps the partial sums of every low pattern of at most t players in `scratch`
//   (a [columns, 2^high_bits] table); a second step adds, for each output, the partial sums over
//   the high-bit supersets. Both steps sum in a fixed order, so results do not depend on the
//   thread count. float64 tables accumulate in float64; float32 tables run the in-block
//   transform in float32 (a butterfly tree: rounding grows with the log of the number of terms)
//   and the second step in float64.
#pragma once

#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor_view.h"
#include "interactions/subsets.h"

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::interactions {

enum class MoebiusKind : std::int32_t {
  Moebius = 0,
  Zeta = 1,
  MoebiusAdjoint = 2,
  ZetaAdjoint = 3,
};

// Up to 2^40 entries: far beyond any memory, and binomials of 40 stay exact in int64.
constexpr int kMaxPlayers = 40;

// Player bits summed inside one block by superset_weighted_sums (and the first pass of the CUDA
// Moebius transform): 4096 entries, 32 KB in float64.
constexpr int kLowBits = 12;

void moebius(const TensorView& table, MoebiusKind kind, std::uintptr_t stream);

void superset_weighted_sums(const TensorView& dividends, const TensorView& weights_host,
                            const TensorView& weights, const TensorView& scratch,
                            const TensorView& out, std::int64_t order, std::uintptr_t stream);

// Elements of the scratch table superset_weighted_sums needs for n players and this order.
std::int64_t superset_scratch_size(std::int64_t n, std::int64_t order);

struct SupersetParams {
  int n;
  int order;
  int low_bits;           // min(n, kLowBits)
  int high_bits;          // n - low_bits
  std::int64_t columns;   // sum over t <= order of count_up_to(low_bits, t)
  std::int64_t outputs;   // count_up_to(n, order)
};

SupersetParams superset_params(int n, int order);

// First scratch column of output size t: sum over t' < t of count_up_to(low_bits, t').
MECHINTERP_HD std::int64_t column_base(int low_bits, int t) {
  std::int64_t base = 0;
  for (int s = 0; s < t; ++s) base += count_up_to(low_bits, s);
  return base;
}

template <typename T, bool kSuperset, bool kNegate>
void moebius_cpu(T* table, int n);

// T is double or float; scratch holds acc_t<T>.
template <typename T>
void superset_weighted_sums_cpu(const T* dividends, const double* weights, acc_t<T>* scratch,
                                T* out, const SupersetParams& params);

#if defined(MECHINTERP_WITH_CUDA)
// Enqueue on `stream` and return; the caller has made the table's device current.
template <typename T>
void launch_moebius_cuda(T* table, int n, MoebiusKind kind, cudaStream_t stream);

template <typename T>
void launch_superset_weighted_sums_cuda(const T* dividends, const double* weights,
                                        acc_t<T>* scratch, T* out, const SupersetParams& params,
                                        cudaStream_t stream);
#endif

}  // namespace mechinterp::interactions
