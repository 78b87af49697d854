"""A sweep's write table: every cell's rectangles, for every prompt pair, as one int64 array.

A sweep of a few hundred cells spends more time deciding where to write than writing, unless
the deciding is done in arrays: one short loop reads each site's fields, and the rectangles,
first positions and per-cell summaries come from whole-array operations. Sites that name several
positions, heads or neurons at once go through :func:`~mechinterp.patching.boxes.site_rects`.

Columns of the table (one row per write): pair, group (index into the sweep's component-layer
groups), origin (0 clean, 1 corrupt), a_begin, a_end, f_begin, f_end, over the ``[rows, a, f]``
view of the group's tensor (see :mod:`mechinterp.patching.boxes`). Rows are ordered by cell.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mechinterp.patching.boxes import site_rects
from mechinterp.positions import RowSpans
from mechinterp.sites import Site, base_component, token_axis

Group = tuple[str, int]

_PLAIN, _PER_HEAD, _NEURON, _PATTERN = 0, 1, 2, 3
_KIND = {"head": _PER_HEAD, "q": _PER_HEAD, "k": _PER_HEAD, "v": _PER_HEAD, "neuron": _NEURON,
         "pattern": _PATTERN}


@dataclass
class WriteTable:
    """Where every cell of a sweep writes.

    ``writes`` is ``[n, 7]`` (see the module docstring), ``offsets[c]:offsets[c + 1]`` the rows
    of cell ``c``, ``cell`` the cell of each row, and ``first`` / ``last`` the first and last
    sequence position each write covers (query positions for attention patterns; ``last`` is -1
    for an empty rectangle).
    """

    writes: np.ndarray
    offsets: np.ndarray
    cell: np.ndarray
    first: np.ndarray
    last: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def starts(self, last_start: int) -> np.ndarray:
        """Per cell, its first write from the clean run, at most ``last_start`` (0 if none)."""
        clean = self.writes[:, 2] == 0
        starts = np.full(self.n_cells, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(starts, self.cell[clean], self.first[clean])
        starts[starts == np.iinfo(np.int64).max] = 0
        return np.clip(starts, 0, max(last_start, 0))

    def inert(self, first_difference: Sequence[int], scored: Sequence[int]) -> np.ndarray:
        """Cells whose every write is frozen, lies before its pair's first difference, or after
        its pair's scored position (per-pair lists)."""
        pair = self.writes[:, 0]
        harmless = ((self.writes[:, 2] != 0)
                    | (self.last < np.asarray(first_difference, dtype=np.int64)[pair])
                    | (self.first > np.asarray(scored, dtype=np.int64)[pair]))
        harmful = np.bincount(self.cell[~harmless], minlength=self.n_cells)
        return np.flatnonzero(harmful == 0)


def build_writes(parts: Sequence[Sequence[tuple[Site, str]]], *, spans: RowSpans, n_pairs: int,
                 group_index: dict[Group, int], group_of: Callable[[Site], Group],
                 extent: Callable[[str], tuple[int, int]], heads_of: Callable[[str], int],
                 own_spans: Callable[[str], RowSpans] | None = None) -> WriteTable:
    """The write table of cells ``parts`` (each a list of ``(site, origin)``).

    ``extent(component)`` is ``(a, f)`` of the component's ``[rows, a, f]`` view and
    ``heads_of(component)`` how many heads its features hold. Positions are checked against
    ``spans`` (raising for positions outside a prompt) before anything is written; a tower's
    components (``vision.*``) and the projector count theirs over ``own_spans(axis)``, their own
    tokens (:func:`~mechinterp.sites.token_axis`). Both run before the main sequence, so their
    writes span every main position.
    """
    seq_len = spans.seq_len

    def spans_of(axis: str | None) -> RowSpans:
        return spans if axis is None or own_spans is None else own_spans(axis)

    positions: dict[tuple[str | None, int], int] = {}  # distinct (axis, position) -> row of `columns`
    simple: list[tuple[int, int, int, int, int, int, int]] = []
    odd: list[np.ndarray] = []  # rows of sites with several positions, heads or neurons
    odd_cells: list[np.ndarray] = []
    memo: dict = {}
    group_ids: dict[tuple[str, int | None], int] = {}  # by (component, layer as given)
    fields = operator.attrgetter("component", "layer", "pos", "head", "neuron")
    for c, cell in enumerate(parts):
        for site, origin in cell:
            component, layer, pos, head, neuron = fields(site)
            group = group_ids.get((component, layer))
            if group is None:
                group = group_ids[component, layer] = group_index[group_of(site)]
            frozen = int(origin != "clean")
            if type(pos) is tuple or type(head) is tuple or type(neuron) is tuple:
                axis = token_axis(component)
                rects = site_rects(site, spans_of(axis), n_pairs, extent(component),
                                   heads_of(component), memo if axis is None else {})
                rows = [(p, group, frozen, *r) for p, pair_rects in enumerate(rects) for r in pair_rects]
                odd.append(np.asarray(rows, dtype=np.int64).reshape(-1, 7))
                odd_cells.append(np.full(len(rows), c, dtype=np.int64))
                continue
            slot = -1 if pos is None else positions.setdefault((token_axis(component), pos),
                                                               len(positions))
            simple.append((c, group, frozen, _KIND.get(base_component(component), _PLAIN), slot,
                           -1 if head is None else head, -1 if neuron is None else neuron))
    # Raises for positions outside a prompt (or a tower's tokens); rows match slots.
    columns = np.zeros((max(1, len(positions)), n_pairs), np.int64)
    for axis in {axis for axis, _ in positions}:
        slots = [(slot, pos) for (a, pos), slot in positions.items() if a == axis]
        columns[[slot for slot, _ in slots]] = spans_of(axis).int_columns([pos for _, pos in slots])

    entries = np.asarray(simple, dtype=np.int64).reshape(-1, 7)
    cell, group, frozen, kind, slot, head, neuron = entries.T
    # Extents per group (every site of a group has the same component).
    components = {g: name[0] for name, g in group_index.items()}
    extent_a = np.zeros(len(group_index) or 1, dtype=np.int64)
    extent_f = np.zeros_like(extent_a)
    width = np.ones_like(extent_a)
    for g, component in components.items():
        extent_a[g], extent_f[g] = extent(component)
        if _KIND.get(base_component(component)) == _PER_HEAD:
            width[g] = extent_f[g] // heads_of(component)
    has_pos = slot >= 0
    col = columns[np.where(has_pos, slot, 0)]  # [entries, pairs]
    has_pos, has_head, has_neuron = has_pos[:, None], (head >= 0)[:, None], (neuron >= 0)[:, None]
    pattern = (kind == _PATTERN)[:, None]
    e_a, e_f, w = extent_a[group][:, None], extent_f[group][:, None], width[group][:, None]
    h, n = head[:, None], neuron[:, None]
    # Plain, per-head and neuron components: positions along a, features along f.
    a0 = np.where(has_pos, col, 0)
    a1 = np.where(has_pos, col + 1, e_a)
    per_head = has_head & (kind == _PER_HEAD)[:, None]
    by_neuron = has_neuron & (kind == _NEURON)[:, None]
    f0 = np.where(per_head, h * w, np.where(by_neuron, n, 0))
    f1 = np.where(per_head, (h + 1) * w, np.where(by_neuron, n + 1, e_f))
    # Attention patterns: heads along a, query blocks of seq_len keys along f.
    a0 = np.where(pattern, np.where(has_head, h, 0), a0)
    a1 = np.where(pattern, np.where(has_head, h + 1, e_a), a1)
    f0 = np.where(pattern, np.where(has_pos, col * seq_len, 0), f0)
    f1 = np.where(pattern, np.where(has_pos, (col + 1) * seq_len, e_f), f1)

    shape = a0.shape
    pairs = np.broadcast_to(np.arange(n_pairs, dtype=np.int64), shape)
    table = np.stack([pairs, *(np.broadcast_to(x[:, None], shape) for x in (group, frozen)),
                      a0, a1, f0, f1], axis=-1).reshape(-1, 7)
    cells = np.repeat(cell, n_pairs)
    if odd:
        table = np.concatenate([table, *odd])
        cells = np.concatenate([cells, *odd_cells])
        order = np.argsort(cells, kind="stable")
        table, cells = table[order], cells[order]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(cells, minlength=len(parts)), out=offsets[1:])

    is_pattern = np.asarray([components[g] == "pattern" for g in range(len(components))] or [False])
    pattern_rows = is_pattern[table[:, 1]]
    a0, a1, f0, f1 = table[:, 3], table[:, 4], table[:, 5], table[:, 6]
    first = np.where(pattern_rows, f0 // seq_len, a0)
    last = np.where(pattern_rows, (f1 - 1) // seq_len, a1 - 1)
    before_main = np.asarray([token_axis(components[g]) is not None for g in range(len(components))]
                             or [False])[table[:, 1]]
    first[before_main], last[before_main] = 0, seq_len - 1
    last[(a1 <= a0) | (f1 <= f0)] = -1
    return WriteTable(table, offsets, cells, first, last)
