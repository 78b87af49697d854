"""How to cut a sorted list of patched cells into forwards.

A forward that starts at layer ``l`` (everything below comes from the corrupted run) costs about
``overhead + rows * depth(l)``: a fixed part (kernel launches, Python) worth ``overhead`` rows of
compute, plus work proportional to the rows it carries through the remaining layers. Cutting at
layer boundaries lets later forwards skip more layers, at the price of more fixed parts; a small
dynamic programme over the layer boundaries picks the cheapest cuts.

Examples:
    >>> plan_chunks([0, 0, 1, 1], rows_per_cell=1, budget=8, n_layers=2, overhead=0.0)
    [(0, 2), (2, 4)]
    >>> plan_chunks([0, 0, 1, 1], rows_per_cell=1, budget=8, n_layers=2, overhead=100.0)
    [(0, 4)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def depth(layer: int, n_layers: int) -> float:
    """Fraction of a full forward left when blocks below ``layer`` are skipped (the embedding
    and the head count as one layer; ``layer < 0`` means nothing is skipped)."""
    return (n_layers - max(layer, 0) + 1) / (n_layers + 1)


def plan_chunks(layers: Sequence[int], *, rows_per_cell: int, budget: int, n_layers: int,
                overhead: float, first_extra_rows: int = 0) -> list[tuple[int, int]]:
    """Cut ``layers`` (the first patched layer of each cell, sorted) into ranges of cells.

    Each returned range runs as one or more forwards of at most ``budget`` rows. Cuts fall only
    where the layer changes, except that a range longer than the budget is split into equal
    forwards. ``first_extra_rows`` rows ride along in the first forward (the unpatched runs).
    """
    n = len(layers)
    if n == 0:
        return []
    cuts = [0] + [i for i in range(1, n) if layers[i] != layers[i - 1]] + [n]
    per_forward = max(1, budget // rows_per_cell)

    def cost(begin: int, end: int) -> float:
        rows = (end - begin) * rows_per_cell + (first_extra_rows if begin == 0 else 0)
        forwards = math.ceil(rows / (per_forward * rows_per_cell))
        return forwards * overhead + rows * depth(layers[begin], n_layers)

    best = [0.0] + [math.inf] * (len(cuts) - 1)
    back = [0] * len(cuts)
    for k in range(1, len(cuts)):
        for t in range(k):
            total = best[t] + cost(cuts[t], cuts[k])
            if total < best[k]:
                best[k], back[k] = total, t
    ranges = []
    k = len(cuts) - 1
    while k > 0:
        ranges.append((cuts[back[k]], cuts[k]))
        k = back[k]
    return ranges[::-1]


def split_forwards(begin: int, end: int, per_forward: int) -> list[tuple[int, int]]:
    """Split a range of cells into the fewest forwards of at most ``per_forward`` cells."""
    count = end - begin
    if count <= 0:
        return []
    pieces = max(1, math.ceil(count / per_forward))
    size = math.ceil(count / pieces)
    return [(start, min(start + size, end)) for start in range(begin, end, size)]
