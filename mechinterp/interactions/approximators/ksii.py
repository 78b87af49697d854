"""k-SII from a regression surrogate plus an unbiased sampled correction.

Why not a plain weighted regression: the Shapley value is the solution of the Shapley-kernel
least-squares problem, but k-SII (k >= 2) is not known to be the solution of any weighted
least-squares problem -- KernelSHAP-IQ (Fumagalli et al. 2024) proves a residual-regression
form for pairs and only conjectures it for higher orders, and is exact at full budget only
where that form holds. Here regression does what it is good at, explaining most of the game,
and sampling corrects what it misses without bias (the regression-adjusted Monte Carlo scheme
of Witter, Liu & Musco 2025, with a k-additive surrogate and k-SII's coefficients):

1. Coalitions are drawn as for Leverage SHAP: the budget spread evenly over sizes, complementary
   pairs, without replacement, sizes that fit enumerated.
2. A surrogate ``g`` with Harsanyi dividends only on coalitions of at most ``K`` players is
   fitted to the sample by ridge-regularised weighted least squares (each size weighted
   equally). Its k-SII is exact and cheap: a dividend of ``T`` credits each ``S ⊆ T`` with a
   closed-form weight.
3. k-SII is linear in the game, ``k-SII(S) = Σ_T γ_S(T) v(T)`` with ``γ`` depending only on
   ``|S|``, ``|T|`` and ``|S ∩ T|`` (:func:`coalition_weights`). So ``k-SII(v) = k-SII(g) +
   Σ_T γ_S(T) r(T)`` for the residual ``r = v - g``; the sum is exact over enumerated sizes and
   estimated by inverse-inclusion (Horvitz-Thompson) weighting over sampled ones, with the
   stratified-sampling variance as the standard error.

The identity in 3 holds for any surrogate, so a budget that covers every coalition gives the
exact k-SII; a surrogate close to the game only shrinks the variance. In sampled sizes the
residual of a unit is taken leave-one-unit-out (closed form for ridge regression), so that a
surrogate flexible enough to fit its own sample does not hide the error it makes elsewhere;
the surrogate's order ``K`` and ridge strength are chosen among a few candidates by the
variance they leave, measured with those honest residuals. The estimate is efficient (sums to
``v(N) - v(∅)``): the ``γ`` of every coalition other than ``∅`` and ``N`` sum to zero over ``S``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch

from mechinterp.errors import InputError
from mechinterp.interactions.approximators.base import Approximator, Estimate, Evaluator, schedule
from mechinterp.interactions.approximators.regression import stratified_variance
from mechinterp.interactions.approximators.sampling import (
    StratifiedDesign,
    allocate,
    make_strata,
)
from mechinterp.interactions.games import _bernoulli, index_from_dividends
from mechinterp.interactions.subsets import count_up_to, subsets_up_to

__all__ = ["RegressionAdjustedKSII", "coalition_weights"]

# Work held in memory at once when crediting sampled coalitions to target subsets.
_CHUNK = 1 << 22
# Ridge strengths tried, relative to the mean diagonal of the weighted Gram matrix.
_RIDGES = (1e-6, 1e-2, 1e-1, 1.0)
# The surrogate's order is chosen by variance among orders with at most this many dividends
# per evaluated coalition (more only adds cost: the leave-one-out residuals then blow up).
_FEATURES_PER_ROW = 4
# Targets used to compare candidate surrogates (all of them when fewer).
_SELECTION_TARGETS = 128


def _sii(n: int, s: int, t: int, a: int) -> Fraction:
    """Coefficient of ``v(T)`` in SII(S): ``|S| = s``, ``|T| = t``, ``|S ∩ T| = a``."""
    outside = t - a
    return Fraction((-1) ** (s - a) * math.factorial(outside) * math.factorial(n - outside - s),
                    math.factorial(n - s + 1))


@cache
def coalition_weights(n: int, order: int) -> torch.Tensor:
    """``[s, t, a]`` coefficient of ``v(T)`` in k-SII(S), times ``C(n, t)``.

    ``s = |S|`` in ``1..order`` (row 0 unused), ``t = |T|``, ``a = |S ∩ T|``. k-SII(S) is
    ``Σ_ℓ B_ℓ Σ_{W ⊆ N \\ S, |W| = ℓ} SII(S ∪ W)``; grouping the ``W`` by how many of their
    players lie in ``T`` leaves a sum of binomials. The factor ``C(n, t)`` keeps the entries of
    order one at any ``n`` (the coefficients themselves shrink like ``1 / C(n, t)``).

    Examples:
        >>> coalition_weights(3, 1)[1, :, 1].tolist()  # SV: v(T) with i ∈ T weighs 1 / (t C(n, t))
        [0.0, 1.0, 0.5, 0.3333333333333333]
    """
    bernoulli = _bernoulli(order + 1)
    out = torch.zeros(order + 1, n + 1, order + 1, dtype=torch.float64)
    for s in range(1, order + 1):
        for t in range(n + 1):
            for a in range(max(0, s + t - n), min(s, t) + 1):
                total = Fraction(0)
                for ell in range(order - s + 1):
                    for j in range(ell + 1):
                        ways = math.comb(t - a, j) * math.comb(n - s - (t - a), ell - j)
                        if ways:
                            total += bernoulli[ell] * ways * _sii(n, s + ell, t, a + j)
                out[s, t, a] = float(total * math.comb(n, t))
    return out


def _subsets(n: int, size: int) -> torch.Tensor:
    """``[subset, size]`` players of the subsets of one size, canonical order."""
    return torch.tensor(subsets_up_to(n, size, min_order=size),
                        dtype=torch.int64).reshape(-1, size)


def _contains(z: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """``[row, subset]`` 1.0 where coalition ``row`` contains the subset."""
    out = torch.ones(z.shape[0], subsets.shape[0], dtype=torch.float64)
    for column in range(subsets.shape[1]):
        out = out * z[:, subsets[:, column]]
    return out


def _ridge(x: torch.Tensor, target: torch.Tensor, ridge: float, total: float,
           sampled: torch.Tensor, cost: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Ridge regression with coefficients summing to ``total``, and leave-one-unit-out residuals.

    Solves ``min |x a - target|² + λ |a|²`` subject to ``Σ a = total`` (``λ`` is ``ridge``
    times the mean diagonal of ``xᵀx``): the unconstrained solution moved along ``G⁻¹ 1``, with
    ``G = xᵀx + λI``. For the rows ``u`` of a sampled unit, the residual with the unit left
    out of the fit is ``(I - H_uu)⁻¹ e_u`` for the hat matrix ``H = x G⁻¹ xᵀ - q qᵀ``,
    ``q = x G⁻¹ 1 / sqrt(1ᵀ G⁻¹ 1)`` (the constraint's share). With more coefficients than
    rows the same quantities come from the ``rows × rows`` matrix ``x xᵀ + λI`` (Woodbury), so
    the cost is cubic in the smaller of the two.

    Returns:
        ``(coefficients, residual, honest)``, residuals in the weighted scale of ``target``;
        ``None`` when the regularised matrix is not positive definite.
    """
    rows, width = x.shape
    ones = torch.ones(width, dtype=torch.float64)
    if width <= rows:
        gram = x.T @ x
        strength = ridge * (float(gram.diagonal().mean()) or 1.0)
        gram.diagonal().add_(strength)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info):
            return None
        free = torch.cholesky_solve((x.T @ target)[:, None], chol)[:, 0]
        toward = torch.cholesky_solve(ones[:, None], chol)[:, 0]
    else:
        kernel = x @ x.T
        strength = ridge * (float(kernel.diagonal().sum()) / width or 1.0)
        kernel.diagonal().add_(strength)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info):
            return None
        free = x.T @ torch.cholesky_solve(target[:, None], chol)[:, 0]
        toward = (ones - x.T @ torch.cholesky_solve((x @ ones)[:, None], chol)[:, 0]) / strength
    coefficients = free - toward * (float(free.sum()) - total) / float(toward.sum())
    residual = target - x @ coefficients
    honest = residual.clone()
    if not bool(sampled.any()):
        return coefficients, residual, honest
    units = int(sampled.sum()) // cost
    pull = (x[sampled] @ toward / math.sqrt(float(toward.sum()))).reshape(units, cost, 1)
    if width <= rows:
        factor = torch.linalg.solve_triangular(chol, x[sampled].T, upper=False)
        blocks = factor.T.reshape(units, cost, -1)
        keep = torch.eye(cost, dtype=torch.float64) - blocks @ blocks.transpose(1, 2)
    else:
        # I - x G⁻¹ xᵀ = λ (x xᵀ + λI)⁻¹: only the diagonal blocks of the inverse are needed.
        inverse = torch.cholesky_inverse(chol)
        index = torch.nonzero(sampled).flatten().reshape(units, cost)
        keep = strength * inverse[index[:, :, None], index[:, None, :]]
    keep = keep + pull @ pull.transpose(1, 2)
    honest[sampled] = torch.linalg.solve(keep, residual[sampled].reshape(units, cost, 1)).reshape(-1)
    return coefficients, residual, honest


class _Candidate:
    """One surrogate: its dividends, and the residuals of the sample under it.

    ``residual`` is the in-sample residual (the estimate uses it, so that with dividends of
    order 1 and the Shapley kernel the estimate is exactly the Shapley regression's);
    ``honest`` replaces it by the leave-one-unit-out residual in sampled strata (the variance
    uses it, so that a surrogate that fits its own sample does not look better than it is).
    """

    def __init__(self, order: int, dividends: torch.Tensor, masks: torch.Tensor,
                 residual: torch.Tensor, honest: torch.Tensor) -> None:
        self.order = order
        self.dividends = dividends
        self.masks = masks
        self.residual = residual
        self.honest = honest


class RegressionAdjustedKSII(Approximator):
    """k-SII (Shapley values for ``order=1``) by a regression surrogate and a sampled correction.

    Args:
        order: the order ``k`` of k-SII; 1 gives Shapley values.
        surrogate_order: order of the surrogate's dividends; ``None`` chooses among
            ``0..order + 2`` by the variance each leaves (0 is plain stratified sampling).
        max_features: most dividends a surrogate may have (bounds the regression's cost).
        paired: sample complementary pairs ``(S, N \\ S)``.

    Examples:
        >>> from mechinterp.interactions.games import SumOfUnanimityGame
        >>> game = SumOfUnanimityGame.random(8, n_terms=10, max_size=4, seed=0)
        >>> exact = game.exact("k-SII", order=2)
        >>> full = RegressionAdjustedKSII(order=2).approximate(game, budget=2**8, seed=0)
        >>> float((full.values - exact.values).abs().max()) < 1e-10
        True
        >>> sv = RegressionAdjustedKSII(order=1).approximate(game, budget=100, seed=0)
        >>> sv.index, sv.evaluations
        ('SV', 100)
    """

    def __init__(self, *, order: int = 2, surrogate_order: int | None = None,
                 max_features: int = 1024, paired: bool = True) -> None:
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            msg = f"order must be an int >= 1, got {order!r}"
            raise InputError(msg)
        if surrogate_order is not None and (not isinstance(surrogate_order, int)
                                            or isinstance(surrogate_order, bool)
                                            or surrogate_order < 0):
            msg = f"surrogate_order must be a non-negative int or None, got {surrogate_order!r}"
            raise InputError(msg)
        if not isinstance(max_features, int) or isinstance(max_features, bool) or max_features < 0:
            msg = f"max_features must be a non-negative int, got {max_features!r}"
            raise InputError(msg)
        self.order = order
        self.index = "SV" if order == 1 else "k-SII"
        self.surrogate_order = surrogate_order
        self.max_features = max_features
        self.paired = bool(paired)

    def minimum_budget(self, n_players: int) -> int:
        return 2

    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        n = evaluator.n_players
        ends = evaluator(torch.stack([torch.zeros(n, dtype=torch.bool),
                                      torch.ones(n, dtype=torch.bool)]))
        empty, full = float(ends[0]), float(ends[1])
        strata = make_strata(n, paired=self.paired, mass=lambda s: 1.0)
        cost = 2 if self.paired else 1
        design = StratifiedDesign(n, strata, allocate(strata, evaluator.remaining // cost),
                                  generator)
        targets = [(s, _subsets(n, s)) for s in range(1, self.order + 1)]
        selection = self._selection_targets(targets, generator)
        values = stderr = None
        for step in schedule(design.total, first=max(4 * n, design.total // 8),
                             tolerance=tolerance):
            design.advance(step, evaluator)
            values, stderr = self._solve(design, empty, full, targets, selection)
            if tolerance is not None and float(stderr.max()) < tolerance:
                break
        return Estimate(values, stderr, empty, full)

    @staticmethod
    def _selection_targets(targets: list[tuple[int, torch.Tensor]],
                           generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
        total = sum(t.shape[0] for _, t in targets)
        if total <= _SELECTION_TARGETS:
            return targets
        keep = []
        for s, subsets in targets:
            count = max(1, round(_SELECTION_TARGETS * subsets.shape[0] / total))
            chosen = torch.randperm(subsets.shape[0], generator=generator)[:count]
            keep.append((s, subsets[chosen.sort().values]))
        return keep

    def _orders(self, n: int, rows: int) -> list[int]:
        if self.surrogate_order is not None:
            return [min(self.surrogate_order, n)]
        return [k for k in range(min(self.order + 2, n) + 1)
                if count_up_to(n, k, min_order=1) <= min(self.max_features,
                                                         _FEATURES_PER_ROW * rows)]

    def _candidates(self, design: StratifiedDesign, z: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor, sampled: torch.Tensor, delta: float):
        """Yield the candidate surrogates, one per (order, ridge strength).

        Each is fitted by Shapley-kernel weighted ridge regression with its dividends summing
        to ``v(N) - v(∅)``, so that it is exact on ``∅`` and ``N``; with dividends of order 1
        this is the Shapley regression itself, and the correction then vanishes.
        """
        n, cost = design.n, design.strata[0].cost if design.strata else 1
        root = weight.sqrt()
        unweight = root.clamp(min=1e-300)
        for k in self._orders(n, z.shape[0]):
            if k == 0:
                yield _Candidate(0, torch.zeros(0, dtype=torch.float64),
                                 torch.zeros(0, n, dtype=torch.bool), y, y)
                continue
            terms = [_subsets(n, size) for size in range(1, k + 1)]
            x = root[:, None] * torch.cat([_contains(z, t) for t in terms], dim=1)
            masks = torch.cat([torch.zeros(t.shape[0], n, dtype=torch.bool).scatter_(1, t, True)
                               for t in terms])
            for ridge in _RIDGES if self.surrogate_order is None else _RIDGES[:1]:
                fit = _ridge(x, root * y, ridge, delta, sampled, cost)
                if fit is not None:
                    dividends, residual, honest = fit
                    yield _Candidate(k, dividends, masks, residual / unweight, honest / unweight)

    def _correction(self, design: StratifiedDesign, z: torch.Tensor, sizes: torch.Tensor,
                    scale: torch.Tensor, residual_full: float,
                    targets: list[tuple[int, torch.Tensor]],
                    stratum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimated ``Σ_T γ_S(T) r(T)`` and its variance for each target ``S``."""
        gamma = coalition_weights(design.n, self.order)
        estimates, variances = [], []
        step = max(1, _CHUNK // max(1, z.shape[0]))
        for s, subsets in targets:
            for start in range(0, subsets.shape[0], step):
                block = subsets[start:start + step]
                incidence = torch.zeros(design.n, block.shape[0], dtype=torch.float64)
                incidence.scatter_(0, block.T, 1.0)
                overlap = (z @ incidence).round().to(torch.int64)
                scores = scale[:, None] * gamma[s][sizes[:, None], overlap]
                estimates.append(scores.sum(0) + gamma[s, design.n, s] * residual_full)
                if scores.shape[0]:
                    variances.append(stratified_variance(scores, stratum, design))
                else:
                    variances.append(torch.full((block.shape[0],), math.nan, dtype=torch.float64))
        return torch.cat(estimates), torch.cat(variances)

    def _solve(self, design: StratifiedDesign, empty: float, full: float,
               targets: list[tuple[int, torch.Tensor]],
               selection: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        coalitions, values, stratum, _ = design.data()
        z = coalitions.to(torch.float64)
        y = values - empty
        sizes = coalitions.sum(1)
        inclusion = design.inverse_inclusion()[stratum]
        sampled = design.sampled()[stratum]
        kernel = torch.tensor([0.0] + [1.0 / (s * (design.n - s)) for s in range(1, design.n)]
                              + [0.0], dtype=torch.float64)
        weight = kernel[sizes] * inclusion
        delta = full - empty
        best, best_variance = None, math.inf
        for candidate in self._candidates(design, z, y, weight, sampled, delta):
            rest = delta - float(candidate.dividends.sum())
            _, variance = self._correction(design, z, sizes, inclusion * candidate.honest, rest,
                                           selection, stratum)
            total = float(variance.nan_to_num(nan=math.inf).sum())
            if best is None or total < best_variance:
                best, best_variance = candidate, total
        rest = delta - float(best.dividends.sum())
        correction, _ = self._correction(design, z, sizes, inclusion * best.residual, rest,
                                         targets, stratum)
        _, variance = self._correction(design, z, sizes, inclusion * best.honest, rest, targets,
                                       stratum)
        if best.order:
            base = index_from_dividends(best.masks, best.dividends, "k-SII", self.order,
                                        min_order=1)
        else:
            base = torch.zeros_like(correction)
        return base + correction, variance.clamp(min=0.0).sqrt()

    def __repr__(self) -> str:
        return (f"{self.name}(order={self.order}, surrogate_order={self.surrogate_order}, "
                f"max_features={self.max_features}, paired={self.paired})")
