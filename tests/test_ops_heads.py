"""diagonal_score (mechinterp._ops) against its pure-PyTorch twin (mechinterp._reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels import DTYPES, TOLERANCES, needs_cuda

import mechinterp._ops as ops
import mechinterp._reference as ref
from mechinterp import _C
from mechinterp.errors import DeviceError, DTypeError, InputError, ShapeError

cuda = pytest.mark.cuda


def random_pattern(
    batch: int, heads: int, seq: int, *, dtype=torch.float64, device="cpu", seed: int = 0
) -> torch.Tensor:
    """Causal softmax attention probabilities [batch, head, seq, seq]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq, seq, generator=g, dtype=torch.float64)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(-1).to(dtype=dtype, device=device)


def assert_matches_reference(pattern: torch.Tensor, offset: int, first_query: int) -> None:
    got = ops.diagonal_score(pattern, offset=offset, first_query=first_query)
    expected = ref.diagonal_score(pattern, offset=offset, first_query=first_query)
    assert got.dtype == expected.dtype
    assert got.shape == (pattern.shape[1],)
    assert got.device == pattern.device
    rtol, atol = TOLERANCES[pattern.dtype]
    torch.testing.assert_close(got.cpu().double(), expected.cpu().double(), rtol=rtol, atol=atol)


# ---- CPU ----


def test_fp64_cpu_equals_reference():
    pattern = random_pattern(3, 5, 17)
    for offset, first_query in [(0, 0), (1, 0), (1, 3), (4, 9), (16, 0), (0, 16)]:
        got = ops.diagonal_score(pattern, offset=offset, first_query=first_query)
        expected = ref.diagonal_score(pattern, offset=offset, first_query=first_query)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_known_values():
    # Head 0 attends to itself, head 1 to the previous token (the first query to itself).
    seq = 6
    eye = torch.eye(seq)
    prev = torch.diag(torch.ones(seq - 1), -1)
    prev[0, 0] = 1.0
    pattern = torch.stack([eye, prev]).unsqueeze(0).repeat(2, 1, 1, 1)
    torch.testing.assert_close(ops.diagonal_score(pattern, offset=0), torch.tensor([1.0, 1 / 6]))
    torch.testing.assert_close(ops.diagonal_score(pattern, offset=1), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(
        ops.diagonal_score(pattern, offset=0, first_query=1), torch.tensor([1.0, 0.0])
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_grid_cpu(dtype):
    pattern = random_pattern(2, 4, 13, dtype=dtype, seed=1)
    for offset, first_query in [(0, 0), (1, 0), (3, 5)]:
        assert_matches_reference(pattern, offset, first_query)


@settings(derandomize=True, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 5),
    seq=st.integers(1, 17),
    offset=st.integers(0, 4),
    first_query=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_shapes_hypothesis(batch, heads, seq, offset, first_query, dtype, layout, seed):
    pattern = random_pattern(batch, heads, seq, dtype=dtype, seed=seed)
    if layout == "transposed":
        # Same values, heads and queries swapped in memory.
        pattern = pattern.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        big = torch.zeros(batch, heads + 1, 2 * seq, 2 * seq, dtype=dtype)
        big[:, 1:, ::2, 1::2] = pattern
        pattern = big[:, 1:, ::2, 1::2]
    if max(offset, first_query) >= seq:
        with pytest.raises(InputError, match="first_query"):
            ops.diagonal_score(pattern, offset=offset, first_query=first_query)
        return
    assert_matches_reference(pattern, offset, first_query)


def test_non_contiguous_input():
    base = random_pattern(2, 3, 9, seed=2)
    transposed = base.transpose(0, 1).contiguous().transpose(0, 1)  # batch and head swapped
    assert not transposed.is_contiguous()
    torch.testing.assert_close(
        ops.diagonal_score(transposed, offset=1), ref.diagonal_score(base, offset=1)
    )
    # Zero strides: every (batch, head) shares one matrix.
    expanded = base[:1, :1].expand(4, 5, 9, 9)
    assert expanded.stride()[:2] == (0, 0)
    torch.testing.assert_close(
        ops.diagonal_score(expanded, offset=2),
        ref.diagonal_score(base[:1, :1], offset=2).expand(5),
    )


def test_large_input_uses_parallel_path():
    # Above the kernel's threading threshold; only the diagonal is real memory (zero key stride).
    rows = torch.rand(4, 16, 700, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pattern = rows.unsqueeze(-1).expand(4, 16, 700, 700)
    got = ops.diagonal_score(pattern, offset=3, first_query=5)
    torch.testing.assert_close(
        got, ref.diagonal_score(pattern, offset=3, first_query=5), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(got, rows[:, :, 5:].mean(dim=(0, 2)), rtol=0, atol=1e-12)


def test_zero_heads_gives_empty_output():
    out = ops.diagonal_score(torch.zeros(2, 0, 4, 4), offset=1)
    assert out.shape == (0,) and out.dtype == torch.float32


# ---- bad inputs ----


@pytest.mark.parametrize(
    ("pattern", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 4, 4), {"offset": 0}, ShapeError, "pattern must be 4-D"),
        (torch.zeros(1, 2, 4, 5), {"offset": 0}, ShapeError, "key == query"),
        (torch.zeros(0, 2, 4, 4), {"offset": 0}, ShapeError, "batch size 0"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.int64), {"offset": 0}, DTypeError, "torch.int64"),
        (torch.zeros(1, 2, 4, 4, device="meta"), {"offset": 0}, DeviceError, "meta"),
        (torch.zeros(1, 2, 4, 4), {"offset": -1}, InputError, "offset must be >= 0, got -1"),
        (torch.zeros(1, 2, 4, 4), {"offset": 0, "first_query": -2}, InputError, "first_query"),
        (torch.zeros(1, 2, 4, 4), {"offset": 4}, InputError, "offset=4, query=4"),
        (torch.zeros(1, 2, 4, 4), {"offset": 0, "first_query": 4}, InputError, "first_query=4"),
        (torch.zeros(1, 2, 0, 0), {"offset": 0}, InputError, "query=0"),
        (torch.zeros(1, 2, 4, 4), {"offset": 1.5}, InputError, "offset must be an int"),
        (torch.zeros(1, 2, 4, 4), {"offset": True}, InputError, "offset must be an int"),
    ],
)
def test_bad_inputs(pattern, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ops.diagonal_score(pattern, **kwargs)
    assert isinstance(info.value, ValueError)


def test_not_a_tensor():
    with pytest.raises(InputError, match="pattern must be a torch.Tensor"):
        ops.diagonal_score([[[[1.0]]]], offset=0)  # type: ignore[arg-type]


# The C++ checks are the backstop for callers that skip _ops; they too raise ValueError.


def _c_call(pattern, out, offset=0, first_query=0):
    _C.diagonal_score(ops._view(pattern), ops._view(out), offset, first_query, 0)


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (torch.zeros(3, dtype=torch.float32), r"out must have shape \[2\]"),
        (torch.zeros(2, dtype=torch.float64), "out must be float32 for a float32 pattern"),
        (torch.zeros(2, 2, dtype=torch.float32)[:, 0], "out must be contiguous"),
    ],
)
def test_c_rejects_bad_out(out, match):
    with pytest.raises(ValueError, match=match):
        _c_call(torch.zeros(1, 2, 4, 4), out)


def test_c_rejects_bad_arguments():
    pattern, out = torch.zeros(1, 2, 4, 4), torch.zeros(2)
    with pytest.raises(ValueError, match="pattern must be 4-D"):
        _c_call(torch.zeros(2, 4, 4), out)
    with pytest.raises(ValueError, match="pattern must be float64, float32, float16 or bfloat16"):
        _c_call(pattern.int(), out)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        _c_call(pattern, out, offset=-1)
    with pytest.raises(ValueError, match="first_query=9, offset=0, query=4"):
        _c_call(pattern, out, first_query=9)


@pytest.mark.parametrize(
    ("view", "match"),
    [
        ("not a tuple", "pattern: expected a tensor view tuple"),
        ((0, "float32", (1,), (1,), "cpu"), "6 fields"),
        ((0, "complex64", (1,), (1,), "cpu", 0), "pattern: dtype must be one of"),
        ((0, "float32", (1, 2), (1,), "cpu", 0), "shape has 2 dims but strides has 1"),
        ((0, "float32", (-1,), (1,), "cpu", 0), "shape must be non-negative"),
        ((0, "float32", (1,) * 9, (1,) * 9, "cpu", 0), "at most 8 dims"),
        ((0, "float32", (1.0,), (1,), "cpu", 0), "shape must be an int, got float"),
        ((0, "float32", (1,), (1,), "mps", 0), "device_type must be 'cpu' or 'cuda'"),
        ((0, "float32", (1,), (1,), "cuda", -1), "device_index"),
        ((-8, "float32", (1,), (1,), "cpu", 0), "data_ptr must be a non-negative address"),
        ((0, "float32", (2**70,), (1,), "cpu", 0), "shape must fit in a signed 64-bit integer"),
    ],
)
def test_c_rejects_malformed_views(view, match):
    with pytest.raises(ValueError, match=match):
        _C.diagonal_score(view, ops._view(torch.zeros(1)), 0, 0, 0)


def test_c_rejects_null_data():
    with pytest.raises(ValueError, match="null data pointer"):
        _C.diagonal_score(
            (0, "float32", (1, 1, 2, 2), (4, 4, 2, 1), "cpu", 0),
            ops._view(torch.zeros(1)),
            0,
            0,
            0,
        )


# ---- CUDA ----


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_and_reference(dtype):
    cpu_pattern = random_pattern(3, 5, 33, dtype=dtype, seed=4)
    pattern = cpu_pattern.cuda()
    for offset, first_query in [(0, 0), (1, 0), (7, 12)]:
        assert_matches_reference(pattern, offset, first_query)
        got = ops.diagonal_score(pattern, offset=offset, first_query=first_query)
        on_cpu = ops.diagonal_score(cpu_pattern, offset=offset, first_query=first_query)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got.cpu(), on_cpu, rtol=rtol, atol=atol)


@cuda
@needs_cuda
@settings(derandomize=True, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 5),
    seq=st.integers(1, 17),
    offset=st.integers(0, 4),
    first_query=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_cuda_shapes_hypothesis(batch, heads, seq, offset, first_query, dtype, seed):
    pattern = random_pattern(batch, heads, seq, dtype=dtype, seed=seed, device="cuda")
    pattern = pattern.transpose(2, 3).contiguous().transpose(2, 3)  # column-major queries
    if max(offset, first_query) >= seq:
        with pytest.raises(InputError):
            ops.diagonal_score(pattern, offset=offset, first_query=first_query)
        return
    assert_matches_reference(pattern, offset, first_query)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_bit_reproducible(dtype):
    # Large enough that every thread of a block sums many items before the reduction tree.
    pattern = random_pattern(8, 4, 300, dtype=dtype, seed=5, device="cuda")
    first = ops.diagonal_score(pattern, offset=1)
    for _ in range(3):
        assert torch.equal(ops.diagonal_score(pattern, offset=1), first)


@cuda
@needs_cuda
def test_cuda_runs_on_current_stream():
    stream = torch.cuda.Stream()
    assert stream.cuda_stream != torch.cuda.default_stream().cuda_stream
    base = torch.randn(16, 8, 256, 256, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        # Produced and consumed on `stream`: reading on any other stream would race.
        pattern = (base @ base.transpose(-1, -2) / 16).softmax(-1)
        got = ops.diagonal_score(pattern, offset=1)
    stream.synchronize()
    expected = ref.diagonal_score(pattern, offset=1)
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)


@cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device_keeps_current_device():
    pattern = random_pattern(2, 3, 11, device="cuda:1")
    before = torch.cuda.current_device()
    got = ops.diagonal_score(pattern, offset=1)
    assert torch.cuda.current_device() == before
    assert got.device == pattern.device
    torch.testing.assert_close(got.cpu(), ref.diagonal_score(pattern.cpu(), offset=1))
