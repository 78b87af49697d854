"""Permutation sampling of Shapley values, with antithetic (reversed) permutations.

The Shapley value is a player's marginal contribution averaged over the orders in which the
players can join. One random order costs ``n - 1`` evaluations (the prefixes of sizes ``1..n-1``;
``∅`` and ``N`` are shared by all orders) and gives every player one contribution, so the
estimate is efficient by construction. Pairing each order with its reverse (Mitchell et al.
2022) cancels the even-order part of the game: one antithetic pair is already exact for games
with interactions of order at most 2, since of two players in a pairwise term, each comes
second in exactly one of the two orders.
"""

from __future__ import annotations

import math

import torch

from mechinterp.interactions.approximators.base import (
    Approximator,
    Estimate,
    Evaluator,
    lone_player,
    schedule,
)

__all__ = ["PermutationSamplingSV"]


class PermutationSamplingSV(Approximator):
    """Shapley values by sampling orders of the players, antithetic pairs by default.

    Each round evaluates the prefixes of all its orders in one block. The standard error is the
    spread of the per-pair (or per-order) estimates over the square root of their number; it
    needs two of them (NaN before).

    Args:
        antithetic: pair each random order with its reverse.

    Examples:
        >>> from mechinterp.interactions.games import SumOfUnanimityGame
        >>> game = SumOfUnanimityGame([(0, 1), (2,), (1, 3)], [1.0, 2.0, -1.0], n_players=5)
        >>> PermutationSamplingSV().approximate(game, budget=10, seed=0).values.tolist()
        [0.5, 0.0, 2.0, -0.5, 0.0]
    """

    index = "SV"
    order = 1
    enumerate_when_affordable = True

    def __init__(self, *, antithetic: bool = True) -> None:
        self.antithetic = bool(antithetic)

    def _per_unit(self, n: int) -> int:
        return (n - 1) * (2 if self.antithetic else 1)

    def minimum_budget(self, n_players: int) -> int:
        return 2 + self._per_unit(n_players)

    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        n = evaluator.n_players
        empty, full = evaluator.ends()
        if n == 1:
            return lone_player(empty, full)
        units = evaluator.remaining // self._per_unit(n)
        estimates = torch.zeros(0, n, dtype=torch.float64)
        for target in schedule(units, first=max(2, units // 8), tolerance=tolerance):
            fresh = self._units(evaluator, generator, target - estimates.shape[0], empty, full)
            estimates = torch.cat([estimates, fresh])
            stderr = self._stderr(estimates)
            if tolerance is not None and float(stderr.max()) < tolerance:
                break
        return Estimate(estimates.mean(0), self._stderr(estimates), empty, full)

    @staticmethod
    def _stderr(estimates: torch.Tensor) -> torch.Tensor:
        count = estimates.shape[0]
        if count < 2:
            return torch.full((estimates.shape[1],), math.nan, dtype=torch.float64)
        return estimates.std(0, correction=1) / math.sqrt(count)

    def _units(self, evaluator: Evaluator, generator: torch.Generator, count: int,
               empty: float, full: float) -> torch.Tensor:
        """``[unit, player]`` Shapley estimates of ``count`` new orders (or antithetic pairs)."""
        n = evaluator.n_players
        orders = torch.rand(count, n, generator=generator).argsort(1)
        if self.antithetic:
            orders = torch.stack([orders, orders.flip(1)], dim=1).reshape(-1, n)
        position = orders.argsort(1)
        sizes = torch.arange(1, n, dtype=torch.int64)
        # Row (r, k) holds the first k + 1 players of order r.
        prefixes = position[:, None, :] < sizes[None, :, None]
        values = evaluator(prefixes.reshape(-1, n)).reshape(-1, n - 1)
        chain = torch.cat([torch.full((orders.shape[0], 1), empty, dtype=torch.float64), values,
                           torch.full((orders.shape[0], 1), full, dtype=torch.float64)], dim=1)
        marginal = chain.diff(dim=1)  # [order, position]: what the player at that position adds
        contributions = torch.zeros(orders.shape[0], n, dtype=torch.float64)
        contributions.scatter_(1, orders, marginal)
        if self.antithetic:
            contributions = contributions.reshape(-1, 2, n).mean(1)
        return contributions

    def __repr__(self) -> str:
        return f"{self.name}(antithetic={self.antithetic})"
