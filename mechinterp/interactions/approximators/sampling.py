"""Stratified sampling of coalitions by size, without replacement, optionally paired.

The regression estimators draw coalitions size by size. A *unit* is one coalition ``S`` or, with
pairing, the pair ``(S, N \\ S)``; a *stratum* holds the units of one size (sizes ``s`` and
``n - s`` together when paired; at ``s = n/2`` a pair stays in its own size and is counted once,
by the member that holds player 0). The budget is shared among strata in proportion to a
per-size mass (the estimator's choice: the Shapley kernel, or uniform for leverage scores) by
water-filling: a stratum that can afford all its units is enumerated (the "border trick" of
good KernelSHAP implementations, which falls out of the allocation here), and what it does not
need goes to the others. Units within a stratum are distinct and uniformly random, so the
inclusion probability of each is exactly ``n_h / N_h`` and the estimators weight by its inverse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "StratifiedDesign",
    "Stratum",
    "allocate",
    "draw_units",
    "expand",
    "make_strata",
    "random_subsets",
]

# Enumerate a size's subsets (rather than draw and reject duplicates) when this many or fewer
# exist and a good share of them is wanted.
_ENUMERATE = 1 << 19


@dataclass(frozen=True)
class Stratum:
    """Units of one size.

    Attributes:
        size: size of the unit's first coalition (the smaller one when paired).
        paired: whether a unit is the pair ``(S, N \\ S)``.
        population: how many distinct units exist.
        share: relative mass, the allocation's weight per unit of budget.
    """

    size: int
    paired: bool
    population: int
    share: float

    @property
    def cost(self) -> int:
        """Evaluations per unit."""
        return 2 if self.paired else 1

    def ratio(self, n: int) -> float:
        """``population / C(n, size)``: 1, or 1/2 for the self-paired middle size."""
        return self.population / math.comb(n, self.size)


def make_strata(n: int, *, paired: bool, mass: Callable[[int], float]) -> list[Stratum]:
    """The strata of sizes ``1..n-1`` for ``n`` players.

    Args:
        n: number of players.
        paired: whether units are complementary pairs.
        mass: desired number of evaluations of each size, up to a common factor.
    """
    if not paired:
        return [Stratum(s, False, math.comb(n, s), mass(s)) for s in range(1, n)]
    strata = []
    for s in range(1, n // 2 + 1):
        if 2 * s < n:
            # One pair buys one coalition of each of the two sizes.
            strata.append(Stratum(s, True, math.comb(n, s), (mass(s) + mass(n - s)) / 2))
        else:
            # Both members have size n/2: one pair buys two coalitions of that size.
            strata.append(Stratum(s, True, math.comb(n, s) // 2, mass(s) / 2))
    return strata


def allocate(strata: list[Stratum], units: int) -> list[int]:
    """Units per stratum: proportional to ``share``, capped at ``population`` (water-filling).

    Capped strata are enumerated and their surplus goes to the rest; fractional parts are
    settled by largest remainder, so the total is exactly ``min(units, Σ population)``.
    """
    counts = [0] * len(strata)
    open_ = [i for i, st in enumerate(strata) if st.population > 0 and st.share > 0]
    left = units
    while open_ and left > 0:
        total = sum(strata[i].share for i in open_)
        full = [i for i in open_ if left * strata[i].share / total >= strata[i].population]
        if not full:
            ideal = {i: left * strata[i].share / total for i in open_}
            for i in open_:
                counts[i] = math.floor(ideal[i])
            spare = left - sum(counts[i] for i in open_)
            by_remainder = sorted(open_, key=lambda i: (counts[i] - ideal[i], i))
            for i in by_remainder[:spare]:
                counts[i] += 1
            break
        for i in full:
            counts[i] = strata[i].population
            left -= strata[i].population
        open_ = [i for i in open_ if i not in full]
    return counts


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """``[row, player]`` bool as ``[row, word]`` int64 keys (62 players per word)."""
    rows, n = mask.shape
    words = -(-n // 62)
    padded = torch.zeros(rows, words * 62, dtype=torch.int64)
    padded[:, :n] = mask.to(torch.int64)
    bits = 1 << torch.arange(62, dtype=torch.int64)
    return (padded.view(rows, words, 62) * bits).sum(2)


def random_subsets(n: int, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct, uniformly random subsets of ``size`` of ``n`` players, in random order.

    Returns:
        ``[count, n]`` bool.
    """
    population = math.comb(n, size)
    if count > population:
        msg = f"count must be at most C({n}, {size}) = {population}, got {count}"
        raise ValueError(msg)
    out = torch.zeros(count, n, dtype=torch.bool)
    if count == 0 or size == 0:
        return out
    if population <= _ENUMERATE and 3 * count >= population:
        # List the smaller side (a subset or its complement) of every subset of this size.
        side = min(size, n - size)
        listed = torch.tensor(list(itertools.combinations(range(n), side)),
                              dtype=torch.int64).reshape(population, side)
        chosen = listed[torch.randperm(population, generator=generator)[:count]]
        out.scatter_(1, chosen, True)
        return out if side == size else ~out
    # Draw more than needed and drop duplicates: with count <= population / 3 a round keeps
    # most of its draws, so this ends after a few rounds.
    kept = torch.zeros(0, n, dtype=torch.bool)
    while kept.shape[0] < count:
        extra = (count - kept.shape[0]) * 5 // 4 + 8
        order = torch.rand(extra, n, generator=generator).argsort(1)[:, :size]
        fresh = torch.zeros(extra, n, dtype=torch.bool).scatter_(1, order, True)
        both = torch.cat([kept, fresh])
        _, inverse = torch.unique(_pack(both), dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), both.shape[0], dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(both.shape[0]), reduce="amin")
        kept = both[first.sort().values]
    kept = kept[:count]
    return kept[torch.randperm(count, generator=generator)]


def draw_units(n: int, stratum: Stratum, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct random units of a stratum, as their first coalitions ``[count, n]``."""
    if stratum.paired and 2 * stratum.size == n:
        # One member of each pair holds player 0; draw that one, from the other n - 1 players.
        rest = random_subsets(n - 1, stratum.size - 1, count, generator)
        return torch.cat([torch.ones(count, 1, dtype=torch.bool), rest], dim=1)
    return random_subsets(n, stratum.size, count, generator)


def expand(units: torch.Tensor, paired: bool) -> torch.Tensor:
    """Coalitions of units: ``[unit, player]`` first members to ``[unit * cost, player]``,
    the two members of unit ``u`` at rows ``2u`` and ``2u + 1`` when paired."""
    if not paired:
        return units
    return torch.stack([units, ~units], dim=1).reshape(-1, units.shape[1])


class StratifiedDesign:
    """A planned stratified sample, evaluated in growing prefixes.

    Each stratum's planned units are in random order, so every prefix is itself a uniform
    sample without replacement of that stratum: an estimator may stop after any step and
    weight each evaluated unit by ``population / evaluated`` of its stratum.

    Args:
        n: number of players.
        strata: the strata.
        counts: planned units per stratum (from :func:`allocate`).
        generator: the sampling's random generator.
    """

    def __init__(self, n: int, strata: list[Stratum], counts: list[int],
                 generator: torch.Generator) -> None:
        self.n = n
        self.strata = strata
        self.counts = counts
        self.planned = [draw_units(n, st, c, generator) for st, c in zip(strata, counts,
                                                                          strict=True)]
        self.done = [0] * len(strata)
        self._coalitions: list[torch.Tensor] = [torch.zeros(0, n, dtype=torch.bool)
                                                for _ in strata]
        self._values: list[torch.Tensor] = [torch.zeros(0, dtype=torch.float64) for _ in strata]

    @property
    def total(self) -> int:
        """Planned units."""
        return sum(self.counts)

    def advance(self, units: int, evaluate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Evaluate until about ``units`` units are done, in one block of evaluations.

        Each step is spread as :func:`allocate` would spread its own budget (border sizes
        enumerated first), so an estimate that stops early is as good as one planned for
        that budget; water-filling allocations only grow with the budget, so steps nest.
        """
        step = allocate(self.strata, min(units, self.total))
        targets = [min(c, max(d, t)) for c, d, t in zip(self.counts, self.done, step,
                                                        strict=True)]
        if units >= self.total:
            targets = list(self.counts)
        blocks, pieces = [], []
        for h, (target, done) in enumerate(zip(targets, self.done, strict=True)):
            if target > done:
                coalitions = expand(self.planned[h][done:target], self.strata[h].paired)
                blocks.append(coalitions)
                pieces.append((h, coalitions))
        if not blocks:
            return
        values = evaluate(torch.cat(blocks))
        start = 0
        for h, coalitions in pieces:
            stop = start + coalitions.shape[0]
            self._coalitions[h] = torch.cat([self._coalitions[h], coalitions])
            self._values[h] = torch.cat([self._values[h], values[start:stop]])
            start = stop
        self.done = targets

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The evaluated coalitions so far.

        Returns:
            ``coalitions [row, player]`` bool, ``values [row]``, ``stratum [row]`` int64 and
            ``unit [row]`` int64 (units numbered across strata).
        """
        coalitions = torch.cat(self._coalitions)
        values = torch.cat(self._values)
        stratum = torch.cat([torch.full((c.shape[0],), h, dtype=torch.int64)
                             for h, c in enumerate(self._coalitions)])
        unit = torch.cat([torch.arange(c.shape[0]) // self.strata[h].cost
                          for h, c in enumerate(self._coalitions)])
        offsets = torch.tensor([0, *itertools.accumulate(self.done)][:-1], dtype=torch.int64)
        return coalitions, values, stratum, unit + offsets[stratum]

    def inverse_inclusion(self) -> torch.Tensor:
        """``[stratum]`` ``population / (C(n, size) · evaluated)``: the weight of an evaluated
        unit relative to a full enumeration, per coalition of its sizes."""
        return torch.tensor([st.ratio(self.n) / d if d else 0.0
                             for st, d in zip(self.strata, self.done, strict=True)],
                            dtype=torch.float64)

    def variance_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per stratum, the factor ``(1 - n_h / N_h) · n_h / (n_h - 1)`` that turns the sum of
        squared centred unit totals into the variance of the stratum's estimated total, and
        the variance group of each stratum.

        A stratum with one evaluated unit (and not enumerated) cannot estimate its own
        variance; such strata are collapsed into one group (with a neighbour when alone), the
        standard conservative estimator of survey sampling.
        """
        groups = list(range(len(self.strata)))
        factors = []
        lonely = [h for h, (st, d) in enumerate(zip(self.strata, self.done, strict=True))
                  if d == 1 and st.population > 1]
        if len(lonely) == 1:
            h = lonely[0]
            neighbours = [g for g in range(len(self.strata)) if self.done[g] >= 2 and g != h]
            if neighbours:
                lonely.append(min(neighbours, key=lambda g: abs(g - h)))
        for h in lonely:
            groups[h] = lonely[0]
        for h, (st, d) in enumerate(zip(self.strata, self.done, strict=True)):
            members = sum(self.done[g] for g in range(len(self.strata)) if groups[g] == groups[h])
            remaining = 1.0 - d / st.population if st.population else 0.0
            if h in lonely:
                remaining = 1.0
            if members > 1:
                factors.append(remaining * members / (members - 1))
            else:
                # A lone sampled unit says nothing about its spread: the variance is unknown.
                factors.append(math.nan if remaining > 0 else 0.0)
        return torch.tensor(factors, dtype=torch.float64), torch.tensor(groups)

    def sampled(self) -> torch.Tensor:
        """``[stratum]`` bool: the stratum is sampled (not every unit evaluated)."""
        return torch.tensor([d < st.population for st, d in zip(self.strata, self.done,
                                                                 strict=True)])
