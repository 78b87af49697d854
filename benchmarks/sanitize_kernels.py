"""Exercise every CUDA kernel once per dtype and layout, for compute-sanitizer.

Run under each tool, e.g. ``compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py``.
Small shapes keep the instrumented run short; odd sizes, a non-contiguous input and a
non-default stream cover the edge cases. Every result is checked against its reference.
"""

from __future__ import annotations

import itertools

import torch

from mechinterp import _ops, _reference

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def diagonal_score_cases() -> int:
    checked = 0
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype in DTYPES:
        for batch, heads, seq, offset, first in ((1, 1, 1, 0, 0), (3, 5, 17, 2, 4), (2, 12, 129, 1, 1)):
            pattern = torch.rand(batch, heads, seq, seq, device="cuda", generator=generator).to(dtype)
            layouts = (pattern, pattern.transpose(2, 3).contiguous().transpose(2, 3))
            for tensor in layouts:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())  # the input is made on the default stream
                with torch.cuda.stream(stream):
                    ours = _ops.diagonal_score(tensor, offset=offset, first_query=first)
                stream.synchronize()
                expected = _reference.diagonal_score(tensor, offset=offset, first_query=first)
                torch.testing.assert_close(ours, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
                checked += 1
    return checked


def patch_boxes_cases() -> int:
    checked = 0
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for rows, a, f in ((1, 1, 1), (5, 7, 33), (9, 64, 200)):
            dest = torch.randn(rows, a, f, generator=g).to(dtype)
            src = torch.randn(3, f, a, generator=g).to(dtype).transpose(1, 2)  # non-contiguous
            cur = torch.randn(rows, a, f, generator=g).to(dtype)
            boxes = [[r, r % 3, r % a, a, (r * 7) % f, f] for r in range(rows)]
            # A second box in rows whose first one leaves positions free: disjoint along a.
            boxes += [[r, (r + 1) % 3, 0, r % a, 0, f] for r in range(rows) if r % a]
            boxes = torch.tensor(boxes)
            for alpha, with_cur in ((1.0, False), (0.5, False), (1.0, True)):
                got = dest.cuda()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    _ops.patch_boxes(got, src.cuda(), boxes, alpha=alpha,
                                     cur=cur.cuda() if with_cur else None)
                stream.synchronize()
                expected = dest.clone()
                _reference.patch_boxes(expected, src, boxes, alpha=alpha, cur=cur if with_cur else None)
                tol = TOLERANCE[dtype]
                torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
                checked += 1
    return checked


def patch_metric_cases() -> int:
    checked = 0
    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        for rows, vocab in ((1, 1), (3, 31), (5, 1000)):
            logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype)
            ref = (3 * torch.randn(2, vocab, generator=g)).to(dtype)
            for kind in _ops.METRIC_KINDS:
                high = 2 if kind == "kl" else vocab
                index = torch.randint(0, high, (rows, 2), generator=g)
                got = _ops.patch_metric(logits.cuda(), kind, index, ref=ref.cuda())
                expected = _reference.patch_metric(logits, kind, index, ref=ref)
                tol = 1e-10 if dtype == torch.float64 else 2e-5
                torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
                checked += 1
    return checked


def fill_noise_cases() -> int:
    checked = 0
    for dtype in DTYPES:
        for n in (1, 7, 100_001):
            for kind in _ops.NOISE_KINDS:
                got = _ops.fill_noise(torch.empty(n, dtype=dtype, device="cuda"), seed=n, kind=kind)
                expected = _ops.fill_noise(torch.empty(n, dtype=dtype), seed=n, kind=kind)
                tol = TOLERANCE[dtype]
                torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
                checked += 1
    return checked


def interactions_cases() -> int:
    """Moebius transforms and superset sums: one block in shared memory (n < 12), the first
    sweep alone (12) and partial groups of high players (13, 14), on a side stream."""
    checked = 0
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        for n in (0, 1, 5, 11, 12, 13, 14):
            table = torch.randn(2**n, generator=g, dtype=torch.float64).to(dtype)
            for kind in _ops.MOEBIUS_KINDS:
                got = table.cuda()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    _ops.moebius_(got, kind=kind)
                stream.synchronize()
                expected = _ops.moebius_(table.clone(), kind=kind)
                summed = "zeta_adjoint" if kind.endswith("adjoint") else "zeta"
                bound = 4 * (n + 1) * eps * _ops.moebius_(table.double().abs(), kind=summed)
                assert bool(((got.cpu().double() - expected.double()).abs() <= bound).all()), kind
                checked += 1
            for order in sorted({0, min(n, 2), min(n, 3)}):
                weights = torch.randn(n + 1, order + 1, generator=g, dtype=torch.float64)
                got = _ops.superset_weighted_sums(table.cuda(), weights)
                expected = _ops.superset_weighted_sums(table, weights)
                bound = 4 * (n + 1) * eps * _ops.superset_weighted_sums(table.double().abs(),
                                                                        weights.abs())
                assert bool(((got.cpu().double() - expected.double()).abs() <= bound).all())
                checked += 1
    return checked


def sae_cases() -> int:
    """Selectors and the sparse decode against their CPU kernels: tails, ties, strided rows."""
    checked = 0
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        segment = _ops.SAE_CUDA_SEGMENT
        # 16-byte rows: the 16-bit plain threshold kernel (rows staged through shared memory,
        # a short last row group and segment).
        for rows, cols in ((1, 8), (9, segment + 24)):
            values = torch.randn(rows, cols, generator=g).to(dtype)
            threshold = torch.rand(cols, generator=g)
            got = _ops.select_threshold(values.cuda(), cap=64, threshold=threshold.cuda())
            want = _ops.select_threshold(values, cap=cols, threshold=threshold)
            assert got[2].sum(1).cpu().tolist() == want[2][:, 0].tolist()
            checked += 1
        for rows, cols in ((1, 1), (3, 77), (4, segment), (2, segment + 8)):
            wide = torch.randn(rows, cols + 3, generator=g).to(dtype)
            wide[0, : cols // 2] = 0.5  # ties, to reach the bisection path
            values = wide[:, 1 : cols + 1]  # rows strided, no 16-byte alignment
            for k in sorted({1, min(cols, 5), 64}):
                got = _ops.select_topk(values.cuda(), k)
                want = _ops.select_topk(values, k)
                if _ops.topk_segments(cols, torch.device("cuda")) == 1:
                    assert torch.equal(got[1].cpu(), want[1]), (dtype, rows, cols, k)
                checked += 1
            got = _ops.select_threshold(values.cuda(), cap=4)
            assert got[2].sum(1).cpu().tolist() == _ops.select_threshold(values, cap=4)[2][:, 0].tolist()
            columns = {"bias": torch.randn(cols, generator=g), "mag_scale": torch.rand(cols, generator=g),
                       "mag_bias": torch.randn(cols, generator=g)}
            got = _ops.select_threshold(values.cuda(), cap=4, **{n: t.cuda() for n, t in columns.items()})
            assert got[2].sum(1).cpu().tolist() == _ops.select_threshold(values, cap=4, **columns)[2][:, 0].tolist()
            checked += 2
            # Into segment slices of a wider (zeroed) buffer, then compacted on both devices.
            segments = got[2].shape[1]
            wider = (torch.zeros(rows, segments + 1, 4, device="cuda"),
                     torch.zeros(rows, segments + 1, 4, dtype=torch.int32, device="cuda"),
                     torch.zeros(rows, segments + 1, dtype=torch.int32, device="cuda"))
            _ops.select_threshold(values.cuda(), cap=4, out=tuple(t[:, 1:] for t in wider))
            kept, index, count = (t[:, 1:].contiguous() for t in wider)
            per_row = count.clamp(max=4).sum(1)
            start = torch.cumsum(per_row, 0) - per_row
            nnz = int(per_row.sum())
            got = _ops.compact_slots(kept, index, count, start, nnz, dtype)
            want = _ops.compact_slots(kept.cpu(), index.cpu(), count.cpu(), start.cpu(), nnz, dtype)
            assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
            checked += 1
            for k in sorted({1, min(cols, 5), 64}):
                # The running top-k over two chunks (the second one cut short).
                top_v = torch.full((rows, k), float("-inf"), device="cuda")
                top_i = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
                bar = torch.zeros(rows, dtype=torch.int32, device="cuda")
                half = max(1, cols // 2)
                for c0, c1 in ((0, half), (half, cols)):
                    if c1 > c0:
                        part = _ops.topk_candidates(values[:, c0:c1].cuda(), k, row_bar=bar, col_offset=c0)
                        _ops.topk_merge(top_v, top_i, part, bar)
                want = values.float().sort(dim=1, descending=True, stable=True)
                n = min(k, cols)
                assert torch.equal(top_i[:, :n].long().cpu(), want.indices[:, :n]), (dtype, rows, cols, k)
                checked += 1
    for dtype in (torch.float16, torch.bfloat16):
        # Whole aligned segments: the packed candidates kernel, and its redo kernel for a row of
        # ties and a row with a NaN.
        segment = _ops.SAE_CUDA_SEGMENT
        values = torch.randn(3, 2 * segment, generator=g).to(dtype)
        values[0] = 0.5
        values[1, 77] = float("nan")
        k = 16
        top_v = torch.full((3, k), float("-inf"), device="cuda")
        top_i = torch.full((3, k), -1, dtype=torch.int32, device="cuda")
        bar = torch.zeros(3, dtype=torch.int32, device="cuda")
        for c0 in (0, segment):
            part = _ops.topk_candidates(values[:, c0:c0 + segment].cuda(), k, row_bar=bar, col_offset=c0)
            _ops.topk_merge(top_v, top_i, part, bar)
        want = _ops.select_topk(values, k)
        assert torch.equal(top_i.cpu(), want[1]), dtype
        checked += 1
    for dtype in DTYPES:
        weight = torch.randn(50, 37, generator=g).to(dtype)
        index = torch.randint(-1, 50, (6, 5), generator=g)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        values = torch.randn(6, 5, generator=g).to(acc)
        got = _ops.sparse_decode(index.cuda(), values.cuda(), weight.cuda())
        want = _ops.sparse_decode(index, values, weight)
        assert torch.allclose(got.cpu().double(), want.double(), atol=TOLERANCE[dtype] * 10)
        checked += 1
    return checked


def fused_sae_cases() -> int:
    """The fused Hopper threshold encode against an exact CPU reference (sums exact in float32,
    so there is one right answer): partial tiles, every kernel (cluster shape) in CUTLASS's
    default tile order and in bands of 8 tile rows, a tile row that overflows its records, rows
    ordered by the kernel and by a sort, a compaction queued into arrays too short for it (so
    compacted again); in bfloat16 and float16. The inputs carry a decoder bias (exactly), which
    the GEMM's launch subtracts; with rows ordered by a sort they start 2 bytes past a 16-byte
    boundary (centred one element a thread)."""
    if not _ops.fused_threshold_available(torch.device("cuda")):
        return 0
    from mechinterp.sae import SAE, encode_sparse, fused

    checked = 0
    g = torch.Generator().manual_seed(3)
    for (rows, d_in, d_sae, arch), dtype in itertools.product(
            ((300, 72, 904, "jumprelu"), (129, 1032, 520, "relu"), (800, 64, 1600, "jumprelu")),
            fused.DTYPES):
        fields = {"W_enc": torch.randint(-8, 9, (d_in, d_sae), generator=g) / 8.0,
                  "b_enc": torch.randint(-40, 9, (d_sae,), generator=g) / 8.0,
                  "W_dec": torch.randn(d_sae, d_in, generator=g),
                  "b_dec": torch.arange(d_in) % 5 - 2.0, "architecture": arch}
        if arch == "jumprelu":
            fields["threshold"] = 2.0 * d_in ** 0.5 * (1 + 0.3 * torch.rand(d_sae, generator=g))
        sae = SAE(**fields).to(dtype=dtype)
        sae_cuda = sae.to("cuda")
        x = torch.randint(-3, 4, (rows, d_in), generator=g).to(dtype)
        x[128:] *= 0  # relu: tile row 0 dense (it overflows), the rest sparse
        h = (x.double() @ sae.W_enc.double() + sae.b_enc.double()).to(dtype)
        bound = sae.threshold.double() if sae.threshold is not None else torch.zeros(d_sae)
        want = (h.double() > bound.clamp_min(0)) & (h.double() > 0)
        want_values = torch.where(want, h, torch.zeros((), dtype=h.dtype))
        saved = fused._KERNEL_ORDER_MAX, fused.schedule_for
        try:
            # Every kernel (in its default tile order and in bands) with rows ordered by the
            # compaction kernel, then the chosen schedule with rows ordered by a sort.
            schedules = [fused.FusedSchedule(k, r, s) for k in _ops.SAE_FUSED_KERNELS
                         for r, s in (("heuristic", 1), ("along_n", 8))]
            chosen = saved[1](rows, d_in, d_sae)
            runs = [(saved[0], s, None) for s in schedules] + [(3, chosen, None),
                                                               (saved[0], chosen, 1)]
            for order_max, schedule, last_entries in runs:
                if last_entries is not None:  # room for 1/8 more than this, plus 64
                    fused._last_entries[(rows, d_in, d_sae)] = last_entries
                fused._KERNEL_ORDER_MAX = order_max
                fused.schedule_for = lambda _rows, _d_in, _d_sae, schedule=schedule: schedule
                shifted = (x + sae.b_dec).cuda()  # x exactly, once centred
                if order_max == 3:
                    flat = torch.empty(shifted.numel() + 1, dtype=dtype, device="cuda")
                    shifted = flat[1:].view_as(shifted).copy_(shifted)
                got = encode_sparse(sae_cuda, shifted, fused=True).to("cpu")
                dense = got.to_dense()
                wrong = ((dense != want_values).any(1) | (got.l0 != want.sum(1))).nonzero()
                assert wrong.numel() == 0, (
                    f"{arch} {dtype} {rows}x{d_in}x{d_sae} {schedule} order_max {order_max}: rows "
                    f"{wrong.flatten()[:8].tolist()} differ; first: got "
                    f"{got.indices[got.row_ptr[wrong[0, 0]]:got.row_ptr[wrong[0, 0] + 1]][:12].tolist()}"
                    f" want {want[wrong[0, 0]].nonzero().flatten()[:12].tolist()}")
                assert bool((got.indices[1:] > got.indices[:-1])[
                    (got.row_index()[1:] == got.row_index()[:-1])].all()), "columns must ascend"
                checked += 1
        finally:
            fused._KERNEL_ORDER_MAX, fused.schedule_for = saved
    return checked


def fused_topk_cases() -> int:
    """The fused Hopper TopK encode (sample, GEMM with a floor per row, merge) against an exact
    CPU reference: heavy ties, a tile row of all-equal rows that overflows its records, both
    kernels with a floor in CUTLASS's default tile order and in bands; in bfloat16 and float16
    (cuBLAS, which encodes the sample, reducing float16 sums in float32)."""
    if not _ops.fused_threshold_available(torch.device("cuda")):
        return 0
    from mechinterp.sae import SAE, encode_sparse, fused

    checked = 0
    g = torch.Generator().manual_seed(4)
    matmul = torch.backends.cuda.matmul
    reduced = matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = False
    for (rows, d_in, d_sae, k), dtype in itertools.product(
            ((300, 72, 1032, 7), (800, 64, 8192, 64), (129, 1032, 4104, 32)), fused.DTYPES):
        sae = SAE(W_enc=torch.randint(-8, 9, (d_in, d_sae), generator=g) / 8.0,
                  b_enc=torch.randint(-40, 9, (d_sae,), generator=g) / 8.0,
                  W_dec=torch.randn(d_sae, d_in, generator=g), b_dec=torch.zeros(d_in),
                  architecture="topk", k=k).to(dtype=dtype)
        x = torch.randint(-3, 4, (rows, d_in), generator=g).to(dtype)
        x[:128] = 0  # tile row 0: every pre-activation its bias, ties everywhere
        h = (x.double() @ sae.W_enc.double() + sae.b_enc.double()).to(dtype)
        top_i = torch.sort(h.float(), dim=1, descending=True, stable=True).indices[:, :k]
        want_values = torch.relu(h.gather(1, top_i))
        saved = fused.schedule_for
        try:
            for kernel in _ops.SAE_FUSED_FLOOR_KERNELS:
                for raster, swizzle in (("heuristic", 1), ("along_n", 4)):
                    schedule = fused.FusedSchedule(kernel, raster, swizzle)
                    fused.schedule_for = lambda _rows, _d_in, _d_sae, schedule=schedule: schedule
                    got = encode_sparse(sae.to("cuda"), x.cuda(), fused=True).to("cpu")
                    got_i = got.indices.view(rows, k)
                    wrong = ((got_i != top_i).any(1) |
                             (got.values.view(rows, k) != want_values).any(1)).nonzero()
                    assert wrong.numel() == 0, (
                        f"topk {dtype} {rows}x{d_in}x{d_sae} k={k} {schedule}: rows "
                        f"{wrong.flatten()[:8].tolist()} differ; first: got "
                        f"{got_i[wrong[0, 0]][:12].tolist()} want {top_i[wrong[0, 0]][:12].tolist()}")
                    checked += 1
        finally:
            fused.schedule_for = saved
    matmul.allow_fp16_reduced_precision_reduction = reduced
    return checked


if __name__ == "__main__":
    print(f"diagonal_score: {diagonal_score_cases()} cases match the reference")
    print(f"patch_boxes: {patch_boxes_cases()} cases match the reference")
    print(f"patch_metric: {patch_metric_cases()} cases match the reference")
    print(f"fill_noise: {fill_noise_cases()} cases match the CPU kernel")
    print(f"interactions: {interactions_cases()} cases match the CPU kernels")
    print(f"sae: {sae_cases()} cases match the CPU kernels")
    print(f"fused sae encode: {fused_sae_cases()} cases match the exact reference")
    print(f"fused topk encode: {fused_topk_cases()} cases match the exact reference")
