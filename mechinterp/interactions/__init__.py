"""Harsanyi interactions and Shapley values: exact transforms, estimators and model games."""

from __future__ import annotations

from mechinterp.interactions.andor import (
    AndOrResult,
    GeneralizableAndOrResult,
    and_or_interactions,
    and_or_loss,
    and_or_split,
    generalizable_and_or_interactions,
)
from mechinterp.interactions.approximators import (
    SVARM,
    Approximator,
    KernelSHAP,
    LeverageSHAP,
    PermutationSamplingSV,
    RegressionAdjustedKSII,
)
from mechinterp.interactions.autograd import (
    differentiable_inverse_moebius_transform,
    differentiable_moebius_transform,
    differentiable_or_interactions,
)
from mechinterp.interactions.enumeration import exact
from mechinterp.interactions.games import (
    CallableGame,
    Game,
    SumOfUnanimityGame,
    TabularGame,
)
from mechinterp.interactions.result import InteractionResult
from mechinterp.interactions.subsets import (
    count_up_to,
    mask_of,
    subset_masks,
    subset_of,
    subsets_up_to,
)
from mechinterp.interactions.transforms import (
    banzhaf_values,
    exact_interactions,
    interaction_index,
    inverse_moebius_transform,
    moebius_transform,
    or_interactions,
    shapley_values,
)
from mechinterp.interactions.weights import INDICES, index_weights

# Model games import the model layer (nnsight, transformers), which takes seconds; the rest of
# the package does not need it.
_LAZY = {name: "mechinterp.interactions.model_games"
         for name in ("BaselineLearning", "ComponentGame", "ModelGame", "TokenGame")}
_LAZY["FeatureGame"] = "mechinterp.interactions.feature_games"


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'mechinterp.interactions' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "INDICES",
    "SVARM",
    "AndOrResult",
    "Approximator",
    "BaselineLearning",
    "CallableGame",
    "ComponentGame",
    "FeatureGame",
    "Game",
    "GeneralizableAndOrResult",
    "InteractionResult",
    "KernelSHAP",
    "LeverageSHAP",
    "ModelGame",
    "PermutationSamplingSV",
    "RegressionAdjustedKSII",
    "SumOfUnanimityGame",
    "TabularGame",
    "TokenGame",
    "and_or_interactions",
    "and_or_loss",
    "and_or_split",
    "banzhaf_values",
    "count_up_to",
    "differentiable_inverse_moebius_transform",
    "differentiable_moebius_transform",
    "differentiable_or_interactions",
    "exact",
    "exact_interactions",
    "generalizable_and_or_interactions",
    "index_weights",
    "interaction_index",
    "inverse_moebius_transform",
    "mask_of",
    "moebius_transform",
    "or_interactions",
    "shapley_values",
    "subset_masks",
    "subset_of",
    "subsets_up_to",
]
