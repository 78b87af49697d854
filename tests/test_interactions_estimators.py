"""Estimators: budgets kept (counted through a spy game), large batches, efficiency, exact at
full budget, the antithetic pair, seeds, standard errors that shrink and cover, the stopping
rule, bad input; compared with shapiq where it is installed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mechinterp.errors import InputError
from mechinterp.interactions.approximators import (
    SVARM,
    KernelSHAP,
    LeverageSHAP,
    PermutationSamplingSV,
    RegressionAdjustedKSII,
)
from mechinterp.interactions.approximators.base import exact_index
from mechinterp.interactions.approximators.ksii import coalition_weights
from mechinterp.interactions.approximators.sampling import (
    allocate,
    make_strata,
    random_subsets,
)
from mechinterp.interactions.games import Game, SumOfUnanimityGame, TabularGame

SV_ESTIMATORS = [
    pytest.param(lambda: KernelSHAP(), id="kernelshap"),
    pytest.param(lambda: KernelSHAP(paired=False), id="kernelshap-unpaired"),
    pytest.param(lambda: LeverageSHAP(), id="leverage"),
    pytest.param(lambda: PermutationSamplingSV(), id="permutation"),
    pytest.param(lambda: PermutationSamplingSV(antithetic=False), id="permutation-plain"),
    pytest.param(lambda: SVARM(), id="svarm"),
    pytest.param(lambda: RegressionAdjustedKSII(order=1), id="regression-adjusted"),
]
EFFICIENT = [p for p in SV_ESTIMATORS if p.id != "svarm"]
ALL = [*SV_ESTIMATORS, pytest.param(lambda: RegressionAdjustedKSII(order=2), id="ksii-2")]
# The regression-adjusted estimator searches surrogates of up to ~1000 dividends by default;
# the tests that run it many times cap them to stay fast.
FAST = [pytest.param(lambda: KernelSHAP(), id="kernelshap"),
        pytest.param(lambda: PermutationSamplingSV(), id="permutation"),
        pytest.param(lambda: SVARM(), id="svarm"),
        pytest.param(lambda: RegressionAdjustedKSII(order=1, max_features=100), id="ra-1"),
        pytest.param(lambda: RegressionAdjustedKSII(order=2, max_features=100), id="ra-2")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """This module runs on one thread (see conftest's ``one_thread``)."""


class Spy(Game):
    """A sum of unanimity games that records every batch it evaluates."""

    def __init__(self, game: SumOfUnanimityGame, **kwargs) -> None:
        super().__init__(game.n_players, **kwargs)
        self.game = game
        self.calls: list[int] = []

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        self.calls.append(coalitions.shape[0])
        return self.game.value_function(coalitions)


def soum(n: int = 12, seed: int = 0, max_size: int = 4) -> SumOfUnanimityGame:
    return SumOfUnanimityGame.random(n, n_terms=2 * n, min_size=1, max_size=max_size, seed=seed)


def random_table_game(n: int, seed: int = 0) -> TabularGame:
    generator = torch.Generator().manual_seed(seed)
    return TabularGame(torch.randn(1 << n, generator=generator, dtype=torch.float64))


# -- budget and batching ----------------------------------------------------------------------


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("budget", [60, 333])
def test_budget_is_respected_in_large_batches(make, budget: int) -> None:
    game = Spy(soum(), batch_size=64)
    result = make().approximate(game, budget=budget, seed=0)
    assert game.evaluations == result.evaluations == sum(game.calls) <= budget
    assert result.evaluations >= budget - 2 * 11  # at most one unit left unspent
    assert max(game.calls) <= 64
    # Coalitions go in blocks: few calls, most of them full.
    assert len(game.calls) <= math.ceil(budget / 64) + 4


def test_batch_size_argument_overrides_the_game() -> None:
    game = Spy(soum(), batch_size=1000)
    LeverageSHAP().approximate(game, budget=300, seed=0, batch_size=50)
    assert max(game.calls) <= 50


@pytest.mark.parametrize("make", EFFICIENT)
def test_efficiency(make) -> None:
    game = soum(seed=3)
    result = make().approximate(game, budget=200, seed=1)
    assert float(result.values.sum()) == pytest.approx(game.full_value - game.empty_value,
                                                       abs=1e-9)
    assert result.baseline_value == game.empty_value and result.full_value == game.full_value


def test_ksii_efficiency_and_layout() -> None:
    game = soum(seed=4)
    result = RegressionAdjustedKSII(order=2, max_features=100).approximate(game, budget=300,
                                                                           seed=0)
    assert (result.index, result.min_order, result.max_order) == ("k-SII", 1, 2)
    assert float(result.values.sum()) == pytest.approx(game.full_value - game.empty_value,
                                                       abs=1e-9)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", SV_ESTIMATORS)
def test_full_budget_is_exact(make) -> None:
    game = random_table_game(7)
    exact = exact_index(game.values, "SV", 1)
    result = make().approximate(game, budget=2**7, seed=0)
    torch.testing.assert_close(result.values, exact, rtol=0, atol=1e-10)
    assert result.evaluations == 2**7
    assert float(result.stderr.abs().max()) < 1e-6


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("paired", [True, False])
def test_ksii_full_budget_is_exact(order: int, paired: bool) -> None:
    game = random_table_game(7, seed=order)
    exact = exact_index(game.values, "k-SII", order)
    result = RegressionAdjustedKSII(order=order, paired=paired).approximate(game, budget=2**7)
    torch.testing.assert_close(result.values, exact, rtol=0, atol=1e-9)


def test_exact_index_matches_closed_forms() -> None:
    game = soum(n=9, max_size=5)
    table = game.table()
    for index, order in (("SV", 1), ("k-SII", 2), ("k-SII", 3)):
        torch.testing.assert_close(exact_index(table, index, order),
                                   game.exact(index, order=order).values)


@pytest.mark.parametrize("seed", range(5))
def test_one_antithetic_pair_is_exact_for_order_two(seed: int) -> None:
    game = SumOfUnanimityGame.random(10, n_terms=15, min_size=1, max_size=2, seed=seed)
    result = PermutationSamplingSV().approximate(game, budget=2 + 2 * 9, seed=seed)
    torch.testing.assert_close(result.values, game.exact("SV").values, rtol=0, atol=1e-12)
    # One plain permutation is not exact on the same games.
    plain = PermutationSamplingSV(antithetic=False).approximate(game, budget=2 + 9, seed=seed)
    assert float((plain.values - game.exact("SV").values).abs().max()) > 1e-6


@pytest.mark.parametrize("make", [KernelSHAP, LeverageSHAP,
                                  lambda: RegressionAdjustedKSII(order=1)])
def test_paired_regression_is_exact_for_order_two(make) -> None:
    game = SumOfUnanimityGame.random(14, n_terms=20, min_size=1, max_size=2, seed=2)
    result = make().approximate(game, budget=120, seed=0)
    torch.testing.assert_close(result.values, game.exact("SV").values, rtol=0, atol=1e-6)


def test_coalition_weights_reproduce_ksii() -> None:
    """k-SII of a unit table (v = 1 on one coalition) is the coefficient of that coalition."""
    n, order = 5, 3
    weights = coalition_weights(n, order)
    for mask in (0, 3, 7, 21, 31):
        table = torch.zeros(1 << n, dtype=torch.float64)
        table[mask] = 1.0
        values = exact_index(table, "k-SII", order)
        t = mask.bit_count()
        position = 0
        for s in range(1, order + 1):
            for subset in itertools.combinations(range(n), s):
                a = sum(mask >> i & 1 for i in subset)
                expected = float(weights[s, t, a]) / math.comb(n, t)
                assert float(values[position]) == pytest.approx(expected, abs=1e-12)
                position += 1


# -- randomness and standard errors -------------------------------------------------------------


@pytest.mark.parametrize("make", FAST)
def test_seeds_reproduce(make) -> None:
    game = soum(seed=5)
    first = make().approximate(game, budget=150, seed=11)
    again = make().approximate(game, budget=150, seed=11)
    other = make().approximate(game, budget=150, seed=12)
    assert torch.equal(first.values, again.values)
    assert not torch.equal(first.values, other.values)


@pytest.mark.parametrize("make", [p for p in SV_ESTIMATORS if p.id != "regression-adjusted"])
def test_standard_errors_shrink_and_cover(make) -> None:
    """Over 8 seeds: errors at 4x the budget about half as large, and |error| <= 1.96 se for
    most players (normal coverage is 95%)."""
    game = soum(n=14, seed=6, max_size=5)
    truth = game.exact("SV").values
    small, large, covered, count = 0.0, 0.0, 0, 0
    for seed in range(8):
        low = make().approximate(game, budget=250, seed=seed)
        high = make().approximate(game, budget=1000, seed=seed)
        small += float(low.stderr.mean())
        large += float(high.stderr.mean())
        covered += int(((high.values - truth).abs() <= 1.96 * high.stderr).sum())
        count += truth.numel()
    assert large < 0.75 * small
    assert covered / count > 0.8


def test_regression_adjusted_errors_cover() -> None:
    game = soum(n=10, seed=7, max_size=5)
    for order in (1, 2):
        truth = game.exact("k-SII", order=order).values
        covered = count = 0
        for seed in range(6):
            estimator = RegressionAdjustedKSII(order=order, max_features=200)
            result = estimator.approximate(game, budget=300, seed=seed)
            covered += int(((result.values - truth).abs() <= 1.96 * result.stderr + 1e-9).sum())
            count += truth.numel()
        assert covered / count > 0.8


@pytest.mark.parametrize("make", FAST)
def test_stopping_rule(make) -> None:
    game = soum(n=12, seed=8)
    loose = make().approximate(game, budget=2000, seed=0, tolerance=0.2)
    assert loose.evaluations < 2000
    assert float(loose.stderr.max()) < 0.2
    tight = make().approximate(game, budget=600, seed=0, tolerance=1e-12)
    assert tight.evaluations >= 600 - 2 * 11


def test_permutation_stderr_needs_two_units() -> None:
    result = PermutationSamplingSV().approximate(soum(), budget=2 + 2 * 11, seed=0)
    assert bool(result.stderr.isnan().all())


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budget": -1}, "budget must be an int >= 0"),
    ({"budget": 10.5}, "budget must be an int"),
    ({"budget": 100, "tolerance": 0}, "tolerance must be a positive"),
    ({"budget": 100, "seed": -3}, "seed must be"),
    ({"budget": 100, "batch_size": 0}, "batch_size must be"),
    ({"budget": 5}, r"budget must be at least 24 evaluations for PermutationSamplingSV"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        PermutationSamplingSV().approximate(soum(), **kwargs)


def test_bad_games_and_options() -> None:
    with pytest.raises(InputError, match="mechinterp Game"):
        KernelSHAP().approximate(lambda c: c, budget=10)
    with pytest.raises(InputError, match="order must be at most n_players=3"):
        RegressionAdjustedKSII(order=4).approximate(soum(n=3, max_size=2), budget=10)
    with pytest.raises(InputError, match="order must be an int >= 1"):
        RegressionAdjustedKSII(order=0)
    with pytest.raises(InputError, match="surrogate_order"):
        RegressionAdjustedKSII(surrogate_order=-1)
    with pytest.raises(InputError, match="max_features must be a non-negative int or None"):
        RegressionAdjustedKSII(max_features=-1)


def test_surrogate_orders_follow_the_feature_limits() -> None:
    # Pairs of 128 players are 8,256 dividends (with the singletons): the default lets an
    # order-2 surrogate estimate order-2 k-SII once there is one evaluation per 16 dividends.
    pairs = RegressionAdjustedKSII(order=2)
    assert pairs._orders(128, 4000) == [1, 2]
    assert pairs._orders(128, 516) == [1, 2]
    assert pairs._orders(128, 515) == [1]
    # Above the estimated order the default stays at 4,096 dividends (order 3 of 32 players
    # needs 5,488); an explicit limit applies to every order.
    assert pairs._orders(32, 4000) == [1, 2]
    assert RegressionAdjustedKSII(order=2, max_features=16384)._orders(32, 4000) == [1, 2, 3]
    assert RegressionAdjustedKSII(order=2, max_features=4096)._orders(128, 4000) == [1]


# -- sampling internals ------------------------------------------------------------------------


def test_allocation_caps_and_spends_everything() -> None:
    strata = make_strata(10, paired=True, mass=lambda s: 1.0 / (s * (10 - s)))
    assert [st.population for st in strata] == [10, 45, 120, 210, 126]
    counts = allocate(strata, 200)
    assert sum(counts) == 200
    assert counts[0] == 10  # the border size is enumerated
    assert all(c <= st.population for c, st in zip(counts, strata, strict=True))
    assert allocate(strata, 10_000) == [st.population for st in strata]


def test_random_subsets_are_distinct_and_uniform() -> None:
    generator = torch.Generator().manual_seed(0)
    for n, size, count in ((40, 3, 500), (10, 5, 200), (10, 5, 252), (128, 60, 100)):
        subsets = random_subsets(n, size, count, generator)
        assert subsets.shape == (count, n) and bool((subsets.sum(1) == size).all())
        assert torch.unique(subsets, dim=0).shape[0] == count
    # Each player is in a uniform subset with probability size / n.
    draws = torch.cat([random_subsets(8, 3, 40, generator) for _ in range(200)])
    frequency = draws.double().mean(0)
    assert float((frequency - 3 / 8).abs().max()) < 0.03


def test_ksii_keeps_the_size_of_large_pair_interactions() -> None:
    """Ridge shrinks a surrogate's large dividends with its small ones; the relaxed refit (the
    order-one dividends and the largest pairs, lightly regularised) keeps most of their size.
    On 40-player sum-of-unanimity games at 2,000 evaluations, the pairs whose k-SII exceeds
    0.4 are estimated at over 0.8 of their value on average (ridge alone: about 0.68)."""
    n = 40
    for seed in range(2):
        game = SumOfUnanimityGame.random(n, n_terms=2 * n, min_size=1, max_size=5, seed=seed)
        exact = game.exact("k-SII", order=2)
        truth = exact.values[1:] if exact.min_order == 0 else exact.values
        estimate = RegressionAdjustedKSII(order=2).approximate(game, budget=2000, seed=seed).values
        large = (truth[n:].abs() > 0.4).nonzero().flatten() + n
        assert large.numel() >= 10
        assert float((estimate[large] / truth[large]).mean()) > 0.8


# -- peers -----------------------------------------------------------------------------------------


def test_exact_results_equal_shapiq() -> None:
    shapiq = pytest.importorskip("shapiq")
    game = random_table_game(7, seed=9)
    computer = shapiq.ExactComputer(n_players=7, game=lambda c: game(
        torch.as_tensor(c, dtype=torch.bool).reshape(-1, 7)).numpy())
    for order, estimator in ((1, KernelSHAP()), (2, RegressionAdjustedKSII(order=2))):
        result = estimator.approximate(game, budget=2**7)
        theirs = computer("SV" if order == 1 else "k-SII", order=order)
        expected = [float(theirs[s]) for s in result.subsets]
        assert result.values.tolist() == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_at_least_as_accurate_as_shapiq() -> None:
    shapiq = pytest.importorskip("shapiq")
    n, budget = 14, 600
    ours_sv = ours_ksii = theirs_sv = theirs_ksii = 0.0
    for seed in range(3):
        game = soum(n=n, seed=seed, max_size=5)
        sv, ksii = game.exact("SV"), game.exact("k-SII", order=2)

        def call(c, game=game):
            return game(torch.as_tensor(c, dtype=torch.bool).reshape(-1, n)).numpy()

        kernel = shapiq.KernelSHAP(n, pairing_trick=True, random_state=seed).approximate(budget,
                                                                                        call)
        theirs_sv += sum((kernel[s] - v) ** 2 for s, v in zip(sv.subsets, sv.values.tolist(),
                                                               strict=True))
        iq = shapiq.KernelSHAPIQ(n, max_order=2, index="k-SII", random_state=seed)
        iq_values = iq.approximate(budget, call)
        theirs_ksii += sum((iq_values[s] - v) ** 2 for s, v in zip(
            ksii.subsets, ksii.values.tolist(), strict=True))
        ours = RegressionAdjustedKSII(order=1).approximate(game, budget=budget, seed=seed)
        ours_sv += float(((ours.values - sv.values) ** 2).sum())
        ours = RegressionAdjustedKSII(order=2).approximate(game, budget=budget, seed=seed)
        ours_ksii += float(((ours.values - ksii.values) ** 2).sum())
    assert ours_sv <= theirs_sv
    assert ours_ksii <= theirs_ksii
