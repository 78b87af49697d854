"""Games: checked, counted, batched evaluation; closed forms of sums of unanimity games held to
brute-force definitions and to shapiq."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.interactions.games import CallableGame, Game, SumOfUnanimityGame, TabularGame
from mechinterp.interactions.subsets import mask_of, subsets_up_to
from mechinterp.interactions.weights import INDICES


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """This module runs on one thread (see conftest's ``one_thread``)."""


# -- brute force from the definitions ---------------------------------------------------------


def bits(n: int) -> torch.Tensor:
    """``[2**n, n]`` every coalition, row ``mask``."""
    masks = torch.arange(1 << n)
    return (masks[:, None] >> torch.arange(n)) & 1 == 1


def derivative(table: torch.Tensor, subset: tuple[int, ...], rest: int) -> float:
    """Discrete derivative of ``v`` by ``subset`` at coalition mask ``rest`` (disjoint)."""
    total = 0.0
    for size in range(len(subset) + 1):
        for part in itertools.combinations(subset, size):
            total += (-1) ** (len(subset) - size) * float(table[rest | mask_of(part)])
    return total


def shapley(table: torch.Tensor, n: int) -> list[float]:
    out = []
    for i in range(n):
        total = 0.0
        for mask in range(1 << n):
            if not mask >> i & 1:
                s = mask.bit_count()
                weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                total += weight * (float(table[mask | 1 << i]) - float(table[mask]))
        out.append(total)
    return out


def banzhaf(table: torch.Tensor, n: int) -> list[float]:
    return [sum(derivative(table, (i,), m) for m in range(1 << n) if not m >> i & 1) / 2 ** (n - 1)
            for i in range(n)]


def sii(table: torch.Tensor, n: int, subset: tuple[int, ...]) -> float:
    """Shapley interaction index (Grabisch & Roubens) from its definition."""
    s = len(subset)
    inside = mask_of(subset)
    total = 0.0
    for rest in range(1 << n):
        if rest & inside:
            continue
        t = rest.bit_count()
        weight = math.factorial(t) * math.factorial(n - t - s) / math.factorial(n - s + 1)
        total += weight * derivative(table, subset, rest)
    return total


BERNOULLI = [Fraction(1), Fraction(-1, 2), Fraction(1, 6), Fraction(0), Fraction(-1, 30)]


def k_sii(table: torch.Tensor, n: int, subset: tuple[int, ...], order: int) -> float:
    """k-SII (Bord et al.): SII aggregated with Bernoulli numbers over supersets up to ``order``."""
    total = 0.0
    others = [p for p in range(n) if p not in subset]
    for extra in range(order - len(subset) + 1):
        for more in itertools.combinations(others, extra):
            total += float(BERNOULLI[extra]) * sii(table, n, tuple(sorted(subset + more)))
    return total


def moebius(table: torch.Tensor, n: int, subset: tuple[int, ...]) -> float:
    inside = mask_of(subset)
    return sum((-1) ** (len(subset) - m.bit_count()) * float(table[m])
               for m in range(1 << n) if m & ~inside == 0)


@pytest.fixture(scope="module")
def random_table() -> tuple[torch.Tensor, int]:
    n = 5
    generator = torch.Generator().manual_seed(3)
    return torch.randn(1 << n, generator=generator, dtype=torch.float64), n


def soum_of_table(table: torch.Tensor, n: int) -> SumOfUnanimityGame:
    """The table's game written as a sum of unanimity games (every coalition a term)."""
    dividends = [moebius(table, n, tuple(i for i in range(n) if m >> i & 1)) for m in range(1 << n)]
    return SumOfUnanimityGame(bits(n), dividends, n)


# -- evaluation --------------------------------------------------------------------------------


class Spy(Game):
    """Records the size of every batch it is asked to evaluate."""

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.calls: list[int] = []

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        self.calls.append(coalitions.shape[0])
        return coalitions.sum(1).to(torch.float64) ** 2


def test_game_batches_and_counts() -> None:
    game = Spy(4, batch_size=3)
    coalitions = bits(4)[:10]
    values = game(coalitions)
    assert game.calls == [3, 3, 3, 1]
    assert game.evaluations == 10
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, coalitions.sum(1).double() ** 2)
    game(coalitions, batch_size=10)
    assert game.calls[-1] == 10 and game.evaluations == 20


def test_table_enumerates_by_mask() -> None:
    game = Spy(5)
    table = game.table()
    assert game.evaluations == 32
    for mask in (0, 1, 6, 31):
        assert table[mask] == mask.bit_count() ** 2
    with pytest.raises(InputError, match="max_players"):
        Spy(30).table()


def test_empty_and_full_value_cost_one_evaluation_each() -> None:
    game = SumOfUnanimityGame([(), (0, 1)], [0.5, 2.0], n_players=3)
    assert game.empty_value == 0.5 and game.full_value == 2.5
    assert game.empty_value == 0.5
    assert game.evaluations == 2


def test_tabular_game_looks_up_masks(random_table) -> None:
    table, n = random_table
    game = TabularGame(table)
    assert game.n_players == n
    torch.testing.assert_close(game(bits(n)), table)
    torch.testing.assert_close(game.table(), table)


def test_callable_game_and_labels() -> None:
    game = CallableGame(lambda c: c[:, 0].double(), 3, players=["a", "b", "c"])
    assert game.players == ("a", "b", "c")
    assert game(torch.tensor([[True, False, False]])).tolist() == [1.0]
    with pytest.raises(InputError, match="callable"):
        CallableGame(3, 2)
    with pytest.raises(InputError, match="players"):
        CallableGame(lambda c: c, 3, players=["a", "a", "b"])


@pytest.mark.parametrize(("coalitions", "error", "match"), [
    (torch.zeros(2, 3, dtype=torch.int64), DTypeError, "torch.bool"),
    ([[True, False, True]], DTypeError, "torch.Tensor"),
    (torch.zeros(3, dtype=torch.bool), ShapeError, r"\[coalition, 3\]"),
    (torch.zeros(2, 4, dtype=torch.bool), ShapeError, r"got \[2, 4\]"),
])
def test_bad_coalitions(coalitions, error, match) -> None:
    with pytest.raises(error, match=match):
        SumOfUnanimityGame([(0,)], [1.0], 3)(coalitions)


@pytest.mark.parametrize("result", [
    lambda c: torch.zeros(c.shape[0], 1),
    lambda c: torch.zeros(c.shape[0] + 1),
    lambda c: [0.0] * c.shape[0],
])
def test_value_function_of_wrong_shape(result) -> None:
    with pytest.raises(ShapeError, match="one value per coalition"):
        CallableGame(result, 2)(torch.ones(3, 2, dtype=torch.bool))


def test_bad_tables() -> None:
    with pytest.raises(ShapeError, match="power-of-two"):
        TabularGame(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ShapeError, match="power-of-two"):
        TabularGame(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(DTypeError, match="floating"):
        TabularGame(torch.zeros(4, dtype=torch.int64))


def test_bad_soum() -> None:
    with pytest.raises(InputError, match=r"terms\[0\]"):
        SumOfUnanimityGame([(0, 5)], [1.0], 3)
    with pytest.raises(ShapeError, match="one per term"):
        SumOfUnanimityGame([(0,), (1,)], [1.0], 3)
    with pytest.raises(InputError, match="min_size"):
        SumOfUnanimityGame.random(4, n_terms=2, min_size=3, max_size=2)
    game = SumOfUnanimityGame([(0, 1)], [1.0], 4)
    with pytest.raises(InputError, match="index must be one of"):
        game.exact("Owen")
    with pytest.raises(InputError, match="order 1 only"):
        game.exact("SV", order=2)


# -- closed forms ------------------------------------------------------------------------------


def test_soum_values_and_dividends() -> None:
    game = SumOfUnanimityGame([(0, 2), (1,), (0, 2)], [1.0, -2.0, 0.5], 4)
    assert game.dividends() == {(0, 2): 1.5, (1,): -2.0}
    table = game.table()
    for mask in range(16):
        expected = 1.5 * (mask & 0b101 == 0b101) - 2.0 * (mask & 0b10 == 0b10)
        assert table[mask] == expected


def test_random_soum_is_reproducible() -> None:
    a = SumOfUnanimityGame.random(20, n_terms=15, min_size=2, max_size=4, seed=7)
    b = SumOfUnanimityGame.random(20, n_terms=15, min_size=2, max_size=4, seed=7)
    assert torch.equal(a.terms, b.terms) and torch.equal(a.coefficients, b.coefficients)
    sizes = a.terms.sum(1)
    assert int(sizes.min()) >= 2 and int(sizes.max()) <= 4
    assert float(a.coefficients.abs().max()) <= 1.0


def test_closed_forms_equal_the_definitions(random_table) -> None:
    table, n = random_table
    game = soum_of_table(table, n)
    assert game.exact("SV").values.tolist() == pytest.approx(shapley(table, n), abs=1e-12)
    assert game.exact("BV").values.tolist() == pytest.approx(banzhaf(table, n), abs=1e-12)
    for order in (2, 3):
        subsets = subsets_up_to(n, order, min_order=1)
        got = game.exact("SII", order=order).values.tolist()
        assert got == pytest.approx([sii(table, n, s) for s in subsets], abs=1e-12)
        got = game.exact("k-SII", order=order).values.tolist()
        assert got == pytest.approx([k_sii(table, n, s, order) for s in subsets], abs=1e-12)
    got = game.exact("Moebius").values.tolist()
    assert got == pytest.approx([moebius(table, n, s) for s in subsets_up_to(n, n)], abs=1e-12)


def test_efficiency_at_many_players() -> None:
    game = SumOfUnanimityGame.random(60, n_terms=40, min_size=1, max_size=5, seed=1)
    delta = game.full_value - game.empty_value
    for index, order in (("SV", 1), ("k-SII", 2), ("k-SII", 3), ("STII", 2), ("FSII", 2)):
        assert float(game.exact(index, order=order).values.sum()) == pytest.approx(delta, abs=1e-9)
    # Players in no term are null players.
    idle = torch.nonzero(~game.terms.any(0)).flatten()
    assert idle.numel() and bool((game.exact("SV").values[idle] == 0).all())


@pytest.mark.parametrize("index", INDICES)
def test_closed_forms_equal_shapiq(index: str) -> None:
    shapiq = pytest.importorskip("shapiq")
    game = SumOfUnanimityGame.random(7, n_terms=12, min_size=1, max_size=5, seed=4)
    order = {"SV": 1, "BV": 1, "Moebius": 7}.get(index, 2)
    computer = shapiq.ExactComputer(n_players=7, game=lambda c: game(
        torch.as_tensor(c, dtype=torch.bool).reshape(-1, 7)).numpy())
    theirs = computer(index, order=order)
    ours = game.exact(index, order=order, min_order=0)
    expected = [float(theirs[s]) for s in ours.subsets]
    assert ours.values.tolist() == pytest.approx(expected, abs=1e-9)
