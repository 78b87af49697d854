#include "interactions/interactions.h"

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace mechinterp::interactions {

namespace {

void check_memory(const TensorView& view, const char* op, const char* name) {
  MECHINTERP_CHECK(view.numel() == 0 || view.data != nullptr, op, ": ", name, " has ",
                   view.numel(), " elements but a null data pointer");
}

// The number of players of a coalition table, after checking that it is one.
int players_of_table(const TensorView& table, const char* op, const char* name) {
  MECHINTERP_CHECK(table.dtype == DType::Float64 || table.dtype == DType::Float32, op, ": ", name,
                   " must be float64 or float32, got ", dtype_name(table.dtype));
  MECHINTERP_CHECK(table.dim() == 1, op, ": ", name,
                   " must be 1-D [2^n] (one entry per coalition), got shape ",
                   table.shape_string());
  const std::int64_t length = table.size(0);
  MECHINTERP_CHECK(length > 0 && (length & (length - 1)) == 0, op, ": ", name,
                   " must have a power-of-two length 2^n (one entry per coalition of n players), "
                   "got length ",
                   length);
  MECHINTERP_CHECK(table.is_contiguous(), op, ": ", name, " must be contiguous, got stride ",
                   table.stride(0));
  check_memory(table, op, name);
  int n = 0;
  while ((std::int64_t{1} << n) < length) ++n;
  MECHINTERP_CHECK(n <= kMaxPlayers, op, ": ", name, " covers n=", n,
                   " players; at most ", kMaxPlayers, " are supported");
  return n;
}

void check_same_device(const TensorView& view, const TensorView& table, const char* op,
                       const char* name, const char* table_name) {
  MECHINTERP_CHECK(view.device == table.device, op, ": ", name, " and ", table_name,
                   " must be on the same device, got ", name, " on ", device_name(view.device),
                   " and ", table_name, " on ", device_name(table.device));
}

void check_weights(const TensorView& weights, int n, std::int64_t order, const char* name) {
  constexpr const char* kOp = "superset_weighted_sums";
  MECHINTERP_CHECK(weights.dtype == DType::Float64, kOp, ": ", name, " must be float64, got ",
                   dtype_name(weights.dtype));
  MECHINTERP_CHECK(weights.dim() == 2 && weights.size(0) == n + 1 && weights.size(1) == order + 1,
                   kOp, ": ", name, " must have shape [", n + 1, ", ", order + 1,
                   "] ([n + 1, order + 1]: one weight per coalition size and output size), got ",
                   weights.shape_string());
  MECHINTERP_CHECK(weights.is_contiguous(), kOp, ": ", name, " must be contiguous");
  check_memory(weights, kOp, name);
}

template <typename T>
void moebius_cpu_of_kind(T* table, int n, MoebiusKind kind) {
  switch (kind) {
    case MoebiusKind::Moebius: moebius_cpu<T, false, true>(table, n); break;
    case MoebiusKind::Zeta: moebius_cpu<T, false, false>(table, n); break;
    case MoebiusKind::MoebiusAdjoint: moebius_cpu<T, true, true>(table, n); break;
    case MoebiusKind::ZetaAdjoint: moebius_cpu<T, true, false>(table, n); break;
  }
}

}  // namespace

SupersetParams superset_params(int n, int order) {
  SupersetParams p{};
  p.n = n;
  p.order = order;
  p.low_bits = std::min(n, kLowBits);
  p.high_bits = n - p.low_bits;
  p.columns = column_base(p.low_bits, order + 1);
  p.outputs = count_up_to(n, order);
  return p;
}

std::int64_t superset_scratch_size(std::int64_t n, std::int64_t order) {
  MECHINTERP_CHECK(n >= 0 && n <= kMaxPlayers, "superset_scratch_size: n must lie in [0, ",
                   kMaxPlayers, "], got ", n);
  MECHINTERP_CHECK(order >= 0 && order <= n, "superset_scratch_size: order must lie in [0, n=", n,
                   "], got ", order);
  const SupersetParams p = superset_params(static_cast<int>(n), static_cast<int>(order));
  return p.columns << p.high_bits;
}

void moebius(const TensorView& table, MoebiusKind kind, std::uintptr_t stream) {
  constexpr const char* kOp = "moebius";
  const int k = static_cast<int>(kind);
  MECHINTERP_CHECK(k >= 0 && k <= 3, kOp,
                   ": kind must be 0 (moebius), 1 (zeta), 2 (moebius adjoint) or 3 (zeta "
                   "adjoint), got ",
                   k);
  const int n = players_of_table(table, kOp, "table");
  if (n == 0) return;  // one coalition, the empty one: every map is the identity

  if (table.is_cpu()) {
    if (table.dtype == DType::Float64) {
      moebius_cpu_of_kind(table.data_as<double>(), n, kind);
    } else {
      moebius_cpu_of_kind(table.data_as<float>(), n, kind);
    }
    return;
  }

  MECHINTERP_INTERNAL_ASSERT(table.is_cuda(), "unhandled device type ",
                             static_cast<int>(table.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(table.device.index);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (table.dtype == DType::Float64) {
    launch_moebius_cuda<double>(table.data_as<double>(), n, kind, cuda_stream);
  } else {
    launch_moebius_cuda<float>(table.data_as<float>(), n, kind, cuda_stream);
  }
#else
  (void)stream;
  throw_no_cuda(kOp, table.device);
#endif
}

void superset_weighted_sums(const TensorView& dividends, const TensorView& weights_host,
                            const TensorView& weights, const TensorView& scratch,
                            const TensorView& out, std::int64_t order, std::uintptr_t stream) {
  constexpr const char* kOp = "superset_weighted_sums";
  // ---- validate ----
  const int n = players_of_table(dividends, kOp, "dividends");
  MECHINTERP_CHECK(order >= 0 && order <= n, kOp, ": order must lie in [0, n] with n=", n,
                   " players, got ", order);
  check_weights(weights_host, n, order, "weights_host");
  MECHINTERP_CHECK(weights_host.is_cpu(), kOp, ": weights_host must be on cpu, got ",
                   device_name(weights_host.device));
  check_weights(weights, n, order, "weights");
  check_same_device(weights, dividends, kOp, "weights", "dividends");

  const SupersetParams params = superset_params(n, static_cast<int>(order));
  MECHINTERP_CHECK(out.dtype == dividends.dtype, kOp, ": out must have the dtype of dividends (",
                   dtype_name(dividends.dtype), "), got ", dtype_name(out.dtype));
  MECHINTERP_CHECK(out.dim() == 1 && out.size(0) == params.outputs, kOp, ": out must have shape [",
                   params.outputs, "] (one value per subset of at most ", order, " of ", n,
                   " players), got ", out.shape_string());
  MECHINTERP_CHECK(out.is_contiguous(), kOp, ": out must be contiguous, got stride ",
                   out.stride(0));
  check_same_device(out, dividends, kOp, "out", "dividends");
  check_memory(out, kOp, "out");

  const std::int64_t scratch_size = params.columns << params.high_bits;
  MECHINTERP_CHECK(scratch.dtype == dividends.dtype, kOp,
                   ": scratch must have the dtype of dividends (", dtype_name(dividends.dtype),
                   "), got ", dtype_name(scratch.dtype));
  MECHINTERP_CHECK(scratch.dim() == 1 && scratch.size(0) == scratch_size, kOp,
                   ": scratch must have shape [", scratch_size, "] for n=", n, " and order=", order,
                   ", got ", scratch.shape_string());
  MECHINTERP_CHECK(scratch.is_contiguous(), kOp, ": scratch must be contiguous");
  check_same_device(scratch, dividends, kOp, "scratch", "dividends");
  check_memory(scratch, kOp, "scratch");

  // ---- dispatch ----
  if (dividends.is_cpu()) {
    if (dividends.dtype == DType::Float64) {
      superset_weighted_sums_cpu<double>(dividends.data_as<const double>(),
                                         weights_host.data_as<const double>(),
                                         scratch.data_as<double>(), out.data_as<double>(), params);
    } else {
      superset_weighted_sums_cpu<float>(dividends.data_as<const float>(),
                                        weights_host.data_as<const double>(),
                                        scratch.data_as<float>(), out.data_as<float>(), params);
    }
    return;
  }

  MECHINTERP_INTERNAL_ASSERT(dividends.is_cuda(), "unhandled device type ",
                             static_cast<int>(dividends.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(dividends.device.index);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dividends.dtype == DType::Float64) {
    launch_superset_weighted_sums_cuda<double>(
        dividends.data_as<const double>(), weights.data_as<const double>(),
        scratch.data_as<double>(), out.data_as<double>(), params, cuda_stream);
  } else {
    launch_superset_weighted_sums_cuda<float>(
        dividends.data_as<const float>(), weights.data_as<const double>(),
        scratch.data_as<float>(), out.data_as<float>(), params, cuda_stream);
  }
#else
  (void)stream;
  throw_no_cuda(kOp, dividends.device);
#endif
}

}  // namespace mechinterp::interactions
