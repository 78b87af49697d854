#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

// (latent, value) pairs a block stages in shared memory at a time.
constexpr int kStaged = 256;

// One block per row; each thread owns kWidth adjacent outputs (one 16-byte load per decoder row
// when kVector), so the block reads each gathered decoder row once, in full, coalesced.
template <typename W, typename Acc, typename I, bool kVector>
__global__ void SparseDecodeKernel(const I* __restrict__ index, const Acc* __restrict__ values,
                                   const W* __restrict__ weight, const W* __restrict__ bias,
                                   W* __restrict__ out, DecodeParams p) {
  constexpr int kWidth = kVector ? static_cast<int>(16 / sizeof(W)) : 1;
  __shared__ std::int64_t s_latent[kStaged];
  __shared__ Acc s_value[kStaged];

  const std::int64_t row = blockIdx.x;
  const std::int64_t begin = p.row_ptr ? p.row_ptr[row] : row * p.per_row;
  const std::int64_t end = p.row_ptr ? p.row_ptr[row + 1] : begin + p.per_row;
  W* out_row = out + row * p.out_row_stride;

  for (std::int64_t base = 0; base < p.d_out; base += static_cast<std::int64_t>(blockDim.x) * kWidth) {
    const std::int64_t d0 = base + static_cast<std::int64_t>(threadIdx.x) * kWidth;
    const bool active = d0 < p.d_out;
    Acc sum[kWidth];
#pragma unroll
    for (int v = 0; v < kWidth; ++v) {
      const std::int64_t d = d0 + v;
      Acc init = Acc(0);
      if (active && d < p.d_out) {
        if (p.accumulate) {
          init = to_acc<Acc>(out_row[d]);
        } else if (bias) {
          init = to_acc<Acc>(bias[d]);
        }
      }
      sum[v] = init;
    }
    for (std::int64_t start = begin; start < end; start += kStaged) {
      const int staged = static_cast<int>(min(static_cast<std::int64_t>(kStaged), end - start));
      __syncthreads();  // the previous batch is consumed
      for (int e = threadIdx.x; e < staged; e += blockDim.x) {
        const std::int64_t latent = static_cast<std::int64_t>(index[start + e]);
        s_latent[e] = (latent >= 0 && latent < p.d_sae) ? latent : -1;
        s_value[e] = values[start + e];
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll 4
      for (int e = 0; e < staged; ++e) {
        const std::int64_t latent = s_latent[e];
        if (latent < 0) continue;
        const Acc a = s_value[e];
        const W* w = weight + latent * p.d_out + d0;
        if (kVector) {
          W buf[kWidth];
          *reinterpret_cast<uint4*>(buf) = __ldg(reinterpret_cast<const uint4*>(w));
#pragma unroll
          for (int v = 0; v < kWidth; ++v) sum[v] += a * to_acc<Acc>(buf[v]);
        } else {
          sum[0] += a * to_acc<Acc>(w[0]);
        }
      }
    }
    if (active) {
#pragma unroll
      for (int v = 0; v < kWidth; ++v) {
        if (d0 + v < p.d_out) out_row[d0 + v] = from_acc<W, Acc>(sum[v]);
      }
    }
  }
}

}  // namespace

template <typename W, typename I>
void launch_sparse_decode_cuda(const I* index, const acc_t<W>* values, const W* weight,
                               const W* bias, W* out, const DecodeParams& params,
                               cudaStream_t stream) {
  using device_t = cuda_scalar_t<W>;
  using Acc = acc_t<W>;
  MECHINTERP_CHECK(params.rows <= std::numeric_limits<int>::max(),
                   "sparse_decode: at most ", std::numeric_limits<int>::max(), " rows, got ",
                   params.rows);
  constexpr std::int64_t width = 16 / sizeof(W);
  const bool vector = params.d_out % width == 0 &&
                      reinterpret_cast<std::uintptr_t>(weight) % 16 == 0;
  const std::int64_t lanes = vector ? params.d_out / width : params.d_out;
  const int threads = static_cast<int>(std::clamp<std::int64_t>((lanes + 31) / 32 * 32, 32, 1024));
  const auto grid = static_cast<unsigned>(params.rows);
  const auto* w = reinterpret_cast<const device_t*>(weight);
  const auto* b = reinterpret_cast<const device_t*>(bias);
  auto* o = reinterpret_cast<device_t*>(out);
  if (vector) {
    SparseDecodeKernel<device_t, Acc, I, true>
        <<<grid, threads, 0, stream>>>(index, values, w, b, o, params);
  } else {
    SparseDecodeKernel<device_t, Acc, I, false>
        <<<grid, threads, 0, stream>>>(index, values, w, b, o, params);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

#define MECHINTERP_DECODE_CUDA(W, I)                                                          \
  template void launch_sparse_decode_cuda<W, I>(const I*, const acc_t<W>*, const W*, const W*, \
                                                W*, const DecodeParams&, cudaStream_t);
MECHINTERP_DECODE_CUDA(double, std::int32_t)
MECHINTERP_DECODE_CUDA(double, std::int64_t)
MECHINTERP_DECODE_CUDA(float, std::int32_t)
MECHINTERP_DECODE_CUDA(float, std::int64_t)
MECHINTERP_DECODE_CUDA(Half, std::int32_t)
MECHINTERP_DECODE_CUDA(Half, std::int64_t)
MECHINTERP_DECODE_CUDA(BFloat16, std::int32_t)
MECHINTERP_DECODE_CUDA(BFloat16, std::int64_t)
#undef MECHINTERP_DECODE_CUDA

}  // namespace mechinterp::sae
