"""fill_noise (mechinterp._ops) against its pure-Python twin and the Philox test vectors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels import needs_cuda

import mechinterp._ops as ops
import mechinterp._reference as ref
from mechinterp.errors import DTypeError, InputError, ShapeError


def test_philox_twin_matches_the_published_test_vectors():
    # Random123's known-answer tests for philox4x32-10.
    assert ref.philox4x32((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert ref.philox4x32((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert ref.philox4x32((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) \
        == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@given(seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40), n=st.integers(0, 9),
       kind=st.sampled_from(["gaussian", "uniform"]))
def test_equals_twin_bit_for_bit_in_float64(seed, offset, n, kind):
    got = ops.fill_noise(torch.empty(n, dtype=torch.float64), seed=seed, kind=kind, offset=offset)
    expected = ref.fill_noise(torch.empty(n, dtype=torch.float64), seed=seed, kind=kind, offset=offset)
    # The C library and Python's math module round log/cos/sin the same on this platform; allow
    # one unit in the last place in case another libm does not.
    torch.testing.assert_close(got, expected, rtol=4e-16, atol=4e-16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_narrow_dtypes_round_the_float64_value(dtype):
    wide = ops.fill_noise(torch.empty(257, dtype=torch.float64), seed=3)
    narrow = ops.fill_noise(torch.empty(257, dtype=dtype), seed=3)
    assert torch.equal(narrow, wide.float().to(dtype))


def test_statistics_and_reproducibility():
    gaussian = ops.fill_noise(torch.empty(200_000, dtype=torch.float64), seed=11)
    assert abs(float(gaussian.mean())) < 0.01 and abs(float(gaussian.std()) - 1) < 0.01
    assert abs(float((gaussian.abs() < 1).double().mean()) - 0.6827) < 0.005
    uniform = ops.fill_noise(torch.empty(200_000, dtype=torch.float64), seed=11, kind="uniform")
    assert float(uniform.min()) >= -1 and float(uniform.max()) < 1
    assert abs(float(uniform.mean())) < 0.01 and abs(float(uniform.var()) - 1 / 3) < 0.01
    again = ops.fill_noise(torch.empty(200_000, dtype=torch.float64), seed=11)
    assert torch.equal(again, gaussian)
    assert not torch.equal(ops.fill_noise(torch.empty(100), seed=12), gaussian[:100].float())
    whole = ops.fill_noise(torch.empty(4, 50), seed=5)
    parts = [ops.fill_noise(torch.empty(50), seed=5, offset=50 * i) for i in range(4)]
    assert torch.equal(whole, torch.stack(parts))


def test_bad_arguments():
    with pytest.raises(ShapeError, match="out must be contiguous"):
        ops.fill_noise(torch.empty(4, 4).t(), seed=0)
    with pytest.raises(DTypeError, match="out must be float64, float32"):
        ops.fill_noise(torch.empty(4, dtype=torch.long), seed=0)
    with pytest.raises(InputError, match="kind must be one of"):
        ops.fill_noise(torch.empty(4), seed=0, kind="cauchy")
    with pytest.raises(InputError, match=r"seed must lie in \[0, 2\*\*64\)"):
        ops.fill_noise(torch.empty(4), seed=-1)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_cuda_is_reproducible_and_agrees_with_cpu(dtype, kind):
    n = 1_000_003
    gpu = ops.fill_noise(torch.empty(n, dtype=dtype, device="cuda"), seed=99, kind=kind, offset=5)
    assert torch.equal(gpu, ops.fill_noise(torch.empty(n, dtype=dtype, device="cuda"), seed=99,
                                           kind=kind, offset=5))
    cpu = ops.fill_noise(torch.empty(n, dtype=dtype), seed=99, kind=kind, offset=5)
    # Device libm may round log/cos/sin differently in the last float64 place.
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tolerance[dtype], atol=tolerance[dtype])
    if dtype != torch.float64:  # the last float64 bit often differs; rounded, nearly all agree
        assert float((gpu.cpu() != cpu).double().mean()) < 1e-3
