"""Estimators of Shapley values and interaction indices from a budget of evaluations.

Every estimator takes its options as keyword-only constructor arguments and has one verb,
``approximate(game, *, budget, seed=None, tolerance=None, batch_size=None)``, which returns an
:class:`~mechinterp.interactions.result.InteractionResult` with standard errors. None exceeds
its budget (the empty and full coalitions count), all evaluate coalitions in large blocks, and
all stop early once the largest standard error falls below ``tolerance``.
"""

from __future__ import annotations

from mechinterp.interactions.approximators.base import Approximator, Evaluator
from mechinterp.interactions.approximators.kernelshap import KernelSHAP
from mechinterp.interactions.approximators.ksii import RegressionAdjustedKSII
from mechinterp.interactions.approximators.leverage import LeverageSHAP
from mechinterp.interactions.approximators.permutation import PermutationSamplingSV
from mechinterp.interactions.approximators.svarm import SVARM

__all__ = [
    "SVARM",
    "Approximator",
    "Evaluator",
    "KernelSHAP",
    "LeverageSHAP",
    "PermutationSamplingSV",
    "RegressionAdjustedKSII",
]
