// Activation-patching kernels: write many patches into a batch of activations in one pass, and
// reduce the logits of many patched runs to one metric value each without materialising
// log-softmax.
//
// patch_boxes: every box writes one rectangle of one row.
//   dest   [rows, a, f]     activations of the patched batch, written in place; any strides
//   src    [sources, a, f]  values to patch in (clean run, mean, resampled rows); any strides
//   cur    [rows, a, f]     optional: the current value of the quantity being patched when dest
//                           is only one summand of it (a residual written through attn_out)
//   boxes  [m, 6] int64     (row, source, a_begin, a_end, f_begin, f_end), contiguous
//   alpha  [m] float64      interpolation weight per box, contiguous
//   without cur: dest[box] = dest + alpha * (src - dest), exactly src where alpha == 1
//   with cur:    dest[box] = dest + alpha * (src - cur),  exactly dest where src == cur
//   `a` is the position axis for residual-like tensors ([batch, pos, d_model]), and the head axis
//   for attention patterns flattened to [batch, head, query * key]. Boxes of one row must not
//   overlap, so boxes run in any order (and in parallel) with one result.
//
// patch_metric: one value per run from its logits [rows, vocab] (any strides), summed in float32
// (float64 for float64 logits), out [rows] contiguous:
//   LogitDiff  z[target] - z[other]
//   LogProb    z[target] - logsumexp(z)
//   Prob       exp(LogProb)
//   KL         sum_v p_ref(v) (log p_ref(v) - log p(v)), p_ref the softmax of ref[ref_row]
#pragma once

#include <cstdint>
#include <optional>

#include "common/dispatch.h"
#include "common/tensor_view.h"

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::patching {

// Index views come twice: on the host (validated there) and on the data's device (read by the
// kernel); for CPU data they are the same view.
void patch_boxes(const TensorView& dest, const TensorView& src, const std::optional<TensorView>& cur,
                 const TensorView& boxes_host, const TensorView& boxes,
                 const TensorView& alpha_host, const TensorView& alpha, std::uintptr_t stream);

enum class MetricKind : std::int32_t { LogitDiff = 0, LogProb = 1, Prob = 2, KL = 3 };

void patch_metric(const TensorView& logits, MetricKind kind, const TensorView& index_host,
                  const TensorView& index, const std::optional<TensorView>& ref,
                  const TensorView& out, std::uintptr_t stream);

// One box, laid out as a row of the boxes tensor.
struct Box {
  std::int64_t row;
  std::int64_t source;
  std::int64_t a_begin;
  std::int64_t a_end;
  std::int64_t f_begin;
  std::int64_t f_end;
};
static_assert(sizeof(Box) == 6 * sizeof(std::int64_t), "Box must match a row of int64[m, 6]");

struct PatchBoxesParams {
  std::int64_t n_boxes;
  std::int64_t max_box;  // elements in the largest box
  std::int64_t dest_stride[3];
  std::int64_t src_stride[3];
  std::int64_t cur_stride[3];
  bool has_cur;
};

// index [rows, 2] int64: (target, other) for LogitDiff, (target, unused) for LogProb and Prob,
// (ref_row, unused) for KL.
struct PatchMetricParams {
  std::int64_t rows;
  std::int64_t vocab;
  std::int64_t logits_stride[2];
  std::int64_t ref_stride[2];
  MetricKind kind;
};

template <typename T>
void patch_boxes_cpu(T* dest, const T* src, const T* cur, const Box* boxes, const double* alpha,
                     const PatchBoxesParams& params);

template <typename T>
void patch_metric_cpu(const T* logits, const std::int64_t* index, const T* ref, acc_t<T>* out,
                      const PatchMetricParams& params);

#if defined(MECHINTERP_WITH_CUDA)
template <typename T>
void launch_patch_boxes_cuda(T* dest, const T* src, const T* cur, const Box* boxes,
                             const double* alpha, const PatchBoxesParams& params,
                             cudaStream_t stream);

template <typename T>
void launch_patch_metric_cuda(const T* logits, const std::int64_t* index, const T* ref,
                              acc_t<T>* out, const PatchMetricParams& params, cudaStream_t stream);
#endif

}  // namespace mechinterp::patching
