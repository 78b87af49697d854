#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "patching/patching.h"

namespace mechinterp::patching {

namespace {

constexpr int kThreads = 256;
// Each block covers a slice of one box; large boxes (whole sequences) get several blocks.
constexpr std::int64_t kElementsPerBlock = kThreads * 8;
constexpr std::int64_t kMaxSlices = 1024;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    PatchBoxesKernel(T* __restrict__ dest, const T* __restrict__ src, const T* __restrict__ cur,
                     const Box* __restrict__ boxes, const double* __restrict__ alpha,
                     PatchBoxesParams p) {
  const Box b = boxes[blockIdx.x];
  const std::int64_t width = b.f_end - b.f_begin;
  const std::int64_t count = (b.a_end - b.a_begin) * width;
  const double weight_d = alpha[blockIdx.x];
  const Acc weight = static_cast<Acc>(weight_d);
  const bool exact_copy = cur == nullptr && weight_d == 1.0;
  // The innermost axis runs fastest across threads so that contiguous features coalesce.
  for (std::int64_t i = blockIdx.y * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.y) * kThreads) {
    const std::int64_t a = b.a_begin + i / width;
    const std::int64_t f = b.f_begin + i % width;
    T& out = dest[b.row * p.dest_stride[0] + a * p.dest_stride[1] + f * p.dest_stride[2]];
    const T in = src[b.source * p.src_stride[0] + a * p.src_stride[1] + f * p.src_stride[2]];
    if (exact_copy) {
      out = in;
      continue;
    }
    const Acc here = to_acc<Acc>(out);
    const Acc base = cur == nullptr
                         ? here
                         : to_acc<Acc>(cur[b.row * p.cur_stride[0] + a * p.cur_stride[1] +
                                           f * p.cur_stride[2]]);
    out = from_acc<T, Acc>(here + weight * (to_acc<Acc>(in) - base));
  }
}

}  // namespace

template <typename T>
void launch_patch_boxes_cuda(T* dest, const T* src, const T* cur, const Box* boxes,
                             const double* alpha, const PatchBoxesParams& params,
                             cudaStream_t stream) {
  MECHINTERP_CHECK(params.n_boxes <= std::numeric_limits<int>::max(),
                   "patch_boxes: the CUDA kernel takes at most ", std::numeric_limits<int>::max(),
                   " boxes per call, got ", params.n_boxes);
  using device_t = cuda_scalar_t<T>;
  const std::int64_t slices =
      std::min(kMaxSlices, (params.max_box + kElementsPerBlock - 1) / kElementsPerBlock);
  const dim3 grid(static_cast<unsigned>(params.n_boxes), static_cast<unsigned>(slices));
  PatchBoxesKernel<device_t, acc_t<T>><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<device_t*>(dest), reinterpret_cast<const device_t*>(src),
      reinterpret_cast<const device_t*>(cur), boxes, alpha, params);
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_patch_boxes_cuda<double>(double*, const double*, const double*, const Box*,
                                              const double*, const PatchBoxesParams&,
                                              cudaStream_t);
template void launch_patch_boxes_cuda<float>(float*, const float*, const float*, const Box*,
                                             const double*, const PatchBoxesParams&, cudaStream_t);
template void launch_patch_boxes_cuda<Half>(Half*, const Half*, const Half*, const Box*,
                                            const double*, const PatchBoxesParams&, cudaStream_t);
template void launch_patch_boxes_cuda<BFloat16>(BFloat16*, const BFloat16*, const BFloat16*,
                                                const Box*, const double*,
                                                const PatchBoxesParams&, cudaStream_t);

}  // namespace mechinterp::patching
