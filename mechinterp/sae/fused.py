"""The encode fused into the encoder GEMM (bfloat16 and float16 SAEs on Hopper GPUs).

On a GPU of compute capability 9.0, ReLU, JumpReLU, BatchTopK (at inference) and gated SAEs
in bfloat16 or float16 encode in one CUTLASS GEMM whose epilogue keeps only the latents that
pass the threshold (``csrc/sae/fused_threshold.h``): the ``[tokens, d_sae]`` pre-activations
never reach memory. One small kernel then turns the survivors into compressed rows. A gated
SAE's two tests (its gate open, its magnitude positive) both rise with the pre-activation, so
they make one bound per latent (:func:`gated_bounds`), and its few survivors' magnitudes are
computed after.

TopK SAEs first take the exact top ``k`` of a sample of their latents (the first
:func:`topk_sample_cols`, through the chunked path). A row's k-th largest of the sample is a
floor under its k-th largest overall, so the fused GEMM over the other latents keeps, per row,
only what reaches that floor (:func:`encode_topk_block`), and a per-row merge folds those few
into the sample's top ``k``. The GEMM's work is the dense encode's; the sample's
pre-activations are one chunk, the rest none. It is exact, and taken on request
(``encode_sparse(..., fused=True)``, :func:`default_reason`).

Each value is ``E(x @ W_enc + b_enc)`` (E the SAE's dtype) with float32 sums and one rounding, as
cuBLAS's ``addmm`` computes it in the chunked encode, and a latent survives iff that value exceeds
``max(threshold, 0)`` (strictly). The GEMM's summation order is CUTLASS's, so a value can differ
from cuBLAS's by the last bit where the float32 sums round differently.

Each (tile, warp) of the GEMM has room for :data:`RECORDS_PER_WARP` survivors among its
4,096 pre-activations; the rows of a tile that overflowed (dense codes) are encoded again by
the chunked path. :func:`encode_sparse <mechinterp.sae.encode_sparse>` takes this path by
default wherever :func:`unsupported_reason` finds nothing against it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from mechinterp import _C, _ops
from mechinterp.sae.derived import derived
from mechinterp.sae.sae import SAE

__all__ = ["DTYPES", "RECORDS_PER_WARP", "FusedSchedule", "aligned", "default_reason",
           "encode_block", "encode_topk_block", "gated_bounds", "gated_magnitudes",
           "gated_params", "record_bytes_per_row", "rounded_bounds", "schedule_for",
           "threshold_params", "topk_sample_cols", "unsupported_reason"]

#: The SAE dtypes the fused GEMM runs: its inputs, weights, biases and values.
DTYPES = (torch.bfloat16, torch.float16)

#: Survivor records per (tile, warp): 1/32 of the tile's pre-activations, which at realistic
#: densities (L0 / d_sae of 1% or less) leaves room several times over.
RECORDS_PER_WARP = 128
# Rows with at most this many entries are ordered by the compaction kernel (whose work grows
# with the square of a row's entries); wider ones by one sort.
_KERNEL_ORDER_MAX = 1024
_ARCHITECTURES = ("relu", "jumprelu", "batchtopk", "gated", "topk")
# TopK: the sample is this share of the latents, and at least this many times k. A row's
# candidates past the sample are then about k / sample of its latents, at most 1/64: 64 of a
# record region's 4,096 pre-activations on average, half its RECORDS_PER_WARP. Smaller samples
# cost more than they save: with an eighth or a sixteenth of the latents the encode took 1.69x
# and 1.97x the GEMM at 768 x 32768 (a quarter: 1.59x) and 1.18x and 1.23x at 4096 x 131072
# (1.16x; H100, bf16, 16,384 tokens): the GEMM's epilogue and the merge handle the extra
# candidates slower than the sample's chunk costs.
_SAMPLE_SHARE = 4
_SAMPLE_MIN_PER_K = 64

# The chunked encode of some rows, as (row_ptr, indices, values, nnz).
RowsEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


def unsupported_reason(sae: SAE, device: torch.device) -> str | None:
    """Why ``sae`` cannot encode through the fused GEMM on ``device``, or None if it can."""
    if device.type != "cuda":
        return f"it runs on CUDA devices, and the SAE is on {device}"
    if sae.dtype not in DTYPES:
        return f"it runs bfloat16 and float16 SAEs, and this one is {sae.dtype}"
    if sae.architecture not in _ARCHITECTURES:
        return f"it runs {', '.join(_ARCHITECTURES)} SAEs, and this one is {sae.architecture}"
    if sae.d_in % 8 or sae.d_sae % 8:
        return f"d_in and d_sae must be multiples of 8, and are {sae.d_in} and {sae.d_sae}"
    if sae.architecture in ("topk", "gated"):
        why_not = (_topk_unsupported_reason if sae.architecture == "topk"
                   else _gated_unsupported_reason)(sae)
        if why_not is not None:
            return why_not
    if not sae.W_enc.is_contiguous() or sae.W_enc.data_ptr() % 16:
        return "W_enc must be contiguous and start on a 16-byte boundary"
    if not _ops.fused_threshold_available(device):
        if not _C.build_info()["sae_fused_sm90"]:
            return ("this build of mechinterp has no fused encode (it needs CUDA architecture 90 "
                    "and CUTLASS's headers at build time)")
        return f"it needs a GPU of compute capability 9.0 (Hopper), and {device} is not one"
    return None


def default_reason(sae: SAE, device: torch.device) -> str | None:
    """Why :func:`encode_sparse <mechinterp.sae.encode_sparse>` does not take the fused encode
    for ``sae`` on ``device`` by default, or None where it does: wherever it applies
    (:func:`unsupported_reason`) but for TopK SAEs.

    The fused TopK encode is not the faster one (H100, bf16): interleaved with the chunked
    encode it took 1.05x / 1.01x / 1.02x its time at 768 x 32768, 2304 x 65536 and
    4096 x 131072 with 16,384 tokens, and 1.36-2.25x with 128 tokens. In five bench runs
    (16,384 tokens) it took 1.53-1.90x / 1.25-1.32x / 1.10-1.16x the GEMM against
    1.61-1.69x / 1.25-1.29x / 1.13-1.19x.
    """
    why_not = unsupported_reason(sae, device)
    if why_not is None and sae.architecture == "topk":
        return ("the chunked encode is as fast or faster for TopK SAEs (fused=True takes the "
                "fused one)")
    return why_not


def _topk_unsupported_reason(sae: SAE) -> str | None:
    if sae.k > _ops.TOPK_CUDA_MAX_K:
        return f"it runs TopK SAEs with k up to {_ops.TOPK_CUDA_MAX_K}, and this one has k={sae.k}"
    if sae.rescale_acts_by_decoder_norm:
        return ("it ranks pre-activations as they are, and this TopK SAE ranks them scaled by its "
                "decoder norms")
    sample = topk_sample_cols(sae.d_sae, sae.k)
    if 2 * sample > sae.d_sae:
        return (f"a TopK SAE needs at least twice its sample of {sample} latents (for k={sae.k}), "
                f"and this one has d_sae={sae.d_sae}")
    return None


def _gated_unsupported_reason(sae: SAE) -> str | None:
    def finite() -> bool:
        gate, scale, shift = gated_params(sae)
        return bool((torch.isfinite(gate).all() & torch.isfinite(shift).all()
                     & torch.isfinite(scale).all() & (scale > 0).all()).item())

    # One host sync per set of parameters, not per encode.
    if not derived("gated_finite", (sae.b_gate, sae.r_mag, sae.b_mag), finite):
        return ("it bounds each latent of a gated SAE by one threshold, which needs finite gate "
                "and magnitude biases and magnitude scales exp(r_mag) finite and above 0")
    return None


def topk_sample_cols(d_sae: int, k: int) -> int:
    """How many of the first latents give a TopK encode its floor: a quarter of them, at least
    64k, in whole tiles of the GEMM (a multiple of 8, as the GEMM's weight block needs) and, from
    one selector segment up, in whole segments (the selector's fast path).

    Each row's candidates past the sample number about ``k * (d_sae / sample - 1)``: 3k.

    Examples:
        >>> topk_sample_cols(32768, 32), topk_sample_cols(131072, 64), topk_sample_cols(4096, 8)
        (8192, 32768, 1024)
    """
    share = max(d_sae // _SAMPLE_SHARE, _SAMPLE_MIN_PER_K * k)
    step = _ops.SAE_CUDA_SEGMENT if share >= _ops.SAE_CUDA_SEGMENT else _ops.SAE_FUSED_TILE_N
    return _round_up(share, step)


class FusedSchedule(NamedTuple):
    """How the fused GEMM runs: its kernel and the order its persistent CTAs walk the tiles in
    (see :func:`mechinterp._ops.fused_threshold_gemm`). Every schedule writes the same records."""

    kernel: str  #: one of ``_ops.SAE_FUSED_KERNELS``
    raster: str  #: one of ``_ops.SAE_FUSED_RASTERS``
    swizzle: int  #: one of ``_ops.SAE_FUSED_SWIZZLES``


# Banded walks pad the tile grid to whole bands (and the rows to whole clusters of 2): tiles
# past the problem still run the whole main loop, so a band width that pads more than this
# fraction of the tiles is not used.
_MAX_BAND_PADDING = 1 / 32
# Below this many rows the bands did not pay (CUTLASS's default order was as fast or faster).
_MIN_BANDED_ROWS = 2048
# Up to this many inputs the ping-pong kernel, whose epilogues overlap the other warpgroup's
# main loop, beats the cooperative one; past it the cooperative kernel's taller tiles (half the
# weight traffic a row) matter more than the epilogue it leaves exposed.
_MAX_PINGPONG_D_IN = 1536


@functools.lru_cache(maxsize=256)
def schedule_for(rows: int, d_in: int, d_sae: int) -> FusedSchedule:
    """The fused GEMM's schedule for a block of ``rows`` inputs of ``d_in`` and ``d_sae`` latents.

    2 x 1 clusters (two CTAs share each weight tile) throughout. Up to 1,536 inputs, and for
    blocks of fewer than 2,048 rows, the ping-pong kernel: at d_in 768 its GEMM alone is
    1.00-1.08x cuBLAS's against 1.25x for the cooperative one (H100, bf16, 16,384 tokens), and
    at 1,024 rows it is 1.04-1.13x against 1.10-1.30x for every d_in from 1,024 to 2,304. From
    2,048 rows the tiles are walked along the latents in bands (4 tile rows of the ping-pong
    kernel, 8 of the cooperative one; narrower where that would pad the grid), so that a wave's
    inputs and weights stay in L2, where CUTLASS's default order walks whole columns of tiles
    and streams the inputs from memory once per column: the cooperative GEMM alone then runs at
    1.07-1.11x cuBLAS's at 2304 x 65536 and 1.03-1.07x at 4096 x 131072.
    """
    if rows < _MIN_BANDED_ROWS:
        return FusedSchedule("pingpong_2x1", "heuristic", 1)
    pingpong = d_in <= _MAX_PINGPONG_D_IN
    kernel = "pingpong_2x1" if pingpong else "cluster_2x1"
    tile_m = _ops.SAE_FUSED_TILE_M // 2 if pingpong else _ops.SAE_FUSED_TILE_M
    tiles_m = -(-rows // tile_m)
    tiles_n = -(-d_sae // _ops.SAE_FUSED_TILE_N)
    for band in (4, 2) if pingpong else (8, 4, 2):
        # CUTLASS narrows the bands itself below these widths (get_log_swizzle_size).
        if tiles_n < {8: 6, 4: 3, 2: 2}[band]:
            continue
        padded = _round_up(tiles_m, 2 * band) * _round_up(tiles_n, band)
        if padded <= (1 + _MAX_BAND_PADDING) * tiles_m * tiles_n:
            return FusedSchedule(kernel, "along_n", band)
    return FusedSchedule(kernel, "heuristic", 1)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def record_bytes_per_row(d_sae: int) -> int:
    """Bytes of survivor records the fused GEMM holds per encoded row (rounded up)."""
    tiles_n = -(-d_sae // _ops.SAE_FUSED_TILE_N)
    per_tile_row = tiles_n * _ops.SAE_FUSED_WARPS * RECORDS_PER_WARP * 4
    return -(-per_tile_row // _ops.SAE_FUSED_TILE_M)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 16-byte boundary (the GEMM reads by TMA), copied only
    if it is not already."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def rounded_bounds(threshold: torch.Tensor | None, d_sae: int, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``max(threshold, 0)`` rounded down to ``dtype`` (bfloat16 or float16), ``[d_sae]``: for
    any ``v`` of that dtype, ``v > bound`` exactly when ``v > threshold`` and ``v > 0``. NaN
    thresholds stay NaN (no value passes them), as in the dense encode; a float16 bound past
    float16's range is its largest finite value, which only ``inf`` exceeds. ``None`` (ReLU)
    gives zeros.

    Examples:
        >>> import torch
        >>> t = torch.tensor([0.1, -2.0, float("nan"), float("inf")])
        >>> rounded_bounds(t, 4, torch.device("cpu")).float().tolist()[1:]
        [0.0, nan, inf]
        >>> float(rounded_bounds(t, 4, torch.device("cpu"))[0]) <= 0.1
        True
        >>> rounded_bounds(torch.tensor([1e6]), 1, torch.device("cpu"), torch.float16).tolist()
        [65504.0]
    """
    if threshold is None:
        return torch.zeros(d_sae, dtype=dtype, device=device)
    if threshold.dtype == dtype:
        return threshold.clamp_min(0).contiguous()  # one launch: no rounding to do
    t = threshold.to(torch.float32).clamp_min(0)  # clamp keeps NaN
    near = t.to(dtype)
    bits = near.view(torch.int16)
    # Rounding up moved the bound above t: step one value down (t >= 0, so bits go down).
    down = torch.where(near.to(torch.float32) > t, bits - 1, bits)
    return down.view(dtype).contiguous()


# What becomes of the fused GEMM's survivors: (indices, values) -> activations.
Finish = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def threshold_params(sae: SAE) -> tuple[torch.Tensor, torch.Tensor, Finish | None]:
    """``(bias, bound, finish)`` of a threshold SAE's fused encode, worked out once while its
    parameters stand (:func:`mechinterp.sae.derived.derived`).

    The GEMM keeps column ``c`` of a row where ``E(x W + bias[c]) > bound[c]`` (E the SAE's
    dtype);
    ``finish(indices, values)`` (None: nothing to do) turns the kept values into activations.
    ReLU / JumpReLU / BatchTopK: the encoder bias and :func:`rounded_bounds`. Gated: no bias (the
    gate and magnitude read ``x W`` alone), :func:`gated_bounds`, and
    :func:`gated_magnitudes`.
    """
    if sae.architecture == "gated":
        gate, scale, shift = gated_params(sae)

        def gated() -> tuple[torch.Tensor, torch.Tensor]:
            zeros = torch.zeros(sae.d_sae, dtype=sae.dtype, device=sae.device)
            return zeros, aligned(gated_bounds(gate, scale, shift, sae.dtype))

        bias, bound = derived("fused_gated", (sae.b_gate, sae.r_mag, sae.b_mag), gated)
        # gated_magnitudes of the survivors, in place in one launch where torch takes seven
        # (each costing the host microseconds after the encode's sync).
        return bias, bound, functools.partial(_ops.fused_gated_magnitudes_, scale=scale,
                                              bias=shift)

    def bounds() -> torch.Tensor:
        # A new tensor, in the SAE's dtype.
        return aligned(rounded_bounds(sae.threshold, sae.d_sae, sae.device, sae.dtype))

    # The bias is the SAE's own (the cache must not hold it); ReLU's zeros are kept by b_enc.
    bound = derived("fused_bound", (sae.b_enc,) if sae.threshold is None else (sae.threshold,),
                    bounds)
    return aligned(sae.b_enc), bound, None


def gated_params(sae: SAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated SAE's ``(gate bias, magnitude scale, magnitude bias)``, float32 ``[d_sae]`` each,
    as the chunked selector takes them: the scale is ``exp(r_mag)`` in the SAE's dtype, widened."""
    def widened() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Copies even where the SAE is float32 already: the cache must not hold its tensors.
        return tuple(t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                     for t in (sae.b_gate, torch.exp(sae.r_mag), sae.b_mag))

    return derived("gated_params", (sae.b_gate, sae.r_mag, sae.b_mag), widened)


# A 16-bit float type's values in order as int32 keys: negatives by falling magnitude, then
# positives; -0 and +0 are neighbours, -inf and +inf the ends (NaNs lie past them). The bits of
# +inf, per type:
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def _values_of_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.where(keys >= 0x8000, keys - 0x8000, (0x7FFF - keys) | 0x8000)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # int16's two's complement
    return bits.to(torch.int16).view(dtype)


def gated_bounds(gate_bias: torch.Tensor, mag_scale: torch.Tensor, mag_bias: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A gated SAE's bound per latent, ``[d_sae]`` of ``dtype`` (bfloat16 or float16): for every
    ``h`` of that dtype (``x W`` rounded), ``h > bound`` exactly when the chunked selector keeps
    the latent, that is when its gate ``h + gate_bias > 0`` is open and its magnitude
    ``relu(h * mag_scale + mag_bias)`` (float32, rounded after the multiply) is above 0.

    Arguments are float32 ``[d_sae]`` (:func:`gated_params`), finite, with ``mag_scale > 0``: both
    tests then rise with ``h``, and the bound is the largest value that fails them, found by
    bisection over the dtype's values in order (17 halvings of their 65,282 or 63,490 keys, every
    latent at once, with the selector's own float32 arithmetic).

    Examples:
        >>> import torch
        >>> gate, scale, shift = torch.tensor([1.0, -0.5]), torch.tensor([2.0, 1.0]), torch.tensor([-3.0, 0.0])
        >>> gated_bounds(gate, scale, shift).float().tolist()  # h > 1.5 and h > 0.5
        [1.5, 0.5]
        >>> gated_bounds(gate, scale, shift, torch.float16).tolist()
        [1.5, 0.5]
    """
    inf = _INF_BITS[dtype]
    lo = torch.full(gate_bias.shape, 0x7FFF - inf, dtype=torch.int32,  # -inf
                    device=gate_bias.device)
    hi = torch.full_like(lo, 0x8000 + inf + 1)  # past +inf: kept, by convention
    for _ in range(17):  # 2**17 keys > the span: one key apart after, and then it holds
        mid = (lo + hi) // 2
        h = _values_of_keys(mid, dtype).to(torch.float32)
        keep = (h + gate_bias > 0) & (torch.relu(h * mag_scale + mag_bias) > 0)
        lo = torch.where(keep, lo, mid)
        hi = torch.where(keep, mid, hi)
    return _values_of_keys(lo, dtype)


def gated_magnitudes(indices: torch.Tensor, values: torch.Tensor, *, mag_scale: torch.Tensor,
                     mag_bias: torch.Tensor) -> torch.Tensor:
    """The activations of a gated SAE's survivors: ``relu(h * mag_scale + mag_bias)`` in float32,
    rounded after the multiply as the chunked selector computes it, in ``values``' dtype.
    ``values`` are the survivors' ``h`` at latents ``indices``."""
    product = values.to(torch.float32) * mag_scale[indices]
    return torch.relu(product + mag_bias[indices]).to(values.dtype)


def encode_block(xb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 bound: torch.Tensor | None, encode_again: RowsEncoder, finish: Finish | None = None,
                 center: torch.Tensor | None = None, prepared: _ops.PreparedPass | None = None):
    """Compressed rows ``(row_ptr, indices, values, nnz)`` of one block of inputs.

    ``xb`` ``[rows, d_in]`` (contiguous, 16-byte aligned), ``weight`` ``[d_in, d_sae]``,
    ``bias`` and ``bound`` ``[d_sae]`` (:func:`threshold_params`), all of one of
    :data:`DTYPES`. ``finish`` turns the GEMM's survivors into activations. Rows of a tile that
    ran out of record slots go through ``encode_again``. With ``center`` (``[d_in]``), the
    encode reads ``xb - center``, centred in the GEMM's launch (``xb`` need only be contiguous),
    and ``encode_again`` gets centred rows. With ``prepared`` (a :class:`mechinterp._ops.
    PreparedPass` of ``weight``, ``bias`` and ``bound`` for this problem), the pass launches
    with it, and ``bias`` and ``bound`` are not read.

    One host sync in the usual case, for the number of entries, which the compaction counts:
    it is queued before the sync, so that the GPU runs it right after the GEMM while the host
    waits, into arrays with room for a little more than the last encode of the problem size's
    entries (:data:`_last_entries`; none for the first); where they turn out too short, it runs
    again after.
    """
    rows, d_sae = xb.shape[0], weight.shape[1]
    if rows == 0:
        empty = torch.empty(0, dtype=torch.int64, device=xb.device)
        return torch.zeros(1, dtype=torch.int64, device=xb.device), empty, xb.new_empty(0), 0
    # The rows of overflowed tile rows get empty ranges, which drops their records. (Arrays
    # for the compaction allocated before the GEMM's launch gained nothing: the host time saved
    # after the wait was spent before the launch. Allocated after it, they cost nothing.)
    if prepared is None:
        kernel, raster, swizzle = schedule_for(rows, xb.shape[1], d_sae)
        prepared = _ops.prepare_pass("fused_queue_pass", xb, weight, bias, bound,
                                     RECORDS_PER_WARP, kernel, raster, swizzle,
                                     centered=center is not None)
    queued = _ops.queue_prepared(prepared, xb, center)
    size = (rows, xb.shape[1], d_sae)
    last = _last_entries.get(size)
    # Queued before the host waits, so that the GPU runs it right after the GEMM; it makes the
    # row pointers and the summary too. The first encode of a size makes just those.
    capacity = 0 if last is None else last + last // 8 + 64
    compacted = _ops.fused_queued_rows(queued, capacity, order_max=_KERNEL_ORDER_MAX)
    nnz, overflowed, widest = _ops.fused_wait_summary(queued)
    _remember_entries(size, nnz)
    if nnz > capacity:
        compacted = _ops.fused_queued_rows(queued, nnz, order_max=_KERNEL_ORDER_MAX)
    row_ptr = compacted.row_ptr
    if widest <= _KERNEL_ORDER_MAX:
        indices, values = compacted.index[:nnz], compacted.values[:nnz]
    else:
        indices, values = _ordered(row_ptr, compacted.arrival_index[:nnz],
                                   compacted.arrival_values[:nnz], d_sae)
    again = _overflowed_rows(queued, overflowed, rows)
    if again is not None:  # copied out of the scratch before it goes
        again_rows = (xb if center is None else queued.scratch.centered())[again]
    del queued, compacted
    if finish is not None:
        values = finish(indices, values)
    if again is not None:
        again_ptr, again_indices, again_values, again_nnz = encode_again(again_rows)
        row_ptr, indices, values = _spliced(row_ptr, indices, values, again, again_ptr,
                                            again_indices, again_values)
        nnz += again_nnz
    return row_ptr, indices, values, nnz


#: Entries of the last fused encode of each problem size (rows, d_in, d_sae), which size the
#: next one's compaction before its count is known.
_last_entries: dict[tuple[int, int, int], int] = {}
_LAST_ENTRIES_KEPT = 64


def _remember_entries(size: tuple[int, int, int], nnz: int) -> None:
    if size not in _last_entries and len(_last_entries) >= _LAST_ENTRIES_KEPT:
        _last_entries.pop(next(iter(_last_entries)))  # the oldest size
    _last_entries[size] = nnz


# The running top k of some rows over latents [0, cols), as (top_values, top_index, row_bar).
SampleEncoder = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def encode_topk_block(xb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                      encode_sample: SampleEncoder):
    """The top ``k`` of one block of inputs, queued without a host sync: ``(values float32,
    index int32, again)``, the first two ``[rows, k]`` in descending order, ties to the lower
    index, as :func:`mechinterp._ops.topk_merge` keeps them; ``again`` is int32 ``[rows]``,
    nonzero for the rows whose top ``k`` must be encoded again (their GEMM tile ran out of
    record slots; their values here are wrong).

    ``xb``, ``weight`` and ``bias`` as for :func:`encode_block`. ``encode_sample`` gives the
    exact top ``k`` of the first :func:`topk_sample_cols` latents (the chunked path); the fused
    GEMM over the rest keeps what reaches each row's k-th of those (and NaN, which ranks by its
    bits), and the merge folds it in. Nothing here waits for the GPU: the merge reads the
    survivors' count from the device, so the host queues the whole encode while the GEMM runs
    and the caller waits once, for ``again``.
    """
    rows, d_sae = xb.shape[0], weight.shape[1]
    if rows == 0:
        empty = torch.empty(0, k, dtype=torch.int32, device=xb.device)
        return empty.float(), empty, empty.new_empty(0)
    sample = topk_sample_cols(d_sae, k)
    # The sample's GEMM first, so that the GPU starts while the host works out the rest.
    top_v, top_i, row_bar = encode_sample(xb, sample)
    rest, rest_bias = weight[:, sample:], bias[sample:]
    # A NaN k-th (the row's sample ranks NaN above everything) gives no floor: the row keeps
    # everything and its tile row overflows, to be encoded again.
    floor = top_v[:, k - 1].nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    queued = _ops.fused_queue_pass(xb, rest, rest_bias, floor.to(xb.dtype),
                                   cap=RECORDS_PER_WARP, row_floor=True,
                                   **schedule_for(rows, xb.shape[1], d_sae - sample)._asdict())
    cand_ptr, cand_index, cand_values = _ops.fused_queued_entries(queued)
    _ops.topk_merge_rows(top_v, top_i, cand_ptr, cand_index, cand_values, row_bar,
                         col_offset=sample)
    return top_v, top_i, _overflow_flags(queued, rows)


def _overflow_flags(queued: _ops.QueuedPass, rows: int) -> torch.Tensor:
    """int32 ``[rows]``: nonzero for the rows of the tile rows whose records overflowed."""
    flags = queued.scratch.tensor("tile_overflow")
    return flags.repeat_interleave(_ops.SAE_FUSED_TILE_M)[:rows]


def _overflowed_rows(queued: _ops.QueuedPass, overflowed: int, rows: int) -> torch.Tensor | None:
    """The rows of the tile rows whose records overflowed (their ranges are empty), or None."""
    return _overflow_flags(queued, rows).nonzero().flatten() if overflowed else None


def _ordered(row_ptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, d_sae: int):
    """Entries in arrival order, ordered by (row, column) with one sort."""
    rows = row_ptr.shape[0] - 1
    row = torch.repeat_interleave(torch.arange(rows, device=row_ptr.device), row_ptr.diff(),
                                  output_size=indices.shape[0])
    key, order = torch.sort(row * d_sae + indices)
    return key - row * d_sae, values[order]


def _spliced(row_ptr, indices, values, again, again_ptr, again_indices, again_values):
    """Rows ``again`` (empty in ``row_ptr``) filled from a second encode of just those rows."""
    device = row_ptr.device
    counts = row_ptr.diff()
    counts[again] = again_ptr.diff()
    out_ptr = torch.zeros_like(row_ptr)
    torch.cumsum(counts, 0, out=out_ptr[1:])
    kept, added = indices.shape[0], again_indices.shape[0]
    rows = torch.arange(row_ptr.shape[0] - 1, device=device)
    kept_row = torch.repeat_interleave(rows, row_ptr.diff(), output_size=kept)
    kept_at = torch.arange(kept, device=device) + (out_ptr - row_ptr)[kept_row]
    local = torch.repeat_interleave(torch.arange(again.shape[0], device=device),
                                    again_ptr.diff(), output_size=added)
    added_at = (torch.arange(added, device=device) - again_ptr[local]) + out_ptr[again[local]]
    out_indices = torch.empty(kept + added, dtype=indices.dtype, device=device)
    out_values = torch.empty(kept + added, dtype=values.dtype, device=device)
    out_indices[kept_at], out_values[kept_at] = indices, values
    out_indices[added_at], out_values[added_at] = again_indices, again_values
    return out_ptr, out_indices, out_values
