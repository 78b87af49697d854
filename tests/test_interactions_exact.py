"""Exact interactions (mechinterp.interactions) against their definitions, closed forms on sums of
unanimity games, and shapiq 1.4.1's ExactComputer."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.interactions import (
    INDICES,
    banzhaf_values,
    count_up_to,
    exact_interactions,
    index_weights,
    interaction_index,
    inverse_moebius_transform,
    mask_of,
    moebius_transform,
    or_interactions,
    shapley_values,
    subsets_up_to,
)


def random_values(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2**n, generator=g, dtype=torch.float64).to(dtype)


def size(mask: int) -> int:
    return mask.bit_count()


def players_outside(mask: int, n: int) -> list[int]:
    return [i for i in range(n) if not mask >> i & 1]


def derivative(v: torch.Tensor, of: int, at: int) -> float:
    """The discrete derivative of v with respect to the coalition `of`, at the coalition `at`."""
    return sum((-1) ** (size(of) - size(part)) * float(v[at | part])
               for part in range(of + 1) if part & ~of == 0)


def sub_coalitions(mask: int, n: int):
    """Every coalition of the players outside `mask`."""
    outside = players_outside(mask, n)
    for chosen in itertools.product((0, 1), repeat=len(outside)):
        yield sum(1 << p for p, c in zip(outside, chosen) if c)


# ---- definitions, from the values directly ----


def test_shapley_and_banzhaf_values_match_their_definitions():
    n = 6
    v = random_values(n, seed=1)
    m = moebius_transform(v)
    shapley, banzhaf = [], []
    for i in range(n):
        rest = (2**n - 1) & ~(1 << i)
        coalitions = [s for s in range(2**n) if s & rest == s]
        shapley.append(sum(
            math.factorial(size(s)) * math.factorial(n - size(s) - 1) / math.factorial(n)
            * float(v[s | 1 << i] - v[s]) for s in coalitions))
        banzhaf.append(sum(float(v[s | 1 << i] - v[s]) for s in coalitions) / 2 ** (n - 1))
    torch.testing.assert_close(shapley_values(m), torch.tensor(shapley, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(banzhaf_values(m), torch.tensor(banzhaf, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # Efficiency.
    assert abs(float(shapley_values(m).sum() - (v[-1] - v[0]))) < 1e-12


@pytest.mark.parametrize("order", [2, 3])
def test_sii_and_stii_match_their_definitions(order):
    n = 5
    v = random_values(n, seed=order)
    sii = exact_interactions(v, index="SII", order=order)
    stii = exact_interactions(v, index="STII", order=order)
    for position, subset in enumerate(subsets_up_to(n, order)):
        t = mask_of(subset)
        # Grabisch and Roubens: the derivative averaged with weights (n-|S|-|T|)! |S|! / (n-|T|+1)!
        expected = sum(
            math.factorial(n - size(s) - size(t)) * math.factorial(size(s))
            / math.factorial(n - size(t) + 1) * derivative(v, t, s)
            for s in sub_coalitions(t, n))
        assert abs(float(sii[position]) - expected) < 1e-12, subset
        # Sundararajan et al.: below the top order the dividends, at it a Shapley-like average.
        if len(subset) < order:
            expected = derivative(v, t, 0)
        else:
            expected = order / n * sum(derivative(v, t, s) / math.comb(n - 1, size(s))
                                       for s in sub_coalitions(t, n))
        assert abs(float(stii[position]) - expected) < 1e-12, subset


def test_moebius_transform_rebuilds_values():
    n = 7
    v = random_values(n, seed=2)
    m = moebius_transform(v)
    for s in (0, 5, 77, 2**n - 1):
        assert abs(sum(float(m[t]) for t in range(s + 1) if t & ~s == 0) - float(v[s])) < 1e-12
    torch.testing.assert_close(inverse_moebius_transform(m), v, rtol=0, atol=1e-12)


def test_or_interactions_match_their_definition_and_rebuild_the_game():
    n = 5
    full = 2**n - 1
    v = random_values(n, seed=3)
    got = or_interactions(v)
    assert float(got[0]) == float(v[0])
    for s in range(1, 2**n):
        # Li and Zhang (2023): I_or(S) = -sum_{T subset S} (-1)^{|S|-|T|} v(N minus T).
        expected = -sum((-1) ** (size(s) - size(t)) * float(v[full & ~t])
                        for t in range(s + 1) if t & ~s == 0)
        assert abs(float(got[s]) - expected) < 1e-12, s
    for s in range(2**n):
        rebuilt = float(got[0]) + sum(float(got[t]) for t in range(1, 2**n) if t & s)
        assert abs(rebuilt - float(v[s])) < 1e-12, s


def test_or_interactions_in_place_and_of_one_coalition():
    v = random_values(4, seed=5)
    expected = or_interactions(v)
    table = v.clone()
    assert or_interactions(table, inplace=True) is table
    assert torch.equal(table, expected)
    assert or_interactions(torch.tensor([2.5], dtype=torch.float64)).tolist() == [2.5]


# ---- sums of unanimity games: closed forms at n = 20 ----


def unanimity_game(n: int, terms: int, seed: int, max_size: int):
    """A random sum of unanimity games: its dividends (coalition -> coefficient) and its values."""
    g = torch.Generator().manual_seed(seed)
    dividends: dict[int, float] = {0: 0.75}  # v(empty) = 0.75
    for _ in range(terms):
        players = torch.randperm(n, generator=g)[: int(torch.randint(1, max_size + 1, (1,),
                                                                         generator=g))]
        mask = mask_of(players.tolist())
        coefficient = float(torch.randn(1, generator=g, dtype=torch.float64))
        dividends[mask] = dividends.get(mask, 0.0) + coefficient
    values = torch.zeros(2**n, dtype=torch.float64)
    for mask, coefficient in dividends.items():
        values[mask] = coefficient
    for player in range(n):  # v(S) = sum of the dividends inside S, one player at a time
        pairs = values.view(-1, 2, 2**player)
        pairs[:, 1] += pairs[:, 0]
    return dividends, values


def test_sum_of_unanimity_games_at_20_players():
    n = 20
    dividends, v = unanimity_game(n, terms=36, seed=0, max_size=6)
    m = moebius_transform(v)
    expected = torch.zeros(2**n, dtype=torch.float64)
    for mask, coefficient in dividends.items():
        expected[mask] = coefficient
    torch.testing.assert_close(m, expected, rtol=0, atol=1e-12)

    shapley = [sum(c / size(s) for s, c in dividends.items() if s >> i & 1) for i in range(n)]
    banzhaf = [sum(c / 2 ** (size(s) - 1) for s, c in dividends.items() if s >> i & 1)
               for i in range(n)]
    torch.testing.assert_close(shapley_values(m), torch.tensor(shapley, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(banzhaf_values(m), torch.tensor(banzhaf, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert abs(sum(shapley) - float(v[-1] - v[0])) < 1e-12

    subsets = [mask_of(s) for s in subsets_up_to(n, 2)]
    sii = interaction_index(m, "SII", 2)
    closed = [sum(c / (size(s) - size(t) + 1) for s, c in dividends.items() if s & t == t)
              for t in subsets]
    torch.testing.assert_close(sii, torch.tensor(closed, dtype=torch.float64), rtol=0, atol=1e-12)
    stii = interaction_index(m, "STII", 2)
    closed = [dividends.get(t, 0.0) if size(t) < 2 else
              sum(c / math.comb(size(s), 2) for s, c in dividends.items() if s & t == t)
              for t in subsets]
    torch.testing.assert_close(stii, torch.tensor(closed, dtype=torch.float64), rtol=0, atol=1e-12)

    # The efficient indices share v(N) - v(empty) out among the non-empty subsets.
    for index in ("k-SII", "STII", "FSII"):
        for order in (2, 3):
            values = interaction_index(m, index, order)
            assert float(values[0]) == 0.75
            assert abs(float(values[1:].sum() - (v[-1] - v[0]))) < 1e-11, (index, order)


@pytest.mark.parametrize("index", ["k-SII", "STII", "FSII", "FBII", "Moebius"])
def test_order_k_indices_of_a_k_additive_game_are_its_dividends(index):
    n = 20
    dividends, v = unanimity_game(n, terms=30, seed=1, max_size=2)
    got = exact_interactions(v, index=index, order=2)
    expected = [dividends.get(mask_of(s), 0.0) for s in subsets_up_to(n, 2)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0,
                               atol=1e-12)


# ---- the public API: copies, in place, dtypes, edge cases, bad input ----


def test_copies_unless_in_place():
    v = random_values(6)
    before = v.clone()
    m = moebius_transform(v)
    assert torch.equal(v, before) and m.data_ptr() != v.data_ptr()
    assert moebius_transform(v, inplace=True) is v
    assert torch.equal(v, m)
    assert inverse_moebius_transform(v, inplace=True) is v
    torch.testing.assert_close(v, before, rtol=0, atol=1e-13)
    table = before.clone()
    result = exact_interactions(table, index="k-SII", order=2, inplace=True)
    assert torch.equal(table, m) and result.shape == (count_up_to(6, 2),)


def test_non_contiguous_input_is_copied_and_refused_in_place():
    wide = random_values(7)
    strided = wide[::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(moebius_transform(strided), moebius_transform(strided.contiguous()),
                               rtol=0, atol=0)
    m = moebius_transform(strided.contiguous())
    assert torch.equal(interaction_index(torch.stack([m, m], 1)[:, 0], "SII", 3),
                       interaction_index(m, "SII", 3))
    with pytest.raises(ShapeError, match="inplace=True needs a contiguous values"):
        moebius_transform(strided, inplace=True)


@pytest.mark.parametrize("index", [i for i in INDICES if i not in ("SV", "BV")])
def test_float32_agrees_with_float64(index):
    v = random_values(12, seed=4)
    wide = exact_interactions(v, index=index, order=3)
    narrow = exact_interactions(v.float(), index=index, order=3)
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-4, atol=1e-4)


def test_few_players():
    assert moebius_transform(torch.tensor([4.0])).tolist() == [4.0]
    assert shapley_values(torch.tensor([4.0])).shape == (0,)
    assert banzhaf_values(torch.tensor([4.0], dtype=torch.float64)).shape == (0,)
    one = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert exact_interactions(one, index="SV", order=1).tolist() == [1.0, 2.0]
    assert exact_interactions(one, index="BV", order=1).tolist() == [2.0, 2.0]  # mean of v, 2
    with pytest.raises(InputError, match=r"order must lie in \[1, n\] with n=0 players, got 1"):
        interaction_index(torch.tensor([4.0]), "SII", 1)


def test_bad_input():
    m = random_values(4)
    with pytest.raises(InputError, match="interaction_index: index must be one of .* got 'SHAP'"):
        interaction_index(m, "SHAP", 1)
    with pytest.raises(InputError, match=r"order must lie in \[1, n\] with n=4 players, got 0"):
        interaction_index(m, "SII", 0)
    with pytest.raises(InputError, match=r"order must lie in \[1, n\] with n=4 players, got 5"):
        exact_interactions(m, index="k-SII", order=5)
    with pytest.raises(InputError, match="'SV' is a value, defined for order 1 only, got order 2"):
        interaction_index(m, "SV", 2)
    with pytest.raises(InputError, match="order must be an int, got float"):
        interaction_index(m, "SII", 2.0)
    with pytest.raises(ShapeError, match=r"values must have a power-of-two length .* length 12"):
        moebius_transform(torch.zeros(12))
    with pytest.raises(DTypeError, match="dividends must be float64 or float32, got torch.int32"):
        shapley_values(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(DTypeError, match="got torch.bfloat16"):
        exact_interactions(torch.zeros(8, dtype=torch.bfloat16), index="SV", order=1)


def test_weights_are_exact_rationals_rounded_once():
    # k-SII at order 2 on a dividend of 3 players: 1/3 - 1/2 = -1/6 per player, 1/2 per pair.
    weights = index_weights("k-SII", 3, 2)
    assert weights[3].tolist() == [0.0, -1 / 6, 1 / 2]
    assert index_weights("FBII", 4, 1)[4].tolist() == [-3 / 16, 1 / 8]


# ---- shapiq 1.4.1's ExactComputer ----


@pytest.fixture(scope="module")
def shapiq_exact():
    """ExactComputer and MoebiusConverter of shapiq, on the game of a value table."""
    pytest.importorskip("shapiq")
    from shapiq.game_theory.exact import ExactComputer
    from shapiq.game_theory.moebius_converter import MoebiusConverter

    computers = {}

    def computer(values: torch.Tensor):
        key = values.data_ptr()
        if key not in computers:
            table = values.numpy()
            n = values.shape[0].bit_length() - 1

            def game(coalitions):
                return table[(coalitions.astype("int64") << torch.arange(n).numpy()).sum(1)]

            computers[key] = ExactComputer(game, n_players=n)
        return computers[key]

    return computer, MoebiusConverter


def shapiq_values(result, n: int, order: int) -> torch.Tensor:
    """shapiq's values, read in our canonical order."""
    return torch.tensor([result[s] for s in subsets_up_to(n, order)], dtype=torch.float64)


PEER_CASES = [(index, order) for index in ("SII", "k-SII", "STII", "FSII", "FBII")
              for order in (1, 2, 3)] + [("SV", 1), ("BV", 1)]
TABLES = {}


def peer_table(n: int) -> torch.Tensor:
    if n not in TABLES:  # one table per n, so shapiq's computer caches across cases
        TABLES[n] = random_values(n, seed=10 + n)
    return TABLES[n]


def check_against_shapiq(shapiq_exact, n: int, index: str, order: int) -> None:
    computer, _ = shapiq_exact
    v = peer_table(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = shapiq_values(computer(v)(index, order), n, order)
    ours = exact_interactions(v, index=index, order=order)
    # shapiq's exact FSII solves a least-squares problem with the constraints on v(empty) and
    # v(N) as a penalty of weight 1e8: it is off by ~1e-9; ours is the constrained solution.
    atol = 1e-7 if index == "FSII" else 1e-10
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize(("index", "order"), PEER_CASES)
def test_equals_shapiq_exact_computer(shapiq_exact, index, order):
    check_against_shapiq(shapiq_exact, 7, index, order)


@pytest.mark.parametrize(("index", "order"), [("k-SII", 2), ("STII", 3), ("SV", 1), ("BV", 1)])
def test_equals_shapiq_exact_computer_at_10_players(shapiq_exact, index, order):
    check_against_shapiq(shapiq_exact, 10, index, order)


@pytest.mark.slow
@pytest.mark.parametrize(("index", "order"), PEER_CASES)
def test_equals_shapiq_exact_computer_at_10_players_every_index(shapiq_exact, index, order):
    check_against_shapiq(shapiq_exact, 10, index, order)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_moebius_equals_shapiq(shapiq_exact, n):
    computer, _ = shapiq_exact
    v = peer_table(n)
    theirs = computer(v)("Moebius", n)
    ours = moebius_transform(v)
    expected = torch.tensor([theirs[s] for s in subsets_up_to(n, n)], dtype=torch.float64)
    masks = [mask_of(s) for s in subsets_up_to(n, n)]
    torch.testing.assert_close(ours[masks], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_fsii_equals_shapiq_moebius_converter(shapiq_exact, order):
    # shapiq's converter distributes the dividends exactly, without the penalty.
    computer, converter = shapiq_exact
    v = peer_table(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = shapiq_values(converter(computer(v)("Moebius", 7))("FSII", order), 7, order)
    ours = exact_interactions(v, index="FSII", order=order)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_exact_results_of_games_match_the_closed_forms() -> None:
    from mechinterp.interactions import SumOfUnanimityGame, exact

    game = SumOfUnanimityGame.random(9, n_terms=12, min_size=1, max_size=4, seed=3)
    for index, order in (("SV", 1), ("BV", 1), ("k-SII", 2), ("STII", 2), ("FSII", 3)):
        result = exact(game, index=index, order=order)
        expected = game.exact(index, order=order)
        assert result.index == index and result.max_order == order
        torch.testing.assert_close(result.values[-len(expected.values):], expected.values,
                                   rtol=1e-10, atol=1e-10)
    moebius = exact(game, index="Moebius", order=4)
    for subset, coefficient in game.dividends().items():
        assert abs(moebius[subset] - coefficient) < 1e-10
    assert moebius.evaluations == 2**9
    assert abs(moebius.full_value - moebius.baseline_value - float(moebius.values.sum())) < 1e-9
