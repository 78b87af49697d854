"""AND-OR interactions (mechinterp.interactions.andor) and the differentiable transforms under
them (mechinterp.interactions.autograd), against dense 2**n x 2**n matrices built from the
definitions."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from mechinterp import _C
from mechinterp.errors import DeviceError, DTypeError, InputError, ShapeError
from mechinterp.interactions import moebius_transform, or_interactions, subsets_up_to
from mechinterp.interactions.andor import (
    AndOrResult,
    and_or_interactions,
    and_or_loss,
    and_or_split,
    generalizable_and_or_interactions,
)
from mechinterp.interactions.autograd import (
    MoebiusFunction,
    differentiable_inverse_moebius_transform,
    differentiable_moebius_transform,
    differentiable_or_interactions,
)
from mechinterp.interactions.games import SumOfUnanimityGame, TabularGame
from mechinterp.interactions.subsets import mask_of

CUDA_OK = torch.cuda.is_available() and bool(_C.build_info()["cuda"])
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and a CUDA build")

F64 = torch.float64


def random_table(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(2**n, generator=g, dtype=F64)


# -- dense references, from the definitions ---------------------------------------------------


def moebius_matrix(n: int) -> torch.Tensor:
    """``M[S, T] = (-1)**(|S| - |T|)`` for ``T`` inside ``S``: Harsanyi dividends."""
    size = 1 << n
    matrix = torch.zeros(size, size, dtype=F64)
    for s in range(size):
        for t in range(size):
            if t & s == t:
                matrix[s, t] = (-1.0) ** (s.bit_count() - t.bit_count())
    return matrix


def or_matrix(n: int) -> torch.Tensor:
    """``I_or(empty) = v(empty)``, ``I_or(S) = -sum_{T in S} (-1)**(|S|-|T|) v(N minus T)``."""
    size, full = 1 << n, (1 << n) - 1
    matrix = torch.zeros(size, size, dtype=F64)
    matrix[0, 0] = 1.0
    for s in range(1, size):
        for t in range(size):
            if t & s == t:
                matrix[s, full ^ t] -= (-1.0) ** (s.bit_count() - t.bit_count())
    return matrix


def rebuild(and_table: torch.Tensor, or_table: torch.Tensor) -> torch.Tensor:
    """``v_and(S) + v_or(S)`` from the interactions, one coalition at a time."""
    size = and_table.shape[0]
    out = torch.zeros(size, dtype=F64)
    for s in range(size):
        and_part = sum(float(and_table[t]) for t in range(size) if t & s == t)
        or_part = float(or_table[0]) + sum(float(or_table[t]) for t in range(1, size) if t & s)
        out[s] = and_part + or_part
    return out


def canonical(table: torch.Tensor) -> torch.Tensor:
    n = table.shape[0].bit_length() - 1
    return table[[mask_of(s) for s in subsets_up_to(n, n)]]


# -- differentiable transforms ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_transforms_gradcheck(n: int) -> None:
    x = random_table(n, seed=n).requires_grad_()
    for fn in (differentiable_moebius_transform, differentiable_inverse_moebius_transform,
               differentiable_or_interactions):
        assert gradcheck(fn, (x,))
        assert gradgradcheck(fn, (x,))
    for kind in ("moebius_adjoint", "zeta_adjoint"):
        assert gradcheck(lambda t, kind=kind: MoebiusFunction.apply(t, kind), (x,))


def test_transforms_forward_and_strides() -> None:
    n = 4
    x = random_table(n + 1, seed=1)[::2]  # not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(differentiable_moebius_transform(x), moebius_transform(x),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(differentiable_or_interactions(x), or_interactions(x),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(differentiable_moebius_transform(x), moebius_matrix(n) @ x)
    torch.testing.assert_close(differentiable_or_interactions(x), or_matrix(n) @ x)
    back = differentiable_inverse_moebius_transform(differentiable_moebius_transform(x))
    torch.testing.assert_close(back, x)
    before = x.clone()
    differentiable_or_interactions(x)
    assert torch.equal(x, before)  # the input is never overwritten


def test_transforms_float32_gradient() -> None:
    x = random_table(3).float().requires_grad_()
    differentiable_or_interactions(x).abs().sum().backward()
    dense = or_matrix(3).float()
    expected = dense.T @ torch.sign(dense @ x.detach())
    torch.testing.assert_close(x.grad, expected)


# -- (1) reconstruction -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_reconstruction_for_any_p_q(n: int) -> None:
    v = random_table(n, seed=10 + n)
    p, q = random_table(n, seed=20 + n), random_table(n, seed=30 + n)
    and_table, or_table = and_or_split(v, p, q)
    # v_and + v_or = v + q for every split; with q = 0 it is v itself.
    torch.testing.assert_close(rebuild(and_table, or_table), v + q, rtol=0, atol=1e-10)
    and_table, or_table = and_or_split(v, p, torch.zeros_like(v))
    torch.testing.assert_close(rebuild(and_table, or_table), v, rtol=0, atol=1e-10)


def test_reconstruction_after_optimisation() -> None:
    v = random_table(5, seed=4, scale=3.0)
    result = and_or_interactions(v, steps=60, lr=1e-3, progress=False)
    assert result.q.abs().max() > 0
    torch.testing.assert_close(result.reconstruct(), v + result.q, rtol=0, atol=1e-10)
    torch.testing.assert_close(rebuild(canonical_inverse(result.and_result.values, 5),
                                       canonical_inverse(result.or_result.values, 5)),
                               v + result.q, rtol=0, atol=1e-10)
    assert (result.reconstruct() - v).abs().max() <= result.q_bound * (1 + 1e-12)
    exact = and_or_interactions(v, steps=60, lr=1e-3, qthres=0.0, progress=False)
    torch.testing.assert_close(exact.reconstruct(), v, rtol=0, atol=1e-10)


def canonical_inverse(values: torch.Tensor, n: int) -> torch.Tensor:
    table = torch.empty(1 << n, dtype=F64)
    table[[mask_of(s) for s in subsets_up_to(n, n)]] = values
    return table


# -- (2) no split: half of each transform -----------------------------------------------------


def test_zero_split_is_half_of_each_transform() -> None:
    v = random_table(4, seed=2)
    zero = torch.zeros_like(v)
    and_table, or_table = and_or_split(v, zero, zero)
    torch.testing.assert_close(and_table, 0.5 * moebius_transform(v), rtol=0, atol=1e-12)
    torch.testing.assert_close(or_table, 0.5 * or_interactions(v), rtol=0, atol=1e-12)
    result = and_or_interactions(v, steps=0, progress=False)
    torch.testing.assert_close(result.and_result.values, canonical(0.5 * moebius_transform(v)))
    torch.testing.assert_close(result.or_result.values, canonical(0.5 * or_interactions(v)))
    assert result.loss.shape == (1,)
    expected = 0.5 * (moebius_transform(v).abs().sum() + or_interactions(v).abs().sum())
    assert float(result.loss[0]) == pytest.approx(float(expected), rel=1e-12)
    assert result.and_result.index == "AND" and result.or_result.index == "OR"
    assert (result.and_result.min_order, result.and_result.max_order) == (0, 4)


# -- (3) a pure AND game ----------------------------------------------------------------------


def test_pure_and_game_becomes_sparse() -> None:
    terms = [(0, 1), (1, 2, 3), (2, 4)]
    game = SumOfUnanimityGame(terms, [2.0, -1.5, 1.0], n_players=5,
                              players=["a", "b", "c", "d", "e"])
    result = and_or_interactions(game, steps=400, lr=2e-3, progress=False)
    assert result.players == ("a", "b", "c", "d", "e")
    # The split starts at v/2 + v/2 (loss 9.5) and ends close to the AND dividends (4.5).
    assert result.loss[0] == pytest.approx(9.5)
    assert result.loss[-1] < 0.6 * result.loss[0]
    salient = result.salient()
    assert {(kind, subset) for kind, subset, _ in salient} == {("AND", t) for t in terms}
    stats = result.sparsity()
    assert stats["n_salient"] == 3 and stats["n_salient_or"] == 0
    assert stats["n_interactions"] == 2 * 31
    assert stats["salient_strength"] > 0.8
    for (_, subset, value), coefficient in zip(sorted(salient, key=lambda s: s[1]),
                                               [2.0, -1.5, 1.0], strict=True):
        assert value == pytest.approx(coefficient, abs=0.2), subset


def test_salient_uses_the_maximum_over_both_kinds() -> None:
    v = random_table(3, seed=5)
    result = and_or_interactions(v, steps=0, progress=False)
    largest = max(float(result.and_result.values[1:].abs().max()),
                  float(result.or_result.values[1:].abs().max()))
    expected = sum(int((r.values[1:].abs() > 0.3 * largest).sum())
                   for r in (result.and_result, result.or_result))
    salient = result.salient(0.3)
    assert len(salient) == expected == result.sparsity(0.3)["n_salient"]
    magnitudes = [abs(value) for _, _, value in salient]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for kind, subset, value in salient:
        part = result.and_result if kind == "AND" else result.or_result
        assert part[subset] == value and subset
    assert result.salient(0.0) and len(result.salient(1.0)) == 0


# -- (4) the run ------------------------------------------------------------------------------


def test_loss_decreases_and_bounds_hold() -> None:
    v = random_table(4, seed=3, scale=3.0)
    result = and_or_interactions(v, steps=300, lr=1e-4, progress=False)
    assert result.loss.shape == (301,) and result.loss.dtype == F64
    increases = torch.diff(result.loss)
    assert increases.max() <= 1e-9 * float(result.loss[0])
    assert result.loss[-1] < 0.9 * result.loss[0]
    q_bound = 0.04 * abs(float(v[-1] - v[0]))
    assert result.q_bound == pytest.approx(q_bound)
    assert result.q.abs().max() <= q_bound * (1 + 1e-12)
    assert result.q.abs().max() == pytest.approx(q_bound)  # the bound is reached: it binds
    bounded = and_or_interactions(v, steps=100, lr=1e-3, pthres=0.05, progress=False)
    assert bounded.p.abs().max() <= 0.05 * (1 + 1e-12) and bounded.p_bound == 0.05


def test_learning_rate_decays_log_linearly() -> None:
    # Plain SGD (no momentum, no noise): two steps at lr, then lr * lr_decay.
    n, lr = 3, 1e-2
    v = random_table(n, seed=6)
    result = and_or_interactions(v, steps=2, lr=lr, lr_decay=0.1, momentum=0.0, qthres=0.0,
                                 progress=False)
    moebius, orm = moebius_matrix(n), or_matrix(n)

    def gradient(p: torch.Tensor) -> torch.Tensor:
        return moebius.T @ torch.sign(moebius @ (0.5 * v + p)) - orm.T @ torch.sign(
            orm @ (0.5 * v - p))

    first = -lr * gradient(torch.zeros_like(v))
    expected = first - 0.1 * lr * gradient(first)
    torch.testing.assert_close(result.p, expected, rtol=0, atol=1e-12)


# -- (5) gradients against dense matrices -----------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 6])
def test_gradient_matches_dense_matrices(n: int) -> None:
    v = random_table(n, seed=40 + n)
    p = random_table(n, seed=50 + n).requires_grad_()
    q = random_table(n, seed=60 + n).requires_grad_()
    loss = and_or_loss(*and_or_split(v, p, q))
    loss.backward()
    moebius, orm = moebius_matrix(n), or_matrix(n)
    dense_p = p.detach().clone().requires_grad_()
    dense_q = q.detach().clone().requires_grad_()
    half = 0.5 * (v + dense_q)
    dense = (moebius @ (half + dense_p)).abs().sum() + (orm @ (half - dense_p)).abs().sum()
    dense.backward()
    assert float(loss.detach()) == pytest.approx(float(dense.detach()), rel=1e-12)
    torch.testing.assert_close(p.grad, dense_p.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(q.grad, dense_q.grad, rtol=0, atol=1e-10)


# -- (6) several models -----------------------------------------------------------------------


def test_multi_model_loss_against_direct_sum() -> None:
    g = torch.Generator().manual_seed(7)
    and_tables = torch.randn(3, 8, generator=g, dtype=F64, requires_grad=True)
    or_tables = torch.randn(3, 8, generator=g, dtype=F64)
    alpha = 0.1
    direct = 0.0
    for tables in (and_tables.detach(), or_tables):
        for s in range(8):
            column = [abs(float(tables[i, s])) for i in range(3)]
            direct += (1 - alpha) * max(column) + alpha * sum(column)
    loss = and_or_loss(and_tables, or_tables, alpha=alpha)
    assert float(loss.detach()) == pytest.approx(direct, rel=1e-12)
    loss.backward()  # the max sends its share to the strongest model only
    strongest = and_tables.detach().abs().argmax(0)
    expected = alpha * torch.sign(and_tables.detach())
    expected[strongest, torch.arange(8)] += (1 - alpha) * torch.sign(
        and_tables.detach()[strongest, torch.arange(8)])
    torch.testing.assert_close(and_tables.grad, expected)
    # One model: the plain L1 loss, whatever alpha.
    single = and_or_loss(and_tables[0].detach(), or_tables[0], alpha=0.7)
    expected_single = and_tables[0].detach().abs().sum() + or_tables[0].abs().sum()
    assert float(single) == pytest.approx(float(expected_single))


def test_generalizable_interactions() -> None:
    shared_terms = [(0, 1), (1, 2, 3)]
    first = SumOfUnanimityGame([*shared_terms, (3,)], [2.0, -1.5, 0.1], n_players=4).table()
    second = SumOfUnanimityGame([*shared_terms, (2, 3)], [1.8, -1.2, 0.08], n_players=4)
    result = generalizable_and_or_interactions([first, second], steps=300, lr=2e-3,
                                               pthres=0.2, progress=False)
    assert len(result.models) == 2 and result.alpha == 0.1
    # The loss at p = q = 0 is Eq. (6) over half of each transform.
    halves = [(0.5 * moebius_transform(t), 0.5 * or_interactions(t))
              for t in (first, second.table())]
    start = and_or_loss(torch.stack([h[0] for h in halves]), torch.stack([h[1] for h in halves]))
    assert float(result.loss[0]) == pytest.approx(float(start), rel=1e-12)
    assert result.loss[-1] < 0.7 * result.loss[0]
    shared = result.shared_salient()
    assert {("AND", t) for t in shared_terms} <= set(shared)
    for model, table in zip(result.models, (first, second.table()), strict=True):
        assert isinstance(model, AndOrResult)
        torch.testing.assert_close(model.reconstruct(), table + model.q, rtol=0, atol=1e-10)
        assert (model.p - result.shared_p).abs().max() <= 0.2 * (1 + 1e-12)
        assert model.q.abs().max() <= model.q_bound * (1 + 1e-12)
        assert torch.equal(model.loss, result.loss)


# -- devices and dtypes -----------------------------------------------------------------------


def test_float32_and_tabular_game() -> None:
    v = random_table(4, seed=8).float()
    result = and_or_interactions(TabularGame(v.double(), players=list("abcd")), steps=5,
                                 lr=1e-3, progress=False)
    assert result.players == tuple("abcd")
    single = and_or_interactions(v, steps=5, lr=1e-3, progress=False)
    assert single.p.dtype == torch.float32 and single.and_result.values.dtype == F64
    torch.testing.assert_close(single.and_result.values, result.and_result.values,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the step must be captured as a CUDA graph
def test_cuda_matches_cpu() -> None:
    v = random_table(6, seed=9, scale=2.0)
    cpu = and_or_interactions(v, steps=50, lr=1e-3, progress=False)
    gpu = and_or_interactions(v.cuda(), steps=50, lr=1e-3, progress=False)
    assert gpu.p.is_cuda and gpu.reconstruct().is_cuda
    torch.testing.assert_close(gpu.p.cpu(), cpu.p, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu.loss, cpu.loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu.and_result.values, cpu.and_result.values, rtol=1e-9,
                               atol=1e-9)
    # Several models (the step replayed as a CUDA graph holds one transform pair per model).
    tables = [v, random_table(6, seed=10, scale=2.0)]
    cpu = generalizable_and_or_interactions(tables, steps=20, lr=1e-3, pthres=0.1,
                                            progress=False)
    gpu = generalizable_and_or_interactions([t.cuda() for t in tables], steps=20, lr=1e-3,
                                            pthres=0.1, progress=False)
    torch.testing.assert_close(gpu.loss, cpu.loss, rtol=1e-9, atol=1e-9)
    for ours, reference in zip(gpu.models, cpu.models, strict=True):
        torch.testing.assert_close(ours.p.cpu(), reference.p, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.q.cpu(), reference.q, rtol=1e-9, atol=1e-9)


# -- (7) bad input ----------------------------------------------------------------------------


def test_bad_tables() -> None:
    with pytest.raises(ShapeError, match="power-of-two"):
        and_or_interactions(torch.zeros(3, dtype=F64), progress=False)
    with pytest.raises(ShapeError, match="1-D"):
        and_or_interactions(torch.zeros(2, 4, dtype=F64), progress=False)
    with pytest.raises(DTypeError, match="float64 or float32"):
        and_or_interactions(torch.zeros(4, dtype=torch.int64), progress=False)
    with pytest.raises(InputError, match="torch.Tensor"):
        and_or_interactions([0.0, 1.0], progress=False)
    for bad in (float("nan"), float("inf")):
        table = torch.zeros(8, dtype=F64)
        table[5] = bad
        with pytest.raises(InputError, match="finite"):
            and_or_interactions(table, progress=False)
    with pytest.raises(InputError, match="players"):
        and_or_interactions(torch.zeros(4, dtype=F64), players=["a"], progress=False)


@pytest.mark.parametrize(("name", "value"), [
    ("steps", -1), ("steps", 1.5), ("steps", True), ("lr", 0.0), ("lr", -1e-5),
    ("lr", float("nan")), ("qthres", -0.1), ("pthres", -1.0), ("lr_decay", 0.0),
    ("lr_decay", 2.0), ("momentum", 1.0), ("momentum", "0.9"),
])
def test_bad_hyperparameters(name: str, value: object) -> None:
    with pytest.raises(InputError, match=name):
        and_or_interactions(torch.zeros(4, dtype=F64), progress=False, **{name: value})


def test_bad_generalizable_input() -> None:
    table = torch.zeros(4, dtype=F64)
    with pytest.raises(InputError, match="two or more"):
        generalizable_and_or_interactions([table], progress=False)
    with pytest.raises(InputError, match="two or more"):
        generalizable_and_or_interactions(table, progress=False)
    with pytest.raises(ShapeError, match="same players"):
        generalizable_and_or_interactions([table, torch.zeros(8, dtype=F64)], progress=False)
    with pytest.raises(InputError, match="alpha"):
        generalizable_and_or_interactions([table, table], alpha=1.5, progress=False)
    if CUDA_OK:
        with pytest.raises(DeviceError, match="one device"):
            generalizable_and_or_interactions([table, table.cuda()], progress=False)


def test_bad_split_and_loss_input() -> None:
    v = torch.zeros(4, dtype=F64)
    with pytest.raises(ShapeError, match="p must"):
        and_or_split(v, torch.zeros(8, dtype=F64), v)
    with pytest.raises(ShapeError, match="one shape"):
        and_or_loss(v, torch.zeros(8, dtype=F64))
    with pytest.raises(InputError, match="kind"):
        MoebiusFunction.apply(v, "fourier")
    result = and_or_interactions(v, steps=0, progress=False)
    with pytest.raises(InputError, match="threshold"):
        result.salient(2.0)
