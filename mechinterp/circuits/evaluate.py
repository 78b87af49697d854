"""Is a circuit faithful? Faithfulness against circuit size, the MIB metrics, ROC-AUC.

Faithfulness of a circuit ``C`` is ``(m(C) - m(empty)) / (m(full) - m(empty))`` with ``m`` the
mean metric over the prompts: 1 when the circuit alone reproduces the model's behaviour, 0 when
it does no better than removing every edge. Following MIB (Mueller et al. 2025), circuits of the
top-scoring fractions ``k`` of the edges are scored and

- CPR (circuit performance ratio) is the area under ``faithfulness(k)`` (higher is better);
- CMD (circuit-model difference) is the area under ``|1 - faithfulness(k)|`` (lower is better);

both by the trapezoid rule over ``k`` in [0, 1]. Confidence intervals resample the prompts
(bootstrap), reusing each circuit's per-prompt metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechinterp.circuits.result import EdgeScores
from mechinterp.circuits.task import CircuitTask
from mechinterp.errors import InputError

MIB_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top-scoring circuits of each size.

    Attributes:
        n_edges: circuit sizes (edges kept).
        fractions: the sizes as fractions of the graph's edges.
        faithfulness: normalised faithfulness per size.
        low, high: bootstrap confidence interval of each faithfulness (``level``).
        metric: mean metric per size.
        full, empty: mean metric of the full and the empty graph.
        cpr, cmd: the MIB areas (see the module docstring), with their bootstrap intervals.
        ablation: what removed edges read.
    """

    n_edges: list[int]
    fractions: list[float]
    faithfulness: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    metric: torch.Tensor
    full: float
    empty: float
    cpr: float
    cmd: float
    cpr_interval: tuple[float, float]
    cmd_interval: tuple[float, float]
    ablation: str
    level: float

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"n_edges": self.n_edges, "fraction": self.fractions,
                             "faithfulness": self.faithfulness.tolist(),
                             "low": self.low.tolist(), "high": self.high.tolist(),
                             "metric": self.metric.tolist()})

    def plot(self, ax=None):
        """Faithfulness against the fraction of edges kept, with its confidence band."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        x = torch.tensor(self.fractions).clamp(min=1e-4)
        ax.fill_between(x, self.low, self.high, alpha=0.25)
        ax.plot(x, self.faithfulness, marker="o",
                label=f"{self.ablation}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")
        ax.axhline(1.0, color="#888888", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel("faithfulness")
        ax.legend(fontsize=8)
        return ax.figure


def faithfulness(task: CircuitTask, scores: EdgeScores, *, fractions: tuple[float, ...] = MIB_FRACTIONS,
                 bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> FaithfulnessCurve:
    """Faithfulness of the top-scoring circuits at each fraction of the graph's edges.

    Examples:
        >>> import mechinterp
        >>> from mechinterp.circuits import CircuitTask, attribute_edges, faithfulness
        >>> from mechinterp.patching import LogitDiff
        >>> model = mechinterp.load("induction-2l")
        >>> task = CircuitTask(model, "fuba bu mabi fuba bu", "fuba bu mabi lo ki",
        ...                    metric=LogitDiff("mabi", "lo"), progress=False)
        >>> curve = faithfulness(task, attribute_edges(task, method="eap"), bootstrap=100)
        >>> curve.faithfulness[0].item(), curve.faithfulness[-1].item()
        (0.0, 1.0)
    """
    if scores.graph != task.graph:
        msg = "scores must come from the task's graph (the same model)"
        raise InputError(msg)
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        msg = f"fractions must be non-empty and within [0, 1]; got {fractions}"
        raise InputError(msg)
    if not 0 < level < 1:
        msg = f"level must lie in (0, 1); got {level}"
        raise InputError(msg)
    total = task.graph.n_edges
    sizes = [round(f * total) for f in fractions]
    per_row = task.evaluate(scores.top_masks(sizes))  # [size, rows]
    reference = task.reference
    full, empty = float(reference.full.mean()), float(reference.empty.mean())
    # Equal up to rounding (a resample ablation of prompts sharing one answer permutes them).
    if abs(full - empty) <= 1e-6 * max(1.0, abs(full), abs(empty)):
        msg = (f"the full and the empty graph score the same mean metric "
               f"({float(reference.full.mean()):.6g}) under ablation {task.ablation!r}, so "
               f"faithfulness is undefined; choose prompts or an ablation that change the metric")
        raise InputError(msg)
    curve, areas = _normalised(per_row, reference.full, reference.empty, fractions)
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randint(task.n_rows, (bootstrap, task.n_rows), generator=generator)
    boot_curves, boot_areas = [], []
    for rows in samples:
        c, a = _normalised(per_row[:, rows], reference.full[rows], reference.empty[rows], fractions)
        boot_curves.append(c)
        boot_areas.append(a)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    if bootstrap:
        low, high = torch.nanquantile(torch.stack(boot_curves), q, dim=0)
        area_low, area_high = torch.nanquantile(torch.stack(boot_areas), q, dim=0)
    else:
        low = high = curve
        area_low = area_high = areas
    return FaithfulnessCurve(
        n_edges=sizes, fractions=list(fractions), faithfulness=curve, low=low, high=high,
        metric=per_row.mean(1), full=float(reference.full.mean()),
        empty=float(reference.empty.mean()), cpr=float(areas[0]), cmd=float(areas[1]),
        cpr_interval=(float(area_low[0]), float(area_high[0])),
        cmd_interval=(float(area_low[1]), float(area_high[1])), ablation=task.ablation,
        level=level)


def _normalised(per_row: torch.Tensor, full: torch.Tensor, empty: torch.Tensor,
                fractions: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Faithfulness per size and ``[cpr, cmd]`` from per-row metrics."""
    gap = full.mean() - empty.mean()
    curve = (per_row.mean(1) - empty.mean()) / gap if gap != 0 else \
        torch.full((per_row.shape[0],), float("nan"), dtype=torch.float64)
    x = torch.tensor(fractions, dtype=torch.float64)
    if len(fractions) > 1:
        cpr = torch.trapezoid(curve, x)
        cmd = torch.trapezoid((1 - curve).abs(), x)
    else:
        cpr, cmd = curve[0], (1 - curve[0]).abs()
    return curve, torch.stack([cpr, cmd])


def roc_auc(scores: EdgeScores, truth: torch.Tensor) -> float:
    """ROC-AUC of ranking the graph's edges by score magnitude against a ground-truth mask
    ``[source, destination]``: the probability that a circuit edge outranks a non-circuit edge
    (ties count one half)."""
    graph = scores.graph
    truth = graph.check_mask(truth, "truth")
    valid = graph.valid
    values = scores.scores[valid].abs()
    labels = truth[valid]
    positives, negatives = values[labels], values[~labels]
    if not len(positives) or not len(negatives):
        msg = (f"truth must mark some but not all edges of the graph; got {len(positives)} of "
               f"{graph.n_edges}")
        raise InputError(msg)
    greater = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return float(greater + 0.5 * ties)
