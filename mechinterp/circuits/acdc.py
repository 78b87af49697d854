"""ACDC (Conmy et al. 2023): prune edges greedily, from the logits back to the embeddings.

Starting from the full graph, destinations are visited in reverse order of computation (the
logits, the last MLP, the last layer's value, key and query inputs, ...) and each edge into the
destination is removed for good when removing it changes the metric by less than ``threshold``:
the increase of a distance to the clean run (``KL``), or the absolute change of any other metric.
One edge-patched forward over the prompts per edge.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from mechinterp.circuits.result import Circuit
from mechinterp.circuits.task import CircuitTask
from mechinterp.errors import InputError


def acdc(task: CircuitTask, *, threshold: float) -> Circuit:
    """The circuit ACDC keeps at ``threshold``.

    Returns:
        A :class:`Circuit` whose ``info`` records the threshold, the forwards run
        (``forwards``, one per edge) and the wall time in seconds.

    Examples:
        >>> import mechinterp
        >>> from mechinterp.circuits import CircuitTask, acdc
        >>> from mechinterp.patching import KL
        >>> model = mechinterp.load("induction-2l")
        >>> task = CircuitTask(model, "fuba bu mabi fuba bu", "fuba bu mabi lo ki",
        ...                    metric=KL(), progress=False)
        >>> circuit = acdc(task, threshold=0.05)
        >>> circuit.info["forwards"] == task.graph.n_edges
        True
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        msg = f"threshold must be a non-negative number; got {threshold!r}"
        raise InputError(msg)
    graph = task.graph
    distance = task.metric.name == "kl"
    start = time.perf_counter()
    kept = graph.valid.clone()
    current = float(task.evaluate(kept).mean())
    forwards = 0
    bar = tqdm(total=graph.n_edges, desc="ACDC", disable=not task.progress, leave=False)
    for destination in reversed(range(graph.n_destinations)):
        for source in reversed(range(graph.sources_before(destination))):
            trial = kept.clone()
            trial[source, destination] = False
            value = float(task.evaluate(trial).mean())
            forwards += 1
            bar.update()
            change = value - current if distance else abs(value - current)
            if change < threshold:
                kept, current = trial, value
    bar.close()
    info = {"method": "acdc", "threshold": threshold, "forwards": forwards,
            "seconds": time.perf_counter() - start, "metric": repr(task.metric),
            "final_metric": current}
    return Circuit(graph, kept, info=info)
