"""Shapley values as the solution of a weighted least-squares problem, from a stratified sample.

The Shapley value is the additive game closest to ``v`` under the Shapley kernel (Charnes et
al. 1988; Lundberg & Lee 2017):

    φ = argmin Σ_{∅ ≠ S ≠ N} μ(|S|) (v(S) - v(∅) - Σ_{i ∈ S} φ_i)²   subject to Σ φ = v(N) - v(∅),

with ``μ(s) = (n - 1) / (C(n, s) s (n - s))``. The estimators here replace the sum over all
coalitions by a stratified sample (:mod:`.sampling`), each coalition weighted by ``μ`` over its
inclusion probability, and solve the constrained problem exactly: writing
``φ = Δ/n · 1 + Q θ`` with ``Q`` an orthonormal basis of ``{x : Σ x = 0}`` turns it into an
unconstrained least-squares problem in ``θ`` (the projection of Leverage SHAP), so efficiency
holds to rounding whatever the sample. With every coalition evaluated, the solution is the
Shapley value.

Standard errors come from the sandwich (delta-method) variance of the solution: the estimate
moves with the sampled weighted scores ``w x (y - x θ)`` through ``Q H⁻¹``, and those scores'
variance is the textbook variance of stratified sampling without replacement, computed from
the units' spread within each stratum (zero for enumerated strata). At budgets so small that
some sizes get no coalition at all, those sizes are missing from the regression: that is a bias
the standard errors do not show (with one coalition in all, they are NaN).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from functools import cache

import torch

from mechinterp.interactions.approximators.base import (
    Approximator,
    Estimate,
    Evaluator,
    lone_player,
    schedule,
)
from mechinterp.interactions.approximators.sampling import (
    StratifiedDesign,
    allocate,
    make_strata,
)

__all__ = ["ShapleyRegression", "regression_design", "stratified_variance", "sum_zero_basis"]


@cache
def sum_zero_basis(n: int) -> torch.Tensor:
    """``[n, n - 1]`` orthonormal basis of the vectors that sum to zero."""
    start = torch.eye(n, dtype=torch.float64)
    start[:, 0] = 1.0
    q, _ = torch.linalg.qr(start)
    return q[:, 1:].contiguous()


def stratified_variance(scores: torch.Tensor, stratum: torch.Tensor,
                        design: StratifiedDesign) -> torch.Tensor:
    """Variance of ``Σ_rows scores`` under the design, per column.

    Args:
        scores: ``[row, column]`` each row's contribution to the estimated totals, already
            weighted by its inverse inclusion probability; rows in the order of
            :meth:`StratifiedDesign.data` (the coalitions of a unit adjacent).
        stratum: ``[row]`` stratum of each row.
        design: the sampling design.

    Returns:
        ``[column]`` variances.
    """
    cost = design.strata[0].cost if design.strata else 1
    totals = scores.reshape(-1, cost, scores.shape[1]).sum(1)
    unit_stratum = stratum[::cost]
    factors, groups = design.variance_factors()
    # Centre each unit's total on its variance group's mean (one-hot products: a handful of
    # groups, many units).
    member = torch.nn.functional.one_hot(groups[unit_stratum], len(design.strata)).to(totals)
    sizes = member.sum(0).clamp(min=1.0)
    centred = totals - member @ ((member.T @ totals) / sizes[:, None])
    return factors[unit_stratum] @ centred**2


def regression_design(design: StratifiedDesign, empty: float,
                      kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """The sampled rows of the Shapley-kernel regression.

    Args:
        design: the evaluated sample.
        empty: ``v(∅)``.
        kernel: ``[n + 1]`` the kernel's total mass per size (``C(n, s) μ(s)``).

    Returns:
        ``z [row, player]`` float64, ``y [row]`` (``v(S) - v(∅)``), ``w [row]`` regression
        weights, ``unit [row]`` and ``stratum [row]``.
    """
    coalitions, values, stratum, unit = design.data()
    z = coalitions.to(torch.float64)
    sizes = coalitions.sum(1)
    # μ(s) / P(S sampled) = C(n, s) μ(s) · N_h / (C(n, s) n_h): no factorial ever appears.
    w = kernel[sizes] * design.inverse_inclusion()[stratum]
    return z, values - empty, w, unit, stratum


def solve_shapley(design: StratifiedDesign, empty: float, full: float,
                  kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Efficient weighted least-squares Shapley values and their standard errors."""
    n = design.n
    z, y, w, _, stratum = regression_design(design, empty, kernel)
    q = sum_zero_basis(n)
    base = (full - empty) / n
    if z.shape[0] == 0:
        # Nothing sampled: the even split, with no way to tell its error.
        return torch.full((n,), base, dtype=torch.float64), torch.full((n,), math.nan,
                                                                       dtype=torch.float64)
    x = z @ q
    target = y - base * z.sum(1)
    root = w.sqrt()
    # gelsd returns the minimum-norm solution when a small sample leaves the problem
    # rank-deficient (θ = 0 there: the value splits evenly along unseen directions).
    theta = torch.linalg.lstsq(root[:, None] * x, (root * target)[:, None],
                               driver="gelsd").solution[:, 0]
    phi = base + q @ theta
    hessian = x.T @ (w[:, None] * x)
    sensitivity = q @ torch.linalg.pinv(hessian, hermitian=True)
    scores = (w * (target - x @ theta))[:, None] * x @ sensitivity.T
    variance = stratified_variance(scores, stratum, design)
    return phi, variance.clamp(min=0.0).sqrt()


class ShapleyRegression(Approximator):
    """Shapley values by constrained weighted least squares over a stratified sample.

    Subclasses choose how the budget is spread over coalition sizes (:meth:`size_mass`).

    Args:
        paired: sample complementary pairs ``(S, N \\ S)`` (halves the variance from the
            game's even-order part and is exact for games of order at most 2 when the sample
            covers enough pairs; see Mitchell et al. 2022, Covert & Lee 2021).
    """

    index = "SV"
    order = 1

    def __init__(self, *, paired: bool = True) -> None:
        self.paired = bool(paired)

    @abstractmethod
    def size_mass(self, n: int, size: int) -> float:
        """Desired evaluations of coalitions of ``size``, up to a common factor."""

    def minimum_budget(self, n_players: int) -> int:
        return 2

    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        n = evaluator.n_players
        empty, full = evaluator.ends()
        if n == 1:
            return lone_player(empty, full)
        strata = make_strata(n, paired=self.paired, mass=lambda s: self.size_mass(n, s))
        cost = 2 if self.paired else 1
        counts = allocate(strata, evaluator.remaining // cost)
        design = StratifiedDesign(n, strata, counts, generator)
        kernel = torch.tensor([0.0] + [(n - 1) / (s * (n - s)) for s in range(1, n)] + [0.0],
                              dtype=torch.float64)
        phi = torch.full((n,), (full - empty) / n, dtype=torch.float64)
        stderr = torch.full((n,), math.inf, dtype=torch.float64)
        for target in schedule(design.total, first=max(2 * n, design.total // 8),
                               tolerance=tolerance):
            design.advance(target, evaluator)
            phi, stderr = solve_shapley(design, empty, full, kernel)
            if tolerance is not None and float(stderr.max()) < tolerance:
                break
        return Estimate(phi, stderr, empty, full)

    def __repr__(self) -> str:
        return f"{self.name}(paired={self.paired})"
