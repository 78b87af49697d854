"""Stratified SVARM (Kolpaczki et al., AAAI 2024): Shapley values without marginal contributions.

The Shapley value splits into strata by coalition size:

    φ_i = (1/n) Σ_{ℓ=0}^{n-1} (φ⁺_{i,ℓ} - φ⁻_{i,ℓ}),

where ``φ⁺_{i,ℓ}`` is the mean of ``v(A)`` over coalitions ``A ∋ i`` of ``ℓ + 1`` players and
``φ⁻_{i,ℓ}`` the mean over ``A ∌ i`` of ``ℓ`` players. One evaluated coalition of size ``s``
updates a stratum of every player at once (``φ⁺_{i,s-1}`` for its members, ``φ⁻_{i,s}`` for the
others), which is what makes SVARM cheap. As in the paper, the strata of sizes ``0``, ``1``,
``n - 1`` and ``n`` are computed exactly (``2n + 2`` evaluations), a warm-up gives every other
stratum one sample (for each size ``s``: a random order cut into blocks of ``s`` players, and
the complements of blocks of ``n - s``). The rest of the budget goes to sizes by Neyman
allocation with the spread of each size measured on the warm-up (the paper draws sizes from a
fixed distribution; allocating by measured spread does the same job with the game's own
variances), without replacement within a size, enumerating the sizes it can afford.

A stratum still empty when the budget runs out (only at budgets below the warm-up's cost)
borrows the mean of all coalitions of its size, and failing that the interpolation between the
nearest evaluated sizes; its standard error then counts the spread of that size.
"""

from __future__ import annotations

import math

import torch

from mechinterp.interactions.approximators.base import Approximator, Estimate, Evaluator, schedule
from mechinterp.interactions.approximators.sampling import Stratum, allocate, random_subsets

__all__ = ["SVARM"]


class _Strata:
    """Running sums of values per (player, size) stratum, for members and for non-members."""

    def __init__(self, n: int) -> None:
        self.n = n
        shape = (n, n + 1)  # [player, coalition size]
        self.count = {True: torch.zeros(shape, dtype=torch.float64),
                      False: torch.zeros(shape, dtype=torch.float64)}
        self.total = {True: torch.zeros(shape, dtype=torch.float64),
                      False: torch.zeros(shape, dtype=torch.float64)}
        self.square = {True: torch.zeros(shape, dtype=torch.float64),
                       False: torch.zeros(shape, dtype=torch.float64)}
        self.exact = {True: torch.zeros(shape, dtype=torch.bool),
                      False: torch.zeros(shape, dtype=torch.bool)}

    def add(self, coalitions: torch.Tensor, values: torch.Tensor, *, exact: bool = False) -> None:
        sizes = torch.nn.functional.one_hot(coalitions.sum(1), self.n + 1).to(torch.float64)
        for member in (True, False):
            inside = (coalitions if member else ~coalitions).to(torch.float64)
            self.count[member] += inside.T @ sizes
            self.total[member] += inside.T @ (values[:, None] * sizes)
            self.square[member] += inside.T @ (values[:, None] ** 2 * sizes)
            if exact:
                self.exact[member] |= (inside.T @ sizes) > 0

    def forget(self, sizes: list[int]) -> None:
        """Drop what was added for coalitions of these sizes."""
        members, others = torch.tensor(sizes), torch.tensor(sizes)
        for table in (self.count, self.total, self.square):
            table[True][:, members] = 0.0
            table[False][:, others] = 0.0

    def _size_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of all evaluated coalitions of each size (interpolated when none)."""
        # Each coalition of size s is counted once per member: divide by s (or by n - s for the
        # non-member tables) to recover per-coalition sums; sizes 0 and n come from the other.
        sizes = torch.arange(self.n + 1, dtype=torch.float64)
        members = self.count[True].sum(0) / sizes.clamp(min=1)
        others = self.count[False].sum(0) / (self.n - sizes).clamp(min=1)
        count = torch.where(sizes == 0, others, members)
        total = torch.where(sizes == 0, self.total[False].sum(0) / self.n,
                            self.total[True].sum(0) / sizes.clamp(min=1))
        square = torch.where(sizes == 0, self.square[False].sum(0) / self.n,
                             self.square[True].sum(0) / sizes.clamp(min=1))
        known = count > 0
        mean = torch.where(known, total / count.clamp(min=1), 0.0)
        spread = torch.where(count > 1, (square - count * mean**2) / (count - 1).clamp(min=1), 0.0)
        have = torch.nonzero(known).flatten()
        for s in torch.nonzero(~known).flatten().tolist():
            below, above = have[have < s], have[have > s]
            if below.numel() and above.numel():
                lo, hi = int(below.max()), int(above.min())
                mean[s] = mean[lo] + (mean[hi] - mean[lo]) * (s - lo) / (hi - lo)
                spread[s] = max(float(spread[lo]), float(spread[hi]))
            elif have.numel():
                near = int(have[(have - s).abs().argmin()])
                mean[s], spread[s] = mean[near], spread[near]
        # A size seen once has no spread of its own: borrow the largest seen (conservative), or
        # admit it is unknown when no size has been seen twice.
        largest = float(spread.max()) if bool((spread > 0).any()) else math.nan
        return mean, torch.where(spread > 0, spread, largest)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapley values and standard errors from the strata."""
        n = self.n
        size_mean, size_spread = self._size_means()
        means, variances = {}, {}
        for member in (True, False):
            count, total, square = self.count[member], self.total[member], self.square[member]
            mean = torch.where(count > 0, total / count.clamp(min=1), size_mean.expand(n, -1))
            spread = (square - count * mean**2) / (count - 1).clamp(min=1)
            spread = torch.where(count > 1, spread.clamp(min=0.0), size_spread.expand(n, -1))
            variance = spread / count.clamp(min=1)
            variances[member] = torch.where(self.exact[member], 0.0, variance)
            means[member] = mean
        # φ⁺_{i,ℓ} uses size ℓ + 1 (sizes 1..n), φ⁻_{i,ℓ} size ℓ (sizes 0..n-1).
        values = (means[True][:, 1:].sum(1) - means[False][:, :n].sum(1)) / n
        variance = (variances[True][:, 1:].sum(1) + variances[False][:, :n].sum(1)) / n**2
        return values, variance.sqrt()


class SVARM(Approximator):
    """Shapley values by stratified SVARM.

    Args:
        warm_up: give every stratum one sample before sampling freely (as in the paper).

    Examples:
        >>> from mechinterp.interactions.games import SumOfUnanimityGame
        >>> game = SumOfUnanimityGame.random(10, n_terms=6, max_size=3, seed=2)
        >>> result = SVARM().approximate(game, budget=400, seed=0)
        >>> result.evaluations, bool((result.values - game.exact("SV").values).abs().max() < 0.5)
        (400, True)
    """

    index = "SV"
    order = 1
    enumerate_when_affordable = True

    def __init__(self, *, warm_up: bool = True) -> None:
        self.warm_up = bool(warm_up)

    def minimum_budget(self, n_players: int) -> int:
        return 2

    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        n = evaluator.n_players
        strata = _Strata(n)
        ends = torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
        values = evaluator(ends)
        strata.add(ends, values, exact=True)
        empty, full = float(values[0]), float(values[1])
        sampled_sizes = list(range(1, n))
        if n >= 2 and evaluator.remaining >= 2 * n:
            borders = torch.cat([torch.eye(n, dtype=torch.bool), ~torch.eye(n, dtype=torch.bool)])
            if n == 2:
                borders = borders[:2]
            strata.add(borders, evaluator(borders), exact=True)
            sampled_sizes = list(range(2, n - 1))
        if self.warm_up and sampled_sizes:
            warm = self._warm_up(n, sampled_sizes, generator, evaluator.remaining)
            if warm.shape[0]:
                strata.add(warm, evaluator(warm))
        if sampled_sizes and evaluator.remaining:
            self._sample(evaluator, generator, tolerance, strata, sampled_sizes)
        phi, stderr = strata.estimate()
        return Estimate(phi, stderr, empty, full)

    @staticmethod
    def _sample(evaluator: Evaluator, generator: torch.Generator, tolerance: float | None,
                strata: _Strata, sizes: list[int]) -> None:
        """Spend the rest of the budget on sizes by Neyman allocation.

        A coalition of size ``s`` feeds ``s`` strata ``φ⁺`` and ``n - s`` strata ``φ⁻``, so the
        variance it removes from ``Σ_i Var(φ_i)`` is proportional to ``σ_s² (1/s + 1/(n-s))``;
        drawing ``m_s ∝ σ_s sqrt(n / (s (n - s)))`` coalitions of size ``s`` minimises the sum
        (``σ_s``: the spread of ``v`` over coalitions of that size, estimated from the
        warm-up). Sizes whose share covers all their coalitions are enumerated, exactly; the
        others are drawn without replacement within the size.
        """
        n = evaluator.n_players
        _, spread = strata._size_means()
        deviation = spread.nan_to_num(nan=0.0).sqrt()
        fallback = float(deviation[deviation > 0].median()) if bool((deviation > 0).any()) else 1.0
        plan = [Stratum(s, False, math.comb(n, s),
                        (float(deviation[s]) or fallback) * math.sqrt(n / (s * (n - s))))
                for s in sizes]
        counts = allocate(plan, evaluator.remaining)
        whole = [st for st, c in zip(plan, counts, strict=True) if c == st.population]
        if whole:
            # Enumerated sizes replace their warm-up samples: their strata become exact.
            strata.forget([st.size for st in whole])
            block = torch.cat([random_subsets(n, st.size, st.population, generator)
                               for st in whole])
            strata.add(block, evaluator(block), exact=True)
        rows = [random_subsets(n, st.size, c, generator)
                for st, c in zip(plan, counts, strict=True) if 0 < c < st.population]
        if not rows:
            return
        planned = torch.cat(rows)
        planned = planned[torch.randperm(planned.shape[0], generator=generator)]
        done = 0
        for target in schedule(planned.shape[0], first=max(4 * n, planned.shape[0] // 8),
                               tolerance=tolerance):
            block = planned[done:target]
            strata.add(block, evaluator(block))
            done = target
            if tolerance is not None and float(strata.estimate()[1].max()) < tolerance:
                break

    @staticmethod
    def _warm_up(n: int, sizes: list[int], generator: torch.Generator,
                 budget: int) -> torch.Tensor:
        """Coalitions that give each (player, size) stratum a sample, as many as ``budget``
        allows, sizes in random order so that a short budget favours none."""
        rows = []
        for s in torch.tensor(sizes)[torch.randperm(len(sizes), generator=generator)].tolist():
            for block, complement in ((s, False), (n - s, True)):
                order = torch.randperm(n, generator=generator)
                blocks = math.ceil(n / block)
                # Cut the order into blocks of `block` players, the last one wrapping around.
                index = (torch.arange(blocks)[:, None] * block + torch.arange(block)) % n
                coalitions = torch.zeros(blocks, n, dtype=torch.bool)
                coalitions.scatter_(1, order[index], True)
                rows.append(~coalitions if complement else coalitions)
        if not rows:
            return torch.zeros(0, n, dtype=torch.bool)
        return torch.cat(rows)[:budget]

    def __repr__(self) -> str:
        return f"{self.name}(warm_up={self.warm_up})"
