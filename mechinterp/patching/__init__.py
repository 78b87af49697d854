"""Activation and path patching: exact batched sweeps over sites, with metrics and results.

Examples:
    >>> import mechinterp
    >>> from mechinterp import select
    >>> from mechinterp.patching import KL, activation_patch
    >>> model = mechinterp.load("induction-2l")
    >>> result = activation_patch(model, "fuba bu fuba", "mabi bu fuba",
    ...                           select("resid_pre").layers(0), KL(), progress=False)
    >>> float(result.clean[0]), round(float(result.mean(normalized=True)[0]), 4)  # all of layer 0
    (0.0, 1.0)
"""

from mechinterp.patching.attribution import agreement, attribution_patch
from mechinterp.patching.metrics import KL, CallableMetric, LogitDiff, LogProb, Metric, Prob
from mechinterp.patching.paths import path_patch
from mechinterp.patching.result import PatchingResult
from mechinterp.patching.sweep import activation_patch

__all__ = [
    "KL",
    "CallableMetric",
    "LogProb",
    "LogitDiff",
    "Metric",
    "PatchingResult",
    "Prob",
    "activation_patch",
    "agreement",
    "attribution_patch",
    "path_patch",
]
