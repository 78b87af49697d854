"""Estimators of Shapley values and interaction indices from a budget of evaluations."""

from __future__ import annotations

from mechinterp.interactions.approximators.base import Approximator, Evaluator
from mechinterp.interactions.approximators.kernelshap import KernelSHAP
from mechinterp.interactions.approximators.ksii import RegressionAdjustedKSII
from mechinterp.interactions.approximators.leverage import LeverageSHAP

__all__ = ["Approximator", "Evaluator", "KernelSHAP", "LeverageSHAP", "RegressionAdjustedKSII"]
