"""Exact activation-patching sweeps, many patched runs per forward.

For every site (a cell of the sweep) and every prompt pair, the corrupted prompt runs with the
site's activation replaced by its value from the clean prompt (or a mean, or another pair's), and
a metric scores the run. Cells are packed into batches: row ``c * n_pairs + p`` of a forward is
cell ``c`` on pair ``p``, and one kernel call per (component, layer) writes every row's patch.

Work a patch cannot change is not redone: cells are grouped by their first patched layer, and
the blocks below a batch's first patched layer return the corrupted run's outputs instead of
being recomputed. In a causal model, cells are also grouped by their first patched position, and
a batch runs only the positions from its first patched one on, attending to the corrupted run's
keys and values for the earlier ones (see :mod:`mechinterp.patching.prefix`). A cell that only
patches positions before the first difference between the clean and corrupted prompts, or after
the scored position, cannot change the score, so its value is the corrupted run's, uncomputed. A
causal LM only computes logits at the scored position.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mechinterp import _ops
from mechinterp.engine import Plan, check_indices, resolve
from mechinterp.errors import InputError, MechinterpError, ShapeError
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, Sites, Tokens
from mechinterp.patching.boxes import (
    BoxPatch,
    as_rows,
    component_extent,
    own_token_count,
    site_rects,
)
from mechinterp.patching.metrics import Metric, as_metric
from mechinterp.patching.prefix import (
    CorruptedBlocks,
    keeping_rows,
    keys_values,
    new_cache,
    prefix_cache,
)
from mechinterp.patching.result import PatchingResult
from mechinterp.patching.schedule import plan_forwards
from mechinterp.patching.writes import WriteTable, build_writes
from mechinterp.positions import RowSpans
from mechinterp.sites import Site, SiteSelector, SiteUnion, base_component, token_axis, tower_of

SOURCES = ("clean", "mean", "resample")
_UNPATCHABLE = ("logits",)
_SAVE_EVERY_S = 10.0


def activation_patch(
    model: InterpModel,
    clean: Inputs,
    corrupt: Inputs,
    sites: Sites,
    metric: Metric | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    source: str = "clean",
    alpha: float = 1.0,
    position: int = -1,
    batch_size: int | None = None,
    reuse: bool = True,
    progress: bool = True,
    results: str | Path | None = None,
    seed: int = 0,
) -> PatchingResult:
    """Patch each site from the clean run into the corrupted run and score every patched run.

    Args:
        model: a model from :func:`mechinterp.load`.
        clean: the prompts that provide patched values (one per pair).
        corrupt: the prompts that are run and patched, with the same shape and padding as
            ``clean``.
        sites: the cells of the sweep: a selector such as
            ``select("resid_pre").layers().positions()`` or a list of sites. A site without a
            position patches every position; with heads or neurons, only those slices. Sites
            of a multimodal model's towers (``vision.*``, ``qformer.*``) count positions over
            the tower's own tokens (image patches, queries); their runs recompute everything
            after the tower.
        metric: :class:`LogitDiff`, :class:`LogProb`, :class:`Prob`, :class:`KL`, or a callable
            ``(logits [rows, vocab], pairs [rows]) -> [rows]``.
        source: ``"clean"`` (the pair's clean value), ``"mean"`` (the mean over clean prompts)
            or ``"resample"`` (another pair's clean value, seeded by ``seed``).
        alpha: interpolation weight: the patched value is ``corrupt + alpha (source - corrupt)``.
        position: the position whose logits the metric scores (counted like ``Site.pos``).
        batch_size: rows (cells x pairs) per forward; by default sized to a quarter of the free
            memory on GPUs and to about 1 GiB of activations (at most 512 rows) on the CPU. Out
            of memory halves it and retries, keeping the cells already finished.
        reuse: skip the blocks below a batch's first patched layer and, in causal models, the
            positions before its first patched position (both are the corrupted run's).
            Results are the same either way, up to floating-point rounding.
        progress: show a progress bar.
        results: a file to keep results in. An interrupted sweep run again with the same file
            and arguments resumes where it stopped; finished sweeps are returned from it.
        seed: the seed of ``source="resample"``.

    Returns:
        :class:`PatchingResult` with ``values [pair, site]``.

    Examples:
        >>> import mechinterp
        >>> from mechinterp import select
        >>> from mechinterp.patching import LogitDiff, activation_patch
        >>> model = mechinterp.load("induction-2l")
        >>> result = activation_patch(
        ...     model, "fuba bu mabi fuba bu", "fuba bu mabi fuba fafi",
        ...     select("resid_pre").layers().positions(), LogitDiff("mabi", "fuba"), progress=False)
        >>> result.grid()[0].shape, result.grid()[1]
        (torch.Size([2, 6]), ('layer', 'pos'))
    """
    if not isinstance(model, InterpModel):
        msg = f"model must be an InterpModel from mechinterp.load; got {type(model).__name__}"
        raise InputError(msg)
    if source not in SOURCES:
        msg = f"source must be one of {list(SOURCES)}; got {source!r}"
        raise InputError(msg)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        msg = f"alpha must be a number; got {type(alpha).__name__} {alpha!r}"
        raise InputError(msg)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        msg = f"batch_size must be a positive int or None; got {batch_size!r}"
        raise InputError(msg)
    sweep = _Sweep(model, clean, corrupt, sites, as_metric(metric), source, float(alpha),
                   position, seed)
    return sweep.run(batch_size=batch_size, reuse=reuse, progress=progress,
                     results=None if results is None else Path(results))


#: Cell layouts each model remembers (see :meth:`_Sweep._layout`).
_LAYOUTS_KEPT = 8


@dataclass(frozen=True)
class _Layout:
    """A sweep's cells and everything about them that depends only on the site grid and the
    prompts' shape and padding (not their tokens): checked once, reusable."""

    cells: tuple[Site, ...]
    parts: list[list[tuple[Site, str]]]
    groups: list[tuple[str, int]]  # the (component, layer) tensors written, in forward order
    layer_of: list[int]  # per cell, its first patched layer
    frozen_groups: set[tuple[str, int]]  # groups some cell freezes at the corrupted values
    table: WriteTable  # where every cell writes (positions checked)


class _Sweep:
    """One sweep's inputs, sources and cells, checked before any patched forward runs."""

    def __init__(self, model: InterpModel, clean: Inputs, corrupt: Inputs, sites: Sites,
                 metric: Metric, source: str, alpha: float, position: int, seed: int, *,
                 parts: list[list[tuple[Site, str]]] | None = None,
                 corruption: Callable[[int], TensorEdit] | None = None,
                 corrupted_from: int | None = None):
        """``parts`` makes cells compound: cell ``c`` patches every ``(site, origin)`` of
        ``parts[c]``, taking values from the clean run (origin ``"clean"``) or freezing them at
        the corrupted run's (``"corrupt"``); by default each cell patches its own site from the
        clean run. ``corruption(first_row)`` is an edit applied to every row from ``first_row``
        on (the corrupted and patched rows), for corruptions that are not other tokens (noise
        on embeddings); ``corrupted_from`` is then the first position it touches. When a forward
        runs only the positions from ``start`` on, ``corruption(first_row, start)`` must write
        into that suffix."""
        self.model = model
        self.clean = model._as_tokens(clean)
        self.corrupt = model._as_tokens(corrupt)
        if self.clean.shape != self.corrupt.shape or not torch.equal(
                self.clean.attention_mask, self.corrupt.attention_mask):
            msg = (
                f"clean and corrupt must tokenize to the same shape and padding, so that every "
                f"position matches; got shapes {self.clean.shape} and {self.corrupt.shape}"
                + ("" if self.clean.shape != self.corrupt.shape else " with different padding")
            )
            raise ShapeError(msg)
        self.n_pairs, self.seq_len = self.clean.shape
        self.spans = RowSpans.from_mask(self.corrupt.attention_mask)
        self.own_spans: dict[str, RowSpans] = {}  # filled as tower and projector sites ask
        layout = self._layout(sites, parts)
        self.cells, self.parts, self.groups = list(layout.cells), layout.parts, layout.groups
        self.layer_of, self.frozen_groups = layout.layer_of, layout.frozen_groups
        self.table = layout.table
        self.metric = metric.bind(model, self.n_pairs)
        self.source, self.alpha, self.seed = source, alpha, seed
        self.corruption = corruption
        self.score_columns = self._score_columns(position)
        self.corrupted_from = corrupted_from

    def _layout(self, sites: Sites, parts: list[list[tuple[Site, str]]] | None) -> _Layout:
        """The cells and where they write, remembered per model for selectors: a sweep run
        again over the same grid, on prompts of the same shape and padding, reuses them."""
        key = None
        if parts is None and isinstance(sites, (SiteSelector, SiteUnion)):
            key = (sites, self.n_pairs, self.seq_len, tuple(self.spans.start.tolist()),
                   tuple(self.spans.length.tolist()))
            memo = self.model.__dict__.setdefault("_sweep_layouts", OrderedDict())
            if key in memo:
                memo.move_to_end(key)
                return memo[key]
        layout = self._new_layout(sites, parts)
        if key is not None:
            memo[key] = layout
            if len(memo) > _LAYOUTS_KEPT:
                memo.popitem(last=False)
        return layout

    def _new_layout(self, sites: Sites, parts: list[list[tuple[Site, str]]] | None) -> _Layout:
        model = self.model
        cells = tuple(model.sites(sites, n_positions=self.seq_len))
        if not cells:
            msg = "sites must name at least one site to patch; got none"
            raise InputError(msg)
        parts = parts if parts is not None else [[(site, "clean")] for site in cells]
        groups: dict[tuple[str, int | None], tuple[str, int]] = {}  # by the layer as given
        layer_of: list[int] = []  # per cell, its first patched layer
        frozen_groups: set[tuple[str, int]] = set()
        for cell in parts:
            first_layer = None
            for site, origin in cell:
                group = groups.get((site.component, site.layer))
                if group is None:
                    if tower_of(site.component) is not None and \
                            base_component(site.component) == "pattern":
                        msg = (f"sites: a tower's attention patterns cannot be swept; got "
                               f"{site}; edit them with model.run(edits=...)")
                        raise InputError(msg)
                    if site.component in _UNPATCHABLE:
                        msg = f"sites: {site.component!r} cannot be patched (it is the output); got {site}"
                        raise InputError(msg)
                    # Checks the component and the layer once per (component, layer).
                    resolve(site, model.table, model.base)
                    group = groups[site.component, site.layer] = self._group(site)
                elif site.head is not None or site.neuron is not None:
                    check_indices(site, model.table)
                if origin == "corrupt":
                    frozen_groups.add(group)
                # A tower runs before the main layers: a patch there changes all of them.
                layer = -1 if tower_of(group[0]) is not None else group[1]
                first_layer = layer if first_layer is None else min(first_layer, layer)
            layer_of.append(first_layer)
        ordered = sorted(set(groups.values()), key=lambda g: (g[1], g[0]))
        table = build_writes(parts, spans=self.spans, n_pairs=self.n_pairs,
                             group_index={group: i for i, group in enumerate(ordered)},
                             group_of=self._group, extent=self._extent, heads_of=self._heads,
                             own_spans=self._own_spans)
        return _Layout(cells, parts, ordered, layer_of, frozen_groups, table)

    # -- towers (image encoders that run before the main layers) ---------------------------

    def _own_spans(self, axis: str) -> RowSpans:
        """Every pair's tokens of ``axis`` (a tower's, or the projector's rows), unpadded."""
        if axis not in self.own_spans:
            count = own_token_count(self.model, self.clean, axis)
            self.own_spans[axis] = RowSpans.from_mask(torch.ones(self.n_pairs, count, dtype=torch.bool))
        return self.own_spans[axis]

    def _heads(self, component: str) -> int:
        """Heads a component's features hold (key/value heads for ``k`` and ``v``)."""
        dims = self.model.table.dims_for(component)
        return dims.n_kv_heads if base_component(component) in ("k", "v") else dims.n_heads

    def _first_difference(self) -> list[int]:
        """Per pair, the first column where the corrupted run can differ from the clean one."""
        differs = self.clean.input_ids.cpu() != self.corrupt.input_ids.cpu()
        columns = torch.where(differs.any(1), differs.int().argmax(1), self.seq_len).tolist()
        if set(self.clean.extras) != set(self.corrupt.extras) or any(
                not torch.equal(value, self.corrupt.extras[name]) for name, value in self.clean.extras.items()):
            # Other inputs (images) differ: any position may, as far as the ids tell.
            columns = [0] * len(columns)
        if self.corruption is not None:
            start = 0 if self.corrupted_from is None else self.corrupted_from
            columns = [min(c, start) for c in columns]
        return columns

    def _inert(self) -> list[int]:
        """Cells whose every write lands where clean and corrupted activations are equal.

        In a causal model, positions before the first difference compute the same values in the
        clean and the corrupted run, so patching them (from the clean run, at any alpha) or
        freezing anything at the corrupted values changes nothing; nor can a patch after the
        scored position (from any source) change the score. Such a run's metric is the
        corrupted run's, without computing it.
        """
        if not self.model.table.causal:
            return []
        first = self._first_difference() if self.source == "clean" else [0] * self.n_pairs
        return self.table.inert(first, self._scored_columns()).tolist()

    def _starts(self) -> list[int]:
        """Per cell, the first position its patched runs must compute: its first write from
        the clean run (earlier positions are the corrupted run's); 0 outside causal models."""
        if not self.model.table.causal:
            return [0] * self.table.n_cells
        return self.table.starts(min(self._scored_columns())).tolist()

    def _scored_columns(self) -> list[int]:
        """The scored column of each pair."""
        columns = self.score_columns
        if isinstance(columns, int):
            return [columns] * self.n_pairs
        return columns.tolist()

    def _layer(self, site: Site) -> int:
        layers = self.model.table.dims_for(site.component).n_layers
        return -1 if site.layer is None else site.layer % layers

    def _group(self, site: Site) -> tuple[str, int]:
        return site.component, self._layer(site)

    def _score_columns(self, position: int) -> torch.Tensor | int:
        if isinstance(position, bool) or not isinstance(position, int):
            msg = f"position must be an int; got {type(position).__name__} {position!r}"
            raise InputError(msg)
        try:
            columns = self.spans.columns(position)
        except MechinterpError as err:
            msg = str(err).replace("pos ", "position ", 1)
            raise type(err)(msg) from None
        return columns

    # -- logits ---------------------------------------------------------------------------

    def _extra_inputs(self) -> dict:
        """Compute logits only where they are scored, when the model allows it."""
        last = self.score_columns == self.seq_len - 1 if isinstance(self.score_columns, int) \
            else bool((self.score_columns == self.seq_len - 1).all())
        if last and "logits_to_keep" in _parameters(type(self.model._module).forward):
            return {"logits_to_keep": 1}
        return {}

    def _scored(self, logits: torch.Tensor, rows: int, start: int = 0) -> torch.Tensor:
        """``[rows, vocab]`` logits at the scored position of each row, from logits of the
        positions from ``start`` on."""
        if logits.shape[1] == 1:
            return logits[:, 0]
        columns = self.score_columns
        if isinstance(columns, int):
            return logits[:, columns - start]
        index = (columns - start).to(logits.device).repeat(rows // self.n_pairs)
        return logits[torch.arange(rows, device=logits.device), index]

    # -- geometry and sources --------------------------------------------------------------

    def _extent(self, component: str) -> tuple[int, int]:
        """``(a, f)`` of a component's tensor seen as ``[rows, a, f]``."""
        axis = token_axis(component)
        if axis is None:
            return component_extent(self.model.dims, component, self.seq_len)
        return component_extent(self.model.table.dims_for(component), base_component(component),
                                self._own_spans(axis).seq_len)

    def _rects(self) -> list[list[list[tuple[tuple[str, int], str, tuple[int, int, int, int]]]]]:
        """Per cell, per pair: ``(group, origin, rectangle)`` of every write (checks positions)."""
        memo: dict = {}
        out = []
        for cell in self.parts:
            per_pair: list[list] = [[] for _ in range(self.n_pairs)]
            for site, origin in cell:
                axis = token_axis(site.component)
                spans = self.spans if axis is None else self._own_spans(axis)
                rects = site_rects(site, spans, self.n_pairs, self._extent(site.component),
                                   self._heads(site.component), memo if axis is None else {})
                for pair, pair_rects in enumerate(rects):
                    per_pair[pair].extend((self._group(site), origin, r) for r in pair_rects)
            out.append(per_pair)
        return out

    def _source(self, clean_rows: torch.Tensor) -> torch.Tensor:
        """The values patched in, ``[sources, a, f]``, from the clean rows ``[pair, a, f]``."""
        if self.source == "mean":
            return clean_rows.mean(0, keepdim=True)
        return clean_rows.clone()

    def _source_rows(self) -> list[int]:
        if self.source == "mean":
            return [0] * self.n_pairs
        if self.source == "resample" and self.n_pairs > 1:
            # A seeded shift of a random order: no pair takes its own value.
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.n_pairs, generator=g).tolist()
            shift = int(torch.randint(1, self.n_pairs, (1,), generator=g))
            rows = [0] * self.n_pairs
            for i, pair in enumerate(order):
                rows[pair] = order[(i + shift) % self.n_pairs]
            return rows
        return list(range(self.n_pairs))

    def _boxes(self, chunk: Sequence[int], first_row: int, start: int = 0
               ) -> dict[tuple[str, int], _ops.StagedBoxes]:
        """Boxes per (component, layer) for the chunk's cells, rows counted from ``first_row``
        and positions from ``start`` (writes before it are dropped: only frozen values, equal
        to the corrupted run's, can lie there), staged on the device in one upload."""
        if not chunk:
            return {}
        offsets = self.table.offsets
        cells = np.asarray(chunk, dtype=np.int64)
        begin, lengths = offsets[cells], offsets[cells + 1] - offsets[cells]
        slot = np.repeat(np.arange(len(chunk)), lengths)  # each write's cell, as a slot in the chunk
        within = np.arange(len(slot)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        writes = self.table.writes[begin[slot] + within]
        if start:
            writes, kept = self._from_position(writes, start)
            slot = slot[kept]
        pair, group, frozen = writes[:, 0], writes[:, 1], writes[:, 2].astype(bool)
        # Frozen (corrupted) values sit after the clean sources in a group's source tensor.
        frozen_base = 1 if self.source == "mean" else self.n_pairs
        source = np.where(frozen, frozen_base + pair, self.source_rows[pair])
        boxes = np.concatenate([(first_row + slot * self.n_pairs + pair)[:, None], source[:, None],
                                writes[:, 3:]], axis=1)
        order = np.argsort(group, kind="stable")
        groups, counts = np.unique(group[order], return_counts=True)
        staged = _ops.stage_boxes(torch.from_numpy(boxes[order]), self.alpha,
                                  self.clean.input_ids.device)
        return {self.groups[g]: piece for g, piece in zip(groups.tolist(),
                                                           staged.split(counts.tolist()))}

    def _from_position(self, writes: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Writes moved to a forward of the positions from ``start`` on (the position axis is
        ``a``, or, for attention patterns, blocks of ``seq_len`` along ``f``), without those
        that end before it; and the mask of the writes kept."""
        pattern = np.asarray([g[0] == "pattern" for g in self.groups])[writes[:, 1]]
        writes = writes.copy()
        a, f = writes[:, 3:5], writes[:, 5:7]  # views into the copy
        a[~pattern] = np.maximum(a[~pattern] - start, 0)
        f[pattern] = np.maximum(f[pattern] - start * self.seq_len, 0)
        kept = (a[:, 1] > a[:, 0]) & (f[:, 1] > f[:, 0])
        return writes[kept], kept

    def _sources(self, group: tuple[str, int], start: int) -> torch.Tensor:
        """A group's source values from position ``start`` on (a view)."""
        source = self.sources[group]
        if not start:
            return source
        if group[0] == "pattern":
            return source[:, :, start * self.seq_len:]
        return source[:, start:]

    @staticmethod
    def _site(group: tuple[str, int]) -> Site:
        component, layer = group
        return Site(component, layer=None if layer < 0 else layer)

    # -- the sweep ------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.clean.input_ids, self.corrupt.input_ids, self.clean.attention_mask):
            h.update(t.cpu().numpy().tobytes())
        h.update(repr((self.model.family, self.model.dims, [str(s) for s in self.cells],
                       [[(str(site), origin) for site, origin in cell] for cell in self.parts],
                       repr(self.corruption), repr(self.metric), self.source, self.alpha, self.seed,
                       self.score_columns if isinstance(self.score_columns, int)
                       else self.score_columns.tolist())).encode())
        return h.hexdigest()

    def _rows_per_forward(self, batch_size: int | None) -> int:
        if batch_size is not None:
            return batch_size
        device = self.clean.input_ids.device
        d = self.model.dims
        itemsize = next(self.model._module.parameters()).element_size()
        # Live activations of one row in one block, with room for the attention scores.
        per_row = self.seq_len * (8 * d.d_model + 2 * d.d_mlp + 3 * d.n_heads * self.seq_len) * itemsize
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(max(1, min(1024, 0.25 * free // per_row)))
        # On the CPU, large batches still amortise per-forward costs; keep them to ~1 GiB.
        return int(max(1, min(512, 2**30 // per_row)))

    def _overhead_rows(self) -> float:
        """The fixed cost of one forward, in rows of compute. A GPU runs small batches at the
        cost of their kernel launches, up to roughly 2,048 tokens in float32 and 16,384 in 16-bit
        floats (tensor cores do each row's work several times faster) at GPT-2-small's width. A
        wider model fills the GPU with fewer tokens, and each token costs more: the fixed part
        shrinks with the square of the width (on an H100, forwards of 24 rows of 598 tokens
        of a 4096-wide model ran at the rate of plain 32-row forwards). A CPU pays per row."""
        if self.clean.input_ids.device.type != "cuda":
            return 1.0
        itemsize = next(self.model._module.parameters()).element_size()
        narrow = min(1.0, 768 / self.model.dims.d_model) ** 2
        tokens = (16384 if itemsize <= 2 else 2048) * narrow
        return max(0.25, tokens / self.seq_len)

    def _forwards(self, pending: list[int], budget: int, first: bool, reuse: bool
                  ) -> list[list[int]]:
        """The remaining cells, cut into forwards; when ``first``, the first forward also
        carries the 2 x n_pairs unpatched rows (and runs every position and layer)."""
        extra = 2 * self.n_pairs if first else 0
        starts = [self.start_of[i] if reuse else 0 for i in pending]
        layers = [self.layer_of[i] if reuse else -1 for i in pending]
        planned = plan_forwards(starts, layers, seq_len=self.seq_len,
                                n_layers=self.model.dims.n_layers, rows_per_cell=self.n_pairs,
                                budget=budget, overhead=self._overhead_rows(),
                                first_extra_rows=extra)
        return [[pending[i] for i in cells] for cells in planned]

    def run(self, *, batch_size: int | None, reuse: bool, progress: bool,
            results: Path | None) -> PatchingResult:
        fingerprint = self._fingerprint() if results is not None else ""
        self.source_rows = np.asarray(self._source_rows(), dtype=np.int64)
        self.start_of = self._starts()
        n_cells = len(self.cells)
        values = torch.full((self.n_pairs, n_cells), float("nan"))
        done = torch.zeros(n_cells, dtype=torch.bool)
        if results is not None and results.exists():
            stored, stored_print = PatchingResult._load_with_fingerprint(results)
            if stored_print != fingerprint:
                msg = (
                    f"results file {results} holds a different sweep (other prompts, sites, metric "
                    f"or settings); pass another path or delete it to start over"
                )
                raise InputError(msg)
            values, done = stored.values.clone(), stored.done.clone()
        finished_before = done.tolist()
        inert = [i for i in self._inert() if not finished_before[i]]
        skipped = set(inert)
        pending = [i for i in range(n_cells) if not finished_before[i] and i not in skipped]
        budget = self._rows_per_forward(batch_size)
        extra = self._extra_inputs()
        book = _Book(self, values, done, inert)
        last_save = time.monotonic()
        bar = (tqdm(total=n_cells, initial=int(done.sum()), desc="patching", unit="cell",
                    leave=False) if progress else _NoBar())
        try:
            queue = self._forwards(pending, budget, first=True, reuse=reuse)
            while queue:
                chunk = queue[0]
                first = not book.started
                try:
                    if first:
                        # Keys and values are kept only for later forwards that start later.
                        # A forward of a suffix cannot take other inputs (an image) whose
                        # tokens lie in the skipped prefix, unless it takes the language
                        # model's merged input embeddings instead (LLaVA).
                        keep_kv = reuse and (not self.clean.extras or self._embeds_reusable()) \
                            and any(self.start_of[c] for f in queue[1:] for c in f)
                        keep_blocks = reuse and len(queue) > 1
                        scores = self._first_forward(chunk, extra, keep_kv, keep_blocks)
                    else:
                        scores = self._patched(chunk, reuse, extra)
                except torch.OutOfMemoryError:
                    if budget <= self.n_pairs * (3 if first else 1):
                        raise
                    budget //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    queue = self._forwards(pending, budget, first=first, reuse=reuse)
                    continue
                queue.pop(0)
                if first:
                    book.started = True
                    bar.update(len(inert))
                if chunk:
                    book.finish(chunk, scores)
                    finished = set(chunk)
                    pending = [i for i in pending if i not in finished]
                    bar.update(len(chunk))
                if first and keep_kv and self.prefix_kv is None:
                    # The model keeps no reusable cache: every forward runs every position.
                    self.start_of = [0] * n_cells
                    queue = self._forwards(pending, budget, first=False, reuse=reuse)
                if results is not None and time.monotonic() - last_save > _SAVE_EVERY_S:
                    book.result().save(results, fingerprint=fingerprint)
                    last_save = time.monotonic()
        finally:
            bar.close()
            if results is not None and book.started:
                book.result().save(results, fingerprint=fingerprint)  # keeps finished cells on failure too
        return book.result()

    def _first_forward(self, chunk: Sequence[int], extra: dict, keep_kv: bool, keep_blocks: bool
                       ) -> torch.Tensor:
        """One forward of the clean rows, the corrupted rows and the chunk's patched rows.

        The clean rows' activations become the sources for this and every later forward. When
        later forwards follow, the corrupted rows' block outputs (``keep_blocks``) and, when
        they start at later positions, their keys and values (``keep_kv``) become their reused
        prefix.
        """
        model, pairs_n = self.model, self.n_pairs
        times = len(chunk)
        clean, corrupt = self.clean, self.corrupt
        tokens = Tokens.cat([clean, corrupt.repeat(1 + times)])
        boxes = self._boxes(chunk, first_row=2 * pairs_n)
        self.sources: dict[tuple[str, int], torch.Tensor] = {}
        edits = [_FirstPass(self, group, boxes.get(group)) for group in self.groups]
        if self.corruption is not None:
            edits.insert(0, self.corruption(pairs_n))
        plan = Plan(model.table, model.base, tokens.attention_mask, [], edits, model._resolved)
        self.corrupted_blocks = CorruptedBlocks(model) if keep_blocks else None
        keeping = (self.corrupted_blocks.keeping(pairs_n, 2 * pairs_n) if keep_blocks
                   else contextlib.nullcontext())
        self.prefix_embeds = None
        capture = (self._capturing_embeds(pairs_n, 2 * pairs_n) if keep_kv and tokens.extras
                   else contextlib.nullcontext())
        cache = new_cache(model) if keep_kv else None
        trimming = (keeping_rows(model, cache, pairs_n, 2 * pairs_n) if cache is not None
                    else contextlib.nullcontext())
        caching = {"use_cache": True} if keep_kv else {}
        if cache is not None:
            caching["past_key_values"] = cache
        with keeping, capture, trimming, torch.no_grad():
            output, _ = model._forward(tokens, plan, extra_inputs={**extra, **caching})
        self.prefix_kv = None
        if keep_kv:
            self.prefix_kv = keys_values(getattr(output, "past_key_values", None), pairs_n,
                                         self.seq_len)
            output.past_key_values = None
        if output.logits is None:
            model.table.place("logits")  # raises, naming why there is no head
        rows = tokens.shape[0]
        logits = self._scored(output.logits, rows)
        pairs = torch.arange(rows) % pairs_n  # on the host: metrics only index with it
        self.clean_logits = logits[:pairs_n]
        scores = self.metric(logits, pairs, self.clean_logits)  # one pass for every row
        self.clean_metric = scores[:pairs_n]
        self.corrupt_metric = scores[pairs_n:2 * pairs_n]
        return scores[2 * pairs_n:]

    def _embeds_reusable(self) -> bool:
        """Whether forwards of a suffix can take the corrupted run's merged input embeddings in
        place of the token ids and the image: LLaVA, whose language model receives them as its
        input, when no cell writes where they are made (``embed``, ``projector``) and no noise is
        added there. (Qwen2-VL's rotary positions come from the image grids as well.)"""
        return (self.model.family in ("llava", "llava_next") and self.corruption is None
                and not any(component in ("embed", "projector") for component, _ in self.groups))

    @contextlib.contextmanager
    def _capturing_embeds(self, begin: int, end: int):
        """Keep rows ``[begin, end)`` of the language model's input embeddings of the enclosed
        forward as ``prefix_embeds``."""
        model = self.model
        language = model._language_model()

        def keep(_module, _args, kwargs):
            self.prefix_embeds = kwargs["inputs_embeds"][begin:end].clone()

        handle = language.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _patched(self, chunk: Sequence[int], reuse: bool, extra: dict) -> torch.Tensor:
        """Scores ``[len(chunk) * n_pairs]`` of the chunk's patched runs."""
        model = self.model
        times = len(chunk)
        start = min(self.start_of[i] for i in chunk) if reuse and self.prefix_kv else 0
        first_layer = min(self.layer_of[i] for i in chunk) if reuse else 0
        tokens = self.corrupt.repeat(times)
        edits = [BoxPatch(self._site(group), self._sources(group, start), boxes, self.alpha)
                 for group, boxes in self._boxes(chunk, first_row=0, start=start).items()]
        if self.corruption is not None:
            edits.insert(0, self.corruption(0, start))
        plan = Plan(model.table, model.base, tokens.attention_mask, [], edits, model._resolved)
        blocks = self.corrupted_blocks
        stubs = None if blocks is None else blocks.stubs(first_layer, times, start)
        past = prefix_cache(self.prefix_kv, start, times, first_layer) if start else None
        embeds = None
        if start and tokens.extras:
            embeds = self.prefix_embeds[:, start:].repeat(times, 1, 1)
        with torch.no_grad():
            output, _ = model._forward(tokens, plan, stubs=stubs, extra_inputs=extra, start=start,
                                       past=past, embeds=embeds)
        rows = times * self.n_pairs
        logits = self._scored(output.logits, rows, start)
        pairs = torch.arange(rows) % self.n_pairs
        return self.metric(logits, pairs, self.clean_logits)


class _NoBar:
    """Stands in for a progress bar when none is shown (a disabled tqdm still costs a setup)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@functools.cache
def _parameters(function: Callable) -> frozenset[str]:
    """The parameter names of a model class's forward (looked up once per class)."""
    return frozenset(inspect.signature(function).parameters)


class _FirstPass(TensorEdit):
    """In the first forward: keep the clean rows' values of one component as the sweep's source,
    then patch them into that forward's patched rows."""

    def __init__(self, sweep: _Sweep, group: tuple[str, int], boxes: torch.Tensor | None):
        super().__init__(_Sweep._site(group))
        self.sweep, self.group, self.boxes = sweep, group, boxes

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        whole = tensor if current is None else current
        flat = as_rows(whole)  # read only: a copy is as good as a view
        n = self.sweep.n_pairs
        source = self.sweep._source(flat[:n])
        if self.group in self.sweep.frozen_groups:  # the corrupted rows' values, to freeze
            source = torch.cat([source, flat[n:2 * n].clone()])
        self.sweep.sources[self.group] = source
        if self.boxes is not None:
            BoxPatch(self.site, source, self.boxes, self.sweep.alpha).write(tensor, current)


class _Book:
    """A sweep's finished cells. Scores stay on the device until a result is asked for, so
    the host never waits for one forward before queueing the next."""

    def __init__(self, sweep: _Sweep, values: torch.Tensor, done: torch.Tensor, inert: list[int]):
        self.sweep, self.values, self.done, self.inert = sweep, values, done, inert
        self.started = False  # the first forward (clean and corrupted runs) has run
        self.unsaved: list[tuple[list[int], torch.Tensor]] = []  # (cells, scores [pair, cell])
        self._result: PatchingResult | None = None

    def finish(self, chunk: list[int], scores: torch.Tensor) -> None:
        self.unsaved.append((chunk, scores.reshape(len(chunk), self.sweep.n_pairs).t()))

    def result(self) -> PatchingResult:
        sweep = self.sweep
        if self._result is None:
            self.values = self.values.to(sweep.clean_metric.dtype)
            self._result = PatchingResult(sweep.cells, self.values, sweep.clean_metric.cpu(),
                                          sweep.corrupt_metric.cpu(), repr(sweep.metric),
                                          sweep.source, sweep.alpha, self.done)
            if self.inert:  # their runs are the corrupted run
                self.values[:, self.inert] = self._result.corrupt.to(self.values.dtype)[:, None]
                self.done[self.inert] = True
        for chunk, scores in self.unsaved:
            self.values[:, chunk] = scores.cpu().to(self.values.dtype)
            self.done[chunk] = True
        self.unsaved.clear()
        return self._result
