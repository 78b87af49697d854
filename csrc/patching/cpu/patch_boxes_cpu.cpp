#include <cstdint>

#include "common/dispatch.h"
#include "patching/patching.h"

namespace mechinterp::patching {

template <typename T>
void patch_boxes_cpu(T* dest, const T* src, const T* cur, const Box* boxes, const double* alpha,
                     const PatchBoxesParams& p) {
  using acc = acc_t<T>;
  // Boxes of one row are disjoint (checked), so boxes can run on any thread in any order.
  const bool parallel = p.n_boxes > 1 && p.n_boxes * p.max_box >= 65536;
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
#endif
  for (std::int64_t i = 0; i < p.n_boxes; ++i) {
    const Box b = boxes[i];
    const acc weight = static_cast<acc>(alpha[i]);
    const bool exact_copy = cur == nullptr && alpha[i] == 1.0;
    for (std::int64_t a = b.a_begin; a < b.a_end; ++a) {
      T* d = dest + b.row * p.dest_stride[0] + a * p.dest_stride[1];
      const T* s = src + b.source * p.src_stride[0] + a * p.src_stride[1];
      const T* c = cur == nullptr ? nullptr : cur + b.row * p.cur_stride[0] + a * p.cur_stride[1];
      for (std::int64_t f = b.f_begin; f < b.f_end; ++f) {
        T& out = d[f * p.dest_stride[2]];
        const T in = s[f * p.src_stride[2]];
        if (exact_copy) {
          out = in;
          continue;
        }
        const acc here = static_cast<acc>(out);
        const acc base = c == nullptr ? here : static_cast<acc>(c[f * p.cur_stride[2]]);
        out = static_cast<T>(here + weight * (static_cast<acc>(in) - base));
      }
    }
  }
}

template void patch_boxes_cpu<double>(double*, const double*, const double*, const Box*,
                                      const double*, const PatchBoxesParams&);
template void patch_boxes_cpu<float>(float*, const float*, const float*, const Box*,
                                     const double*, const PatchBoxesParams&);
template void patch_boxes_cpu<Half>(Half*, const Half*, const Half*, const Box*, const double*,
                                    const PatchBoxesParams&);
template void patch_boxes_cpu<BFloat16>(BFloat16*, const BFloat16*, const BFloat16*, const Box*,
                                        const double*, const PatchBoxesParams&);

}  // namespace mechinterp::patching
