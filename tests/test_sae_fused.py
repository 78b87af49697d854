"""The fused Hopper threshold encode, held to an exact reference.

Inputs are small integers and weights multiples of 1/8, so every float32 sum is exact in any
order: the reference ``E(x W + b) > max(threshold, 0)`` (E bfloat16 or float16, the SAE's dtype)
is then the one answer that cuBLAS's chunked encode and the fused CUTLASS GEMM must both give,
bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import pytest
import torch

from mechinterp import _C, _ops
from mechinterp.errors import InputError, ShapeError
from mechinterp.sae import SAE, encode_sparse
from mechinterp.sae import fused as fused_module
from mechinterp.sae.derived import forget
from mechinterp.sae.fused import (
    DTYPES,
    FusedSchedule,
    gated_bounds,
    gated_magnitudes,
    gated_params,
    record_bytes_per_row,
    rounded_bounds,
    schedule_for,
    threshold_params,
    unsupported_reason,
)
from tests.kernels import CUDA_OK

FUSED_OK = CUDA_OK and _ops.fused_threshold_available(torch.device("cuda"))
needs_fused = pytest.mark.skipif(
    not FUSED_OK, reason="needs the fused encode (an sm_90 build) and a GPU of compute capability 9.0")


def exact_sae(d_in: int, d_sae: int, arch: str, *, seed: int = 0, device: str = "cpu",
              most_bias: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> SAE:
    """An SAE of ``dtype`` whose encoder sums are exact in float32 for inputs in [-3, 3], with
    biases in [-5, most_bias]."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randint(-8, 9, (d_in, d_sae), generator=g) / 8.0
    b_enc = torch.randint(-40, int(8 * most_bias) + 1, (d_sae,), generator=g) / 8.0
    fields = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": torch.randn(d_sae, d_in, generator=g),
              "b_dec": torch.zeros(d_in), "architecture": arch}
    if arch in ("jumprelu", "batchtopk"):
        # About one pre-activation in fifty passes; then the edge cases, one column each.
        threshold = 2.0 * (d_in ** 0.5) * (1 + 0.3 * torch.rand(d_sae, generator=g))
        threshold[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -3.0, 0.0, -0.0])
        fields["threshold"] = threshold
    if arch == "gated":
        # Gates open for about one pre-activation in twenty; a third of those have a magnitude
        # of 0. Then edge cases: open at 0 or just below, no scale to speak of, a huge one.
        fields["b_gate"] = -2.0 * (d_in ** 0.5) * (1 + 0.3 * torch.rand(d_sae, generator=g))
        fields["r_mag"] = 2 * torch.rand(d_sae, generator=g) - 1
        fields["b_mag"] = torch.randint(-16, 17, (d_sae,), generator=g) / 8.0
        fields["b_gate"][:4] = torch.tensor([0.0, -0.0, 0.125, 1.0])
        # exp(r_mag) is taken in the SAE's dtype and must stay finite and above 0 there.
        edge = 60.0 if dtype == torch.bfloat16 else 9.0
        fields["r_mag"][4:6] = torch.tensor([-edge, edge])
        fields["b_mag"][:6] = torch.tensor([-0.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    return SAE(**fields).to(device=device, dtype=dtype)


def exact_inputs(rows: int, d_in: int, *, seed: int = 1, device: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (rows, d_in), generator=g).to(device=device, dtype=dtype)


def reference(sae: SAE, x: torch.Tensor):
    """(row_ptr, indices, values) of E(x W + b) > max(threshold, 0), from float64 sums (E the
    SAE's dtype).

    Gated: h = E(x W), kept where the gate h + b_gate > 0 is open and the magnitude
    relu(h * exp(r_mag) + b_mag) > 0, in float32 rounded after each operation (the selectors'
    arithmetic; exp(r_mag) in E, as SAELens computes it), rounded to E."""
    dtype = sae.dtype
    if sae.architecture == "gated":
        h = (x.double() @ sae.W_enc.double()).to(dtype).float()
        scale = torch.exp(sae.r_mag).float()
        magnitude = torch.relu(h * scale + sae.b_mag.float())
        keep = (h + sae.b_gate.float() > 0) & (magnitude > 0)
        values = magnitude.to(dtype)
    else:
        values = (x.double() @ sae.W_enc.double() + sae.b_enc.double()).to(dtype)
        bound = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
        if sae.threshold is not None:
            bound = sae.threshold.double().clamp_min(0)  # NaN stays NaN: nothing passes it
        keep = (values.double() > bound) & (values.double() > 0)
    rows, cols = keep.nonzero(as_tuple=True)
    row_ptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    return row_ptr, cols, values[rows, cols]


def assert_same(features, want) -> None:
    row_ptr, indices, values = want
    assert torch.equal(features.row_ptr, row_ptr)
    assert torch.equal(features.indices, indices)
    assert features.values.dtype == values.dtype
    assert torch.equal(features.values.view(torch.int16), values.view(torch.int16))


class GemmSpy:
    """Counts the encode's fused GEMM passes and keeps each one's region counts."""

    def __init__(self, monkeypatch):
        self.warp_counts = []
        real = _ops.queue_prepared  # where every pass is launched

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            self.warp_counts.append(out.scratch.tensor("warp_count").clone())
            return out

        monkeypatch.setattr(_ops, "queue_prepared", spy)


# ---- everywhere ----


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 values of a 16-bit float type, NaNs included."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounded_bounds_keep_exactly_the_values_above_the_threshold(dtype):
    # 1e-6: below float16's smallest normal; 7e4 and 3.3e38: past its range.
    threshold = torch.tensor([0.1, 1 / 3, -2.0, 0.0, 3.0, float("nan"), float("inf"), 3.3e38,
                              1e-6, 7e4, 65504.0, -1e-8])
    bound = rounded_bounds(threshold, 12, torch.device("cpu"), dtype)
    assert bound.dtype == dtype
    # Every value, against every threshold: the compare in the dtype equals the exact one.
    every = every_value(dtype)
    exact = (every.double()[:, None] > threshold.double().clamp_min(0)) & (every.double()[:, None] > 0)
    assert torch.equal(every.float()[:, None] > bound.float(), exact)
    assert torch.equal(rounded_bounds(None, 3, torch.device("cpu"), dtype), torch.zeros(3, dtype=dtype))


def every_value_against_the_selector(gate, scale, shift, device, dtype):
    """Each non-NaN h of ``dtype`` against each latent's gated parameters, through the compiled
    selector: (h [V], kept [V, d] bool, the selector's activations [V, d] float32)."""
    every = every_value(dtype)
    every = every[~torch.isnan(every)].to(device)
    d = gate.shape[0]
    values = every[:, None].expand(-1, d).contiguous()
    kept, index, count = _ops.select_threshold(values, cap=d, bias=gate, mag_scale=scale,
                                               mag_bias=shift)
    slots = torch.arange(d, device=device) < count[:, :1]
    found = torch.zeros(values.shape, dtype=torch.bool, device=device)
    activation = torch.zeros(values.shape, dtype=torch.float32, device=device)
    rows = torch.arange(values.shape[0], device=device)[:, None].expand(-1, d)
    found[rows[slots], index[:, 0][slots].long()] = True
    activation[rows[slots], index[:, 0][slots].long()] = kept[:, 0][slots]
    return every, found, activation


def gated_edge_params(device):
    """float32 gated parameters with edge cases: zero and signed-zero biases, scales from
    1e-30 to 1e30, biases near the bfloat16 extremes."""
    g = torch.Generator().manual_seed(3)
    gate = torch.cat([torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 0.0, 5.0]),
                      6 * torch.rand(16, generator=g) - 3])
    scale = torch.cat([torch.tensor([1.0, 1e-30, 1e30, 1.0, 2.0, 1.0, 0.5, 1e-3]),
                       torch.exp(8 * torch.rand(16, generator=g) - 4)])
    shift = torch.cat([torch.tensor([-0.0, 0.0, -3.0, 1e-30, -1.0, 3e38, -3e38, 0.0]),
                       6 * torch.rand(16, generator=g) - 3])
    return gate.to(device), scale.to(device), shift.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")])])
def test_gated_bounds_keep_exactly_what_the_selector_keeps(device, dtype):
    gate, scale, shift = gated_edge_params(device)
    bound = gated_bounds(gate, scale, shift, dtype)
    assert bound.dtype == dtype and bound.shape == gate.shape
    every, found, activation = every_value_against_the_selector(gate, scale, shift, device, dtype)
    assert torch.equal(every.float()[:, None] > bound.float(), found)
    # The survivors' activations, worked out after the GEMM, are the selector's.
    rows, cols = found.nonzero(as_tuple=True)
    assert torch.equal(gated_magnitudes(cols, every[rows], mag_scale=scale, mag_bias=shift),
                       activation[rows, cols].to(dtype))
    if device == "cuda" and FUSED_OK:
        # The fused encode's one-launch version: the same bits, for the survivors and for every
        # other value and latent too (its ReLU included: torch's on CUDA turns -0 into +0).
        in_place = _ops.fused_gated_magnitudes_(cols, every[rows], scale, shift)
        assert torch.equal(in_place, activation[rows, cols].to(dtype))
        cols = torch.arange(gate.shape[0], device=device).repeat(every.shape[0])
        h = every.repeat_interleave(gate.shape[0])
        want = gated_magnitudes(cols, h, mag_scale=scale, mag_bias=shift)
        got = _ops.fused_gated_magnitudes_(cols, h.clone(), scale, shift)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.cuda
@needs_fused
def test_fused_gated_magnitudes_bad_input_is_named():
    index = torch.zeros(4, dtype=torch.int64, device="cuda")
    values = torch.zeros(4, dtype=torch.bfloat16, device="cuda")
    scale = torch.ones(8, device="cuda")
    with pytest.raises(ValueError, match="fused_gated_magnitudes: values must be bfloat16 or float16"):
        _ops.fused_gated_magnitudes_(index, values.float(), scale, scale)
    with pytest.raises(ValueError, match=r"fused_gated_magnitudes: bias must be a contiguous \[8\]"):
        _ops.fused_gated_magnitudes_(index, values, scale, scale[:4])
    with pytest.raises(ValueError, match=r"fused_gated_magnitudes: values must be a contiguous \[4\]"):
        _ops.fused_gated_magnitudes_(index, values[:2], scale, scale)


def test_threshold_params_are_worked_out_again_when_the_parameters_change():
    def bits(t):  # NaN bounds compare equal by their bits
        return t.view(torch.int16).tolist()

    sae = exact_sae(16, 64, "jumprelu")
    bias, bound, finish = threshold_params(sae)
    assert finish is None and torch.equal(bias, sae.b_enc)
    assert bits(bound) == bits(rounded_bounds(sae.threshold, 64, torch.device("cpu")))
    assert threshold_params(sae)[1] is bound  # kept
    sae.threshold.add_(1.0)  # in place
    assert bits(threshold_params(sae)[1]) == bits(rounded_bounds(sae.threshold, 64,
                                                              torch.device("cpu")))
    sae.threshold = torch.zeros(64, dtype=torch.bfloat16)  # another tensor
    assert threshold_params(sae)[1].abs().max() == 0
    gated = exact_sae(16, 64, "gated")
    bias, bound, finish = threshold_params(gated)
    assert bias.abs().max() == 0 and finish is not None
    gate, scale, shift = gated_params(gated)
    assert bits(bound) == bits(gated_bounds(gate, scale, shift))
    gated.r_mag.fill_(0.0)
    assert bits(threshold_params(gated)[1]) == bits(
        gated_bounds(gated.b_gate.float(), torch.ones(64), gated.b_mag.float()))
    # A float16 SAE's are float16, rounded as float16.
    half, half_gated = (exact_sae(16, 64, arch, dtype=torch.float16) for arch in ("jumprelu", "gated"))
    bias, bound, _ = threshold_params(half)
    assert bias.dtype == bound.dtype == torch.float16
    assert bits(bound) == bits(rounded_bounds(half.threshold, 64, torch.device("cpu"), torch.float16))
    bias, bound, _ = threshold_params(half_gated)
    assert bias.dtype == bound.dtype == torch.float16
    assert bits(bound) == bits(gated_bounds(*gated_params(half_gated), torch.float16))


def test_kept_bounds_go_with_their_sae():
    jumprelu, gated = exact_sae(16, 64, "jumprelu"), exact_sae(16, 64, "gated")
    threshold_params(jumprelu)
    threshold_params(gated)
    sources = [weakref.ref(t) for t in (jumprelu.threshold, jumprelu.b_enc, gated.b_gate,
                                        gated.r_mag, gated.b_mag)]
    del jumprelu, gated
    gc.collect()
    assert [ref() for ref in sources] == [None] * 5


def test_fused_summary_bad_input_is_named():
    with pytest.raises(ValueError, match=r"fused_summary: summary must be a contiguous \[3\]"):
        _C.fused_summary(_ops._view(torch.zeros(2, dtype=torch.int64)), 0)
    with pytest.raises(ValueError, match="fused_summary: summary must be int64, got int32"):
        _C.fused_summary(_ops._view(torch.zeros(3, dtype=torch.int32)), 0)
    with pytest.raises(ValueError, match="fused_summary: summary must be on a CUDA device, got"):
        _C.fused_summary(_ops._view(torch.zeros(3, dtype=torch.int64)), 0)


def test_encode_pass_centring_bad_input_is_named():
    # Checked before anything is launched, so on any device.
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    w = torch.zeros(8, 8, dtype=torch.bfloat16)
    small = _ops._view(torch.zeros(8, dtype=torch.bfloat16))
    counts = _ops._view(torch.zeros(8, dtype=torch.int32))

    def launch(center, centered):
        _C.fused_encode_pass(_ops._view(x), center, centered, _ops._view(w), small, small,
                             counts, counts, counts, counts, counts, counts, counts, 0, 0, 1,
                             False, 0)

    with pytest.raises(ValueError, match="center and centered come together"):
        launch(small, None)
    with pytest.raises(ValueError, match=r"fused_encode_pass: center must be a contiguous \[8\]"):
        launch(_ops._view(torch.zeros(7, dtype=torch.bfloat16)), _ops._view(x))
    with pytest.raises(ValueError, match="fused_encode_pass: centered must be bfloat16"):
        launch(small, _ops._view(torch.zeros(4, 8, dtype=torch.float16)))
    shifted = torch.zeros(4 * 8 + 1, dtype=torch.bfloat16)[1:].view(4, 8)
    with pytest.raises(ValueError, match="centered must start on a 16-byte boundary"):
        launch(small, _ops._view(shifted))


def synthetic_records(rows: int, device: str = "cpu") -> _ops.FusedRecords:
    """Records of ``rows`` rows without entries (one tile column, cap 1), zero counts."""
    tiles_m = -(-rows // _ops.SAE_FUSED_TILE_M)
    zeros = functools.partial(torch.zeros, dtype=torch.int32, device=device)
    return _ops.FusedRecords(zeros(tiles_m, 1, _ops.SAE_FUSED_WARPS, 1),
                             zeros(tiles_m, 1, _ops.SAE_FUSED_WARPS), zeros(tiles_m),
                             zeros(rows), zeros(tiles_m))


def test_records_to_rows_off_cuda_is_named():
    with pytest.raises(ValueError, match="fused_records_to_rows: (runs on CUDA only|this build "
                                         "has no fused encode)"):
        _ops.fused_records_to_rows(synthetic_records(10), 0)


def test_record_bytes_per_row_counts_every_tile_region():
    tiles_n = -(-1000 // _ops.SAE_FUSED_TILE_N)
    slots = tiles_n * _ops.SAE_FUSED_WARPS * fused_module.RECORDS_PER_WARP
    assert record_bytes_per_row(1000) * _ops.SAE_FUSED_TILE_M >= 4 * slots
    assert (record_bytes_per_row(1000) - 1) * _ops.SAE_FUSED_TILE_M < 4 * slots


def test_unsupported_reasons_are_named():
    sae = exact_sae(16, 64, "jumprelu")
    assert "CUDA" in unsupported_reason(sae, torch.device("cpu"))
    assert "bfloat16 and float16" in unsupported_reason(sae.to(dtype=torch.float32),
                                                        torch.device("cuda"))
    # float16 passes the dtype rule: the next rule is the one that speaks.
    odd_half = exact_sae(12, 64, "relu", dtype=torch.float16)
    assert "multiples of 8" in unsupported_reason(odd_half, torch.device("cuda"))
    gated = exact_sae(16, 64, "gated")
    for name, bad in (("r_mag", 100.0), ("r_mag", float("nan")), ("b_gate", float("inf")),
                      ("b_mag", float("-inf"))):
        edited = dataclasses.replace(gated, **{name: getattr(gated, name).clone()})
        getattr(edited, name)[3] = bad  # exp(100) overflows bf16
        assert "finite" in unsupported_reason(edited, torch.device("cuda")), name
    odd = exact_sae(12, 64, "relu")
    assert "multiples of 8" in unsupported_reason(odd, torch.device("cuda"))


def test_fused_true_where_it_cannot_run_is_an_input_error():
    sae = exact_sae(16, 64, "relu")
    x = exact_inputs(5, 16)
    with pytest.raises(InputError, match="fused=True cannot encode this SAE: it runs on CUDA"):
        encode_sparse(sae, x, fused=True)
    with pytest.raises(InputError, match="fused must be True, False or None"):
        encode_sparse(sae, x, fused="yes")
    # fused=False and the default both take the chunked path here.
    assert torch.equal(encode_sparse(sae, x, fused=False).indices, encode_sparse(sae, x).indices)


# Every kernel in CUTLASS's default tile order, and banded orders each way (bands of 8 need at
# least 6 tiles each way, which the 800 x 1600 problem has).
SCHEDULES = [FusedSchedule(kernel, "heuristic", 1) for kernel in _ops.SAE_FUSED_KERNELS] + [
    FusedSchedule("cluster_2x1", "along_m", 2), FusedSchedule("cluster_1x2", "along_n", 8),
    FusedSchedule("pingpong_2x1", "along_n", 8), FusedSchedule("pingpong_2x1", "along_m", 4)]


def use_schedule(monkeypatch, schedule: FusedSchedule) -> None:
    monkeypatch.setattr(fused_module, "schedule_for", lambda rows, d_in, d_sae: schedule)


def exact_cublas(monkeypatch) -> None:
    """cuBLAS's float16 GEMMs reduce in float32 (torch lets them reduce split sums in float16
    by default), so that the chunked encode rounds the exact sums once, as the reference does."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction",
                        False)


def test_schedule_for_bands_only_where_they_do_not_pad_the_tile_grid():
    # Ping-pong tiles are 64 rows tall, cooperative ones 128; both 256 latents wide.
    assert schedule_for(16384, 768, 32768) == FusedSchedule("pingpong_2x1", "along_n", 4)
    assert schedule_for(16384, 1536, 32768).kernel == "pingpong_2x1"
    cooperative = FusedSchedule("cluster_2x1", "along_n", 8)
    assert schedule_for(16384, 2304, 65536) == cooperative  # 128 x 256 tiles
    assert schedule_for(4096, 4096, 131072) == cooperative  # 32 x 512
    # 24 tile rows pad to 32 in bands of 8 (clusters of 2): bands of 4 fit exactly.
    assert schedule_for(3072, 4096, 131072) == FusedSchedule("cluster_2x1", "along_n", 4)
    # 17 tile rows pad to 18 at best (1 in 17 too many for bands of 2 too): no bands.
    assert schedule_for(2100, 4096, 65536) == FusedSchedule("cluster_2x1", "heuristic", 1)
    # 33 ping-pong tile rows pad to 40 in bands of 4 and 36 in bands of 2: no bands.
    assert schedule_for(2100, 768, 65536) == FusedSchedule("pingpong_2x1", "heuristic", 1)
    # Fewer than 2,048 rows: the ping-pong kernel in the default order, at any width.
    small = FusedSchedule("pingpong_2x1", "heuristic", 1)
    assert schedule_for(1024, 4096, 131072) == small
    assert schedule_for(1, 8, 8) == small
    for rows, d_in, d_sae in ((1, 8, 8), (300, 72, 904), (10**6, 8, 8), (16384, 4096, 1 << 20)):
        schedule = schedule_for(rows, d_in, d_sae)
        assert schedule.kernel in _ops.SAE_FUSED_KERNELS
        assert schedule.raster in _ops.SAE_FUSED_RASTERS
        assert schedule.swizzle in _ops.SAE_FUSED_SWIZZLES


# ---- on a Hopper GPU ----


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "gated"])
@pytest.mark.parametrize(("rows", "d_in", "d_sae"), [
    (300, 72, 904),     # partial tiles every way; 44 rows in the last record tile
    (129, 1032, 520),   # one row in the last record tile
    (1, 8, 8),          # the smallest problem
    (800, 64, 1600),    # 7 x 7 tiles, partial both ways: bands of 8 apply
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_encode_is_exact_and_equals_the_chunked_one(monkeypatch, schedule, arch, rows,
                                                          d_in, d_sae, dtype):
    use_schedule(monkeypatch, schedule)
    exact_cublas(monkeypatch)
    sae = exact_sae(d_in, d_sae, arch, device="cuda", dtype=dtype)
    x = exact_inputs(rows, d_in, device="cuda", dtype=dtype)
    if arch == "relu":
        x = x * (torch.rand(rows, 1, device="cuda") < 0.3)  # some sparse, some dense rows
    spy = GemmSpy(monkeypatch)
    fused = encode_sparse(sae, x)  # the default takes the fused path here
    assert len(spy.warp_counts) == 1
    assert_same(fused, reference(sae, x))
    assert_same(encode_sparse(sae, x, fused=False), reference(sae, x))


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dense_rows", [range(128), range(64, 100)])
@pytest.mark.parametrize("arch", ["relu", "gated"])
@pytest.mark.parametrize("b_dec", [False, True], ids=["no_b_dec", "b_dec"])
def test_overflowing_tiles_are_encoded_again_exactly(monkeypatch, schedule, dense_rows, arch,
                                                     b_dec):
    # Tile row 0 has dense rows (ReLU, no threshold; gated, gates open above 0) that overflow
    # its record regions: all of them, or some of the second warpgroup's only. The other rows
    # are zero, so their pre-activations are the biases, <= 0 (gated: 0, which no gate passes).
    # With a decoder bias the inputs are shifted by it (exactly), so that the rows encoded
    # again must be the centred ones.
    use_schedule(monkeypatch, schedule)
    sae = exact_sae(64, 2056, arch, device="cuda", most_bias=0.0)
    if arch == "gated":
        sae.b_gate.zero_()
        sae.b_mag.fill_(0.5)
    x = torch.zeros(300, 64, dtype=torch.bfloat16, device="cuda")
    dense = torch.tensor(list(dense_rows), device="cuda")
    x[dense] = exact_inputs(len(dense_rows), 64, device="cuda")
    if b_dec:
        sae.b_dec.copy_(torch.arange(64, device="cuda") % 5 - 2.0)
    spy = GemmSpy(monkeypatch)
    features = encode_sparse(sae, x + sae.b_dec)
    overflowed = (spy.warp_counts[0] > fused_module.RECORDS_PER_WARP).flatten(1).any(1)
    assert overflowed.tolist() == [True, False, False]
    assert_same(features, reference(sae, x))
    assert features.l0[dense].min() > 500  # the dense rows came back whole
    others = torch.ones(300, dtype=torch.bool, device="cuda")
    others[dense] = False
    assert features.l0[others].max() == 0


def torch_row_pointers(row_count: torch.Tensor, tile_overflow: torch.Tensor):
    """``(row_ptr, summary)`` of row counts whose overflowed tile rows count as empty."""
    rows = row_count.shape[0]
    dropped = tile_overflow.long().repeat_interleave(_ops.SAE_FUSED_TILE_M)[:rows]
    kept = row_count.long() * (1 - dropped)
    row_ptr = torch.cat([kept.new_zeros(1), torch.cumsum(kept, 0)])
    return row_ptr, [int(kept.sum()), int(tile_overflow.sum()), int(kept.max())]


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("rows", [300, 1, 4096, 200_001])
def test_compaction_row_pointers_match_torch(rows):
    # Each block sums the tile totals before its own (200,001 rows: 1,563 tile rows, more than
    # one per thread), scans its rows' counts, and the last one writes the entries.
    found = synthetic_records(rows, "cuda")
    g = torch.Generator().manual_seed(rows)
    overflow = torch.zeros_like(found.tile_overflow, device="cpu")
    overflow[1::3] = 1
    row_count = torch.randint(0, 50, (rows,), generator=g, dtype=torch.int32)
    tiles = torch.zeros(overflow.shape[0] * _ops.SAE_FUSED_TILE_M, dtype=torch.int32)
    tiles[:rows] = row_count
    found.tile_overflow.copy_(overflow)
    found.row_count.copy_(row_count)
    found.tile_total.copy_(tiles.view(-1, _ops.SAE_FUSED_TILE_M).sum(1))
    compacted = _ops.fused_records_to_rows(found, 0)
    want_ptr, want_summary = torch_row_pointers(row_count, overflow)
    assert torch.equal(compacted.row_ptr.cpu(), want_ptr)
    assert compacted.summary.tolist() == want_summary
    assert compacted.index.numel() == compacted.values.numel() == 0


@pytest.mark.cuda
@needs_fused
def test_wide_rows_are_ordered_by_a_sort(monkeypatch):
    monkeypatch.setattr(fused_module, "_KERNEL_ORDER_MAX", 3)
    monkeypatch.setattr(fused_module, "_last_entries", {})
    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    x = exact_inputs(300, 72, device="cuda")
    for _ in range(2):  # compacted after the count is known, then before it
        assert_same(encode_sparse(sae, x), reference(sae, x))


@pytest.mark.cuda
@needs_fused
def test_compaction_sized_from_the_last_encode_is_exact(monkeypatch):
    # An encode's compaction has room for a little more than the last encode of its size
    # had; a denser input than that is compacted again once its count is known.
    monkeypatch.setattr(fused_module, "_last_entries", {})
    capacities = []
    real = _ops.fused_queued_rows

    def spy(queued, capacity, **kwargs):
        capacities.append(capacity)
        return real(queued, capacity, **kwargs)

    monkeypatch.setattr(_ops, "fused_queued_rows", spy)
    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    dense = exact_inputs(300, 72, device="cuda")
    sparse = dense * (torch.arange(300, device="cuda") % 5 == 0).unsqueeze(1)

    def encode(x):
        capacities.clear()
        want = reference(sae, x)
        assert_same(encode_sparse(sae, x), want)
        return int(want[0][-1]), list(capacities)

    n_sparse, calls = encode(sparse)
    assert calls == [0, n_sparse]  # the first of its size: the count, then the entries
    room = n_sparse + n_sparse // 8 + 64
    assert encode(sparse) == (n_sparse, [room])
    n_dense, calls = encode(dense)
    assert n_dense > room and calls == [room, n_dense]  # too little room: compacted again
    assert encode(dense) == (n_dense, [n_dense + n_dense // 8 + 64])


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_pass_centres_as_torch_subtracts(dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    d_in = 72
    sae = exact_sae(d_in, 904, "jumprelu", device="cuda", dtype=dtype)
    bound = rounded_bounds(sae.threshold, sae.d_sae, torch.device("cuda"), dtype)
    center = torch.randn(d_in, generator=g, device="cuda").to(dtype)
    flat = torch.randn(300 * d_in + 1, generator=g, device="cuda").to(dtype)
    for x in (flat[:-1].view(300, d_in), flat[1:].view(300, d_in)):  # 8 a load, then 1
        queued = _ops.fused_queue_pass(x, sae.W_enc, sae.b_enc, bound, cap=128, center=center)
        rows = _ops.fused_queued_rows(queued, 0, order_max=0)
        summary = _ops.fused_wait_summary(queued)
        want = x - center
        assert torch.equal(queued.scratch.centered().view(torch.int16), want.view(torch.int16))
        plain = _ops.fused_queue_pass(want, sae.W_enc, sae.b_enc, bound, cap=128)
        plain_rows = _ops.fused_queued_rows(plain, 0, order_max=0)
        assert _ops.fused_wait_summary(plain) == summary
        assert torch.equal(rows.row_ptr, plain_rows.row_ptr)


def shifted_inputs(sae: SAE, rows: int, *, misaligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, centred)``: inputs whose ``x - b_dec`` is exact, optionally 2 bytes past a 16-byte
    boundary."""
    centred = exact_inputs(rows, sae.d_in, device="cuda", dtype=sae.dtype)
    flat = torch.empty(rows * sae.d_in + 1, dtype=sae.dtype, device="cuda")
    x = (flat[1:] if misaligned else flat[:-1]).view(rows, sae.d_in)
    x.copy_(centred + sae.b_dec)
    return x, centred


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_encode_centres_in_the_gemm_launch(monkeypatch, arch, misaligned, dtype):
    exact_cublas(monkeypatch)
    sae = exact_sae(72, 904, arch, device="cuda", dtype=dtype)
    sae.b_dec.copy_(torch.arange(72, device="cuda") % 7 / 2 - 1.5)  # exact shifts
    x, centred = shifted_inputs(sae, 300, misaligned=misaligned)
    centers = []
    real = _ops.queue_prepared

    def spy(prepared, x, center=None):
        centers.append(center)
        return real(prepared, x, center)

    monkeypatch.setattr(_ops, "queue_prepared", spy)
    want = reference(sae, centred)
    assert_same(encode_sparse(sae, x), want)
    assert len(centers) == 1 and centers[0] is sae.b_dec  # centred by the launch
    # The general path (a record budget given) centres with torch first.
    assert_same(encode_sparse(sae, x, chunk_bytes=1 << 30), want)
    assert centers[1] is None
    uncentred = dataclasses.replace(sae, apply_b_dec_to_input=False)
    assert_same(encode_sparse(uncentred, centred), want)  # aligned: read as it is
    assert centers[2] is None


@pytest.mark.cuda
@needs_fused
def test_default_encode_follows_parameter_changes():
    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    x = exact_inputs(300, 72, device="cuda")
    assert_same(encode_sparse(sae, x), reference(sae, x))
    sae.threshold.mul_(0.5)  # in place: the kept bounds are worked out again
    assert_same(encode_sparse(sae, x), reference(sae, x))
    sae.W_enc = sae.W_enc.flip(1).contiguous()  # another tensor
    assert_same(encode_sparse(sae, x), reference(sae, x))
    sae.b_enc.fill_(-100.0)  # nothing passes
    assert encode_sparse(sae, x).indices.numel() == 0
    sae.b_enc.data = torch.zeros_like(sae.b_enc)  # other memory, the same version
    sae.threshold.data = sae.threshold.data * 2
    assert_same(encode_sparse(sae, x), reference(sae, x))
    sae.threshold.data.mul_(0.25)  # through .data: seen only once forgotten
    forget(sae.threshold)
    assert_same(encode_sparse(sae, x), reference(sae, x))


@pytest.mark.cuda
@needs_fused
def test_default_encode_prepares_a_pass_per_batch_size():
    from mechinterp.sae.encode import _fused_lane

    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    for rows in (300, 130, 300):
        x = exact_inputs(rows, 72, device="cuda")
        assert_same(encode_sparse(sae, x), reference(sae, x))
    assert sorted(_fused_lane(sae).passes) == [(130, True), (300, True)]
    # A b_enc off the 16-byte grid: the lane launches with an aligned copy of it.
    shifted = torch.empty(905, dtype=sae.dtype, device="cuda")[1:]
    shifted.copy_(sae.b_enc)
    sae.b_enc = shifted
    x = exact_inputs(300, 72, device="cuda")
    assert_same(encode_sparse(sae, x), reference(sae, x))
    assert _fused_lane(sae).bias is not None


@pytest.mark.cuda
@needs_fused
def test_default_encode_keeps_no_sae_alive():
    sae = exact_sae(72, 904, "gated", device="cuda")
    encode_sparse(sae, exact_inputs(10, 72, device="cuda"))
    sources = [weakref.ref(t) for t in (sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag)]
    del sae
    gc.collect()
    assert [ref() for ref in sources] == [None] * 4


@pytest.mark.cuda
@needs_fused
def test_row_blocks_follow_the_record_budget(monkeypatch):
    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    x = exact_inputs(600, 72, device="cuda").reshape(3, 200, 72)
    spy = GemmSpy(monkeypatch)
    budget = 256 * record_bytes_per_row(904)  # two tile rows a block
    features = encode_sparse(sae, x, chunk_bytes=budget)
    assert [c.shape[0] for c in spy.warp_counts] == [2, 2, 1]
    assert features.shape == (3, 200)
    assert_same(features, reference(sae, x.reshape(600, 72)))


@pytest.mark.cuda
@needs_fused
def test_misaligned_and_empty_inputs():
    sae = exact_sae(72, 904, "jumprelu", device="cuda")
    x = exact_inputs(50, 72, device="cuda")
    flat = torch.empty(50 * 72 + 1, dtype=torch.bfloat16, device="cuda")
    shifted = flat[1:].view(50, 72)  # 2 bytes past a 16-byte boundary
    shifted.copy_(x)
    assert_same(encode_sparse(sae, shifted, fused=True), reference(sae, x))
    empty = encode_sparse(sae, x[:0], fused=True)
    assert empty.row_ptr.tolist() == [0] and empty.indices.numel() == 0


@pytest.mark.cuda
@needs_fused
def test_kernel_bad_input_is_named():
    x = exact_inputs(10, 72, device="cuda")
    w = torch.zeros(72, 256, dtype=torch.bfloat16, device="cuda")
    bias = torch.zeros(256, dtype=torch.bfloat16, device="cuda")
    bound = torch.zeros(256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="16-byte boundaries"):
        flat = torch.zeros(10 * 72 + 8, dtype=torch.bfloat16, device="cuda")
        _ops.fused_threshold_gemm(flat[1:721].view(10, 72), w, bias, bound, cap=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        _ops.fused_threshold_gemm(x[:, :70].contiguous(), w[:70], bias, bound, cap=4)
    with pytest.raises(ValueError, match="bias must be a contiguous"):
        _ops.fused_threshold_gemm(x, w, bias[:100], bound, cap=4)
    with pytest.raises(ValueError, match="weight must be bfloat16"):
        _ops.fused_threshold_gemm(x, w.float(), bias, bound, cap=4)
    with pytest.raises(ValueError, match="bound must be bfloat16, got float16"):
        _ops.fused_threshold_gemm(x, w, bias, bound.half(), cap=4)
    with pytest.raises(ValueError, match="x must be a contiguous bfloat16 or float16"):
        _ops.fused_threshold_gemm(x.float(), w.float(), bias.float(), bound.float(), cap=4)
    with pytest.raises(InputError, match="kernel must be one of"):
        _ops.fused_threshold_gemm(x, w, bias, bound, cap=4, kernel="fastest")
    with pytest.raises(InputError, match="raster must be one of"):
        _ops.fused_threshold_gemm(x, w, bias, bound, cap=4, raster="zigzag")
    with pytest.raises(InputError, match=r"swizzle must be one of \(1, 2, 4, 8\); got 3"):
        _ops.fused_threshold_gemm(x, w, bias, bound, cap=4, swizzle=3)
    with pytest.raises(ValueError, match=r"kernel must lie in \[0, 3\), got 7"):
        _C.fused_threshold_workspace(10, 72, 256, 0, 7, 0, 1, False, False)
    with pytest.raises(ValueError, match=r"raster must lie in \[0, 3\), got 3"):
        _C.fused_threshold_workspace(10, 72, 256, 0, 0, 3, 1, False, False)
    with pytest.raises(ValueError, match="swizzle must be 1, 2, 4 or 8, got 16"):
        _C.fused_threshold_workspace(10, 72, 256, 0, 0, 0, 16, False, True)
    found = _ops.fused_threshold_gemm(x, w, bias, bound, cap=4)
    short = found._replace(tile_total=found.tile_total.new_zeros(2))
    with pytest.raises(ValueError, match=r"tile_total must be a contiguous \[1\]"):
        _ops.fused_records_to_rows(short, 0)
    wrong = found._replace(row_count=found.row_count.new_zeros(299))  # not this tile grid
    with pytest.raises(ValueError, match="does not fit 299 rows"):
        _ops.fused_records_to_rows(wrong, 0)
    with pytest.raises(InputError, match="fused_records_to_rows: dtype must be torch.bfloat16 or "
                                         "torch.float16, got torch.float32"):
        _ops.fused_records_to_rows(found, 0, dtype=torch.float32)
    with pytest.raises(InputError, match="fused_wait_summary: the summary is the compaction's"):
        _ops.fused_wait_summary(_ops.fused_queue_pass(x, w, bias, bound, cap=4))
    with pytest.raises(InputError, match="fused_queue_pass: kernel must be one of"):
        _ops.fused_queue_pass(x, w, bias, bound, cap=4, kernel="fastest")
    with pytest.raises(ShapeError, match="fused_queue_pass: x and weight must be 2-d"):
        _ops.fused_queue_pass(x, w[0], bias, bound, cap=4)


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("cap", [1, 128])  # every tile row overflows / none does
def test_encode_pass_equals_the_gemm_then_the_compaction(cap):
    sae = exact_sae(64, 1600, "jumprelu", device="cuda")
    x = exact_inputs(800, 64, device="cuda")
    bias = sae.b_enc
    bound = rounded_bounds(sae.threshold, sae.d_sae, torch.device("cuda"))
    schedule = schedule_for(800, 64, 1600)._asdict()
    found = _ops.fused_threshold_gemm(x, sae.W_enc, bias, bound, cap=cap, **schedule)
    tiles = torch.zeros(7 * _ops.SAE_FUSED_TILE_M, dtype=torch.int32, device="cuda")
    tiles[:800] = found.row_count
    assert torch.equal(found.tile_total, tiles.view(7, -1).sum(1, dtype=torch.int32))
    want_ptr, want_summary = torch_row_pointers(found.row_count.cpu(), found.tile_overflow.cpu())
    queued = _ops.fused_queue_pass(x, sae.W_enc, bias, bound, cap=cap, **schedule)
    pointers_only = _ops.fused_queued_rows(queued, 0, order_max=0)
    entries, overflowed, widest = _ops.fused_wait_summary(queued)
    assert [entries, overflowed, widest] == want_summary
    assert (overflowed == 7) == (cap == 1)
    assert torch.equal(pointers_only.row_ptr.cpu(), want_ptr)
    for name in ("warp_count", "tile_overflow", "row_count", "tile_total"):
        assert torch.equal(queued.scratch.tensor(name), getattr(found, name)), name
    # The compaction of either gives the same rows; in arrival order, the same entries.
    rows = _ops.fused_queued_rows(queued, entries, order_max=1 << 40)
    want = _ops.fused_records_to_rows(found, entries)
    assert want.summary.tolist() == want_summary
    assert torch.equal(rows.row_ptr, want.row_ptr)
    assert torch.equal(rows.index, want.index) and torch.equal(rows.values, want.values)
    assert rows.arrival_index.dtype == torch.int32 and rows.arrival_values.dtype == torch.bfloat16
    row = torch.repeat_interleave(torch.arange(800, device="cuda"), rows.row_ptr.diff())
    order = torch.argsort(row * 1600 + rows.arrival_index)
    assert torch.equal(rows.arrival_index[order].long(), want.index)
    assert torch.equal(rows.arrival_values[order].view(torch.int16), want.values.view(torch.int16))
    # The TopK path's entries: arrays as long as the records, the same rows at their head.
    again = _ops.fused_queue_pass(x, sae.W_enc, bias, bound, cap=cap, **schedule)
    queued_ptr, queued_i, queued_v = _ops.fused_queued_entries(again)
    assert queued_i.numel() == queued_v.numel() == again.scratch.tensor("records").numel()
    assert torch.equal(queued_ptr, want.row_ptr)
    order = torch.argsort(row * 1600 + queued_i[:entries])
    assert torch.equal(queued_i[:entries][order].long(), want.index)
    assert torch.equal(queued_v[:entries][order].view(torch.int16), want.values.view(torch.int16))
