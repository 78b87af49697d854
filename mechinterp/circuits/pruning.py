"""ACDC (Conmy et al. 2023): prune edges greedily, from the logits back to the embeddings.

Starting from the full graph, destinations are visited in reverse order of computation (the
logits, the last MLP, the last layer's value, key and query inputs, ...) and each edge into the
destination is removed for good when removing it changes the metric by less than ``threshold``:
the increase of a distance to the clean run (``KL``), or the absolute change of any other metric.

The decisions are sequential, but most edges are removed, so the next ``speculate`` trials run
in one batched forward, trial ``i`` assuming the ``i - 1`` before it were removed. Up to the
first edge that is kept every trial is the one the sequential algorithm would run; the trials
after it are discarded and run again from the kept state. The circuit is the sequential one.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from mechinterp.circuits.result import Circuit
from mechinterp.circuits.task import CircuitTask
from mechinterp.errors import InputError


def acdc(task: CircuitTask, *, threshold: float, speculate: int | None = None) -> Circuit:
    """The circuit ACDC keeps at ``threshold``.

    Args:
        task: prompts, ablation and metric.
        threshold: the largest change of the metric an edge's removal may cause.
        speculate: trials batched per forward (1 runs the sequential algorithm as written);
            default 16 on a GPU, where a forward of more rows costs about the same, and 1 on
            the CPU, where the discarded trials would cost their full price.

    Returns:
        A :class:`Circuit` whose ``info`` records the threshold, the edge trials run
        (``forwards``: one per edge, plus the discarded speculative ones), the batched forwards
        (``batches``) and the wall time in seconds.

    Examples:
        >>> import mechinterp
        >>> from mechinterp.circuits import CircuitTask, acdc
        >>> from mechinterp.patching import KL
        >>> model = mechinterp.load("induction-2l")
        >>> task = CircuitTask(model, "fuba bu mabi fuba bu", "fuba bu mabi lo ki",
        ...                    metric=KL(), progress=False)
        >>> circuit = acdc(task, threshold=0.05)
        >>> circuit.info["forwards"] == circuit.info["batches"] == task.graph.n_edges  # on the CPU
        True
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        msg = f"threshold must be a non-negative number; got {threshold!r}"
        raise InputError(msg)
    if speculate is None:
        speculate = 16 if task.clean_sources.is_cuda else 1
    if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 1:
        msg = f"speculate must be a positive int; got {speculate!r}"
        raise InputError(msg)
    graph = task.graph
    distance = task.metric.name == "kl"
    start = time.perf_counter()
    kept = graph.valid.clone()
    current = float(task.evaluate(kept).mean())
    # Destinations from the logits back, each one's sources from the latest back.
    queue = [(source, destination) for destination in reversed(range(graph.n_destinations))
             for source in reversed(range(graph.sources_before(destination)))]
    trials = batches = 0
    bar = tqdm(total=len(queue), desc="ACDC", disable=not task.progress, leave=False)
    while queue:
        ahead = queue[:speculate]
        masks = kept.expand(len(ahead), -1, -1).clone()
        for i, (source, destination) in enumerate(ahead):
            masks[i:, source, destination] = False  # trial i removes edges 0..i
        values = task.evaluate(masks).mean(dim=1).tolist()
        trials += len(ahead)
        batches += 1
        decided = len(ahead)
        for i, ((source, destination), value) in enumerate(zip(ahead, values)):
            change = value - current if distance else abs(value - current)
            if change < threshold:
                kept[source, destination] = False
                current = value
            else:
                decided = i + 1  # the later trials assumed this edge gone
                break
        queue = queue[decided:]
        bar.update(decided)
    bar.close()
    info = {"method": "acdc", "threshold": threshold, "forwards": trials, "batches": batches,
            "seconds": time.perf_counter() - start, "metric": repr(task.metric),
            "final_metric": current}
    return Circuit(graph, kept, info=info)
