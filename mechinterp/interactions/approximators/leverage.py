"""Leverage SHAP (Musco & Witter, ICLR 2025): the Shapley regression sampled by leverage scores.

After the projection that removes the efficiency constraint, the row of the regression for
coalition ``S`` has leverage score ``1 / C(n, |S|)`` (up to a constant): every size carries the
same total leverage. Sampling rows in proportion to leverage -- a uniform size, then a uniform
coalition of that size -- and weighting each by kernel over probability gives a solution within
``1 + ε`` of the best possible regression error from ``O(n log n + n / ε)`` evaluations, a
guarantee KernelSHAP's kernel-proportional sampling lacks. As in the paper, coalitions are drawn
in complementary pairs and without replacement; sizes whose share covers all their coalitions
are enumerated (inclusion probability 1), which is what capping ``min(1, c ℓ_S)`` does there.
"""

from __future__ import annotations

from mechinterp.interactions.approximators.regression import ShapleyRegression

__all__ = ["LeverageSHAP"]


class LeverageSHAP(ShapleyRegression):
    """Shapley values by Leverage SHAP: uniform sizes, paired, without replacement.

    Args:
        paired: sample complementary pairs ``(S, N \\ S)`` (the paper's default).

    Examples:
        >>> from mechinterp.interactions.games import SumOfUnanimityGame
        >>> game = SumOfUnanimityGame.random(12, n_terms=10, max_size=4, seed=1)
        >>> result = LeverageSHAP().approximate(game, budget=400, seed=0)
        >>> result.evaluations
        400
        >>> abs(float(result.values.sum()) - (game.full_value - game.empty_value)) < 1e-9
        True
    """

    def size_mass(self, n: int, size: int) -> float:
        return 1.0
