"""How to cut the patched cells of a sweep into forwards.

A forward that starts at layer ``l`` (everything below comes from the corrupted run) costs about
``overhead + rows * depth(l)``: a fixed part (kernel launches, Python) worth ``overhead`` rows of
compute, plus work proportional to the rows it carries through the remaining layers. In a causal
model a forward may also start at a later position. Cutting where the first patched layer or
position changes lets later forwards skip more, at the price of more fixed parts; small dynamic
programmes over those boundaries pick the cheapest cuts.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence


def depth(layer: int, n_layers: int) -> float:
    """Fraction of a full forward left when blocks below ``layer`` are skipped (the embedding
    and the head count as one layer; ``layer < 0`` means nothing is skipped)."""
    return (n_layers - max(layer, 0) + 1) / (n_layers + 1)


#: Most candidate cuts between starting positions that :func:`plan_forwards` weighs, for small
#: sweeps and for large ones (whose forwards cost far more than the planning's quadratic loop).
MAX_BANDS = 10
MAX_BANDS_LARGE = 40
LARGE_ROWS = 4096


def plan_forwards(starts: Sequence[int], layers: Sequence[int], *, seq_len: int, n_layers: int,
                  rows_per_cell: int, budget: int, overhead: float,
                  first_extra_rows: int = 0) -> list[list[int]]:
    """Group cells into forwards when each cell may also skip the positions before its start.

    In a causal model, positions before a cell's first patched position compute what the
    corrupted run computed, so a forward whose cells all start at ``s`` or later runs only the
    last ``seq_len - s`` positions (the earlier ones come from the corrupted run's key/value
    cache). A forward starting at position ``s`` and layer ``l`` then costs
    ``overhead + rows * depth(l) * (seq_len - s) / seq_len``. Cells are first cut into bands of
    starts, then each band along layers (:func:`plan_chunks`'s programme), choosing the cheapest
    band cuts by a second programme over at most :data:`MAX_BANDS` candidate cuts
    (:data:`MAX_BANDS_LARGE` for sweeps of :data:`LARGE_ROWS` rows or more).

    With ``first_extra_rows``, the first forward also carries that many rows (the unpatched
    runs) and runs every position and layer, whatever its cells' starts; it then comes first in
    the list, empty when no cell rides along.

    Examples:
        >>> plan_forwards([0, 0, 3, 3], [0, 1, 0, 1], seq_len=4, n_layers=2, rows_per_cell=1,
        ...               budget=8, overhead=0.5)
        [[0, 1], [2, 3]]
        >>> plan_forwards([0, 0, 3, 3], [0, 1, 0, 1], seq_len=4, n_layers=2, rows_per_cell=1,
        ...               budget=8, overhead=100.0)
        [[0, 2, 1, 3]]
    """
    n = len(starts)
    if n == 0:
        return [[]] if first_extra_rows else []
    per_forward = max(1, budget // rows_per_cell)
    rows = n * rows_per_cell
    if rows <= overhead and rows + first_extra_rows <= budget:
        # A second forward would cost more than all the rows it could shorten.
        return [sorted(range(n), key=lambda c: layers[c])]
    distinct = sorted(set(starts))
    bands = MAX_BANDS_LARGE if rows >= LARGE_ROWS else MAX_BANDS
    if len(distinct) > bands:  # candidate cuts at quantiles of the starts
        picks = {distinct[round(i * (len(distinct) - 1) / (bands - 1))] for i in range(bands)}
        distinct = sorted(picks | {distinct[0]})
    band_of = [bisect.bisect_right(distinct, s) - 1 for s in starts]
    # counts[b][l + 1]: cells of band candidate b whose first patched layer is l (l = -1 too)
    counts = [[0] * (n_layers + 1) for _ in distinct]
    for band, layer in zip(band_of, layers):
        counts[band][max(layer, -1) + 1] += 1
    prefix = [[0] * (n_layers + 1)]
    for row in counts:
        prefix.append([a + b for a, b in zip(prefix[-1], row)])

    def band(i: int, j: int) -> tuple[float, list[int]]:
        """Cost of the cells of candidates ``[i, j)`` as one band, and its layer cuts."""
        per_layer = [(layer - 1, b - a) for layer, (a, b) in enumerate(zip(prefix[i], prefix[j]))
                     if b > a]
        extra = first_extra_rows if i == 0 else 0
        scale = 1.0 if extra else (seq_len - distinct[i]) / seq_len  # the first runs in full
        return _layer_programme(per_layer, scale=scale, rows_per_cell=rows_per_cell,
                                per_forward=per_forward, overhead=overhead, n_layers=n_layers,
                                extra=extra)

    k = len(distinct)
    best = [0.0] + [math.inf] * k
    back: list[tuple[int, list[int]]] = [(0, [])] * (k + 1)
    for j in range(1, k + 1):
        for i in range(j):
            cost, cuts = band(i, j)
            if best[i] + cost < best[j]:
                best[j], back[j] = best[i] + cost, (i, cuts)
    bands: list[tuple[int, int, list[int]]] = []
    j = k
    while j > 0:
        i, cuts = back[j]
        bands.append((i, j, cuts))
        j = i
    forwards: list[list[int]] = []
    for i, j, cuts in reversed(bands):
        cells = sorted((c for c in range(n) if i <= band_of[c] < j), key=lambda c: layers[c])
        bounds = [0] + [sum(1 for c in cells if layers[c] < cut) for cut in cuts] + [len(cells)]
        for b0, b1 in itertools.pairwise(bounds):
            if first_extra_rows and not forwards:
                head = min(b1, b0 + max(1, (budget - first_extra_rows) // rows_per_cell))
                forwards.append(cells[b0:head])
                b0 = head
            forwards.extend(cells[a:b] for a, b in split_forwards(b0, b1, per_forward))
    return forwards


def _layer_programme(per_layer: list[tuple[int, int]], *, scale: float, rows_per_cell: int,
                     per_forward: int, overhead: float, n_layers: int, extra: int
                     ) -> tuple[float, list[int]]:
    """Cheapest cuts of one band along layers: ``per_layer`` is ``(layer, cells)`` sorted by
    layer; returns the cost and the layers where new ranges begin. With ``extra`` rows, the
    first range runs every layer (it holds the unpatched runs)."""
    counts = [0]
    for _, cells in per_layer:
        counts.append(counts[-1] + cells)
    # Cost per row of a range starting at entry t (inlined: this loop runs for every band).
    per_row = [depth(-1 if extra and t == 0 else layer, n_layers) * scale
               for t, (layer, _) in enumerate(per_layer)]
    capacity = per_forward * rows_per_cell
    m = len(per_layer)
    best = [0.0] + [math.inf] * m
    back = [0] * (m + 1)
    for u in range(1, m + 1):
        for t in range(u):
            rows = (counts[u] - counts[t]) * rows_per_cell + (extra if t == 0 else 0)
            total = best[t] + -(-rows // capacity) * overhead + rows * per_row[t]
            if total < best[u]:
                best[u], back[u] = total, t
    cuts = []
    u = m
    while u > 0:
        u = back[u]
        if u > 0:
            cuts.append(per_layer[u][0])
    return best[m], cuts[::-1]


def split_forwards(begin: int, end: int, per_forward: int) -> list[tuple[int, int]]:
    """Split a range of cells into the fewest forwards of at most ``per_forward`` cells."""
    count = end - begin
    if count <= 0:
        return []
    pieces = max(1, math.ceil(count / per_forward))
    size = math.ceil(count / pieces)
    return [(start, min(start + size, end)) for start in range(begin, end, size)]
