"""Sparse SAE encode/decode and their kernels, held to the dense reference of ``SAE``."""

from __future__ import annotations

import math

import pytest
import torch

from mechinterp import _ops
from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.sae import SAE, SAEEdit, decode_sparse, encode_sparse, encode_subset, reconstruct
from mechinterp.sites import Site
from tests.kernels import needs_cuda

ARCHS = ("relu", "jumprelu", "topk", "gated", "batchtopk")


def make_sae(arch: str, d_in: int = 24, d_sae: int = 300, *, k: int = 7, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str = "cpu", **extra) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    fields = {
        "W_enc": w_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g, dtype=torch.float64),
        "b_enc": -0.3 + 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64),
        "W_dec": w_dec,
        "b_dec": 0.05 * torch.randn(d_in, generator=g, dtype=torch.float64),
        "architecture": arch,
    }
    if arch in ("jumprelu", "batchtopk"):
        fields["threshold"] = 0.2 + 0.3 * torch.rand(d_sae, generator=g, dtype=torch.float64)
    if arch == "topk":
        fields["k"] = k
    if arch == "gated":
        fields["b_gate"] = -0.5 + 0.2 * torch.randn(d_sae, generator=g, dtype=torch.float64)
        fields["b_mag"] = 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64)
        fields["r_mag"] = 0.2 * torch.randn(d_sae, generator=g, dtype=torch.float64)
    fields.update(extra)
    return SAE(**fields).to(device=device, dtype=dtype)


def inputs(n: int, d_in: int, *, seed: int = 1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, d_in, generator=g, dtype=torch.float64)).to(device, dtype)


def dense_pairs(dense: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(p) for p in dense.nonzero().tolist()}


# ---- the selectors against torch ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_topk_equals_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40, 999, generator=g).to(dtype)
    values[5] = 1.0  # a row of ties: the lowest indices win
    top_v, top_i = _ops.select_topk(values, 9, col_offset=100)
    ref = values.float().sort(dim=1, descending=True, stable=True)
    assert torch.equal(top_v, ref.values[:, :9])
    assert torch.equal(top_i.long(), ref.indices[:, :9] + 100)
    assert top_i[5].tolist() == list(range(100, 109))


def test_select_topk_applies_bias_and_scale_and_merges_by_index():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(6, 50, generator=g)
    bias, scale = torch.randn(50, generator=g), torch.rand(50, generator=g) + 0.5
    top_v, top_i = _ops.select_topk(values, 5, bias=bias, scale=scale)
    ref = ((values + bias) * scale).topk(5, dim=1)
    torch.testing.assert_close(top_v, ref.values)
    assert torch.equal(top_i.long(), ref.indices)
    # Merging: candidates carry their own indices; -1 marks padding that never wins.
    index = torch.randint(0, 10**6, (6, 50), generator=g, dtype=torch.int32)
    index[:, ::7] = -1
    merged_v, merged_i = _ops.select_topk(values, 4, index=index)
    masked = values.masked_fill(index < 0, float("-inf"))
    ref = masked.topk(4, dim=1)
    assert torch.equal(merged_v, ref.values)
    assert torch.equal(merged_i, index.gather(1, ref.indices))


def test_select_topk_pads_short_rows():
    top_v, top_i = _ops.select_topk(torch.tensor([[1.0, 3.0]]), 4)
    assert top_v.tolist() == [[3.0, 1.0, float("-inf"), float("-inf")]]
    assert top_i.tolist() == [[1, 0, -1, -1]]


def test_select_threshold_keeps_columns_in_order_and_counts_overflow():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(8, 70, generator=g)
    bias, threshold = 0.1 * torch.randn(70, generator=g), torch.rand(70, generator=g)
    kept, index, count = _ops.select_threshold(values, cap=70, bias=bias, threshold=threshold,
                                               col_offset=3)
    pre = values + bias
    mask = (pre > threshold) & (pre > 0)
    assert torch.equal(count[:, 0], mask.sum(1).int())
    for r in range(8):
        cols = mask[r].nonzero().flatten()
        n = cols.numel()
        assert torch.equal(index[r, 0, :n].long(), cols + 3)
        assert torch.equal(kept[r, 0, :n], pre[r, cols])
    _, _, small = _ops.select_threshold(values, cap=2, bias=bias, threshold=threshold)
    assert torch.equal(small, count)  # the true count, beyond the slots


def _compact_reference(kept, index, count, row_start, nnz, dtype):
    """compact_slots's contract, one entry at a time."""
    values = torch.full((nnz,), float("nan"), dtype=dtype)
    indices = torch.full((nnz,), -7, dtype=torch.int64)
    rows, segments, cap = kept.shape
    for r in range(rows):
        at = int(row_start[r])
        for s in range(segments):
            for j in range(min(max(int(count[r, s]), 0), cap)):
                if 0 <= at < nnz:
                    values[at] = kept[r, s, j].to(dtype)
                    indices[at] = int(index[r, s, j])
                at += 1
    return values, indices


def _slots(rows, segments, cap, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    kept = torch.randn(rows, segments, cap, generator=g)
    index = torch.randint(0, 1 << 30, (rows, segments, cap), generator=g, dtype=torch.int32)
    count = torch.randint(0, cap + 1, (rows, segments), generator=g, dtype=torch.int32)
    return kept.to(device), index.to(device), count.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_slots_writes_each_rows_filled_slots_in_order(dtype):
    kept, index, count = _slots(37, 45, 5, seed=30)  # more segments than a warp's 32
    count[3, 7] = 99  # a count past cap: only cap slots exist
    count[4] = 0  # an empty row
    per_row = count.clamp(max=5).sum(1)
    row_start = torch.cumsum(per_row, 0) - per_row
    nnz = int(per_row.sum())
    values, indices = _ops.compact_slots(kept, index, count, row_start, nnz, dtype)
    want_v, want_i = _compact_reference(kept, index, count, row_start, nnz, dtype)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert torch.equal(indices, want_i)
    assert torch.equal(values, want_v)
    # Starts past the end drop entries instead of writing out of bounds.
    _short_v, short_i = _ops.compact_slots(kept, index, count, row_start, nnz // 2, dtype)
    assert torch.equal(short_i, want_i[: nnz // 2])


def test_select_threshold_fills_segment_slices_of_a_wider_buffer():
    g = torch.Generator().manual_seed(31)
    values = torch.randn(6, 50, generator=g)
    threshold = torch.rand(50, generator=g)
    alone = _ops.select_threshold(values, cap=9, threshold=threshold)
    kept = torch.full((6, 3, 9), -5.0)
    index = torch.full((6, 3, 9), -5, dtype=torch.int32)
    count = torch.full((6, 3), -5, dtype=torch.int32)
    out = _ops.select_threshold(values, cap=9, threshold=threshold,
                                out=(kept[:, 1:2], index[:, 1:2], count[:, 1:2]))
    assert out[0].data_ptr() == kept[:, 1:2].data_ptr()
    assert torch.equal(count[:, 1:2], alone[2])
    live = torch.arange(9) < alone[2].unsqueeze(-1)
    assert torch.equal(kept[:, 1:2][live], alone[0][live])
    assert torch.equal(index[:, 1:2][live], alone[1][live])
    # The neighbouring segments are untouched.
    assert (count[:, [0, 2]] == -5).all() and (kept[:, [0, 2]] == -5).all()
    with pytest.raises(ValueError, match="out_values"):
        _ops.select_threshold(values, cap=9, out=(kept[:, 1:2, ::2], index[:, 1:2, ::2],
                                                  count[:, 1:2]))


def test_compact_slots_rejects_bad_input():
    kept, index, count = _slots(4, 2, 3, seed=32)
    start = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_start"):
        _ops.compact_slots(kept, index, count, start.int(), 5)
    with pytest.raises(ValueError, match="count"):
        _ops.compact_slots(kept, index, count[:, :1], start, 5)
    with pytest.raises(ValueError, match="index"):
        _ops.compact_slots(kept, index.long(), count, start, 5)
    with pytest.raises(DTypeError, match="dtype"):
        _ops.compact_slots(kept, index, count, start, 5, torch.float64)
    with pytest.raises(InputError, match="nnz"):
        _ops.compact_slots(kept, index, count, start, -1)


def test_sparse_decode_equals_dense_product():
    g = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(30, 16, generator=g), torch.randn(16, generator=g)
    index = torch.randint(0, 30, (5, 4), generator=g)
    index[0, 1] = -1
    values = torch.randn(5, 4, generator=g)
    dense = torch.zeros(5, 30)
    for r in range(5):
        for j in range(4):
            if index[r, j] >= 0:
                dense[r, index[r, j]] += values[r, j]
    torch.testing.assert_close(_ops.sparse_decode(index, values, weight, bias=bias),
                               dense @ weight + bias)
    row_ptr = torch.tensor([0, 2, 2, 5])
    flat_i, flat_v = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = torch.ones(3, 16)
    _ops.sparse_decode(flat_i, flat_v, weight, row_ptr=row_ptr, out=out, accumulate=True)
    want = 1 + torch.stack([weight[1] + 2 * weight[2], torch.zeros(16),
                            3 * weight[3] + 4 * weight[4] + 5 * weight[5]])
    torch.testing.assert_close(out, want)


# ---- encode_sparse / decode_sparse against the dense reference ----


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_encode_sparse_equals_dense_reference(arch, chunk_bytes):
    sae = make_sae(arch)
    x = inputs(33, sae.d_in)
    dense = sae.encode(x)
    features = encode_sparse(sae, x, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(features.to_dense(), dense, rtol=1e-5, atol=1e-6)
    if arch == "topk":
        assert features.l0.tolist() == [sae.k] * 33
        ref = sae.pre_activations(x).topk(sae.k, dim=-1).indices
        got = features.indices.reshape(33, sae.k)
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(got, ref))
    else:
        assert dense_pairs(features.to_dense()) == dense_pairs(dense)
        assert torch.all(features.values > 0)
    torch.testing.assert_close(decode_sparse(sae, features), sae.decode(dense), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_float64_and_leading_shape_take_the_torch_path(arch):
    sae = make_sae(arch, dtype=torch.float64)
    x = inputs(12, sae.d_in, dtype=torch.float64).reshape(3, 4, sae.d_in)
    features = encode_sparse(sae, x, chunk_bytes=2048)
    assert features.shape == (3, 4)
    torch.testing.assert_close(features.to_dense(), sae.encode(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reconstruct(sae, x), sae.forward(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_reconstruct_follows_normalisation_and_rescaling(norm):
    sae = make_sae("topk", normalize_activations=norm, rescale_acts_by_decoder_norm=True,
                   W_dec=3.0 * make_sae("topk").W_dec.double())
    x = inputs(20, sae.d_in)
    torch.testing.assert_close(reconstruct(sae, x), sae.forward(x), rtol=1e-5, atol=1e-5)


def test_transcoder_reconstruct_adds_the_skip():
    base = make_sae("relu")
    g = torch.Generator().manual_seed(9)
    sae = SAE(W_enc=base.W_enc, b_enc=base.b_enc, W_dec=torch.randn(300, 10, generator=g),
              b_dec=torch.zeros(10), apply_b_dec_to_input=False,
              W_skip=torch.randn(10, 24, generator=g))
    x = inputs(7, 24)
    torch.testing.assert_close(reconstruct(sae, x), sae.forward(x), rtol=1e-5, atol=1e-4)


def dictionary_inputs(sae: SAE, n: int, active: int, *, seed: int = 2) -> torch.Tensor:
    """Inputs the SAE explains well: sparse positive mixtures of its decoder rows."""
    g = torch.Generator().manual_seed(seed)
    which = torch.stack([torch.randperm(sae.d_sae, generator=g)[:active] for _ in range(n)])
    amount = 1.0 + torch.rand(n, active, generator=g)
    return torch.einsum("na,nad->nd", amount, sae.W_dec.float()[which]) + sae.b_dec.float()


def test_bfloat16_meets_the_float32_reference_tolerances():
    # A well-posed SAE: its encoder is its decoder's transpose and the inputs are made of its
    # atoms, so the float32 reference reconstructs them and bf16 only adds rounding.
    base = make_sae("topk", d_in=256, d_sae=1024, k=4)
    sae32 = make_sae("topk", d_in=256, d_sae=1024, k=4, W_enc=base.W_dec.T.double(),
                     b_enc=torch.zeros(1024, dtype=torch.float64))
    x = dictionary_inputs(sae32, 200, 4)
    ref = sae32.encode(x)
    got = encode_sparse(sae32.to(dtype=torch.bfloat16), x.bfloat16())
    ref_sets = [set(r.nonzero().flatten().tolist()) for r in ref]
    got_sets = [{i for i, v in zip(r.tolist(), w.tolist()) if v > 0}
                for r, w in zip(got.indices.reshape(200, 4), got.values.reshape(200, 4))]
    jaccard = sum(len(a & b) / len(a | b) for a, b in zip(ref_sets, got_sets)) / 200
    assert jaccard >= 0.98
    l0_ref = sum(map(len, ref_sets)) / 200
    assert abs(sum(map(len, got_sets)) / 200 - l0_ref) <= 0.01 * l0_ref
    want = sae32.forward(x)
    err = (reconstruct(sae32.to(dtype=torch.bfloat16), x.bfloat16()).float() - want).norm()
    assert err / want.norm() <= 1e-2


def test_encode_subset_matches_columns_of_the_dense_encode():
    for arch in ARCHS:
        sae = make_sae(arch)
        x = inputs(9, sae.d_in)
        latents = [5, 0, 299, 5]
        torch.testing.assert_close(encode_subset(sae, x, latents), sae.encode(x)[:, latents],
                                   rtol=1e-5, atol=1e-6)


def test_threshold_overflow_widens_and_stays_exact():
    # ReLU with a positive bias: most latents fire, far beyond the first slot count.
    sae = make_sae("relu", d_sae=3000, b_enc=torch.full((3000,), 5.0, dtype=torch.float64))
    x = inputs(6, sae.d_in)
    features = encode_sparse(sae, x, chunk_bytes=1 << 14)
    torch.testing.assert_close(features.to_dense(), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_sae_edit_uses_the_subset_encode():
    sae = make_sae("topk")
    x = inputs(4, sae.d_in).reshape(1, 4, -1)
    edit = SAEEdit(Site("resid_post", layer=0), sae, ablate=[int(encode_sparse(sae, x).indices[0])])
    delta = edit.delta(x)
    dense = sae.encode(x)
    dense[..., edit.ablate[0]] = 0
    torch.testing.assert_close(delta, sae.decode(dense) - sae.decode(sae.encode(x)), rtol=1e-5,
                               atol=1e-5)


def test_bad_input_is_named():
    sae = make_sae("relu")
    with pytest.raises(ShapeError, match="d_in=24"):
        encode_sparse(sae, torch.randn(3, 5))
    with pytest.raises(InputError, match="chunk_bytes"):
        encode_sparse(sae, torch.randn(3, 24), chunk_bytes=0)
    with pytest.raises(InputError, match="latents"):
        encode_subset(sae, torch.randn(3, 24), [300])
    with pytest.raises(DTypeError, match="values"):
        _ops.select_topk(torch.randn(2, 3, dtype=torch.float64), 1)
    with pytest.raises(ShapeError, match="bias"):
        _ops.select_threshold(torch.randn(2, 3), cap=1, bias=torch.zeros(4))
    with pytest.raises(ShapeError, match="d_sae"):
        decode_sparse(make_sae("relu", d_sae=10), encode_sparse(sae, torch.randn(2, 24)))


# ---- CUDA ----


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_select_topk_equals_cpu(dtype):
    g = torch.Generator().manual_seed(11)
    segment = _ops.SAE_CUDA_SEGMENT
    for cols in (5, 300, segment, 2 * segment + 123):
        values = torch.randn(17, cols, generator=g).to(dtype)
        values[3, : cols // 2] = 0.25  # heavy ties: the bisection path
        cpu_v, cpu_i = _ops.select_topk(values, 12)
        gpu_v, gpu_i = _ops.select_topk(values.cuda(), 12)
        segments = _ops.topk_segments(cols, torch.device("cuda"))
        if segments > 1:
            gpu_v, gpu_i = _ops.select_topk(gpu_v, 12, index=gpu_i)
        assert torch.equal(gpu_v.cpu(), cpu_v)
        assert torch.equal(gpu_i.cpu(), cpu_i)
    for k in (1, 64, 256):
        values = torch.randn(9, segment, generator=g).to(dtype)
        assert torch.equal(_ops.select_topk(values.cuda(), k)[1].cpu(),
                           _ops.select_topk(values, k)[1])


def test_running_topk_is_cuda_only_and_checks_its_slots():
    bar = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_candidates: runs on CUDA only"):
        _ops.topk_candidates(torch.randn(2, 10), 2, row_bar=bar)
    assert _ops.topk_candidate_cap(1) >= 1
    assert _ops.topk_candidate_cap(256) + 256 <= _ops._C.SAE_CUDA_CANDIDATES


def _running_topk(values: torch.Tensor, k: int, widths, scale=None):
    """The CUDA running top-k over column chunks of the given widths."""
    rows = values.shape[0]
    top_v = torch.full((rows, k), float("-inf"), device="cuda")
    top_i = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
    bar = torch.zeros(rows, dtype=torch.int32, device="cuda")
    c0 = 0
    for width in widths:
        chunk = values[:, c0:c0 + width]
        cut = None if scale is None else scale[c0:c0 + width]
        _ops.topk_merge(top_v, top_i, _ops.topk_candidates(chunk, k, row_bar=bar, col_offset=c0,
                                                           scale=cut), bar)
        c0 += width
    assert c0 == values.shape[1]
    return top_v, top_i


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_running_topk_equals_a_stable_sort(dtype, aligned):
    g = torch.Generator().manual_seed(21)
    segment = _ops.SAE_CUDA_SEGMENT
    # Whole segments and rows 16-byte aligned: 16-bit chunks of whole segments take the packed
    # kernel, whose tied and NaN cells go to the redo kernel. Otherwise the general kernel.
    cols = 3 * segment if aligned else 3 * segment + 700
    values = torch.randn(40, cols, generator=g).to(dtype)
    values[3, : cols // 2] = 0.25  # heavy ties in every segment: the exact fallback
    values[4] = 1.0  # a row of ties: the lowest indices win
    values[5, ::7] = 8.0  # many equal maxima spread over the chunks
    values[6] = -torch.arange(cols, dtype=torch.float32).to(dtype)  # descending: bar rises early
    values[7] = torch.arange(cols, dtype=torch.float32).to(dtype)  # ascending: rises late
    values[8, 5000] = float("nan")  # ranks first, as in torch: the key path of the block
    ref = values.float().sort(dim=1, descending=True, stable=True)
    chunkings = ([cols], [segment, segment, segment, 700], [2 * segment + 5, segment + 695],
                 [100, cols - 100])
    if aligned:
        chunkings = ([cols], [segment, segment, segment], [2 * segment, segment])
    for k in (1, 7, 32, 64, 256):
        for widths in chunkings:
            top_v, top_i = _running_topk(values.cuda(), k, widths)
            torch.testing.assert_close(top_v.cpu(), ref.values[:, :k], rtol=0, atol=0,
                                       equal_nan=True, msg=f"k={k}, chunks {widths}")
            assert torch.equal(top_i.long().cpu(), ref.indices[:, :k]), (k, widths)


@pytest.mark.cuda
@needs_cuda
def test_cuda_running_topk_applies_scale_pads_short_rows_and_checks_slots():
    g = torch.Generator().manual_seed(22)
    values = torch.randn(9, 20000, generator=g)
    scale = torch.rand(20000, generator=g) + 0.5
    top_v, top_i = _running_topk(values.cuda(), 16, [12000, 8000], scale=scale.cuda())
    ref = (values * scale).sort(dim=1, descending=True, stable=True)
    torch.testing.assert_close(top_v.cpu(), ref.values[:, :16], rtol=0, atol=0)
    assert torch.equal(top_i.long().cpu(), ref.indices[:, :16])
    short_v, short_i = _running_topk(values[:, :5].cuda(), 8, [3, 2])
    assert torch.equal(short_i[:, 5:].cpu(), torch.full((9, 3), -1, dtype=torch.int32))
    assert torch.isinf(short_v[:, 5:]).all()
    bar = torch.zeros(9, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="k <= cap"):
        _ops.topk_candidates(values.cuda(), 16, row_bar=bar, cap=8)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_select_threshold_equals_cpu(dtype, gated, aligned):
    g = torch.Generator().manual_seed(13)
    segment = _ops.SAE_CUDA_SEGMENT
    cols = 2 * segment + 333
    values = torch.randn(11, cols + 1, generator=g).to(dtype)
    # A one-column offset makes the rows unaligned for 16-byte loads: the scalar path.
    values = values[:, :cols] if aligned else values[:, 1:]
    columns = {"bias": torch.randn(cols, generator=g),
               "threshold": torch.rand(cols, generator=g) + 1.0}
    if gated:
        columns = {"bias": columns["bias"], "mag_scale": torch.rand(cols, generator=g) + 0.5,
                   "mag_bias": torch.randn(cols, generator=g)}
    cpu = _ops.select_threshold(values, cap=cols, **columns)
    gpu = _ops.select_threshold(values.cuda(), cap=segment,
                                **{name: t.cuda() for name, t in columns.items()})
    assert torch.equal(gpu[2].sum(1).cpu(), cpu[2][:, 0])
    for r in range(values.shape[0]):
        n = int(cpu[2][r, 0])
        live = torch.arange(segment) < gpu[2][r].cpu().unsqueeze(-1)
        assert torch.equal(gpu[1][r].cpu()[live], cpu[1][r, 0, :n])
        assert torch.equal(gpu[0][r].cpu()[live], cpu[0][r, 0, :n])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_threshold", [True, False])
def test_cuda_plain_threshold_of_16_bit_values_matches_the_float_test(dtype, with_threshold):
    # The 16-bit path compares packed values against thresholds rounded down to the values'
    # type; it must keep exactly the columns where float(h) > threshold and float(h) > 0.
    g = torch.Generator().manual_seed(35)
    segment = _ops.SAE_CUDA_SEGMENT
    cols = 2 * segment + 336  # a short last segment, still 16-byte rows
    rows = 11  # not a whole number of the kernel's row groups
    values = (torch.randn(rows, cols, generator=g) * 2).to(dtype)
    threshold = torch.rand(cols, generator=g) * 2 + 0.001  # rarely representable in 16 bits
    # Thresholds exactly at values of the row, just below and just above them, negative,
    # NaN and infinite; values that are NaN, infinite and zero.
    exact = values[0, :40].float()
    threshold[:40] = exact
    threshold[40:80] = torch.nextafter(values[1, 40:80].float(), torch.tensor(-math.inf))
    threshold[80:120] = torch.nextafter(values[2, 80:120].float(), torch.tensor(math.inf))
    threshold[120:160] = -torch.rand(40, generator=g)
    threshold[160], threshold[161], threshold[162] = math.nan, math.inf, -math.inf
    values[3, 160:170] = math.inf
    values[4, 170:175] = math.nan
    values[5, :] = 0.0
    values[6, 161] = math.inf
    reference = values.float()
    keep = reference > 0
    if with_threshold:
        keep &= reference > threshold
    columns = {"threshold": threshold.cuda()} if with_threshold else {}
    kept, index, count = _ops.select_threshold(values.cuda(), cap=segment, **columns)
    assert torch.equal(count.sum(1).cpu(), keep.sum(1).to(torch.int32))
    for r in range(rows):
        live = torch.arange(segment) < count[r].cpu().unsqueeze(-1)
        expected = keep[r].nonzero().flatten()
        assert torch.equal(index[r].cpu()[live].long(), expected)
        assert torch.equal(kept[r].cpu()[live], reference[r, expected])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_compact_slots_equals_cpu(dtype):
    kept, index, count = _slots(300, 70, 9, seed=33)
    count[5, 60] = 1000
    per_row = count.clamp(max=9).sum(1)
    row_start = torch.cumsum(per_row, 0) - per_row
    nnz = int(per_row.sum())
    cpu = _ops.compact_slots(kept, index, count, row_start, nnz, dtype)
    gpu = _ops.compact_slots(kept.cuda(), index.cuda(), count.cuda(), row_start.cuda(), nnz,
                             dtype)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    short = _ops.compact_slots(kept.cuda(), index.cuda(), count.cuda(), row_start.cuda(),
                               nnz - 100, dtype)
    assert torch.equal(short[1].cpu(), cpu[1][: nnz - 100])


@pytest.mark.cuda
@needs_cuda
def test_cuda_select_threshold_fills_segment_slices_of_a_wider_buffer():
    g = torch.Generator().manual_seed(34)
    segment = _ops.SAE_CUDA_SEGMENT
    values = torch.randn(7, 2 * segment, generator=g, device="cpu").bfloat16().cuda()
    threshold = (torch.rand(2 * segment, generator=g) + 1.5).cuda()
    alone = _ops.select_threshold(values, cap=40, threshold=threshold)
    kept = torch.full((7, 5, 40), -5.0, device="cuda")
    index = torch.full((7, 5, 40), -5, dtype=torch.int32, device="cuda")
    count = torch.full((7, 5), -5, dtype=torch.int32, device="cuda")
    _ops.select_threshold(values, cap=40, threshold=threshold,
                          out=(kept[:, 2:4], index[:, 2:4], count[:, 2:4]))
    assert torch.equal(count[:, 2:4], alone[2])
    live = torch.arange(40, device="cuda") < alone[2].unsqueeze(-1)
    assert torch.equal(kept[:, 2:4][live], alone[0][live])
    assert torch.equal(index[:, 2:4][live], alone[1][live])
    assert (count[:, [0, 1, 4]] == -5).all() and (kept[:, [0, 1, 4]] == -5).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_decode_equals_cpu():
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(500, 96, generator=g)
    index = torch.randint(-1, 500, (40, 33), generator=g)
    vals = torch.randn(40, 33, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = weight.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        cpu_out = _ops.sparse_decode(index, vals.to(acc), w)
        gpu_out = _ops.sparse_decode(index.cuda(), vals.to(acc).cuda(), w.cuda())
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-5 if dtype != torch.bfloat16
                                   else 1.6e-2, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_encode_sparse_equals_reference(arch):
    segment = _ops.SAE_CUDA_SEGMENT
    sae = make_sae(arch, d_in=64, d_sae=2 * segment + 500, k=40, device="cuda")
    x = inputs(300, 64, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    features = encode_sparse(sae, x, chunk_bytes=300 * segment * 4)  # three chunks
    dense = sae.encode(x)
    torch.testing.assert_close(features.to_dense(), dense, rtol=1e-5, atol=1e-5)
    # ReLU and gated codes here are dense (thousands of latents per row), so compare the
    # reconstructions by relative L2 rather than elementwise.
    want = sae.decode(dense)
    assert float((decode_sparse(sae, features) - want).norm() / want.norm()) <= 1e-5
    cpu = encode_sparse(sae.to("cpu"), x.cpu())
    torch.testing.assert_close(features.to("cpu").to_dense(), cpu.to_dense(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_large_k_falls_back_to_torch_topk():
    sae = make_sae("topk", d_in=32, d_sae=3000, k=300, device="cuda")
    x = inputs(10, 32, device="cuda")
    torch.testing.assert_close(encode_sparse(sae, x).to_dense(), sae.encode(x), rtol=1e-5,
                               atol=1e-5)
