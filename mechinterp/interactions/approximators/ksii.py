"""k-SII from a regression surrogate plus a sampled correction (regression-adjusted sampling).

Why not a plain weighted regression: the Shapley value is the solution of the Shapley-kernel
least-squares problem, but k-SII (k >= 2) is not known to be the solution of any weighted
least-squares problem -- KernelSHAP-IQ (Fumagalli et al. 2024) proves a residual-regression
form for pairs and only conjectures it for higher orders, and is exact at full budget only
where that form holds. Here regression does what it is good at, explaining most of the game,
and sampling corrects what it misses (the regression-adjusted Monte Carlo scheme of Witter,
Liu & Musco 2025, with a k-additive surrogate and k-SII's coefficients):

1. Coalitions are drawn as for Leverage SHAP: the budget spread evenly over sizes, complementary
   pairs, without replacement, sizes that fit enumerated.
2. A surrogate ``g`` with Harsanyi dividends only on coalitions of at most ``K`` players is
   fitted to the sample by Shapley-kernel weighted ridge regression, its dividends summing to
   ``v(N) - v(∅)``. Its k-SII is exact and cheap: a dividend of ``T`` credits each ``S ⊆ T``
   with a closed-form weight. With ``K = 1`` this is the Shapley regression itself.
3. k-SII is linear in the game, ``k-SII(S) = Σ_T γ_S(T) v(T)`` with ``γ`` depending only on
   ``|S|``, ``|T|`` and ``|S ∩ T|`` (:func:`coalition_weights`). So ``k-SII(v) = k-SII(g) +
   Σ_T γ_S(T) r(T)`` for the residual ``r = v - g``; the sum is exact over enumerated sizes and
   estimated by inverse-inclusion (Horvitz-Thompson) weighting over sampled ones, with the
   stratified-sampling variance as the standard error.

The identity in 3 holds for any surrogate, so a budget that covers every coalition gives the
exact k-SII; a surrogate close to the game only shrinks the variance. In sampled sizes the
residual of a unit is also taken leave-one-unit-out (closed form for ridge regression) for the
variance, so that a surrogate flexible enough to fit its own sample does not hide the error it
makes elsewhere; the surrogate's order ``K`` (up to ``k + 2``) and ridge strength are chosen
among a few candidates by the variance they leave, measured with those honest residuals.

Two refinements keep many entries from few evaluations useful. The sampled corrections of
entries of order 2 and more are shrunk towards the surrogate by their own signal-to-noise
ratio (:func:`_garrote`; off with ``shrink=False``, which leaves the estimator unbiased for a
fixed surrogate). The singletons are not estimated directly, whose correction is the noisiest
of all, but from the Shapley value through ``φ_i = Σ_{S ∋ i} k-SII(S) / |S|``, which also
makes the estimate efficient (it sums to ``v(N) - v(∅)``).

Cost: a surrogate of ``p`` dividends fitted to ``m`` coalitions costs about
``min(p, m)² max(p, m)`` per candidate; ``max_features`` bounds ``p``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch

from mechinterp.errors import InputError
from mechinterp.interactions.approximators.base import (
    Approximator,
    Estimate,
    Evaluator,
    lone_player,
    schedule,
)
from mechinterp.interactions.approximators.regression import stratified_variance
from mechinterp.interactions.approximators.sampling import (
    StratifiedDesign,
    allocate,
    make_strata,
)
from mechinterp.interactions.games import index_from_dividends
from mechinterp.interactions.subsets import count_up_to, subsets_up_to
from mechinterp.interactions.weights import bernoulli_numbers

__all__ = ["RegressionAdjustedKSII", "coalition_weights"]

# Work held in memory at once when crediting sampled coalitions to target subsets.
_CHUNK = 1 << 22
# Ridge strengths tried, relative to the mean diagonal of the weighted Gram matrix.
_RIDGES = (1e-6, 1e-2, 1e-1, 1.0)
# The surrogate's order is chosen by variance among the orders whose dividends fit these
# bounds, per evaluated coalition and in all (the default of max_features). Up to the estimated
# order, whose interactions a lower order cannot carry, the bounds are generous (128 players,
# order-2 k-SII on the bench's SOUM games: 1,000 evaluations, error 1.22e-2 to 7.97e-3 with 16
# a row against 4); above it more only adds cost (the leave-one-out residuals blow up).
_FEATURES_PER_ROW_UP_TO_ORDER = 16
_FEATURES_PER_ROW_ABOVE_ORDER = 4
_MAX_FEATURES_UP_TO_ORDER = 16384
_MAX_FEATURES_ABOVE_ORDER = 4096
# A relaxed surrogate refits at most one dividend per this many evaluated coalitions.
_REFIT_ROWS_PER_FEATURE = 8
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
    bernoulli = bernoulli_numbers(order + 1)
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


class _Features:
    """The surrogate's design: ``[T ⊆ S]`` for every ``T`` of ``1..order`` players, each row
    scaled by ``root`` (the square root of its regression weight), held implicitly.

    Two coalitions share ``Σ_{t=1}^{order} C(|S ∩ S'|, t)`` features, so the rows' Gram matrix
    costs one ``[row, player] × [player, row]`` product (the kernel trick) however many
    features there are; the features themselves are only formed in column blocks.
    """

    def __init__(self, z: torch.Tensor, root: torch.Tensor, order: int) -> None:
        self.z, self.root, self.order = z, root, order
        self.terms = [_subsets(z.shape[1], size) for size in range(1, order + 1)]
        self.width = sum(t.shape[0] for t in self.terms)

    def _count(self, overlap: torch.Tensor) -> torch.Tensor:
        """``Σ_{t=1}^{order} C(overlap, t)``, elementwise."""
        total, term = torch.zeros_like(overlap), torch.ones_like(overlap)
        for t in range(1, self.order + 1):
            term = term * (overlap - t + 1) / t
            total = total + term
        return total

    def dense(self) -> torch.Tensor:
        """``[row, feature]`` the weighted features."""
        return self.root[:, None] * torch.cat([_contains(self.z, t) for t in self.terms], dim=1)

    def kernel(self) -> torch.Tensor:
        """``[row, row]`` the weighted features' Gram matrix ``x xᵀ``."""
        return self.root[:, None] * self._count(self.z @ self.z.T) * self.root[None, :]

    def row_sums(self) -> torch.Tensor:
        """``[row]`` ``x 1``."""
        return self.root * self._count(self.z.sum(1))

    def transpose_times(self, vector: torch.Tensor) -> torch.Tensor:
        """``[feature]`` ``xᵀ vector``, in column blocks."""
        scaled = self.root * vector
        step = max(1, _CHUNK // max(1, self.z.shape[0]))
        return torch.cat([scaled @ _contains(self.z, t[start:start + step])
                          for t in self.terms for start in range(0, t.shape[0], step)])

    def restricted(self, keep: torch.Tensor) -> _Features:
        """The same design with only the features ``keep`` (``[feature]`` bool)."""
        out = _Features.__new__(_Features)
        out.z, out.root, out.order = self.z, self.root, self.order
        chunks = keep.split([t.shape[0] for t in self.terms])
        out.terms = [t[chunk] for t, chunk in zip(self.terms, chunks, strict=True)]
        out.width = int(keep.sum())
        return out

    def masks(self) -> torch.Tensor:
        """``[feature, player]`` bool: the players of each feature's coalition."""
        n = self.z.shape[1]
        return torch.cat([torch.zeros(t.shape[0], n, dtype=torch.bool).scatter_(1, t, True)
                          for t in self.terms])


def _ridge(features: _Features, target: torch.Tensor, ridge: float, total: float,
           sampled: torch.Tensor, cost: int):
    """Ridge regression with coefficients summing to ``total``, and leave-one-unit-out residuals.

    Solves ``min |x a - target|² + λ |a|²`` subject to ``Σ a = total`` (``λ`` is ``ridge``
    times the mean diagonal of ``xᵀx``): the unconstrained solution moved along ``G⁻¹ 1``, with
    ``G = xᵀx + λI``. For the rows ``u`` of a sampled unit, the residual with the unit left
    out of the fit is ``(I - H_uu)⁻¹ e_u`` for the hat matrix ``H = x G⁻¹ xᵀ - q qᵀ``,
    ``q = x G⁻¹ 1 / sqrt(1ᵀ G⁻¹ 1)`` (the constraint's share). With more coefficients than
    rows the same quantities come from the ``rows × rows`` matrix ``x xᵀ + λI`` (Woodbury),
    so the cost is cubic in the smaller of the two.

    Returns:
        ``(residual, honest, coefficients)`` -- residuals in the weighted scale of ``target``,
        ``coefficients`` a function computing them (the dual form needs a pass over the
        features) -- or ``None`` when the regularised matrix is not positive definite.
    """
    rows, width = target.shape[0], features.width
    if width <= rows:
        x = features.dense()
        ones = torch.ones(width, dtype=torch.float64)
        gram = x.T @ x
        strength = ridge * (float(gram.diagonal().mean()) or 1.0)
        gram.diagonal().add_(strength)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info):
            return None
        free = torch.cholesky_solve((x.T @ target)[:, None], chol)[:, 0]
        toward = torch.cholesky_solve(ones[:, None], chol)[:, 0]
        along = float(toward.sum())
        shift = (float(free.sum()) - total) / along
        coefficients = free - shift * toward
        residual = target - x @ coefficients
        pull_rows = x @ toward

        def solution() -> torch.Tensor:
            return coefficients
    else:
        kernel = features.kernel()
        strength = ridge * (float(kernel.diagonal().sum()) / width or 1.0)
        kernel.diagonal().add_(strength)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info):
            return None
        sums = features.row_sums()
        alpha = torch.cholesky_solve(target[:, None], chol)[:, 0]
        beta = torch.cholesky_solve(sums[:, None], chol)[:, 0]
        # free = xᵀ α and toward = G⁻¹ 1 = (1 - xᵀ β) / λ, evaluated through x xᵀ.
        along = (width - float(sums @ beta)) / strength
        shift = (float(sums @ alpha) - total) / along
        fitted = (kernel @ alpha - strength * alpha)
        pull_rows = (sums - (kernel @ beta - strength * beta)) / strength
        residual = target - fitted + shift * pull_rows

        def solution() -> torch.Tensor:
            return features.transpose_times(alpha + shift * beta / strength) - shift / strength
    honest = residual.clone()
    if bool(sampled.any()):
        units = int(sampled.sum()) // cost
        pull = (pull_rows[sampled] / math.sqrt(along)).reshape(units, cost, 1)
        if width <= rows:
            factor = torch.linalg.solve_triangular(chol, x[sampled].T, upper=False)
            blocks = factor.T.reshape(units, cost, -1)
            keep = torch.eye(cost, dtype=torch.float64) - blocks @ blocks.transpose(1, 2)
        else:
            # I - x G⁻¹ xᵀ = λ (x xᵀ + λI)⁻¹: only diagonal blocks of the inverse are needed.
            inverse = torch.cholesky_inverse(chol)
            index = torch.nonzero(sampled).flatten().reshape(units, cost)
            keep = strength * inverse[index[:, :, None], index[:, None, :]]
        keep = keep + pull @ pull.transpose(1, 2)
        honest[sampled] = torch.linalg.solve(keep, residual[sampled].reshape(units, cost,
                                                                            1)).reshape(-1)
    return residual, honest, solution


class _Candidate:
    """One surrogate and the residuals of the sample under it.

    ``residual`` is the in-sample residual (the estimate uses it, so that with dividends of
    order 1 and the Shapley kernel the estimate is exactly the Shapley regression's);
    ``honest`` replaces it by the leave-one-unit-out residual in sampled strata (the variance
    uses it, so that a surrogate that fits its own sample does not look better than it is).
    ``dividends()`` computes the surrogate's dividends, only needed for the chosen one.
    """

    def __init__(self, order: int, features: _Features | None, residual: torch.Tensor,
                 honest: torch.Tensor, dividends) -> None:
        self.order = order
        self.features = features
        self.residual = residual
        self.honest = honest
        self.dividends = dividends


def _garrote(estimate: torch.Tensor, variance: torch.Tensor, entries: int) -> torch.Tensor:
    """Factors ``max(0, 1 - λ² σ² / ĉ²)`` that shrink sampled corrections (non-negative garrote).

    A correction within about ``λ`` standard errors of zero is mostly noise and is pulled
    towards the surrogate's value; one many standard errors away is kept. ``λ² = 2 ln m`` for
    ``m`` entries of the same order is the universal threshold of Donoho & Johnstone: of ``m``
    entries of pure noise, the largest stays below it. Interactions of games met in practice
    are sparse (most pairs of players do not interact), and with many entries and few
    evaluations this keeps the estimate from being mostly noise. Exact corrections (zero
    variance) keep factor 1; unknown variances leave the correction alone.
    """
    level = 2.0 * math.log(max(entries, 2))
    energy = estimate**2
    factor = (1.0 - level * variance / energy.clamp(min=1e-300)).clamp(min=0.0)
    factor = torch.where(energy > 0, factor, 0.0)
    return torch.where(variance.isfinite() & (variance > 0), factor, 1.0)


class RegressionAdjustedKSII(Approximator):
    """k-SII (Shapley values for ``order=1``) by a regression surrogate and a sampled correction.

    Args:
        order: the order ``k`` of k-SII; 1 gives Shapley values.
        surrogate_order: order of the surrogate's dividends; ``None`` chooses among
            ``1..order + 2`` by the variance each leaves (0 is plain stratified sampling).
        max_features: most dividends a surrogate may have (bounds the regression's cost).
            Default: 16,384 for surrogates up to ``order``, 4,096 above it. The pairs of 128
            players need 8,256: on sums of unanimity games with 4,000 evaluations, an order-2
            surrogate brings k-SII's error from 1.17e-2 to 5.0e-3 and its top-10 precision from
            0.13 to 0.63, in 13.6 s instead of 1.4 s (two CPU cores); a surrogate above the
            order gains less for its cost (order 3 for 32 players: 1.3e-3 to 9.7e-4, 2 s to
            83 s).
        paired: sample complementary pairs ``(S, N \\ S)``.
        shrink: shrink each entry's sampled correction by its signal-to-noise ratio
            (:func:`_garrote`; entries of order 2 and more): lower error when there are many
            entries and few evaluations,
            at the price of a small bias; exact at full budget either way.

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
                 max_features: int | None = None, paired: bool = True,
                 shrink: bool = True) -> None:
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            msg = f"order must be an int >= 1, got {order!r}"
            raise InputError(msg)
        if surrogate_order is not None and (not isinstance(surrogate_order, int)
                                            or isinstance(surrogate_order, bool)
                                            or surrogate_order < 0):
            msg = f"surrogate_order must be a non-negative int or None, got {surrogate_order!r}"
            raise InputError(msg)
        if max_features is not None and (not isinstance(max_features, int)
                                         or isinstance(max_features, bool) or max_features < 0):
            msg = f"max_features must be a non-negative int or None, got {max_features!r}"
            raise InputError(msg)
        self.order = order
        self.index = "SV" if order == 1 else "k-SII"
        self.surrogate_order = surrogate_order
        self.max_features = max_features
        self.paired = bool(paired)
        self.shrink = bool(shrink)

    def minimum_budget(self, n_players: int) -> int:
        return 2

    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        n = evaluator.n_players
        empty, full = evaluator.ends()
        if n == 1:
            return lone_player(empty, full)
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
        """Surrogate orders to try. Order 1 (the Shapley regression) is always among them once
        anything is sampled: it is what the corrections shrink towards, and without any
        surrogate (order 0) the unsampled rest of the game would be credited to ``N`` alone."""
        if self.surrogate_order is not None:
            return [min(self.surrogate_order, n)]
        if rows == 0:
            return [0]
        return [1, *(k for k in range(2, min(self.order + 2, n) + 1)
                     if count_up_to(n, k, min_order=1) <= self._feature_limit(k, rows))]

    def _feature_limit(self, surrogate_order: int, rows: int) -> int:
        up_to_order = surrogate_order <= self.order
        if self.max_features is not None:
            cap = self.max_features
        else:
            cap = _MAX_FEATURES_UP_TO_ORDER if up_to_order else _MAX_FEATURES_ABOVE_ORDER
        per_row = _FEATURES_PER_ROW_UP_TO_ORDER if up_to_order else _FEATURES_PER_ROW_ABOVE_ORDER
        return min(cap, per_row * rows)

    def _candidates(self, design: StratifiedDesign, z: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor, sampled: torch.Tensor, delta: float):
        """Yield the candidate surrogates, one per (order, ridge strength), and for orders of
        2 and more a relaxed refit on the order-one dividends and the largest higher ones.

        Each is fitted by Shapley-kernel weighted ridge regression with its dividends summing
        to ``v(N) - v(∅)``, so that it is exact on ``∅`` and ``N``; with dividends of order 1
        this is the Shapley regression itself, and the correction then vanishes.
        """
        n, cost = design.n, design.strata[0].cost if design.strata else 1
        root = weight.sqrt()
        unweight = root.clamp(min=1e-300)
        for k in self._orders(n, z.shape[0]):
            if k == 0:
                yield _Candidate(0, None, y, y, lambda: torch.zeros(0, dtype=torch.float64))
                continue
            features = _Features(z, root, k)
            screen = None
            for ridge in _RIDGES if self.surrogate_order is None else _RIDGES[:1]:
                fit = _ridge(features, root * y, ridge, delta, sampled, cost)
                if fit is not None:
                    residual, honest, dividends = fit
                    if ridge == _RIDGES[1]:
                        screen = dividends
                    yield _Candidate(k, features, residual / unweight, honest / unweight,
                                     dividends)
            if k >= 2 and screen is not None and self.surrogate_order is None:
                # Ridge pulls every dividend towards zero, the large ones too. Refit with only
                # the order-one dividends and the largest higher ones, less regularised: the
                # relaxed fit keeps the large interactions' size.
                yield from self._relaxed(features, screen(), root * y, unweight, delta, sampled,
                                         cost)

    @staticmethod
    def _relaxed(features: _Features, dividends: torch.Tensor, target: torch.Tensor,
                 unweight: torch.Tensor, delta: float, sampled: torch.Tensor, cost: int):
        """Candidates on the order-one dividends and the higher ones largest in ``dividends``
        (one feature per ``_REFIT_ROWS_PER_FEATURE`` evaluated coalitions), lightly
        regularised."""
        singles = features.terms[0].shape[0]
        room = min(target.shape[0] // _REFIT_ROWS_PER_FEATURE, features.width) - singles
        if room <= 0:
            return
        keep = torch.zeros(features.width, dtype=torch.bool)
        keep[:singles] = True
        keep[singles + dividends[singles:].abs().topk(room).indices] = True
        relaxed = features.restricted(keep)
        for ridge in _RIDGES[:2]:
            fit = _ridge(relaxed, target, ridge, delta, sampled, cost)
            if fit is not None:
                residual, honest, coefficients = fit
                yield _Candidate(relaxed.order, relaxed, residual / unweight, honest / unweight,
                                 coefficients)

    def _credits(self, n: int, z: torch.Tensor, sizes: torch.Tensor, s: int,
                 block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[row, target]`` coefficient of each evaluated coalition in k-SII of each target
        (times ``C(n, |T|)``), and the ``[player, target]`` incidence of the targets."""
        gamma = coalition_weights(n, self.order)
        incidence = torch.zeros(n, block.shape[0], dtype=torch.float64)
        incidence.scatter_(0, block.T, 1.0)
        overlap = (z @ incidence).round().to(torch.int64)
        return gamma[s][sizes[:, None], overlap], incidence

    def _selection_variance(self, design: StratifiedDesign, z: torch.Tensor,
                            sizes: torch.Tensor, scale: torch.Tensor,
                            targets: list[tuple[int, torch.Tensor]],
                            stratum: torch.Tensor) -> float:
        """Total variance of the sampled corrections over ``targets`` (to compare surrogates)."""
        if z.shape[0] == 0:
            return math.inf
        total = 0.0
        step = max(1, _CHUNK // max(1, z.shape[0]))
        for s, subsets in targets:
            for start in range(0, subsets.shape[0], step):
                credits, _ = self._credits(design.n, z, sizes, s, subsets[start:start + step])
                variance = stratified_variance(scale[:, None] * credits, stratum, design)
                total += float(variance.nan_to_num(nan=math.inf).sum())
        return total

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
        delta = full - empty
        best, best_variance = None, math.inf
        for candidate in self._candidates(design, z, y, kernel[sizes] * inclusion, sampled,
                                          delta):
            total = self._selection_variance(design, z, sizes, inclusion * candidate.honest,
                                             selection, stratum)
            if best is None or total < best_variance:
                best, best_variance = candidate, total
        return self._assemble(design, z, sizes, stratum, sampled, inclusion, best, delta,
                              targets)

    def _assemble(self, design: StratifiedDesign, z: torch.Tensor, sizes: torch.Tensor,
                  stratum: torch.Tensor, sampled: torch.Tensor, inclusion: torch.Tensor,
                  best: _Candidate, delta: float,
                  targets: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimate and its standard errors under the chosen surrogate.

        Entries of order 2 and more: the surrogate's k-SII, plus the correction over
        enumerated coalitions (exact), plus the sampled correction, shrunk by :func:`_garrote`
        when :attr:`shrink` is set. Entries of order 1 come from the Shapley value, estimated
        the same way (never shrunk), through the identity ``φ_i = Σ_{S ∋ i} k-SII(S) / |S|``
        that k-SII satisfies: ``k-SII(i) = φ_i - Σ_{S ∋ i, |S| >= 2} k-SII(S) / |S|``. Without
        shrinking this equals the direct estimate (everything is linear in the game); with it,
        the singletons do not inherit the large variance of their own direct correction. The
        identity also keeps the estimate efficient, since the Shapley values are.
        """
        n, rows = design.n, z.shape[0]
        fit, honest = inclusion * best.residual, inclusion * best.honest
        rest = 0.0 if best.order else delta  # the surrogate is exact at N unless K = 0
        counts = [t.shape[0] for _, t in targets]
        if best.order:
            masks, dividends = best.features.masks(), best.dividends()
            shapley = index_from_dividends(masks, dividends, "SV", 1, min_order=1)
            base = index_from_dividends(masks, dividends, "k-SII", self.order,
                                        min_order=1).split(counts)
        else:
            shapley = torch.zeros(n, dtype=torch.float64)
            base = [torch.zeros(c, dtype=torch.float64) for c in counts]
        # Per-row scores of the singletons: the Shapley value's, less the shares of the higher
        # orders (below), so that their variance follows whatever those orders keep.
        sv = coalition_weights(n, 1)[1]
        sv_credits = sv[sizes[:, None], z.round().to(torch.int64)]
        single_fit = fit[:, None] * sv_credits
        single_honest = honest[:, None] * sv_credits
        single_fixed = shapley + sv[n, 1] * rest
        higher_values, higher_variances = [], []
        step = max(1, _CHUNK // max(1, rows))
        for (s, subsets), base_s in zip(targets, base, strict=True):
            if s == 1:
                continue
            at_full = coalition_weights(n, self.order)[s, n, s] * rest
            for start in range(0, subsets.shape[0], step):
                block = subsets[start:start + step]
                fixed = base_s[start:start + block.shape[0]] + at_full
                credits, incidence = self._credits(n, z, sizes, s, block)
                scores_fit, scores_honest = fit[:, None] * credits, honest[:, None] * credits
                estimated = scores_fit[sampled].sum(0)
                exact = scores_fit.sum(0) - estimated
                variance = (stratified_variance(scores_honest, stratum, design) if rows
                            else torch.full((block.shape[0],), math.nan, dtype=torch.float64))
                keep = (_garrote(estimated, variance, subsets.shape[0]) if self.shrink
                        else torch.ones_like(estimated))
                higher_values.append(fixed + exact + keep * estimated)
                higher_variances.append(variance)
                row_keep = torch.where(sampled[:, None], keep[None, :], 1.0)
                share = incidence.T / s  # [target, player]: each entry's share of its players
                single_fit -= (scores_fit * row_keep) @ share
                single_honest -= (scores_honest * row_keep) @ share
                single_fixed = single_fixed - fixed @ share
        singles = single_fixed + single_fit.sum(0)
        single_variance = (stratified_variance(single_honest, stratum, design) if rows
                           else torch.full((n,), math.nan, dtype=torch.float64))
        values = torch.cat([singles, *higher_values])
        errors = torch.cat([single_variance, *higher_variances]).clamp(min=0.0).sqrt()
        return values, errors

    def __repr__(self) -> str:
        return (f"{self.name}(order={self.order}, surrogate_order={self.surrogate_order}, "
                f"max_features={self.max_features}, paired={self.paired})")
