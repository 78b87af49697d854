"""moebius_ and superset_weighted_sums (mechinterp._ops) against their twins in _reference.

The transforms add and subtract up to 2**n numbers that cancel, so a relative tolerance means
little; instead each entry is held to the rounding bound of a sum computed along n butterflies:
|error| <= c * n * eps * (the same sum taken over absolute values).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels import needs_cuda

import mechinterp._ops as ops
import mechinterp._reference as ref
from mechinterp import _C
from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.interactions import count_up_to

cuda = pytest.mark.cuda

KINDS = list(ops.MOEBIUS_KINDS)
TABLE_DTYPES = [torch.float64, torch.float32]
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}

# The map whose entries are the absolute values of each kind's entries.
ABSOLUTE = {"moebius": "zeta", "zeta": "zeta", "moebius_adjoint": "zeta_adjoint",
            "zeta_adjoint": "zeta_adjoint"}


def random_table(n: int, *, dtype=torch.float64, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2**n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def per_player(table: torch.Tensor, kind: str) -> torch.Tensor:
    """The transform one player at a time in float64, by plain reshapes (for n past the twin)."""
    x = table.to(torch.float64).clone()
    n = x.shape[0].bit_length() - 1
    superset = kind.endswith("adjoint")
    sign = -1.0 if kind.startswith("moebius") else 1.0
    for player in range(n):
        pairs = x.view(-1, 2, 2**player)
        lo, hi = pairs[:, 0], pairs[:, 1]
        if superset:
            lo.add_(hi, alpha=sign)
        else:
            hi.add_(lo, alpha=sign)
    return x


def assert_within_rounding(got: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                           n: int, dtype: torch.dtype) -> None:
    bound = 2 * (n + 1) * EPS[dtype] * magnitude + 1e-300
    error = (got.double().cpu() - expected.double().cpu()).abs()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"entry {worst}: error {float(error[worst]):.3g} > bound {float(bound[worst]):.3g}"
    )


def check_moebius(table: torch.Tensor, kind: str, *, twin: bool) -> torch.Tensor:
    n = table.shape[0].bit_length() - 1
    got = ops.moebius_(table.clone(), kind=kind)
    assert got.dtype == table.dtype and got.device == table.device
    source = table.double().cpu()
    expected = ref.moebius_(source.clone(), kind=kind) if twin else per_player(source, kind)
    magnitude = per_player(source.abs(), ABSOLUTE[kind])
    assert_within_rounding(got, expected, magnitude, n, table.dtype)
    return got


def random_weights(n: int, order: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n + 1, order + 1, generator=g, dtype=torch.float64)


def check_superset_sums(dividends: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n = dividends.shape[0].bit_length() - 1
    got = ops.superset_weighted_sums(dividends, weights)
    order = weights.shape[1] - 1
    assert got.shape == (count_up_to(n, order),)
    assert got.dtype == dividends.dtype and got.device == dividends.device
    source = dividends.double().cpu()
    expected = ref.superset_weighted_sums(source, weights)
    magnitude = ref.superset_weighted_sums(source.abs(), weights.abs())
    assert_within_rounding(got, expected, magnitude, n, dividends.dtype)
    return got


# ---- moebius_: CPU ----


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10])
def test_moebius_equals_definition(n, dtype, kind):
    check_moebius(random_table(n, dtype=dtype, seed=n), kind, twin=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [12, 13, 17])
def test_moebius_past_one_block(n, dtype, kind):
    # 12 players fill one cache block; 13 and 17 add a partial group of high players.
    check_moebius(random_table(n, dtype=dtype, seed=n), kind, twin=False)


@pytest.mark.parametrize(("dtype", "kind"), [(torch.float64, "moebius"),
                                             (torch.float32, "zeta_adjoint")], ids=str)
def test_moebius_full_group_of_high_players(dtype, kind):
    check_moebius(random_table(20, dtype=dtype, seed=20), kind, twin=False)


@given(n=st.integers(0, 12), kind=st.sampled_from(KINDS), dtype=st.sampled_from(TABLE_DTYPES),
       seed=st.integers(0, 2**16))
def test_moebius_random_tables(n, kind, dtype, seed):
    check_moebius(random_table(n, dtype=dtype, seed=seed), kind, twin=n <= 9)


def test_one_and_two_coalitions():
    a = torch.tensor([3.0], dtype=torch.float64)
    for kind in KINDS:
        assert torch.equal(ops.moebius_(a.clone(), kind=kind), a)
    v = torch.tensor([3.0, 5.0], dtype=torch.float64)
    expected = {"moebius": [3.0, 2.0], "zeta": [3.0, 8.0], "moebius_adjoint": [-2.0, 5.0],
                "zeta_adjoint": [8.0, 5.0]}
    for kind, values in expected.items():
        assert ops.moebius_(v.clone(), kind=kind).tolist() == values


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 5, 13, 15])
def test_inverse_undoes_forward(n, dtype):
    v = random_table(n, dtype=dtype, seed=3)
    for forward, backward in [("moebius", "zeta"), ("zeta", "moebius"),
                              ("moebius_adjoint", "zeta_adjoint"),
                              ("zeta_adjoint", "moebius_adjoint")]:
        back = ops.moebius_(ops.moebius_(v.clone(), kind=forward), kind=backward)
        magnitude = per_player(per_player(v.double().abs(), "zeta"), "zeta_adjoint")
        assert_within_rounding(back, v, magnitude, 2 * n, dtype)


@pytest.mark.parametrize("n", [0, 1, 5, 13, 15])
def test_adjoint_is_the_transpose(n):
    x, y = random_table(n, seed=1), random_table(n, seed=2)
    for kind in ("moebius", "zeta"):
        left = torch.dot(ops.moebius_(x.clone(), kind=kind), y)
        right = torch.dot(x, ops.moebius_(y.clone(), kind=f"{kind}_adjoint"))
        scale = torch.dot(per_player(x.abs(), "zeta"), y.abs())
        assert abs(float(left - right)) <= 4 * (n + 1) * EPS[torch.float64] * float(scale) + 1e-300


def test_moebius_does_not_depend_on_the_thread_count():
    v = random_table(15, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.moebius_(v.clone())
        sums_single = ops.superset_weighted_sums(v, random_weights(15, 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.moebius_(v.clone()), single)
    assert torch.equal(ops.superset_weighted_sums(v, random_weights(15, 3)), sums_single)


# ---- superset_weighted_sums: CPU ----


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize(("n", "order"), [(0, 0), (1, 0), (1, 1), (2, 2), (5, 3), (9, 9),
                                          (12, 0), (12, 3), (13, 4), (14, 3)])
def test_superset_sums_equal_reference(n, order, dtype):
    check_superset_sums(random_table(n, dtype=dtype, seed=n), random_weights(n, order, seed=order))


@given(n=st.integers(0, 12), data=st.data(), dtype=st.sampled_from(TABLE_DTYPES),
       seed=st.integers(0, 2**16))
def test_superset_sums_random_tables(n, data, dtype, seed):
    order = data.draw(st.integers(0, min(n, 4)), label="order")
    check_superset_sums(random_table(n, dtype=dtype, seed=seed), random_weights(n, order, seed))


def test_superset_sums_known_values():
    # n = 2: out[()] = sum_S m(S) w(|S|, 0); out[(i,)] = sum_{S containing i} m(S) w(|S|, 1).
    m = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [10.0, 100.0], [1000.0, 10000.0]], dtype=torch.float64)
    got = ops.superset_weighted_sums(m, w)
    assert got.tolist() == [1 + 20 + 30 + 4000, 200 + 40000, 300 + 40000]


def test_superset_sums_accept_weights_of_any_real_dtype_and_device():
    m = random_table(4)
    w = random_weights(4, 2)
    expected = ops.superset_weighted_sums(m, w)
    assert torch.equal(ops.superset_weighted_sums(m, w.float()),
                       ops.superset_weighted_sums(m, w.float().double()))
    assert torch.equal(ops.superset_weighted_sums(m, w.t().contiguous().t()), expected)


# ---- bad input ----


def test_bad_tables():
    with pytest.raises(ShapeError, match=r"table must have a power-of-two length .* length 6"):
        ops.moebius_(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ShapeError, match="got length 0"):
        ops.moebius_(torch.zeros(0, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"table must be 1-D \[2\*\*n\]"):
        ops.moebius_(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(DTypeError, match="table must be float64 or float32, got torch.int64"):
        ops.moebius_(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DTypeError, match="got torch.float16"):
        ops.moebius_(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(InputError, match="table must be a torch.Tensor, got list"):
        ops.moebius_([0.0, 1.0])
    with pytest.raises(InputError, match="kind must be one of"):
        ops.moebius_(torch.zeros(4, dtype=torch.float64), kind="mobius")


def test_non_contiguous_tables_are_refused():
    strided = torch.zeros(8, dtype=torch.float64)[::2]
    with pytest.raises(ShapeError, match="table must be contiguous"):
        ops.moebius_(strided)
    with pytest.raises(ShapeError, match="dividends must be contiguous"):
        ops.superset_weighted_sums(strided, random_weights(2, 1))


def test_bad_weights():
    m = random_table(3)
    with pytest.raises(ShapeError, match=r"weights must have shape \[n \+ 1, order \+ 1\] = \[4, "):
        ops.superset_weighted_sums(m, torch.zeros(3, 2))
    with pytest.raises(ShapeError, match=r"0 <= order <= n=3 .* got \(4, 5\)"):
        ops.superset_weighted_sums(m, torch.zeros(4, 5))
    with pytest.raises(DTypeError, match="weights must be real numbers"):
        ops.superset_weighted_sums(m, torch.zeros(4, 2, dtype=torch.complex128))


def test_compiled_checks_guard_direct_calls():
    # _ops validates first; _C checks again for callers that bypass it.
    m = random_table(13)
    w = random_weights(13, 2)
    out = torch.empty(count_up_to(13, 2), dtype=torch.float64)
    scratch = torch.empty(_C.superset_scratch_size(13, 2) - 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scratch must have shape \["):
        _C.superset_weighted_sums(ops._view(m), ops._view(w), ops._view(w), ops._view(scratch),
                                  ops._view(out), 2, 0)
    with pytest.raises(ValueError, match="power-of-two length"):
        _C.moebius(ops._view(torch.zeros(3, dtype=torch.float64)), 0, 0)
    with pytest.raises(ValueError, match="kind must be 0"):
        _C.moebius(ops._view(torch.zeros(4, dtype=torch.float64)), 7, 0)


def test_memory_budget(monkeypatch):
    monkeypatch.setattr(ops, "_available_bytes", lambda device: 1000)
    monkeypatch.setattr(ops, "_SMALL_ALLOCATION", 0)
    with pytest.raises(InputError, match=r"n=10 players at order 3 .* needs [\d,]+ bytes .* only "
                                         r"1,000 bytes"):
        ops.superset_weighted_sums(random_table(10), random_weights(10, 3))


# ---- CUDA ----


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 5, 11, 12, 13, 17, 20, 21, 24])
def test_moebius_cuda(n, dtype, kind):
    # 11: one block in shared memory; 12: the first sweep only; 13 to 24: one to two more sweeps,
    # and partial groups (13, 21) that fold extra rows into the tile.
    table = random_table(n, dtype=dtype, seed=n, device="cuda")
    gpu = check_moebius(table, kind, twin=n <= 9)
    cpu = ops.moebius_(table.cpu(), kind=kind)
    magnitude = per_player(table.double().cpu().abs(), ABSOLUTE[kind])
    assert_within_rounding(gpu, cpu, 2 * magnitude, n, dtype)
    assert torch.equal(ops.moebius_(table.clone(), kind=kind), gpu)  # bit-reproducible


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize(("n", "order"), [(0, 0), (3, 3), (11, 2), (12, 0), (12, 3), (13, 3),
                                          (16, 4), (20, 3)])
def test_superset_sums_cuda(n, order, dtype):
    dividends = random_table(n, dtype=dtype, seed=n, device="cuda")
    weights = random_weights(n, order, seed=order)
    gpu = check_superset_sums(dividends, weights) if n <= 16 else \
        ops.superset_weighted_sums(dividends, weights)
    cpu = ops.superset_weighted_sums(dividends.cpu(), weights)
    magnitude = ops.superset_weighted_sums(dividends.double().cpu().abs(), weights.abs())
    assert_within_rounding(gpu, cpu, 2 * magnitude, n, dtype)
    assert torch.equal(ops.superset_weighted_sums(dividends, weights), gpu)
