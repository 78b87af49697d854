"""Attribution patching (AtP): every cell of a sweep from one forward and one backward.

The effect of patching a site is estimated to first order around the corrupted run:
``m(patched) ~ m(corrupt) + sum over the site's elements of (a_clean - a_corrupt) * dm/da``,
with the gradient taken on the corrupted run. One clean forward, one corrupted forward and one
backward give every cell at once, instead of one forward per cell. The estimate is exact for a
metric linear in the site and degrades where the model saturates (attention softmax, LayerNorm);
:func:`agreement` measures it against exact patching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mechinterp.engine import Plan
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, Sites, Tokens
from mechinterp.patching.boxes import as_rows
from mechinterp.patching.metrics import Metric, as_metric
from mechinterp.patching.result import PatchingResult
from mechinterp.patching.sweep import _Sweep


def attribution_patch(
    model: InterpModel,
    clean: Inputs,
    corrupt: Inputs,
    sites: Sites,
    metric: Metric | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    position: int = -1,
    batch_size: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Estimate :func:`activation_patch` for every site from gradients (AtP).

    Takes the arguments of :func:`activation_patch` (with ``source="clean"``). ``batch_size``
    bounds the prompt pairs per forward and backward. Returns a :class:`PatchingResult` whose
    ``values`` are the estimated metric of each patched run, so it compares cell by cell with
    the exact sweep (see :func:`agreement`).

    Examples:
        >>> import mechinterp
        >>> from mechinterp import select
        >>> from mechinterp.patching import LogitDiff, attribution_patch
        >>> model = mechinterp.load("induction-2l")
        >>> approx = attribution_patch(model, "fuba bu mabi fuba", "fuba fafi mabi fuba",
        ...                            select("head").layers().heads(), LogitDiff("bu", "fafi"),
        ...                            progress=False)
        >>> approx.values.shape
        torch.Size([1, 8])
    """
    sweep = _Sweep(model, clean, corrupt, sites, as_metric(metric), "clean", 1.0, position, 0)
    rects = sweep._rects()
    n_pairs = sweep.n_pairs
    per_forward = n_pairs if batch_size is None else max(1, batch_size)
    estimates = torch.zeros(n_pairs, len(sweep.cells), dtype=torch.float64)
    clean_metric, corrupt_metric = [], []
    bar = tqdm(total=n_pairs, desc="attribution patching", unit="pair", disable=not progress,
               leave=False)
    for start in range(0, n_pairs, per_forward):
        rows = slice(start, min(start + per_forward, n_pairs))
        part = _part(sweep, rows)
        clean_m, corrupt_m, products = _gradients(sweep, part, rows)
        clean_metric.append(clean_m)
        corrupt_metric.append(corrupt_m)
        estimates[rows] = _cell_sums(sweep, products, [cell[rows] for cell in rects])
        bar.update(rows.stop - rows.start)
    bar.close()
    corrupt_all = torch.cat(corrupt_metric)
    values = corrupt_all[:, None].to(torch.float64) + estimates
    dtype = corrupt_all.dtype
    return PatchingResult(sweep.cells, values.to(dtype), torch.cat(clean_metric), corrupt_all,
                          f"AtP estimate of {sweep.metric!r}")


def _part(sweep: _Sweep, rows: slice) -> tuple[Tokens, Tokens]:
    clean, corrupt = sweep.clean, sweep.corrupt
    return (Tokens(clean.input_ids[rows], clean.attention_mask[rows]),
            Tokens(corrupt.input_ids[rows], corrupt.attention_mask[rows]))


class _Probe(TensorEdit):
    """Keeps a component's value and adds a zero tensor whose gradient is the gradient of the
    metric with respect to that component."""

    def __init__(self, site, store: dict, key):
        super().__init__(site)
        self.store, self.key = store, key

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        whole = tensor if current is None else current
        delta = torch.zeros_like(tensor, requires_grad=True)
        self.store[self.key] = (whole.detach().clone(), delta)
        tensor.add_(delta)  # in place, so the model's own tensor carries the gradient


def _gradients(sweep: _Sweep, part: tuple[Tokens, Tokens], rows: slice):
    """Clean and corrupted metrics of the pairs in ``rows``, and per (component, layer) the
    products ``(a_clean - a_corrupt) * dm/da`` as ``[pair, a, f]`` float64."""
    model = sweep.model
    clean, corrupt = part
    pairs = torch.arange(rows.start, rows.stop)
    wanted = [_Sweep._site(g) for g in sweep.groups]
    with torch.no_grad():
        clean_run = model.run(clean, cache=wanted)
    if clean_run.logits is None:
        model.table.place("logits")  # raises, naming why there is no head
    n = clean.shape[0]
    clean_logits_all = sweep._scored(clean_run.logits, n)
    clean_logits = torch.zeros((sweep.n_pairs, clean_logits_all.shape[-1]), dtype=clean_logits_all.dtype,
                               device=clean_logits_all.device)
    clean_logits[rows] = clean_logits_all
    device_pairs = pairs.to(clean_logits.device)
    clean_m = sweep.metric(clean_logits_all, device_pairs, clean_logits).cpu()

    store: dict = {}
    edits = [_Probe(_Sweep._site(g), store, g) for g in sweep.groups]
    plan = Plan(model.table, model.base, corrupt.attention_mask, [], edits, model._resolved)
    with torch.enable_grad():
        output, _ = model._forward(corrupt, plan)
        logits = sweep._scored(output.logits, n)
        scores = sweep.metric.differentiable(logits, device_pairs, clean_logits)
        deltas = [store[g][1] for g in sweep.groups]
        grads = torch.autograd.grad(scores.sum(), deltas, allow_unused=True)
    products = {}
    for group, site, grad in zip(sweep.groups, wanted, grads):
        corrupt_value = as_rows(store[group][0]).double()
        clean_value = as_rows(clean_run.cache[site]).double()
        grad = torch.zeros_like(corrupt_value) if grad is None else as_rows(grad).double()
        products[group] = (clean_value - corrupt_value) * grad
    return clean_m, scores.detach().cpu(), products


def _cell_sums(sweep: _Sweep, products: dict, rects: list) -> torch.Tensor:
    """``[pair, cell]``: each cell's product summed over its rectangles, by 2-D prefix sums.

    Every rectangle of a (component, layer) is gathered in one indexing operation, so a GPU is
    synchronised once per component and layer, not once per cell.
    """
    n_pairs = len(rects[0]) if rects else 0
    out = torch.zeros(n_pairs, len(rects), dtype=torch.float64)
    boxes: dict[tuple[str, int], list[tuple[int, int, int, int, int, int]]] = {}
    for c, per_pair in enumerate(rects):
        for p, writes in enumerate(per_pair):
            for group, _, (a0, a1, f0, f1) in writes:
                boxes.setdefault(group, []).append((p, c, a0, a1, f0, f1))
    for group, items in boxes.items():
        product = products[group]
        pairs, extent_a, extent_f = product.shape
        prefix = torch.zeros(pairs, extent_a + 1, extent_f + 1, dtype=torch.float64,
                             device=product.device)
        prefix[:, 1:, 1:] = product.cumsum(1).cumsum(2)
        p, c, a0, a1, f0, f1 = torch.tensor(items, device=product.device).unbind(1)
        sums = prefix[p, a1, f1] - prefix[p, a0, f1] - prefix[p, a1, f0] + prefix[p, a0, f0]
        flat = torch.zeros(n_pairs * len(rects), dtype=torch.float64, device=product.device)
        flat.index_add_(0, p * len(rects) + c, sums)
        out += flat.reshape(n_pairs, len(rects)).cpu()
    return out


def agreement(exact: PatchingResult, estimate: PatchingResult) -> dict[str, float]:
    """How well an estimate (AtP) ranks and matches exact patching, over cells' means.

    Returns Pearson and Spearman correlations of the per-cell mean effects and the fraction of
    the top 10% cells by exact effect that the estimate also puts in its top 10%.
    """
    if [str(s) for s in exact.sites] != [str(s) for s in estimate.sites]:
        msg = "exact and estimate must cover the same sites in the same order"
        raise ValueError(msg)
    x = (exact.mean() - exact.corrupt.mean()).double()
    y = (estimate.mean() - estimate.corrupt.mean()).double()

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        denominator = float(a.norm() * b.norm())
        return float((a * b).sum()) / denominator if denominator > 0 else float("nan")

    def ranks(a: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(a)).double()

    k = max(1, len(x) // 10)
    top_exact = set(torch.topk(x.abs(), k).indices.tolist())
    top_estimate = set(torch.topk(y.abs(), k).indices.tolist())
    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y)),
            "top10_overlap": len(top_exact & top_estimate) / k}


__all__ = ["agreement", "attribution_patch"]
