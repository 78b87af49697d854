#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "patching/patching.h"

namespace mechinterp::patching {

namespace {

// One block per run. A fixed block size and reduction tree give bit-reproducible results.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// A partial logsumexp: sum of exp(z - top) over the items seen, top their maximum.
template <typename Acc>
struct Partial {
  Acc top;
  Acc sum;
};

template <typename Acc>
__device__ __forceinline__ Partial<Acc> merge(Partial<Acc> x, Partial<Acc> y) {
  if (y.top == -INFINITY) return x;
  if (x.top == -INFINITY) return y;
  if (x.top >= y.top) return {x.top, x.sum + y.sum * exp(y.top - x.top)};
  return {y.top, y.sum + x.sum * exp(x.top - y.top)};
}

template <typename Acc>
__device__ Partial<Acc> block_merge(Partial<Acc> v, Partial<Acc>* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int delta = 16; delta > 0; delta >>= 1) {
    const Partial<Acc> other{__shfl_down_sync(0xffffffffu, v.top, delta),
                             __shfl_down_sync(0xffffffffu, v.sum, delta)};
    v = merge(v, other);
  }
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : Partial<Acc>{-INFINITY, 0};
    for (int delta = 16; delta > 0; delta >>= 1) {
      const Partial<Acc> other{__shfl_down_sync(0xffffffffu, v.top, delta),
                               __shfl_down_sync(0xffffffffu, v.sum, delta)};
      v = merge(v, other);
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const Partial<Acc> total = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return total;
}

template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : Acc(0);
    for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  }
  return v;  // valid in thread 0
}

template <typename T, typename Acc>
__device__ Acc logsumexp(const T* z, std::int64_t vocab, std::int64_t stride,
                         Partial<Acc>* shared) {
  Partial<Acc> mine{-INFINITY, 0};
  for (std::int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    mine = merge(mine, Partial<Acc>{to_acc<Acc>(z[v * stride]), Acc(1)});
  }
  const Partial<Acc> total = block_merge(mine, shared);
  return total.top + log(total.sum);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    PatchMetricKernel(const T* __restrict__ logits, const std::int64_t* __restrict__ index,
                      const T* __restrict__ ref, Acc* __restrict__ out, PatchMetricParams p) {
  __shared__ Partial<Acc> partials[kWarps];
  __shared__ Acc sums[kWarps];
  const std::int64_t r = blockIdx.x;
  const T* z = logits + r * p.logits_stride[0];
  const std::int64_t s = p.logits_stride[1];
  const std::int64_t first = index[2 * r];
  if (p.kind == MetricKind::LogitDiff) {
    if (threadIdx.x == 0) out[r] = to_acc<Acc>(z[first * s]) - to_acc<Acc>(z[index[2 * r + 1] * s]);
    return;
  }
  const Acc lse = logsumexp<T, Acc>(z, p.vocab, s, partials);
  if (p.kind != MetricKind::KL) {
    if (threadIdx.x == 0) {
      const Acc logprob = to_acc<Acc>(z[first * s]) - lse;
      out[r] = p.kind == MetricKind::Prob ? exp(logprob) : logprob;
    }
    return;
  }
  const T* y = ref + first * p.ref_stride[0];
  const std::int64_t rs = p.ref_stride[1];
  const Acc ref_lse = logsumexp<T, Acc>(y, p.vocab, rs, partials);
  Acc kl = 0;
  for (std::int64_t v = threadIdx.x; v < p.vocab; v += kThreads) {
    const Acc ref_logprob = to_acc<Acc>(y[v * rs]) - ref_lse;
    const Acc ref_prob = exp(ref_logprob);
    if (ref_prob > 0) kl += ref_prob * (ref_logprob - (to_acc<Acc>(z[v * s]) - lse));  // 0 log 0 = 0
  }
  kl = block_sum(kl, sums);
  if (threadIdx.x == 0) out[r] = kl;
}

}  // namespace

template <typename T>
void launch_patch_metric_cuda(const T* logits, const std::int64_t* index, const T* ref,
                              acc_t<T>* out, const PatchMetricParams& params,
                              cudaStream_t stream) {
  MECHINTERP_CHECK(params.rows <= std::numeric_limits<int>::max(),
                   "patch_metric: the CUDA kernel takes at most ", std::numeric_limits<int>::max(),
                   " runs per call, got ", params.rows);
  using device_t = cuda_scalar_t<T>;
  PatchMetricKernel<device_t, acc_t<T>>
      <<<static_cast<unsigned>(params.rows), kThreads, 0, stream>>>(
          reinterpret_cast<const device_t*>(logits), index,
          reinterpret_cast<const device_t*>(ref), out, params);
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_patch_metric_cuda<double>(const double*, const std::int64_t*, const double*,
                                               double*, const PatchMetricParams&, cudaStream_t);
template void launch_patch_metric_cuda<float>(const float*, const std::int64_t*, const float*,
                                              float*, const PatchMetricParams&, cudaStream_t);
template void launch_patch_metric_cuda<Half>(const Half*, const std::int64_t*, const Half*, float*,
                                             const PatchMetricParams&, cudaStream_t);
template void launch_patch_metric_cuda<BFloat16>(const BFloat16*, const std::int64_t*,
                                                 const BFloat16*, float*,
                                                 const PatchMetricParams&, cudaStream_t);

}  // namespace mechinterp::patching
