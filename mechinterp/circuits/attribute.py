"""Edge scores: EAP, EAP-IG and exact edge patching.

Every method estimates, for each edge, the change of the mean metric when that edge alone is
removed: ``score(s -> d) ~ mean over prompts of m(edge removed) - m(clean)``.

- ``"eap"`` (Syed et al. 2023): first order around the clean run,
  ``score = sum over positions of (patched_s - clean_s) . dm/d(input_d)``, from one clean
  forward and one backward.
- ``"eap-ig"`` (Hanna et al. 2024, the inputs variant): the gradient is averaged over ``steps``
  forwards whose embeddings move from the corrupted (patched) prompt's to the clean prompt's,
  ``alpha = k / steps`` for ``k = 1..steps`` (integrated gradients with a right Riemann sum).
  With one step it is EAP.
- ``"eap-ig-activations"``: the gradient is averaged over ``steps`` forwards in which every edge
  is patched with weight ``1 - alpha``, so each destination's input moves along the straight line
  from its patched to its clean value.
- ``"exact"``: one edge-patched run per edge, batched; the ground truth the estimates are held to.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mechinterp.circuits.result import EdgeScores
from mechinterp.circuits.task import CircuitTask
from mechinterp.errors import InputError

METHODS = ("eap", "eap-ig", "eap-ig-activations", "exact")


def attribute_edges(task: CircuitTask, *, method: str = "eap-ig", steps: int = 5) -> EdgeScores:
    """Score every edge of ``task.graph``.

    Args:
        task: the model, prompts, ablation and metric.
        method: ``"eap"``, ``"eap-ig"``, ``"eap-ig-activations"`` or ``"exact"``.
        steps: interpolation steps of the integrated-gradient methods.

    Returns:
        :class:`EdgeScores` with a ``[source, destination]`` score matrix (0 off the edges).

    Examples:
        >>> import mechinterp
        >>> from mechinterp.circuits import CircuitTask, attribute_edges
        >>> from mechinterp.patching import LogitDiff
        >>> model = mechinterp.load("induction-2l")
        >>> task = CircuitTask(model, "fuba bu mabi fuba bu", "fuba bu mabi lo ki",
        ...                    metric=LogitDiff("mabi", "lo"), progress=False)
        >>> scores = attribute_edges(task, method="eap-ig", steps=5)
        >>> len(scores.ranked()) == task.graph.n_edges
        True
    """
    if method not in METHODS:
        msg = f"method must be one of {METHODS}; got {method!r}"
        raise InputError(msg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int; got {steps!r}"
        raise InputError(msg)
    if method == "exact":
        values = _exact(task)
    else:
        values = _gradient_scores(task, method, 1 if method == "eap" else steps)
    return EdgeScores(task.graph, values * task.graph.valid, method=method,
                      metric=repr(task.metric), ablation=task.ablation)


def _gradient_scores(task: CircuitTask, method: str, steps: int) -> torch.Tensor:
    graph = task.graph
    device = task.clean_sources.device
    wide = torch.float64 if task.clean_sources.dtype == torch.float64 else torch.float32
    total = torch.zeros(graph.n_sources, graph.n_destinations, dtype=wide, device=device)
    chunks = list(task._chunks())
    bar = tqdm(total=len(chunks) * steps, desc=method, disable=not task.progress, leave=False)
    all_edges = graph.valid.to(device=device, dtype=task.clean_sources.dtype)
    for rows in chunks:
        grads = None
        for k in range(1, steps + 1):
            alpha = k / steps
            embed = weights = None
            if method == "eap-ig" and steps > 1:
                clean_embed = task.clean_sources[rows, 0]
                patched_embed = task._patched_rows(rows)[:, 0].expand_as(clean_embed)
                embed = patched_embed + alpha * (clean_embed - patched_embed)
            elif method == "eap-ig-activations" and alpha < 1:
                weights = all_edges * (1 - alpha)
            g = task.destination_gradients(rows, embed=embed, weights=weights)
            grads = g if grads is None else grads + g
            bar.update()
        grads = grads / steps
        for destinations, delta in task.read_deltas(rows):
            total[:delta.shape[1], destinations] += torch.einsum(
                "bspd,bnpd->sn", delta.to(wide), grads[:, destinations].to(wide))
    bar.close()
    return (total / task.n_rows).double().cpu()


def _exact(task: CircuitTask) -> torch.Tensor:
    """One run per edge with that edge alone removed."""
    graph = task.graph
    edges = graph.valid.nonzero()
    kept = graph.valid.expand(len(edges), -1, -1).clone()
    kept[torch.arange(len(edges)), edges[:, 0], edges[:, 1]] = False
    values = task.evaluate(kept).mean(dim=1)
    out = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
    out[edges[:, 0], edges[:, 1]] = values - task.clean_metric.mean()
    return out


def attribute_nodes(task: CircuitTask, *, method: str = "eap-ig", steps: int = 5) -> dict[str, float]:
    """Score every source node (``embed``, each head, each MLP): the estimated change of the mean
    metric when the node's output is patched everywhere it is read, i.e. all of its outgoing
    edges at once.

    The gradient methods are linear in the patched difference, so a node's score is the sum of
    its edges' scores; ``"exact"`` runs one forward per node with all its edges removed.

    Returns:
        Node name -> score, in graph order.
    """
    graph = task.graph
    if method != "exact":
        edges = attribute_edges(task, method=method, steps=steps).scores
        return dict(zip(graph.source_names, edges.sum(dim=1).tolist()))
    kept = graph.valid.expand(graph.n_sources, -1, -1).clone()
    for source in range(graph.n_sources):
        kept[source, source] = False  # every edge out of the source
    values = task.evaluate(kept).mean(dim=1) - task.clean_metric.mean()
    return dict(zip(graph.source_names, values.tolist()))
