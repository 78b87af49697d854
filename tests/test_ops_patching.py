"""patch_boxes and patch_metric (mechinterp._ops) against their pure-PyTorch twins."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels import DTYPES, TOLERANCES, needs_cuda

import mechinterp._ops as ops
import mechinterp._reference as ref
from mechinterp.errors import DTypeError, InputError, ShapeError

cuda = pytest.mark.cuda


def disjoint_boxes(rows: int, sources: int, a: int, f: int, *, seed: int, per_row: int = 2) -> torch.Tensor:
    """Up to ``per_row`` boxes per row on disjoint position ranges, random feature ranges."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for row in range(rows):
        cuts = sorted(torch.randint(0, a + 1, (2 * per_row,), generator=g).tolist())
        for k in range(per_row):
            a0, a1 = cuts[2 * k], cuts[2 * k + 1]
            f0, f1 = sorted(torch.randint(0, f + 1, (2,), generator=g).tolist())
            source = int(torch.randint(0, sources, (1,), generator=g))
            boxes.append([row, source, a0, a1, f0, f1])
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 6)


def check_boxes(dest, src, boxes, *, alpha=1.0, cur=None, exact=False):
    got, expected = dest.clone(), dest.clone()
    ops.patch_boxes(got, src, boxes, alpha=alpha, cur=cur)
    ref.patch_boxes(expected, src, boxes, alpha=alpha, cur=cur)
    if exact:
        assert torch.equal(got, expected)
    else:
        rtol, atol = TOLERANCES[dest.dtype]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return got


# ---- patch_boxes on the CPU ----


def test_copy_is_exact_and_touches_only_boxes():
    g = torch.Generator().manual_seed(0)
    dest, src = torch.randn(4, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)
    boxes = torch.tensor([[0, 2, 1, 3, 0, 6], [0, 1, 3, 4, 2, 4], [3, 0, 0, 5, 5, 6]])
    got = check_boxes(dest, src, boxes, exact=True)
    assert torch.equal(got[0, 1:3], src[2, 1:3])
    assert torch.equal(got[0, 3, 2:4], src[1, 3, 2:4])
    assert torch.equal(got[3, :, 5], src[0, :, 5])
    untouched = torch.ones_like(dest, dtype=torch.bool)
    for row, _, a0, a1, f0, f1 in boxes.tolist():
        untouched[row, a0:a1, f0:f1] = False
    assert torch.equal(got[untouched], dest[untouched])


def test_interpolation_and_cur():
    g = torch.Generator().manual_seed(1)
    dest, src = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    boxes = disjoint_boxes(3, 2, 4, 5, seed=2)
    alpha = torch.rand(boxes.shape[0], generator=g, dtype=torch.float64)
    check_boxes(dest, src, boxes, alpha=alpha)
    cur = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    check_boxes(dest, src, boxes, alpha=alpha, cur=cur)
    # Writing a sum's own value through a summand changes nothing, bit for bit.
    same = check_boxes(dest, cur, torch.tensor([[r, r, 0, 4, 0, 5] for r in range(2)]), cur=cur)
    assert torch.equal(same, dest)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_grid_and_strides(dtype):
    g = torch.Generator().manual_seed(3)
    # Transposed storage: neither tensor is contiguous.
    dest = torch.randn(5, 7, 6, generator=g).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    src = torch.randn(6, 4, 7, generator=g).to(dtype).permute(0, 2, 1)[:3]
    assert not dest.is_contiguous() and not src.is_contiguous()
    boxes = disjoint_boxes(5, 3, 7, 4, seed=4)
    check_boxes(dest[..., :4], src, boxes, exact=True)
    check_boxes(dest[..., :4], src, boxes, alpha=0.25)


@given(
    rows=st.integers(1, 6), sources=st.integers(1, 4), a=st.integers(0, 9), f=st.integers(0, 33),
    per_row=st.integers(0, 3), seed=st.integers(0, 2**16), alpha=st.sampled_from([1.0, 0.5, -0.3]),
    with_cur=st.booleans(),
)
def test_random_shapes(rows, sources, a, f, per_row, seed, alpha, with_cur):
    g = torch.Generator().manual_seed(seed)
    dest = torch.randn(rows, a, f, generator=g, dtype=torch.float64)
    src = torch.randn(sources, a, f, generator=g, dtype=torch.float64)
    cur = torch.randn(rows, a, f, generator=g, dtype=torch.float64) if with_cur else None
    boxes = disjoint_boxes(rows, sources, a, f, seed=seed, per_row=per_row)
    check_boxes(dest, src, boxes, alpha=alpha, cur=cur)


@pytest.mark.parametrize(
    ("box", "needle"),
    [
        ([2, 0, 0, 1, 0, 1], "row 2, outside [0, 2)"),
        ([0, 1, 0, 1, 0, 1], "source row 1, outside [0, 1)"),
        ([0, 0, 2, 4, 0, 1], "[2, 4) on axis 1"),
        ([0, 0, 1, 0, 0, 1], "[1, 0) on axis 1"),
        ([0, 0, 0, 1, 0, 5], "[0, 5) on axis 2"),
    ],
)
def test_bad_boxes(box, needle):
    dest, src = torch.zeros(2, 3, 4), torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        ops.patch_boxes(dest, src, torch.tensor([box]))


def test_bad_arguments():
    dest, src = torch.zeros(2, 3, 4), torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="boxes 0 and 1 overlap in row 0"):
        ops.patch_boxes(dest, src, torch.tensor([[0, 0, 0, 2, 0, 2], [0, 0, 1, 3, 1, 3]]))
    ops.patch_boxes(dest, src, torch.tensor([[0, 0, 0, 2, 0, 2], [0, 0, 1, 3, 2, 4]]))  # disjoint
    with pytest.raises(ShapeError, match=r"boxes must be an integer tensor \[m, 6\]"):
        ops.patch_boxes(dest, src, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(DTypeError, match="boxes must hold integers"):
        ops.patch_boxes(dest, src, torch.zeros(1, 6))
    with pytest.raises(ValueError, match="src must have shape"):
        ops.patch_boxes(dest, torch.zeros(1, 3, 5), torch.zeros(0, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="src must have dest's dtype float32"):
        ops.patch_boxes(dest, src.double(), torch.zeros(0, 6, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"alpha must be a number or a tensor \[1\]"):
        ops.patch_boxes(dest, src, torch.tensor([[0, 0, 0, 1, 0, 1]]), alpha=torch.ones(2))
    with pytest.raises(ValueError, match="alpha of box 0 must be finite"):
        ops.patch_boxes(dest, src, torch.tensor([[0, 0, 0, 1, 0, 1]]), alpha=float("nan"))
    with pytest.raises(DTypeError, match="dest must be float64, float32, float16 or bfloat16"):
        ops.patch_boxes(dest.long(), src, torch.tensor([[0, 0, 0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="cur must have dest's shape"):
        ops.patch_boxes(dest, src, torch.tensor([[0, 0, 0, 1, 0, 1]]), cur=torch.zeros(1, 3, 4))


# ---- patch_metric on the CPU ----


def random_logits(rows: int, vocab: int, *, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)


def metric_index(kind: str, rows: int, vocab: int, refs: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    high = refs if kind == "kl" else vocab
    return torch.stack([torch.randint(0, high, (rows,), generator=g),
                        torch.randint(0, vocab, (rows,), generator=g)], dim=1)


@pytest.mark.parametrize("kind", list(ops.METRIC_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_metric_equals_reference(kind, dtype):
    logits = random_logits(9, 1001, dtype=dtype, seed=5)
    reference = random_logits(3, 1001, dtype=dtype, seed=6)
    index = metric_index(kind, 9, 1001, 3, seed=7)
    got = ops.patch_metric(logits, kind, index, ref=reference)
    expected = ref.patch_metric(logits, kind, index, ref=reference)
    assert got.dtype == expected.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Sums over the vocabulary in float32: allow a little more than one rounding.
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_metric_known_values_and_masked_vocab():
    z = torch.tensor([[0.0, float("-inf"), 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(ops.patch_metric(z, "prob", torch.tensor([[0, 0], [2, 0]])),
                               torch.tensor([0.5, 1 / 3]))
    # KL of a distribution to itself is 0, also with a token of probability 0.
    kl = ops.patch_metric(z, "kl", torch.tensor([[0, 0], [1, 0]]), ref=z)
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.0]))
    strided = random_logits(4, 50, dtype=torch.float32).t().contiguous().t()
    torch.testing.assert_close(ops.patch_metric(strided, "logprob", torch.zeros(4, 2, dtype=torch.long)),
                               strided.log_softmax(-1)[:, 0])


def test_metric_bad_arguments():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"target token of run 1 is 5, outside the vocabulary \[0, 5\)"):
        ops.patch_metric(z, "logprob", torch.tensor([[0, 0], [5, 0]]))
    with pytest.raises(ValueError, match="other token of run 0 is -1"):
        ops.patch_metric(z, "logit_diff", torch.tensor([[0, -1], [1, 1]]))
    with pytest.raises(ValueError, match=r"ref row of run 0 is 2, outside \[0, 1\)"):
        ops.patch_metric(z, "kl", torch.tensor([[2, 0], [0, 0]]), ref=torch.zeros(1, 5))
    with pytest.raises(InputError, match="kind 'kl' needs ref"):
        ops.patch_metric(z, "kl", torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="kind must be one of"):
        ops.patch_metric(z, "accuracy", torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"index must be an integer tensor \[2, 2\]"):
        ops.patch_metric(z, "prob", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ref must have shape \[refs, 5\]"):
        ops.patch_metric(z, "kl", torch.zeros(2, 2, dtype=torch.long), ref=torch.zeros(1, 4))


# ---- CUDA ----


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_boxes_agree_with_cpu(dtype):
    g = torch.Generator().manual_seed(8)
    dest = torch.randn(64, 33, 96, generator=g).to(dtype)
    src = torch.randn(7, 33, 96, generator=g).to(dtype)
    cur = torch.randn(64, 33, 96, generator=g).to(dtype)
    boxes = disjoint_boxes(64, 7, 33, 96, seed=9, per_row=3)
    boxes = torch.cat([boxes, torch.tensor([[0, 0, 0, 0, 0, 0]])])  # an empty box is fine
    for alpha, with_cur in [(1.0, False), (0.3, False), (1.0, True)]:
        on_cpu, on_gpu = dest.clone(), dest.cuda()
        c = cur if with_cur else None
        ops.patch_boxes(on_cpu, src, boxes, alpha=alpha, cur=c)
        ops.patch_boxes(on_gpu, src.cuda(), boxes.cuda(), alpha=alpha, cur=None if c is None else c.cuda())
        if alpha == 1.0 and not with_cur:
            assert torch.equal(on_gpu.cpu(), on_cpu)
        else:
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=rtol, atol=atol)
    big = torch.zeros(2, 4096, 64, dtype=dtype, device="cuda")  # one box split over many blocks
    ops.patch_boxes(big, torch.ones(1, 4096, 64, dtype=dtype, device="cuda"),
                    torch.tensor([[1, 0, 0, 4096, 0, 64]]))
    assert big[1].eq(1).all() and big[0].eq(0).all()


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", list(ops.METRIC_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_metric_equals_reference(kind, dtype):
    logits = random_logits(37, 50257, dtype=dtype, seed=10).cuda()
    reference = random_logits(4, 50257, dtype=dtype, seed=11).cuda()
    index = metric_index(kind, 37, 50257, 4, seed=12)
    got = ops.patch_metric(logits, kind, index, ref=reference)
    again = ops.patch_metric(logits, kind, index, ref=reference)
    assert torch.equal(got, again)  # bit-reproducible
    expected = ref.patch_metric(logits.cpu(), kind, index, ref=reference.cpu())
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)
    torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=atol)
