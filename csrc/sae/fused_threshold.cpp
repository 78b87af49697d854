#include "sae/fused_threshold.h"

#include <array>
#include <atomic>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "sae/checks.h"

namespace mechinterp::sae {

namespace {

constexpr const char* kGemmOp = "fused_threshold_gemm";
constexpr const char* kRowsOp = "fused_records_to_rows";

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The records' tile grid of a [rows, d_sae] problem: at most 65,535 tile rows (8,388,480 rows)
// a call, far past what a call's record budget lets the encode ask for.
void check_problem(std::int64_t rows, std::int64_t d_in, std::int64_t d_sae, const char* op) {
  MECHINTERP_CHECK(rows >= 1 && rows <= INT32_MAX && d_in >= 8 && d_in <= INT32_MAX &&
                       d_sae >= 8 && d_sae <= INT32_MAX,
                   op, ": rows, d_in and d_sae must lie in [1 or 8, 2^31), got ", rows, ", ",
                   d_in, " and ", d_sae);
  MECHINTERP_CHECK(d_in % 8 == 0 && d_sae % 8 == 0, op,
                   ": d_in and d_sae must be multiples of 8 (16-byte rows), got ", d_in, " and ",
                   d_sae);
  MECHINTERP_CHECK(fused_tiles(rows, kFusedTileM) <= 65535, op, ": at most ",
                   65535 * std::int64_t{kFusedTileM}, " rows a call, got ", rows);
}

[[noreturn]] void throw_not_built(const char* op) {
  detail::throw_user_error(op, ": this build has no fused encode (it needs CUDA architecture 90 "
                           "and CUTLASS's headers at build time)");
}

#if defined(MECHINTERP_WITH_SM90_FUSED)
void require_available(int device_index, const char* op) {
  MECHINTERP_CHECK(fused_threshold_available(device_index), op,
                   ": needs a GPU of compute capability 9.0 (Hopper); cuda:", device_index,
                   " is not one");
}

// Asked once a device: the GEMM's launch needs it on every call, and each driver call costs
// the host time while the GPU waits. Devices past the first 64 are asked every time.
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> known{};
  if (device >= 0 && device < 64) {
    const int count = known[device].load(std::memory_order_relaxed);
    if (count > 0) return count;
  }
  int count = 0;
  MECHINTERP_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) known[device].store(count, std::memory_order_relaxed);
  return count;
}

// Three int64 of pinned host memory for fused_summary, freed with their thread.
struct PinnedSummary {
  std::int64_t* data = nullptr;
  PinnedSummary() {
    // Portable: pinned for every device's context, not only the one current here.
    MECHINTERP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&data),
                                        3 * sizeof(std::int64_t), cudaHostAllocPortable));
  }
  ~PinnedSummary() { (void)cudaFreeHost(data); }  // at exit CUDA may be gone: nothing to do then
  PinnedSummary(const PinnedSummary&) = delete;
  PinnedSummary& operator=(const PinnedSummary&) = delete;
};

FusedGemmEntry gemm_entry(int kernel, bool row_floor, bool float16) {
  switch (static_cast<FusedKernel>(kernel)) {
    case FusedKernel::kCluster2x1:
      if (float16) return row_floor ? cluster_2x1_floor_gemm_f16() : cluster_2x1_gemm_f16();
      return row_floor ? cluster_2x1_floor_gemm() : cluster_2x1_gemm();
    case FusedKernel::kCluster1x2:  // no floor variant: check_kernel
      return float16 ? cluster_1x2_gemm_f16() : cluster_1x2_gemm();
    case FusedKernel::kPingPong2x1:
      if (float16) return row_floor ? pingpong_2x1_floor_gemm_f16() : pingpong_2x1_gemm_f16();
      return row_floor ? pingpong_2x1_floor_gemm() : pingpong_2x1_gemm();
  }
  return {};  // unreachable: check_kernel ran first
}
#endif

void check_kernel(int kernel, bool row_floor, const char* op) {
  MECHINTERP_CHECK(kernel >= 0 && kernel < kFusedKernelCount, op, ": kernel must lie in [0, ",
                   kFusedKernelCount, "), got ", kernel);
  MECHINTERP_CHECK(!row_floor || fused_kernel_has_row_floor(kernel), op, ": kernel ",
                   fused_kernel_name(kernel), " has no variant with a floor per row (row_floor); "
                   "cluster_2x1 and pingpong_2x1 do");
}

void check_raster(int raster, const char* op) {
  MECHINTERP_CHECK(raster >= 0 && raster < kFusedRasterCount, op, ": raster must lie in [0, ",
                   kFusedRasterCount, "), got ", raster);
}

void check_schedule(int raster, int swizzle, const char* op) {
  check_raster(raster, op);
  MECHINTERP_CHECK(swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8, op,
                   ": swizzle must be 1, 2, 4 or 8, got ", swizzle);
}

}  // namespace

bool fused_kernel_has_row_floor(int kernel) {
  return kernel == static_cast<int>(FusedKernel::kCluster2x1) ||
         kernel == static_cast<int>(FusedKernel::kPingPong2x1);
}

const char* fused_kernel_name(int kernel) {
  check_kernel(kernel, false, "fused_kernel_name");
  static constexpr const char* kNames[kFusedKernelCount] = {"cluster_2x1", "cluster_1x2",
                                                            "pingpong_2x1"};
  return kNames[kernel];
}

const char* fused_raster_name(int raster) {
  check_raster(raster, "fused_raster_name");
  static constexpr const char* kNames[kFusedRasterCount] = {"heuristic", "along_m", "along_n"};
  return kNames[raster];
}

bool fused_threshold_available(int device_index) {
#if defined(MECHINTERP_WITH_SM90_FUSED)
  // A device's compute capability does not change while the process runs, and every launch
  // asks: the answer is kept for the first 64 devices (0 unknown, 1 yes, 2 no).
  static std::array<std::atomic<signed char>, 64> known{};
  const bool kept = device_index >= 0 && device_index < 64;
  if (kept) {
    const signed char answer = known[device_index].load(std::memory_order_relaxed);
    if (answer != 0) return answer == 1;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device_index < 0 || device_index >= count) {
    (void)cudaGetLastError();  // no device is not an error here
    return false;
  }
  int major = 0, minor = 0;
  MECHINTERP_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_index));
  MECHINTERP_CUDA_CHECK(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_index));
  // sm_90a code runs on compute capability 9.0 only.
  const bool available = major == 9 && minor == 0;
  if (kept) known[device_index].store(available ? 1 : 2, std::memory_order_relaxed);
  return available;
#else
  (void)device_index;
  return false;
#endif
}

std::int64_t fused_threshold_workspace(std::int64_t rows, std::int64_t d_in, std::int64_t d_sae,
                                       int device_index, int kernel, int raster, int swizzle,
                                       bool row_floor, bool float16) {
  constexpr const char* kOp = "fused_threshold_workspace";
  check_problem(rows, d_in, d_sae, kOp);
  check_kernel(kernel, row_floor, kOp);
  check_schedule(raster, swizzle, kOp);
#if defined(MECHINTERP_WITH_SM90_FUSED)
  require_available(device_index, kOp);
  const CudaDeviceGuard guard(device_index);
  FusedGemmParams p{};
  p.rows = rows;
  p.d_in = d_in;
  p.d_sae = d_sae;
  p.cap = 1;
  p.device = device_index;
  p.sm_count = sm_count(device_index);
  p.raster = raster;
  p.swizzle = swizzle;
  p.weight_ld = d_sae;
  return static_cast<std::int64_t>(gemm_entry(kernel, row_floor, float16).workspace_bytes(p));
#else
  (void)device_index;
  (void)float16;
  throw_not_built(kOp);
#endif
}

void fused_threshold_gemm(const TensorView& x, const TensorView& weight, const TensorView& bias,
                          const TensorView& bound, const TensorView& records,
                          const TensorView& warp_count, const TensorView& row_count,
                          const TensorView& tile_overflow, const TensorView& tile_total,
                          const TensorView& workspace, int kernel, int raster, int swizzle,
                          bool row_floor, std::uintptr_t stream) {
  MECHINTERP_CHECK(x.dim() == 2 && x.is_contiguous() &&
                       (x.dtype == DType::BFloat16 || x.dtype == DType::Float16),
                   kGemmOp, ": x must be a contiguous bfloat16 or float16 [rows, d_in], got ",
                   dtype_name(x.dtype), " ", x.shape_string());
  const DType element = x.dtype;  // the weight, bias and bound's too
  const std::int64_t rows = x.size(0);
  const std::int64_t d_in = x.size(1);
  MECHINTERP_CHECK(weight.dim() == 2 && weight.size(0) == d_in, kGemmOp,
                   ": weight must be [d_in=", d_in, ", d_sae], got ", weight.shape_string());
  const std::int64_t d_sae = weight.size(1);
  check_problem(rows, d_in, d_sae, kGemmOp);
  check_kernel(kernel, row_floor, kGemmOp);
  check_schedule(raster, swizzle, kGemmOp);
  if (row_floor) {
    // A block of columns of a wider weight: TMA needs unit column stride and 16-byte rows.
    MECHINTERP_CHECK(weight.dtype == element, kGemmOp, ": weight must be ", dtype_name(element),
                     " (as x), got ", dtype_name(weight.dtype));
    check_same_device(weight, x, kGemmOp, "weight", "x");
    MECHINTERP_CHECK(weight.stride(1) == 1 && weight.stride(0) >= d_sae &&
                         weight.stride(0) % 8 == 0,
                     kGemmOp, ": weight must have unit column stride and a row stride that is a "
                     "multiple of 8 and at least d_sae=", d_sae, ", got strides (",
                     weight.stride(0), ", ", weight.stride(1), ")");
  } else {
    check_block(weight, {d_in, d_sae}, element, x, kGemmOp, "weight", "x");
  }
  check_block(bias, {d_sae}, element, x, kGemmOp, "bias", "x");
  check_block(bound, {row_floor ? rows : d_sae}, element, x, kGemmOp, "bound", "x");
  const std::int64_t tiles_m = fused_tiles(rows, kFusedTileM);
  const std::int64_t tiles_n = fused_tiles(d_sae, kFusedTileN);
  MECHINTERP_CHECK(records.dim() == 4, kGemmOp, ": records must be [", tiles_m, ", ", tiles_n,
                   ", ", kFusedWarps, ", cap], got ", records.shape_string());
  const std::int64_t cap = records.size(3);
  MECHINTERP_CHECK(cap >= 1 && cap <= INT32_MAX, kGemmOp, ": records' cap must be >= 1, got ",
                   cap);
  check_block(records, {tiles_m, tiles_n, kFusedWarps, cap}, DType::Int32, x, kGemmOp, "records",
              "x");
  check_block(warp_count, {tiles_m, tiles_n, kFusedWarps}, DType::Int32, x, kGemmOp,
              "warp_count", "x");
  check_block(row_count, {rows}, DType::Int32, x, kGemmOp, "row_count", "x");
  check_block(tile_overflow, {tiles_m}, DType::Int32, x, kGemmOp, "tile_overflow", "x");
  check_block(tile_total, {tiles_m}, DType::Int32, x, kGemmOp, "tile_total", "x");
  MECHINTERP_CHECK(workspace.is_contiguous(), kGemmOp, ": workspace must be contiguous");
  check_same_device(workspace, x, kGemmOp, "workspace", "x");
  for (const auto* t : {&x, &weight, &bias, &bound, &workspace}) {
    MECHINTERP_CHECK(aligned16(t->data) || t->numel() == 0, kGemmOp,
                     ": x, weight, bias, bound and workspace must start on 16-byte boundaries "
                     "(the kernel reads them by TMA)");
  }
#if defined(MECHINTERP_WITH_SM90_FUSED)
  MECHINTERP_CHECK(x.is_cuda(), kGemmOp, ": runs on CUDA only, got ", device_name(x.device));
  require_available(x.device.index, kGemmOp);
  const CudaDeviceGuard guard(x.device.index);
  FusedGemmParams p{};
  p.rows = rows;
  p.d_in = d_in;
  p.d_sae = d_sae;
  p.cap = cap;
  p.device = x.device.index;
  p.sm_count = sm_count(p.device);
  p.raster = raster;
  p.swizzle = swizzle;
  p.x = x.data;
  p.weight = weight.data;
  p.weight_ld = weight.stride(0);
  p.bias = bias.data;
  p.bound = bound.data;
  p.records = records.data_as<std::uint32_t>();
  p.warp_count = warp_count.data_as<std::int32_t>();
  p.row_count = row_count.data_as<std::int32_t>();
  p.tile_overflow = tile_overflow.data_as<std::int32_t>();
  p.tile_total = tile_total.data_as<std::int32_t>();
  p.workspace_bytes = static_cast<std::size_t>(workspace.numel()) * dtype_itemsize(workspace.dtype);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const char* refused = gemm_entry(kernel, row_floor, element == DType::Float16)
                            .run(p, workspace.data, cuda_stream);
  MECHINTERP_CHECK(refused[0] == '\0', kGemmOp, ": ", refused, " (rows ", rows, ", d_in ", d_in,
                   ", d_sae ", d_sae, ", kernel ", fused_kernel_name(kernel), ", raster ",
                   fused_raster_name(raster), ", swizzle ", swizzle, ")");
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
#else
  (void)stream;
  throw_not_built(kGemmOp);
#endif
}

void fused_encode_pass(
    const TensorView& x, const TensorView* center, const TensorView* centered,
    const TensorView& weight, const TensorView& bias, const TensorView& bound,
    const TensorView& records, const TensorView& summary, const TensorView& warp_count,
    const TensorView& tile_overflow, const TensorView& tile_total, const TensorView& row_count,
    const TensorView& workspace, int kernel, int raster, int swizzle, bool row_floor,
    std::uintptr_t stream) {
  constexpr const char* kOp = "fused_encode_pass";
  MECHINTERP_CHECK(x.dim() == 2 && weight.dim() == 2, kOp, ": x and weight must be 2-d, got ",
                   x.shape_string(), " and ", weight.shape_string());
  MECHINTERP_CHECK((center == nullptr) == (centered == nullptr), kOp,
                   ": center and centered come together (both or neither)");
  if (center != nullptr) {
    MECHINTERP_CHECK(x.is_contiguous() &&
                         (x.dtype == DType::BFloat16 || x.dtype == DType::Float16),
                     kOp, ": x must be a contiguous bfloat16 or float16 [rows, d_in], got ",
                     dtype_name(x.dtype), " ", x.shape_string());
    check_block(*center, {x.size(1)}, x.dtype, x, kOp, "center", "x");
    check_block(*centered, {x.size(0), x.size(1)}, x.dtype, x, kOp, "centered", "x");
    MECHINTERP_CHECK(aligned16(centered->data), kOp,
                     ": centered must start on a 16-byte boundary (the GEMM reads it by TMA)");
  }
  // The counts are zeroed before the GEMM checks the rest, so their sizes are checked here.
  const std::int64_t rows = x.size(0);
  const std::int64_t tiles_m = fused_tiles(rows, kFusedTileM);
  const std::int64_t tiles_n = fused_tiles(weight.size(1), kFusedTileN);
  check_block(summary, {3}, DType::Int64, x, kOp, "summary", "x");
  check_block(warp_count, {tiles_m, tiles_n, kFusedWarps}, DType::Int32, x, kOp, "warp_count",
              "x");
  check_block(tile_overflow, {tiles_m}, DType::Int32, x, kOp, "tile_overflow", "x");
  check_block(tile_total, {tiles_m}, DType::Int32, x, kOp, "tile_total", "x");
  check_block(row_count, {rows}, DType::Int32, x, kOp, "row_count", "x");
  // The summary and the counts, laid back to back in that order (as _ops lays them out).
  const TensorView* zeroed[] = {&summary, &warp_count, &tile_overflow, &tile_total, &row_count};
  bool back_to_back = true;
  std::int64_t words = 0;
  for (const auto* z : zeroed) {
    back_to_back = back_to_back && static_cast<const char*>(z->data) ==
                                       static_cast<const char*>(summary.data) + 4 * words;
    words += z->numel() * static_cast<std::int64_t>(dtype_itemsize(z->dtype)) / 4;
  }
#if defined(MECHINTERP_WITH_SM90_FUSED)
  MECHINTERP_CHECK(x.is_cuda(), kOp, ": runs on CUDA only, got ", device_name(x.device));
  const CudaDeviceGuard guard(x.device.index);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  // One launch each: while the host makes them, the GPU waits for the GEMM.
  const bool centering = center != nullptr && rows > 0 && x.size(1) > 0;
  if (!back_to_back) {
    for (const auto* z : zeroed) {
      MECHINTERP_CUDA_CHECK(cudaMemsetAsync(
          z->data, 0, static_cast<std::size_t>(z->numel()) * dtype_itemsize(z->dtype),
          cuda_stream));
    }
  } else if (!centering) {
    MECHINTERP_CUDA_CHECK(cudaMemsetAsync(summary.data, 0,
                                          static_cast<std::size_t>(words) * 4, cuda_stream));
  }
  if (centering) {  // zeroes what lies back to back as well
    launch_center_rows(x.data_as<std::uint16_t>(), center->data_as<std::uint16_t>(),
                       centered->data_as<std::uint16_t>(), rows, x.size(1),
                       x.dtype == DType::Float16, aligned16(x.data),
                       back_to_back ? summary.data_as<std::int32_t>() : nullptr,
                       back_to_back ? words : 0, sm_count(x.device.index), cuda_stream);
  }
  fused_threshold_gemm(centering ? *centered : x, weight, bias, bound, records, warp_count,
                       row_count, tile_overflow, tile_total, workspace, kernel, raster, swizzle,
                       row_floor, stream);
#else
  // Without the fused build the GEMM's own call names the reason.
  (void)words;
  fused_threshold_gemm(x, weight, bias, bound, records, warp_count, row_count, tile_overflow,
                       tile_total, workspace, kernel, raster, swizzle, row_floor, stream);
#endif
}

std::array<std::int64_t, 3> fused_summary(const TensorView& summary, std::uintptr_t stream) {
  constexpr const char* kOp = "fused_summary";
  check_block(summary, {3}, DType::Int64, summary, kOp, "summary", "summary");
  MECHINTERP_CHECK(summary.is_cuda(), kOp, ": summary must be on a CUDA device, got ",
                   device_name(summary.device));
  std::array<std::int64_t, 3> host{};
#if defined(MECHINTERP_WITH_SM90_FUSED)
  const CudaDeviceGuard guard(summary.device.index);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  // Into pinned memory, one a thread: a copy to pageable memory goes through a staging buffer,
  // which the host waits for after the encode's last kernel.
  thread_local const PinnedSummary pinned;
  MECHINTERP_CUDA_CHECK(cudaMemcpyAsync(pinned.data, summary.data, sizeof(host),
                                        cudaMemcpyDeviceToHost, cuda_stream));
  MECHINTERP_CUDA_CHECK(cudaStreamSynchronize(cuda_stream));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = pinned.data[i];
#else
  (void)stream;
  throw_not_built(kOp);
#endif
  return host;
}

void fused_records_to_rows(const TensorView& records, const TensorView& warp_count,
                           const TensorView& row_count, const TensorView& tile_overflow,
                           const TensorView& tile_total, const TensorView& row_ptr,
                           const TensorView& summary, const TensorView& scratch_index,
                           const TensorView& scratch_values, const TensorView& out_index,
                           const TensorView& out_values, bool order, std::int64_t order_max,
                           std::uintptr_t stream) {
  MECHINTERP_CHECK(records.dim() == 4 && records.size(2) == kFusedWarps, kRowsOp,
                   ": records must be [tiles_m, tiles_n, ", kFusedWarps, ", cap], got ",
                   records.shape_string());
  const std::int64_t tiles_m = records.size(0);
  const std::int64_t tiles_n = records.size(1);
  const std::int64_t cap = records.size(3);
  check_block(records, {tiles_m, tiles_n, kFusedWarps, cap}, DType::Int32, records, kRowsOp,
              "records", "records");
  check_block(warp_count, {tiles_m, tiles_n, kFusedWarps}, DType::Int32, records, kRowsOp,
              "warp_count", "records");
  MECHINTERP_CHECK(row_count.dim() == 1 && row_count.size(0) >= 1, kRowsOp,
                   ": row_count must be [rows], rows >= 1, got ", row_count.shape_string());
  const std::int64_t rows = row_count.size(0);
  MECHINTERP_CHECK(fused_tiles(rows, kFusedTileM) == tiles_m && tiles_m <= 65535, kRowsOp,
                   ": records hold ", tiles_m, " tile rows, which does not fit ", rows,
                   " rows (row_count ", row_count.shape_string(), ")");
  check_block(row_count, {rows}, DType::Int32, records, kRowsOp, "row_count", "records");
  check_block(tile_overflow, {tiles_m}, DType::Int32, records, kRowsOp, "tile_overflow",
              "records");
  check_block(tile_total, {tiles_m}, DType::Int32, records, kRowsOp, "tile_total", "records");
  check_block(row_ptr, {rows + 1}, DType::Int64, records, kRowsOp, "row_ptr", "records");
  check_block(summary, {3}, DType::Int64, records, kRowsOp, "summary", "records");
  MECHINTERP_CHECK(scratch_index.dim() == 1, kRowsOp, ": scratch_index must be [nnz], got ",
                   scratch_index.shape_string());
  const std::int64_t nnz = scratch_index.size(0);
  check_block(scratch_index, {nnz}, DType::Int32, records, kRowsOp, "scratch_index", "records");
  // The records' 16 bits are copied as they are: either 16-bit float type, as long as both
  // value arrays agree.
  check_half_values(scratch_values, kRowsOp, "scratch_values");
  check_block(scratch_values, {nnz}, scratch_values.dtype, records, kRowsOp, "scratch_values",
              "records");
  MECHINTERP_CHECK(order_max >= 0, kRowsOp, ": order_max must be at least 0, got ", order_max);
  if (order) {  // without order, out_* are not touched
    check_block(out_index, {nnz}, DType::Int64, records, kRowsOp, "out_index", "records");
    check_block(out_values, {nnz}, scratch_values.dtype, records, kRowsOp, "out_values",
                "records");
  }
#if defined(MECHINTERP_WITH_SM90_FUSED)
  MECHINTERP_CHECK(records.is_cuda(), kRowsOp, ": runs on CUDA only, got ",
                   device_name(records.device));
  const CudaDeviceGuard guard(records.device.index);
  FusedRowsParams p{};
  p.rows = rows;
  p.tiles_m = tiles_m;
  p.tiles_n = tiles_n;
  p.cap = cap;
  p.nnz = nnz;
  p.order_max = order_max;
  p.order = order;
  const FusedCounts counts{warp_count.data_as<std::int32_t>(), row_count.data_as<std::int32_t>(),
                           tile_overflow.data_as<std::int32_t>(),
                           tile_total.data_as<std::int32_t>()};
  launch_fused_records_to_rows(
      records.data_as<std::uint32_t>(), counts, row_ptr.data_as<std::int64_t>(),
      summary.data_as<std::int64_t>(), scratch_index.data_as<std::int32_t>(),
      scratch_values.data_as<std::uint16_t>(), out_index.data_as<std::int64_t>(),
      out_values.data_as<std::uint16_t>(), p, reinterpret_cast<cudaStream_t>(stream));
#else
  (void)order;
  (void)stream;
  throw_not_built(kRowsOp);
#endif
}

void fused_gated_magnitudes(const TensorView& index, const TensorView& values,
                            const TensorView& scale, const TensorView& bias,
                            std::uintptr_t stream) {
  constexpr const char* kOp = "fused_gated_magnitudes";
  MECHINTERP_CHECK(index.dim() == 1, kOp, ": index must be [n], got ", index.shape_string());
  MECHINTERP_CHECK(scale.dim() == 1, kOp, ": scale must be [d_sae], got ",
                   scale.shape_string());
  const std::int64_t n = index.size(0);
  const std::int64_t d_sae = scale.size(0);
  check_block(index, {n}, DType::Int64, index, kOp, "index", "index");
  check_half_values(values, kOp, "values");
  check_block(values, {n}, values.dtype, index, kOp, "values", "index");
  check_block(scale, {d_sae}, DType::Float32, index, kOp, "scale", "index");
  check_block(bias, {d_sae}, DType::Float32, index, kOp, "bias", "index");
#if defined(MECHINTERP_WITH_SM90_FUSED)
  MECHINTERP_CHECK(index.is_cuda(), kOp, ": runs on CUDA only, got ", device_name(index.device));
  const CudaDeviceGuard guard(index.device.index);
  launch_gated_magnitudes(index.data_as<std::int64_t>(), values.data_as<std::uint16_t>(),
                          scale.data_as<float>(), bias.data_as<float>(), n,
                          values.dtype == DType::Float16, reinterpret_cast<cudaStream_t>(stream));
#else
  (void)stream;
  throw_not_built(kOp);
#endif
}

}  // namespace mechinterp::sae
