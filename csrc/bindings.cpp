#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>

#include "common/build_info.h"
#include "common/check.h"
#include "common/pyview.h"
#include "heads/heads.h"
#include "interactions/interactions.h"
#include "patching/patching.h"
#include "sae/fused_threshold.h"
#include "sae/sae.h"
#include "tracing/tracing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mechinterp's compiled kernels. Call them through mechinterp._ops, which validates.";

  // std::invalid_argument already becomes ValueError. InternalError is a std::logic_error, which
  // pybind11 would only reach through its catch-all; name the mapping so it cannot drift.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mechinterp::InternalError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def(
      "diagonal_score",
      [](py::handle pattern, py::handle out, std::int64_t offset, std::int64_t first_query,
         std::uintptr_t stream) {
        const auto pattern_view = mechinterp::view_from_py(pattern, "pattern");
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::heads::diagonal_score(pattern_view, out_view, offset, first_query, stream);
      },
      py::arg("pattern"), py::arg("out"), py::arg("offset"), py::arg("first_query"),
      py::arg("stream"),
      "out[h] = mean over batch b and query q in [max(first_query, offset), query) of "
      "pattern[b, h, q, q - offset]. pattern: view of [batch, head, query, query]; out: view of "
      "[head], float64 for float64 input else float32, written in place; stream: cudaStream_t as "
      "int (ignored on CPU).");

  m.def(
      "patch_boxes",
      [](py::handle dest, py::handle src, py::object cur, py::handle boxes_host, py::handle boxes,
         py::handle alpha_host, py::handle alpha, std::uintptr_t stream) {
        const auto dest_view = mechinterp::view_from_py(dest, "dest");
        const auto src_view = mechinterp::view_from_py(src, "src");
        std::optional<mechinterp::TensorView> cur_view;
        if (!cur.is_none()) cur_view = mechinterp::view_from_py(cur, "cur");
        const auto boxes_host_view = mechinterp::view_from_py(boxes_host, "boxes_host");
        const auto boxes_view = mechinterp::view_from_py(boxes, "boxes");
        const auto alpha_host_view = mechinterp::view_from_py(alpha_host, "alpha_host");
        const auto alpha_view = mechinterp::view_from_py(alpha, "alpha");
        py::gil_scoped_release release;
        mechinterp::patching::patch_boxes(dest_view, src_view, cur_view, boxes_host_view,
                                          boxes_view, alpha_host_view, alpha_view, stream);
      },
      py::arg("dest"), py::arg("src"), py::arg("cur"), py::arg("boxes_host"), py::arg("boxes"),
      py::arg("alpha_host"), py::arg("alpha"), py::arg("stream"),
      "Write boxes (row, source, a_begin, a_end, f_begin, f_end) of src [sources, a, f] into dest "
      "[rows, a, f] in place: dest + alpha (src - dest), or dest + alpha (src - cur) when cur is "
      "given. boxes int64 [m, 6] and alpha float64 [m] come as a host copy (validated) and a copy "
      "on dest's device (read by the kernel).");

  m.def(
      "patch_metric",
      [](py::handle logits, int kind, py::handle index_host, py::handle index, py::object ref,
         py::handle out, std::uintptr_t stream) {
        const auto logits_view = mechinterp::view_from_py(logits, "logits");
        const auto index_host_view = mechinterp::view_from_py(index_host, "index_host");
        const auto index_view = mechinterp::view_from_py(index, "index");
        std::optional<mechinterp::TensorView> ref_view;
        if (!ref.is_none()) ref_view = mechinterp::view_from_py(ref, "ref");
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::patching::patch_metric(logits_view,
                                           static_cast<mechinterp::patching::MetricKind>(kind),
                                           index_host_view, index_view, ref_view, out_view, stream);
      },
      py::arg("logits"), py::arg("kind"), py::arg("index_host"), py::arg("index"), py::arg("ref"),
      py::arg("out"), py::arg("stream"),
      "One metric value per run from logits [rows, vocab]: kind 0 logit difference z[t] - z[o], "
      "1 log-probability of t, 2 probability of t, 3 KL(softmax(ref[r]) || softmax(z)). index "
      "int64 [rows, 2] holds (t, o) or (r, unused), as a host copy and a device copy; out [rows] "
      "float32 (float64 for float64 logits).");

  m.def(
      "fill_noise",
      [](py::handle out, std::uint64_t seed, std::uint64_t offset, int kind,
         std::uintptr_t stream) {
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::tracing::fill_noise(out_view, seed, offset,
                                        static_cast<mechinterp::tracing::NoiseKind>(kind), stream);
      },
      py::arg("out"), py::arg("seed"), py::arg("offset"), py::arg("kind"), py::arg("stream"),
      "Fill the contiguous tensor out with seeded noise: element i is a function of (seed, "
      "offset + i) only (Philox4x32-10). kind 0: standard normal (Box-Muller), 1: uniform on "
      "[-1, 1).");

  m.def(
      "moebius",
      [](py::handle table, int kind, std::uintptr_t stream) {
        const auto table_view = mechinterp::view_from_py(table, "table");
        py::gil_scoped_release release;
        mechinterp::interactions::moebius(
            table_view, static_cast<mechinterp::interactions::MoebiusKind>(kind), stream);
      },
      py::arg("table"), py::arg("kind"), py::arg("stream"),
      "Transform the contiguous float64/float32 table [2^n] over coalitions in place. kind 0: "
      "Moebius m(S) = sum_{T subset S} (-1)^{|S|-|T|} v(T); 1: its inverse (zeta) v(S) = "
      "sum_{T subset S} m(T); 2: the transpose of 0 (sum over supersets); 3: the transpose of 1.");

  m.def(
      "superset_weighted_sums",
      [](py::handle dividends, py::handle weights_host, py::handle weights, py::handle scratch,
         py::handle out, std::int64_t order, std::uintptr_t stream) {
        const auto dividends_view = mechinterp::view_from_py(dividends, "dividends");
        const auto weights_host_view = mechinterp::view_from_py(weights_host, "weights_host");
        const auto weights_view = mechinterp::view_from_py(weights, "weights");
        const auto scratch_view = mechinterp::view_from_py(scratch, "scratch");
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::interactions::superset_weighted_sums(dividends_view, weights_host_view,
                                                         weights_view, scratch_view, out_view,
                                                         order, stream);
      },
      py::arg("dividends"), py::arg("weights_host"), py::arg("weights"), py::arg("scratch"),
      py::arg("out"), py::arg("order"), py::arg("stream"),
      "out[T] = sum_{S superset T} dividends[S] * weights[|S|, |T|] for every subset T of at most "
      "order players, in canonical order (by size, then combinations order). weights float64 "
      "[n + 1, order + 1] as a host copy (validated) and a copy on the device of dividends; "
      "scratch [superset_scratch_size(n, order)] with the dtype of dividends.");

  m.def("superset_scratch_size", &mechinterp::interactions::superset_scratch_size, py::arg("n"),
        py::arg("order"),
        "Elements of the scratch table superset_weighted_sums needs for n players and this "
        "order.");

  m.def("topk_segments", &mechinterp::sae::topk_segments, py::arg("cols"), py::arg("cuda"),
        "Segments the SAE selectors split cols columns into: one per SAE_CUDA_SEGMENT on CUDA, "
        "one on the CPU.");
  m.attr("SAE_CUDA_SEGMENT") = mechinterp::sae::kCudaSegment;
  m.attr("SAE_CUDA_CANDIDATES") = mechinterp::sae::kCudaCandidates;

  m.def(
      "select_topk",
      [](py::handle values, py::object index, py::object bias, py::object scale, std::int64_t k,
         std::int64_t col_offset, py::handle out_values, py::handle out_index,
         std::uintptr_t stream) {
        const auto values_view = mechinterp::view_from_py(values, "values");
        const auto index_view = mechinterp::optional_view_from_py(index, "index");
        const auto bias_view = mechinterp::optional_view_from_py(bias, "bias");
        const auto scale_view = mechinterp::optional_view_from_py(scale, "scale");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        py::gil_scoped_release release;
        mechinterp::sae::select_topk(values_view, index_view, bias_view, scale_view, k,
                                     col_offset, out_values_view, out_index_view, stream);
      },
      py::arg("values"), py::arg("index"), py::arg("bias"), py::arg("scale"), py::arg("k"),
      py::arg("col_offset"), py::arg("out_values"), py::arg("out_index"), py::arg("stream"),
      "Per row and segment of values [rows, cols], the k largest (values + bias) * scale in "
      "descending order (ties to the lower index) into out_values float32 / out_index int32 "
      "[rows, segments * k]; indices are col_offset + column, or index[r, c] when given.");

  m.def(
      "select_threshold",
      [](py::handle values, py::object bias, py::object threshold, py::object mag_scale,
         py::object mag_bias, std::int64_t col_offset, py::handle out_values, py::handle out_index,
         py::handle out_count, std::uintptr_t stream) {
        const auto values_view = mechinterp::view_from_py(values, "values");
        const auto bias_view = mechinterp::optional_view_from_py(bias, "bias");
        const auto threshold_view = mechinterp::optional_view_from_py(threshold, "threshold");
        const auto mag_scale_view = mechinterp::optional_view_from_py(mag_scale, "mag_scale");
        const auto mag_bias_view = mechinterp::optional_view_from_py(mag_bias, "mag_bias");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        const auto out_count_view = mechinterp::view_from_py(out_count, "out_count");
        py::gil_scoped_release release;
        mechinterp::sae::select_threshold(values_view, bias_view, threshold_view, mag_scale_view,
                                          mag_bias_view, col_offset, out_values_view,
                                          out_index_view, out_count_view, stream);
      },
      py::arg("values"), py::arg("bias"), py::arg("threshold"), py::arg("mag_scale"),
      py::arg("mag_bias"), py::arg("col_offset"), py::arg("out_values"), py::arg("out_index"),
      py::arg("out_count"), py::arg("stream"),
      "Columns of values [rows, cols] whose values + bias exceed threshold (0 if none), in "
      "column order per row and segment, into slots [rows, segments, cap]; the value kept is "
      "values + bias, or relu(values * mag_scale + mag_bias) (gated). out_count [rows, "
      "segments] holds the true count.");

  m.def(
      "compact_slots",
      [](py::handle kept, py::handle index, py::handle count, py::handle row_start,
         py::handle out_values, py::handle out_index, std::uintptr_t stream) {
        const auto kept_view = mechinterp::view_from_py(kept, "kept");
        const auto index_view = mechinterp::view_from_py(index, "index");
        const auto count_view = mechinterp::view_from_py(count, "count");
        const auto row_start_view = mechinterp::view_from_py(row_start, "row_start");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        py::gil_scoped_release release;
        mechinterp::sae::compact_slots(kept_view, index_view, count_view, row_start_view,
                                       out_values_view, out_index_view, stream);
      },
      py::arg("kept"), py::arg("index"), py::arg("count"), py::arg("row_start"),
      py::arg("out_values"), py::arg("out_index"), py::arg("stream"),
      "select_threshold's filled slots [rows, segments, cap] (the first min(count, cap) of each "
      "segment) as compressed rows: row r's from row_start[r] on, into out_values (float32 / "
      "float16 / bfloat16, rounded to nearest) and out_index int64 [nnz].");

  m.attr("SAE_FUSED_TILE_M") = mechinterp::sae::kFusedTileM;
  m.attr("SAE_FUSED_TILE_N") = mechinterp::sae::kFusedTileN;
  m.attr("SAE_FUSED_WARPS") = mechinterp::sae::kFusedWarps;
  {
    py::tuple names(mechinterp::sae::kFusedKernelCount);
    for (int i = 0; i < mechinterp::sae::kFusedKernelCount; ++i) {
      names[i] = mechinterp::sae::fused_kernel_name(i);
    }
    m.attr("SAE_FUSED_KERNELS") = names;
    py::list floor_names;
    for (int i = 0; i < mechinterp::sae::kFusedKernelCount; ++i) {
      if (mechinterp::sae::fused_kernel_has_row_floor(i)) {
        floor_names.append(mechinterp::sae::fused_kernel_name(i));
      }
    }
    m.attr("SAE_FUSED_FLOOR_KERNELS") = py::tuple(floor_names);
    py::tuple rasters(mechinterp::sae::kFusedRasterCount);
    for (int i = 0; i < mechinterp::sae::kFusedRasterCount; ++i) {
      rasters[i] = mechinterp::sae::fused_raster_name(i);
    }
    m.attr("SAE_FUSED_RASTERS") = rasters;
  }
  m.def("fused_threshold_available", &mechinterp::sae::fused_threshold_available,
        py::arg("device_index"),
        "Whether this build has the fused sm_90 SAE encode and the CUDA device can run it.");
  m.def("fused_threshold_workspace", &mechinterp::sae::fused_threshold_workspace, py::arg("rows"),
        py::arg("d_in"), py::arg("d_sae"), py::arg("device_index"), py::arg("kernel"),
        py::arg("raster"), py::arg("swizzle"), py::arg("row_floor"), py::arg("float16"),
        "Workspace bytes of fused_threshold_gemm for this problem on that device, kernel (an "
        "index into SAE_FUSED_KERNELS), tile order, kind of bound and element type (float16, "
        "else bfloat16).");

  m.def(
      "fused_threshold_gemm",
      [](py::handle x, py::handle weight, py::handle bias, py::handle bound, py::handle records,
         py::handle warp_count, py::handle row_count, py::handle tile_overflow,
         py::handle tile_total, py::handle workspace, int kernel, int raster, int swizzle,
         bool row_floor, std::uintptr_t stream) {
        const auto x_view = mechinterp::view_from_py(x, "x");
        const auto weight_view = mechinterp::view_from_py(weight, "weight");
        const auto bias_view = mechinterp::view_from_py(bias, "bias");
        const auto bound_view = mechinterp::view_from_py(bound, "bound");
        const auto records_view = mechinterp::view_from_py(records, "records");
        const auto warp_count_view = mechinterp::view_from_py(warp_count, "warp_count");
        const auto row_count_view = mechinterp::view_from_py(row_count, "row_count");
        const auto tile_overflow_view = mechinterp::view_from_py(tile_overflow, "tile_overflow");
        const auto tile_total_view = mechinterp::view_from_py(tile_total, "tile_total");
        const auto workspace_view = mechinterp::view_from_py(workspace, "workspace");
        py::gil_scoped_release release;
        mechinterp::sae::fused_threshold_gemm(x_view, weight_view, bias_view, bound_view,
                                              records_view, warp_count_view, row_count_view,
                                              tile_overflow_view, tile_total_view, workspace_view,
                                              kernel, raster, swizzle, row_floor, stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("bound"), py::arg("records"),
      py::arg("warp_count"), py::arg("row_count"), py::arg("tile_overflow"),
      py::arg("tile_total"), py::arg("workspace"), py::arg("kernel"), py::arg("raster"),
      py::arg("swizzle"), py::arg("row_floor"), py::arg("stream"),
      "sm_90: x [rows, d_in] @ weight [d_in, d_sae] + bias, rounded to x's type (bf16 or fp16, "
      "as are weight, bias and bound); the "
      "entries above bound ([d_sae]) become records [tiles_m, tiles_n, warps, cap] with "
      "counts per region (warp_count), per row (row_count) and per tile row (tile_total) and a "
      "flag per tile row whose regions overflowed (tile_overflow), all zeroed by the caller; "
      "kernel indexes "
      "SAE_FUSED_KERNELS, raster SAE_FUSED_RASTERS, and swizzle (1, 2, 4 or 8) is the width of "
      "the bands of tiles walked. With row_floor, bound is [rows] and an entry survives "
      "iff it is at least its row's bound or NaN (weight may then be a block of columns).");

  m.def(
      "fused_encode_pass",
      [](py::handle x, py::handle center, py::handle centered, py::handle weight,
         py::handle bias, py::handle bound, py::handle records, py::handle summary,
         py::handle warp_count, py::handle tile_overflow, py::handle tile_total,
         py::handle row_count, py::handle workspace, int kernel, int raster, int swizzle,
         bool row_floor, std::uintptr_t stream) {
        const auto x_view = mechinterp::view_from_py(x, "x");
        std::optional<mechinterp::TensorView> center_view, centered_view;
        if (!center.is_none()) center_view = mechinterp::view_from_py(center, "center");
        if (!centered.is_none()) centered_view = mechinterp::view_from_py(centered, "centered");
        const auto weight_view = mechinterp::view_from_py(weight, "weight");
        const auto bias_view = mechinterp::view_from_py(bias, "bias");
        const auto bound_view = mechinterp::view_from_py(bound, "bound");
        const auto records_view = mechinterp::view_from_py(records, "records");
        const auto summary_view = mechinterp::view_from_py(summary, "summary");
        const auto warp_count_view = mechinterp::view_from_py(warp_count, "warp_count");
        const auto tile_overflow_view = mechinterp::view_from_py(tile_overflow, "tile_overflow");
        const auto tile_total_view = mechinterp::view_from_py(tile_total, "tile_total");
        const auto row_count_view = mechinterp::view_from_py(row_count, "row_count");
        const auto workspace_view = mechinterp::view_from_py(workspace, "workspace");
        py::gil_scoped_release release;
        mechinterp::sae::fused_encode_pass(
            x_view, center_view ? &*center_view : nullptr,
            centered_view ? &*centered_view : nullptr, weight_view, bias_view, bound_view,
            records_view, summary_view, warp_count_view, tile_overflow_view, tile_total_view,
            row_count_view, workspace_view, kernel, raster, swizzle, row_floor, stream);
      },
      py::arg("x"), py::arg("center"), py::arg("centered"), py::arg("weight"), py::arg("bias"),
      py::arg("bound"), py::arg("records"), py::arg("summary"), py::arg("warp_count"),
      py::arg("tile_overflow"), py::arg("tile_total"), py::arg("row_count"),
      py::arg("workspace"), py::arg("kernel"), py::arg("raster"), py::arg("swizzle"),
      py::arg("row_floor"), py::arg("stream"),
      "Zeroes the summary and the counts and queues fused_threshold_gemm; with center (else "
      "None), x - center is first written to centered and the GEMM reads it.");

  m.def(
      "fused_summary",
      [](py::handle summary, std::uintptr_t stream) {
        const auto summary_view = mechinterp::view_from_py(summary, "summary");
        std::array<std::int64_t, 3> host{};
        {
          py::gil_scoped_release release;
          host = mechinterp::sae::fused_summary(summary_view, stream);
        }
        return py::make_tuple(host[0], host[1], host[2]);
      },
      py::arg("summary"), py::arg("stream"),
      "Waits for a fused_records_to_rows summary (int64 [3] on the device) on the stream and "
      "returns it: "
      "(entries, overflowed tile rows, widest row).");

  m.def(
      "fused_gated_magnitudes",
      [](py::handle index, py::handle values, py::handle scale, py::handle bias,
         std::uintptr_t stream) {
        const auto index_view = mechinterp::view_from_py(index, "index");
        const auto values_view = mechinterp::view_from_py(values, "values");
        const auto scale_view = mechinterp::view_from_py(scale, "scale");
        const auto bias_view = mechinterp::view_from_py(bias, "bias");
        py::gil_scoped_release release;
        mechinterp::sae::fused_gated_magnitudes(index_view, values_view, scale_view, bias_view,
                                                stream);
      },
      py::arg("index"), py::arg("values"), py::arg("scale"), py::arg("bias"), py::arg("stream"),
      "A gated SAE's survivors' activations in place: values bf16 or fp16 [n] become "
      "relu(v * scale[index] + bias[index]) in float32, the multiply rounded before the "
      "add; index int64 [n] in [0, d_sae), scale and bias float32 [d_sae].");

  m.def(
      "fused_records_to_rows",
      [](py::handle records, py::handle warp_count, py::handle row_count,
         py::handle tile_overflow, py::handle tile_total, py::handle row_ptr, py::handle summary,
         py::handle scratch_index, py::handle scratch_values, py::handle out_index,
         py::handle out_values, bool order, std::int64_t order_max, std::uintptr_t stream) {
        const auto records_view = mechinterp::view_from_py(records, "records");
        const auto warp_count_view = mechinterp::view_from_py(warp_count, "warp_count");
        const auto row_count_view = mechinterp::view_from_py(row_count, "row_count");
        const auto tile_overflow_view = mechinterp::view_from_py(tile_overflow, "tile_overflow");
        const auto tile_total_view = mechinterp::view_from_py(tile_total, "tile_total");
        const auto row_ptr_view = mechinterp::view_from_py(row_ptr, "row_ptr");
        const auto summary_view = mechinterp::view_from_py(summary, "summary");
        const auto scratch_index_view = mechinterp::view_from_py(scratch_index, "scratch_index");
        const auto scratch_values_view = mechinterp::view_from_py(scratch_values, "scratch_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        py::gil_scoped_release release;
        mechinterp::sae::fused_records_to_rows(
            records_view, warp_count_view, row_count_view, tile_overflow_view, tile_total_view,
            row_ptr_view, summary_view, scratch_index_view, scratch_values_view, out_index_view,
            out_values_view, order, order_max, stream);
      },
      py::arg("records"), py::arg("warp_count"), py::arg("row_count"), py::arg("tile_overflow"),
      py::arg("tile_total"), py::arg("row_ptr"), py::arg("summary"), py::arg("scratch_index"),
      py::arg("scratch_values"), py::arg("out_index"), py::arg("out_values"), py::arg("order"),
      py::arg("order_max"), py::arg("stream"),
      "fused_threshold_gemm's records as compressed rows: row_ptr int64 [rows + 1] from the "
      "counts (the rows of overflowed tile rows empty), summary int64 [3] (zeroed by the "
      "caller) = (entries, overflowed tile rows, widest row), and the entries (those past the "
      "arrays' nnz dropped): ordered by column into out_index int64 / out_values (the values' "
      "bf16 or fp16; rows of more than order_max entries, or ending past nnz, are not "
      "written), or in arrival order left in scratch_index / scratch_values.");

  m.def(
      "topk_candidates",
      [](py::handle values, py::object bias, py::object scale, std::int64_t k,
         std::int64_t col_offset, py::handle out_values, py::handle out_index,
         py::handle out_count, py::handle row_bar, std::uintptr_t stream) {
        const auto values_view = mechinterp::view_from_py(values, "values");
        const auto bias_view = mechinterp::optional_view_from_py(bias, "bias");
        const auto scale_view = mechinterp::optional_view_from_py(scale, "scale");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        const auto out_count_view = mechinterp::view_from_py(out_count, "out_count");
        const auto row_bar_view = mechinterp::view_from_py(row_bar, "row_bar");
        py::gil_scoped_release release;
        mechinterp::sae::topk_candidates(values_view, bias_view, scale_view, k, col_offset,
                                         out_values_view, out_index_view, out_count_view,
                                         row_bar_view, stream);
      },
      py::arg("values"), py::arg("bias"), py::arg("scale"), py::arg("k"), py::arg("col_offset"),
      py::arg("out_values"), py::arg("out_index"), py::arg("out_count"), py::arg("row_bar"),
      py::arg("stream"),
      "CUDA: per row and segment of values [rows, cols], the columns that can still be among the "
      "row's k largest (values + bias) * scale, unordered, into slots [rows, segments, cap] "
      "with counts [rows, segments]; raises row_bar (order keys) to each segment's bound.");

  m.def(
      "topk_merge",
      [](py::handle top_values, py::handle top_index, py::handle cand_values,
         py::handle cand_index, py::handle cand_count, py::handle row_bar, std::uintptr_t stream) {
        const auto top_values_view = mechinterp::view_from_py(top_values, "top_values");
        const auto top_index_view = mechinterp::view_from_py(top_index, "top_index");
        const auto cand_values_view = mechinterp::view_from_py(cand_values, "cand_values");
        const auto cand_index_view = mechinterp::view_from_py(cand_index, "cand_index");
        const auto cand_count_view = mechinterp::view_from_py(cand_count, "cand_count");
        const auto row_bar_view = mechinterp::view_from_py(row_bar, "row_bar");
        py::gil_scoped_release release;
        mechinterp::sae::topk_merge(top_values_view, top_index_view, cand_values_view,
                                    cand_index_view, cand_count_view, row_bar_view, stream);
      },
      py::arg("top_values"), py::arg("top_index"), py::arg("cand_values"), py::arg("cand_index"),
      py::arg("cand_count"), py::arg("row_bar"), py::arg("stream"),
      "CUDA: folds topk_candidates' slots into the running top-k [rows, k] (descending, ties to "
      "the lower index) and raises row_bar to its k-th key.");

  m.def(
      "topk_merge_rows",
      [](py::handle top_values, py::handle top_index, py::handle row_ptr, py::handle cand_index,
         py::handle cand_values, std::int64_t col_offset, py::handle row_bar,
         std::uintptr_t stream) {
        const auto top_values_view = mechinterp::view_from_py(top_values, "top_values");
        const auto top_index_view = mechinterp::view_from_py(top_index, "top_index");
        const auto row_ptr_view = mechinterp::view_from_py(row_ptr, "row_ptr");
        const auto cand_index_view = mechinterp::view_from_py(cand_index, "cand_index");
        const auto cand_values_view = mechinterp::view_from_py(cand_values, "cand_values");
        const auto row_bar_view = mechinterp::view_from_py(row_bar, "row_bar");
        py::gil_scoped_release release;
        mechinterp::sae::topk_merge_rows(top_values_view, top_index_view, row_ptr_view,
                                         cand_index_view, cand_values_view, col_offset,
                                         row_bar_view, stream);
      },
      py::arg("top_values"), py::arg("top_index"), py::arg("row_ptr"), py::arg("cand_index"),
      py::arg("cand_values"), py::arg("col_offset"), py::arg("row_bar"), py::arg("stream"),
      "CUDA: topk_merge with candidates as compressed rows (int32 columns from col_offset, bf16 or "
      "fp16 values).");

  m.def(
      "screened_topk",
      [](py::handle screen, py::handle x, py::handle w_t, py::handle norms, py::object bias,
         py::object scale, std::int64_t k, py::handle out_values, py::handle out_index) {
        const auto screen_view = mechinterp::view_from_py(screen, "screen");
        const auto x_view = mechinterp::view_from_py(x, "x");
        const auto w_t_view = mechinterp::view_from_py(w_t, "w_t");
        const auto norms_view = mechinterp::view_from_py(norms, "norms");
        const auto bias_view = mechinterp::optional_view_from_py(bias, "bias");
        const auto scale_view = mechinterp::optional_view_from_py(scale, "scale");
        const auto out_values_view = mechinterp::view_from_py(out_values, "out_values");
        const auto out_index_view = mechinterp::view_from_py(out_index, "out_index");
        py::gil_scoped_release release;
        return mechinterp::sae::screened_topk(screen_view, x_view, w_t_view, norms_view,
                                              bias_view, scale_view, k, out_values_view,
                                              out_index_view);
      },
      py::arg("screen"), py::arg("x"), py::arg("w_t"), py::arg("norms"), py::arg("bias"),
      py::arg("scale"), py::arg("k"), py::arg("out_values"), py::arg("out_index"),
      "CPU: the exact float32 top-k of (x W + bias) * scale per row, from a bfloat16 screen "
      "bf16(x) bf16(W) [rows, d_sae], x float32 [rows, d_in], w_t = W^T float32 [d_sae, d_in] "
      "and norms float64 [2, d_sae] (of bf16(W)'s columns and of W - bf16(W)'s, not rounded "
      "down): only latents that can reach "
      "the k-th are computed again. Output as select_topk's [rows, k]; returns how many latents "
      "were recomputed.");

  m.def(
      "sparse_decode",
      [](py::handle index, py::handle values, py::object row_ptr, py::handle weight,
         py::object bias, py::handle out, bool accumulate, std::uintptr_t stream) {
        const auto index_view = mechinterp::view_from_py(index, "index");
        const auto values_view = mechinterp::view_from_py(values, "values");
        const auto row_ptr_view = mechinterp::optional_view_from_py(row_ptr, "row_ptr");
        const auto weight_view = mechinterp::view_from_py(weight, "weight");
        const auto bias_view = mechinterp::optional_view_from_py(bias, "bias");
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::sae::sparse_decode(index_view, values_view, row_ptr_view, weight_view,
                                       bias_view, out_view, accumulate, stream);
      },
      py::arg("index"), py::arg("values"), py::arg("row_ptr"), py::arg("weight"), py::arg("bias"),
      py::arg("out"), py::arg("accumulate"), py::arg("stream"),
      "out[r] = (out[r] if accumulate else bias or 0) + sum_j values[j] weight[index[j]] over "
      "row r's entries (CSR with row_ptr, else [rows, k]); sums in float32 (float64 for "
      "float64 weight), one rounding.");

  m.def(
      "build_info",
      []() {
        const mechinterp::BuildInfo info = mechinterp::build_info();
        py::dict d;
        d["version"] = info.version;
        d["cuda"] = info.cuda;
        d["cuda_archs"] = info.cuda_archs;
        d["cuda_version"] = info.cuda_version;
        d["sae_fused_sm90"] = info.sae_fused_sm90;
        d["openmp"] = info.openmp;
        d["cpu_threads"] = info.cpu_threads;
        d["compiler"] = info.compiler;
        return d;
      },
      "What this build contains: version, cuda, cuda_archs, cuda_version, openmp, cpu_threads, "
      "compiler.");
}
