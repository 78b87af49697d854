"""The fused Hopper TopK encode (a sample's exact top k, the GEMM keeping what reaches each
row's floor, a merge), held to an exact reference.

As in test_sae_fused, inputs are small integers and weights multiples of 1/8, so every float32
sum is exact in any order and ``bf16(x W + b)`` has one right value. Its values then repeat a
lot, so the k-th of a row is usually tied: the top k must break ties to the lower index, as
the chunked encode does.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mechinterp import _C, _ops
from mechinterp.errors import InputError
from mechinterp.sae import SAE, encode_sparse
from mechinterp.sae import encode as encode_module
from mechinterp.sae import fused as fused_module
from mechinterp.sae.fused import FusedSchedule, topk_sample_cols, unsupported_reason
from tests.kernels import CUDA_OK
from tests.test_sae_fused import GemmSpy, exact_cublas, exact_inputs, needs_fused, use_schedule


def exact_topk_sae(d_in: int, d_sae: int, k: int, *, seed: int = 0, device: str = "cpu",
                   zero_bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randint(-8, 9, (d_in, d_sae), generator=g) / 8.0
    b_enc = torch.randint(-40, 9, (d_sae,), generator=g) / 8.0
    if zero_bias:
        b_enc.zero_()
    sae = SAE(W_enc=w_enc, b_enc=b_enc, W_dec=torch.randn(d_sae, d_in, generator=g),
              b_dec=torch.zeros(d_in), architecture="topk", k=k)
    return sae.to(device=device, dtype=dtype)


def reference_topk(sae: SAE, x: torch.Tensor):
    """(indices [rows, k], values [rows, k]) of the top k of E(x W + b) from float64 sums (E the
    SAE's dtype): descending, ties to the lower index, values through a ReLU."""
    h = (x.double() @ sae.W_enc.double() + sae.b_enc.double()).to(sae.dtype)
    index = torch.sort(h.float(), dim=1, descending=True, stable=True).indices[:, :sae.k]
    return index, torch.relu(h.gather(1, index))


def assert_topk_same(features, want) -> None:
    index, values = want
    rows, k = index.shape
    assert torch.equal(features.row_ptr, torch.arange(rows + 1, device=index.device) * k)
    assert torch.equal(features.indices.view(rows, k), index)
    assert features.values.dtype == values.dtype
    assert torch.equal(features.values.view(rows, k), values)


# ---- everywhere ----


def test_sample_is_whole_tiles_and_a_floor_of_the_share():
    for d_sae, k in ((32768, 32), (65536, 64), (131072, 64), (4096, 200), (904, 7), (1 << 20, 256)):
        cols = topk_sample_cols(d_sae, k)
        want = max(d_sae // 4, 64 * k)
        step = _ops.SAE_CUDA_SEGMENT if want >= _ops.SAE_CUDA_SEGMENT else _ops.SAE_FUSED_TILE_N
        assert cols % step == 0 and cols % _ops.SAE_FUSED_TILE_N == 0
        assert want <= cols < want + step


def test_topk_unsupported_reasons_are_named():
    cuda = torch.device("cuda")
    assert "k up to 256" in unsupported_reason(exact_topk_sae(16, 8192, 300), cuda)
    scaled = replace(exact_topk_sae(16, 8192, 8), rescale_acts_by_decoder_norm=True)
    assert "decoder norms" in unsupported_reason(scaled, cuda)
    assert "twice its sample of 512 latents" in unsupported_reason(exact_topk_sae(16, 1016, 8), cuda)


def test_topk_takes_the_fused_encode_on_request_only(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    sae = exact_topk_sae(64, 1024, 8)
    # Where the fused encode does not apply, that is the reason (here: no CUDA device).
    assert fused_module.default_reason(sae, cpu) == unsupported_reason(sae, cpu)
    # Where it applies, TopK still defaults to the chunked encode, and encode_sparse follows.
    monkeypatch.setattr(fused_module, "unsupported_reason", lambda sae, device: None)
    assert "fused=True" in fused_module.default_reason(sae, cuda)
    assert not encode_module._wants_fused(sae, cuda, None)
    assert encode_module._wants_fused(sae, cuda, True)
    relu = SAE(W_enc=sae.W_enc.float(), b_enc=sae.b_enc.float(), W_dec=sae.W_dec.float(),
               b_dec=sae.b_dec.float(), architecture="relu")
    assert fused_module.default_reason(relu, cuda) is None
    assert encode_module._wants_fused(relu, cuda, None)


# ---- on a Hopper GPU ----

FLOOR_SCHEDULES = [FusedSchedule(kernel, raster, swizzle)
                   for kernel in _ops.SAE_FUSED_FLOOR_KERNELS
                   for raster, swizzle in (("heuristic", 1), ("along_n", 4))]


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("schedule", FLOOR_SCHEDULES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize(("rows", "d_in", "d_sae", "k"), [
    (300, 72, 1032, 7),      # partial tiles every way (a sample of 512, 520 latents past it)
    (129, 1032, 4104, 32),   # one row in the last record tile
    (1, 8, 520, 1),          # one row, k = 1
    (800, 64, 8192, 64),
    (200, 64, 32768, 200),   # k past 128: the widest merge; a sample of two segments
])
@pytest.mark.parametrize("dtype", fused_module.DTYPES, ids=str)
def test_fused_topk_is_exact_and_equals_the_chunked_one(monkeypatch, schedule, rows, d_in,
                                                        d_sae, k, dtype):
    use_schedule(monkeypatch, schedule)
    exact_cublas(monkeypatch)
    sae = exact_topk_sae(d_in, d_sae, k, device="cuda", dtype=dtype)
    x = exact_inputs(rows, d_in, device="cuda", dtype=dtype)
    spy = GemmSpy(monkeypatch)
    want = reference_topk(sae, x)
    assert_topk_same(encode_sparse(sae, x, fused=True), want)
    assert len(spy.warp_counts) == 1
    assert_topk_same(encode_sparse(sae, x), want)  # the default: chunked for TopK
    assert len(spy.warp_counts) == 1


@pytest.mark.cuda
@needs_fused
@pytest.mark.parametrize("schedule", FLOOR_SCHEDULES[::3], ids=lambda s: "-".join(map(str, s)))
def test_rows_of_ties_overflow_and_are_encoded_again_exactly(monkeypatch, schedule):
    # Zero rows with zero biases: every pre-activation is 0, so the floor is 0 and every latent
    # past the sample reaches it; tile row 1 overflows its records, and its rows' top k are
    # the first k latents. The other rows' candidates fill about 1/4 of a region.
    use_schedule(monkeypatch, schedule)
    sae = exact_topk_sae(256, 8192, 4, device="cuda", zero_bias=True)
    x = exact_inputs(300, 256, device="cuda")
    x[128:256] = 0
    spy = GemmSpy(monkeypatch)
    features = encode_sparse(sae, x, fused=True)
    overflowed = (spy.warp_counts[0] > fused_module.RECORDS_PER_WARP).flatten(1).any(1)
    assert overflowed.tolist() == [False, True, False]
    assert_topk_same(features, reference_topk(sae, x))
    assert torch.equal(features.indices.view(300, 4)[128:256],
                       torch.arange(4, device="cuda").expand(128, 4))


@pytest.mark.cuda
@needs_fused
def test_infinite_and_nan_rows_equal_the_chunked_encode():
    # NaN ranks by its bits in both paths; a row of NaN has no floor and is encoded again.
    sae = exact_topk_sae(72, 2048, 16, device="cuda")
    x = exact_inputs(300, 72, device="cuda")
    x[3, 5] = float("inf")
    x[140] = float("nan")
    x[7, :] = -float("inf")
    fused = encode_sparse(sae, x, fused=True)
    chunked = encode_sparse(sae, x, fused=False)
    assert torch.equal(fused.indices, chunked.indices)
    assert torch.equal(fused.values.view(torch.int16), chunked.values.view(torch.int16))
    finite = torch.ones(300, dtype=torch.bool, device="cuda")
    finite[[3, 7, 140]] = False
    want_i, want_v = reference_topk(sae, x[finite])
    assert torch.equal(fused.indices.view(300, 16)[finite], want_i)
    assert torch.equal(fused.values.view(300, 16)[finite], want_v)


@pytest.mark.cuda
@needs_fused
def test_topk_row_blocks_follow_the_record_budget(monkeypatch):
    sae = exact_topk_sae(72, 1032, 8, device="cuda")
    x = exact_inputs(600, 72, device="cuda").reshape(3, 200, 72)
    spy = GemmSpy(monkeypatch)
    budget = 256 * fused_module.record_bytes_per_row(1032)  # two tile rows a block
    features = encode_sparse(sae, x, chunk_bytes=budget, fused=True)
    assert [c.shape[0] for c in spy.warp_counts] == [2, 2, 1]
    assert features.shape == (3, 200)
    assert_topk_same(features, reference_topk(sae, x.reshape(600, 72)))
    empty = encode_sparse(sae, x[0, :0], fused=True)
    assert empty.row_ptr.tolist() == [0] and empty.indices.numel() == 0


@pytest.mark.cuda
@needs_fused
def test_rows_encoded_again_land_in_their_block(monkeypatch):
    # Three blocks of two tile rows. Tile row 3 (the second block's second) is all ties at 0,
    # so it overflows; its rows are encoded again after the whole encode is queued.
    sae = exact_topk_sae(72, 1032, 8, device="cuda", zero_bias=True)
    x = exact_inputs(600, 72, device="cuda")
    x[384:512] = 0
    spy = GemmSpy(monkeypatch)
    budget = 256 * fused_module.record_bytes_per_row(1032)
    features = encode_sparse(sae, x, chunk_bytes=budget, fused=True)
    overflowed = [(c > fused_module.RECORDS_PER_WARP).flatten(1).any(1) for c in spy.warp_counts]
    assert [o.shape[0] for o in overflowed] == [2, 2, 1]
    assert bool(overflowed[1][1])
    assert_topk_same(features, reference_topk(sae, x))
    assert torch.equal(features.indices.view(600, 8)[384:512],
                       torch.arange(8, device="cuda").expand(128, 8))


@pytest.mark.cuda
@needs_fused
def test_floor_kernel_bad_input_is_named():
    x = exact_inputs(10, 72, device="cuda")
    w = torch.zeros(72, 512, dtype=torch.bfloat16, device="cuda")
    bias = torch.zeros(256, dtype=torch.bfloat16, device="cuda")
    floor = torch.zeros(10, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(InputError, match="kernel must be one of .* with row_floor"):
        _ops.fused_threshold_gemm(x, w[:, 256:], bias, floor, cap=4, kernel="cluster_1x2",
                                  row_floor=True)
    with pytest.raises(ValueError, match="has no variant with a floor per row"):
        _C.fused_threshold_workspace(10, 72, 256, 0, 1, 0, 1, True, True)
    with pytest.raises(ValueError, match=r"bound must be a contiguous \[10\]"):
        _ops.fused_threshold_gemm(x, w[:, 256:], bias, bias, cap=4, row_floor=True)
    with pytest.raises(ValueError, match=r"weight must be float16 \(as x\), got bfloat16"):
        _ops.fused_threshold_gemm(x.half(), w[:, 256:], bias.half(), floor.half(), cap=4,
                                  row_floor=True)
    with pytest.raises(ValueError, match="unit column stride"):
        _ops.fused_threshold_gemm(x, w[:, ::2], bias, floor, cap=4, row_floor=True)
    with pytest.raises(ValueError, match="16-byte boundaries"):
        _ops.fused_threshold_gemm(x, w[:, 4:260], bias, floor, cap=4, row_floor=True)
    # Without a floor per row the weight must be whole.
    with pytest.raises(ValueError, match=r"weight must be a contiguous \[72, 256\]"):
        _ops.fused_threshold_gemm(x, w[:, 256:], bias, bias, cap=4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 5, 32, 64, 100, 256])
def test_merge_of_compressed_rows_equals_a_sort(k, dtype):
    # Running top k of random rows, then candidates in compressed rows (any order, some rows
    # empty, some with hundreds): the merge equals a stable sort of everything.
    g = torch.Generator().manual_seed(k)
    rows, start_cols, offset = 37, 3 * k, 1000
    start = torch.randint(-20, 20, (rows, start_cols), generator=g).float() / 4
    counts = torch.randint(0, 600, (rows,), generator=g)
    counts[::5] = 0
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    nnz = int(row_ptr[-1])
    cand_values = (torch.randint(-20, 20, (nnz,), generator=g).float() / 4).to(dtype)
    cand_values[::7] *= 1e-3  # float16's subnormals, bfloat16's finer steps
    cand_index = torch.cat([torch.randperm(2000, generator=g)[:int(c)] for c in counts]).int()
    top_v, top_i = _ops.select_topk(start.cuda(), k)
    top_v, top_i = top_v[:, :k].contiguous(), top_i[:, :k].contiguous()
    row_bar = torch.zeros(rows, dtype=torch.int32, device="cuda")
    _ops.topk_merge_rows(top_v, top_i, row_ptr.cuda(), cand_index.cuda(), cand_values.cuda(),
                         row_bar, col_offset=offset)
    for r in range(rows):
        lo, hi = int(row_ptr[r]), int(row_ptr[r + 1])
        values = torch.cat([start[r], cand_values[lo:hi].float()])
        index = torch.cat([torch.arange(start_cols), cand_index[lo:hi].long() + offset])
        # Descending value, then ascending index.
        order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), int(index[i])))[:k]
        assert top_i[r].tolist() == index[order].tolist(), r
        assert top_v[r].tolist() == values[order].tolist(), r


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and the CUDA kernels")
def test_merges_name_a_bad_running_top_k():
    top_v = torch.zeros(3, 4, device="cuda")
    top_i = torch.zeros(3, 4, dtype=torch.int32, device="cuda")
    bar = torch.zeros(3, dtype=torch.int32, device="cuda")
    row_ptr = torch.zeros(4, dtype=torch.int64, device="cuda")
    cand_i = torch.zeros(0, dtype=torch.int32, device="cuda")
    cand_v = torch.zeros(0, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="topk_merge_rows: top_index must be int32"):
        _ops.topk_merge_rows(top_v, top_i.long(), row_ptr, cand_i, cand_v, bar)
    with pytest.raises(ValueError, match=r"topk_merge_rows: row_bar must be a contiguous \[3\]"):
        _ops.topk_merge_rows(top_v, top_i, row_ptr, cand_i, cand_v, bar[:2])
    with pytest.raises(ValueError,
                       match="topk_merge_rows: cand_values must be bfloat16 or float16, got float32"):
        _ops.topk_merge_rows(top_v, top_i, row_ptr, cand_i, cand_v.float(), bar)
    candidates = _ops.topk_candidates(torch.zeros(3, 64, device="cuda"), 4, row_bar=bar)
    with pytest.raises(ValueError, match="topk_merge: top_values must be float32"):
        _ops.topk_merge(top_v.double(), top_i, candidates, bar)
