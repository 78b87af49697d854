"""Path patching: how much of a site's effect travels along direct paths to chosen receivers.

Activation patching a sender measures its total effect, through every later component. Path
patching (Wang et al. 2022, "Interpretability in the Wild"; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching") keeps only the paths that go from the sender
straight to some receivers through the residual stream, without passing through other heads.
For each sender (a cell of the result) and prompt pair, the corrupted prompt runs twice:

1. Pass 1 runs with the sender's activation taken from the clean run, while every site of the
   frozen kinds (by default every head's output) computed after the sender holds its corrupted
   value, so the sender's change reaches later components only along direct paths. The
   receivers' values in this run are kept, each read as its inputs make it, before its own site
   is held (a head that receives passes on its corrupted output). Frozen sites after the last
   receiver cannot change a receiver, so they are left alone.
2. Pass 2 runs with every receiver set to its pass-1 value, nothing else changed, and the metric
   scores it. When the receivers are the model's output, the metric of pass 1 is the result.

A receiver receives from a sender only if the forward computes it after the sender: in a later
layer, or in the same layer at a later stage (``resid_pre``, then ``q``/``k``/``v``,
``pattern``, ``head``, ``attn_out``, ``resid_mid``, ``neuron``, ``mlp_out``, ``resid_post``).
Pass 2 writes, for each sender, only the receivers that receive from it; the others keep their
corrupted values, and a sender none of the receivers receives from scores exactly the corrupted
run's metric, computed without a forward.

Many senders share each forward, as in :func:`activation_patch`: row ``c * n_pairs + p`` is
sender ``c`` of the batch on pair ``p``, and one kernel call per (component, layer) writes every
row's patches. One forward of the clean and corrupted prompts provides the senders' clean values
and the frozen sites' corrupted values; then each batch of senders runs pass 1, reading the
receivers, and pass 2, writing them. Blocks below a pass's first edited layer are not recomputed:
they return the corrupted run's outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mechinterp.engine import Plan, resolve
from mechinterp.errors import InputError, SiteError
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, Sites, Tokens
from mechinterp.patching.boxes import BoxPatch, Rect, as_rows, site_rects
from mechinterp.patching.metrics import Metric, as_metric
from mechinterp.patching.prefix import CorruptedBlocks
from mechinterp.patching.result import PatchingResult
from mechinterp.patching.schedule import plan_forwards
from mechinterp.patching.sweep import _Sweep
from mechinterp.sites import Site

#: Components a sender may be: those that write into the residual stream, or are it.
SENDERS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "head", "mlp_out")
#: Kinds of sites that pass 1 can hold at their corrupted values.
FREEZABLE = ("head", "mlp_out")

# The order in which a block computes its components. A receiver can only depend on a sender
# that comes before it: in an earlier layer, or earlier in the same layer.
_STAGE = {"resid_pre": 0, "q": 1, "k": 1, "v": 1, "pattern": 2, "head": 3, "attn_out": 4,
          "resid_mid": 5, "neuron": 6, "mlp_out": 7, "resid_post": 8}

Group = tuple[str, int]  # (component, layer); layer -1 for embed
Order = tuple[int, int]  # (layer, stage)


def path_patch(
    model: InterpModel,
    clean: Inputs,
    corrupt: Inputs,
    senders: Sites,
    receivers: Sites | str,
    metric: Metric | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    freeze: Sequence[str] | str = ("head",),
    position: int = -1,
    batch_size: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Patch each sender from the clean run into the corrupted run along direct paths only.

    Args:
        model: a model from :func:`mechinterp.load`.
        clean: the prompts that provide the senders' values (one per pair).
        corrupt: the prompts that are run and patched, with the same shape and padding as
            ``clean``.
        senders: the cells of the result: a selector such as ``select("head").layers(0).heads()``
            or a list of sites of the components in :data:`SENDERS`, with or without positions.
        receivers: where the paths end: ``"logits"`` (the model's output), or sites such as
            ``Site("k", layer=1, head=3)``, ``q``, ``v``, ``head``, ``resid_pre``, ``mlp_out``,
            optionally with positions. ``attn_out`` cannot receive while heads are frozen (it
            sums them): name the heads of its layer instead.
        metric: :class:`LogitDiff`, :class:`LogProb`, :class:`Prob`, :class:`KL`, or a callable
            ``(logits [rows, vocab], pairs [rows]) -> [rows]``.
        freeze: kinds of sites held at their corrupted values in pass 1, of :data:`FREEZABLE`:
            ``"head"`` (each head's output, the input of the attention output projection) and
            ``"mlp_out"``. Only sites computed after the sender are held; a receiver is read as
            its inputs make it, before its own site is held.
        position: the position whose logits the metric scores (counted like ``Site.pos``).
        batch_size: rows (senders x pairs) per forward; by default sized like
            :func:`activation_patch`'s, less the memory that keeps the receivers' values
            between the passes. Out of memory halves it and retries.
        progress: show a progress bar.

    Returns:
        :class:`PatchingResult` over the senders, with ``values [pair, sender]``; a sender that
        no receiver receives from has the corrupted run's metric.

    Examples:
        >>> import mechinterp
        >>> from mechinterp import Site, select
        >>> from mechinterp.patching import LogitDiff, path_patch
        >>> model = mechinterp.load("induction-2l")
        >>> result = path_patch(
        ...     model, "vetu fuba bu mabi fafi vetu fuba bu mabi",
        ...     "vetu fuba bu kete fafi vetu fuba bu mabi", select("head").layers().heads(),
        ...     [Site("k", layer=1, head=3)], LogitDiff("fafi", "kete"), progress=False)
        >>> result.values.shape
        torch.Size([1, 8])
        >>> [round(v, 2) for v in result.normalized()[0, :4].tolist()]  # through L1H3's keys
        [1.14, 0.0, 0.0, 0.0]
        >>> bool((result.values[0, 4:] == result.corrupt[0]).all())  # computed after the keys
        True
    """
    if not isinstance(model, InterpModel):
        msg = f"model must be an InterpModel from mechinterp.load; got {type(model).__name__}"
        raise InputError(msg)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        msg = f"batch_size must be a positive int or None; got {batch_size!r}"
        raise InputError(msg)
    paths = _Paths(model, clean, corrupt, senders, receivers, as_metric(metric),
                   _freeze_kinds(model, freeze), position)
    return paths.run(batch_size=batch_size, progress=progress)


def _freeze_kinds(model: InterpModel, freeze: Sequence[str] | str) -> tuple[str, ...]:
    """The frozen kinds as a tuple, each one checked (a lone string is one kind)."""
    kinds = (freeze,) if isinstance(freeze, str) else freeze
    if not isinstance(kinds, (tuple, list)):
        msg = f"freeze must be a sequence of component names of {list(FREEZABLE)}; got {freeze!r}"
        raise InputError(msg)
    for kind in kinds:
        if kind not in FREEZABLE:
            msg = f"freeze must name components of {list(FREEZABLE)}; got {kind!r}"
            raise InputError(msg)
        model.table.place(kind)  # raises when the family lacks it
    return tuple(dict.fromkeys(kinds))


def _order(site: Site, n_layers: int) -> Order:
    """Where the forward computes a site: its layer, then its stage within the layer."""
    if site.component == "embed":
        return -1, 0
    return site.layer % n_layers, _STAGE[site.component]


def _disjoint(rects: list[Rect]) -> list[Rect]:
    """The union of rectangles as rectangles that do not overlap (a row's boxes must not).

    The plane is cut along every edge; covered cells merge into runs along ``f``, and bands of
    equal runs along ``a``.
    """
    rects = [r for r in rects if r[1] > r[0] and r[3] > r[2]]
    if len(rects) < 2:
        return rects
    a_cuts = sorted({v for r in rects for v in r[:2]})
    f_cuts = sorted({v for r in rects for v in r[2:]})
    a_at = {v: i for i, v in enumerate(a_cuts)}
    f_at = {v: i for i, v in enumerate(f_cuts)}
    covered = torch.zeros(len(a_cuts) - 1, len(f_cuts) - 1, dtype=torch.bool)
    for a0, a1, f0, f1 in rects:
        covered[a_at[a0]:a_at[a1], f_at[f0]:f_at[f1]] = True
    out: list[Rect] = []
    band_start, band_runs = 0, []
    for band, row in enumerate(covered.tolist()):
        runs = [(f_cuts[k], f_cuts[k + length]) for k, length in _true_runs(row)]
        if runs != band_runs:
            out += [(a_cuts[band_start], a_cuts[band], f0, f1) for f0, f1 in band_runs]
            band_start, band_runs = band, runs
    out += [(a_cuts[band_start], a_cuts[-1], f0, f1) for f0, f1 in band_runs]
    return out


def _true_runs(row: list[bool]) -> list[tuple[int, int]]:
    """``(first index, length)`` of every run of True values in ``row``."""
    runs = []
    index = 0
    for value, cells in itertools.groupby(row):
        length = len(list(cells))
        if value:
            runs.append((index, length))
        index += length
    return runs


class _Paths:
    """One path-patching sweep: inputs, per-sender writes of both passes, and the forwards."""

    def __init__(self, model: InterpModel, clean: Inputs, corrupt: Inputs, senders: Sites,
                 receivers: Sites | str, metric: Metric, kinds: tuple[str, ...], position: int):
        self.model = model
        self.kinds = kinds
        self.n_layers = model.dims.n_layers
        clean = model._as_tokens(clean)
        self.senders = self._senders(senders, clean.shape[1])
        self.receivers = self._receivers(receivers, clean.shape[1])
        # The shared part of a sweep: tokens, metric, scored position, memory budget.
        self.sweep = _Sweep(model, clean, corrupt, self.senders, metric, "clean", 1.0, position, 0)
        self.n_pairs, self.seq_len = self.sweep.n_pairs, self.sweep.seq_len
        self.output = not self.receivers
        self.groups: list[Group] = []
        self.group_index: dict[Group, int] = {}
        memo: dict = {}
        self.receiver_rects = [self._site_rects(site, memo, "receivers") for site in self.receivers]
        self.first_pass: list[torch.Tensor] = []  # per sender: [m, 7] pair, group, source, rect
        self.second_pass: list[torch.Tensor] = []  # per sender: [m, 6] pair, group, rect
        self.kept: list[set[int]] = []  # per sender: groups whose pass-1 values pass 2 writes
        self.start_layers: list[tuple[int, int]] = []  # per sender: first edited layer per pass
        self.inert: list[int] = []
        second_memo: dict[tuple[int, ...], tuple[torch.Tensor, set[int], int]] = {}
        for c, sender in enumerate(self.senders):
            self._plan_sender(c, sender, memo, second_memo)

    # -- checks ---------------------------------------------------------------------------

    def _senders(self, senders: Sites, n_positions: int) -> list[Site]:
        sites = self.model.sites(senders, n_positions=n_positions)
        if not sites:
            msg = "senders must name at least one site; got none"
            raise InputError(msg)
        for site in sites:
            if site.component not in SENDERS:
                msg = (
                    f"senders must be sites of {list(SENDERS)} (components that write into the "
                    f"residual stream); got {site}"
                )
                raise InputError(msg)
        return sites

    def _receivers(self, receivers: Sites | str, n_positions: int) -> list[Site]:
        """The receiver sites; empty when the receivers are the model's output."""
        if isinstance(receivers, str):
            if receivers != "logits":
                msg = (f"receivers as a string must be 'logits' (the model's output); got "
                       f"{receivers!r}")
                raise InputError(msg)
            return []
        sites = self.model.sites(receivers, n_positions=n_positions)
        if not sites:
            msg = "receivers must name at least one site, or be 'logits'; got none"
            raise InputError(msg)
        if any(site.component == "logits" for site in sites):
            if sites != [Site("logits")]:
                msg = (
                    f"receivers: the logits are the model's output, a receiver of their own: pass "
                    f"'logits' alone, without positions; got {[str(s) for s in sites]}"
                )
                raise InputError(msg)
            return []
        for site in sites:
            resolve(site, self.model.table, self.model.base)  # layer, head and neuron ranges
            if site.component == "attn_out" and "head" in self.kinds:
                msg = (
                    f"receivers: {site} sums the heads of layer {site.layer}, which freeze holds "
                    f"at their corrupted values in pass 1; name the heads instead "
                    f"(select('head').layers({site.layer}).heads()): setting all of them sets "
                    f"attn_out"
                )
                raise InputError(msg)
        last = Site("resid_post", layer=self.n_layers - 1)
        if all(site in (last, last.at(layer=-1)) for site in sites):
            return []  # the final residual stream is the output: pass 1 scores it
        return sites

    def _site_rects(self, site: Site, memo: dict, argument: str) -> list[list[Rect]]:
        """Per pair, the site's rectangles in its component's ``[rows, a, f]`` tensor."""
        dims = self.model.dims
        heads = dims.n_kv_heads if site.component in ("k", "v") else dims.n_heads
        try:
            rects = site_rects(site, self.sweep.spans, self.n_pairs,
                               self.sweep._extent(site.component), heads, memo)
        except SiteError as err:
            msg = f"{argument}: {site}: {err}"
            raise type(err)(msg) from None
        return [_disjoint(pair_rects) for pair_rects in rects]

    # -- what each sender writes ----------------------------------------------------------

    def _group(self, component: str, layer: int) -> int:
        group = (component, layer)
        if group not in self.group_index:
            self.group_index[group] = len(self.groups)
            self.groups.append(group)
        return self.group_index[group]

    def _site_group(self, site: Site) -> int:
        return self._group(site.component, -1 if site.layer is None else site.layer % self.n_layers)

    def _plan_sender(self, c: int, sender: Site, memo: dict, second_memo: dict) -> None:
        """Sender ``c``'s writes in both passes, or its place among the inert senders."""
        here = _order(sender, self.n_layers)
        receiving = tuple(j for j, site in enumerate(self.receivers)
                          if _order(site, self.n_layers) > here)
        if not self.output and not receiving:
            self.inert.append(c)
        reach = (self.n_layers, 0) if self.output else max(
            (_order(self.receivers[j], self.n_layers) for j in receiving), default=here)
        n = self.n_pairs
        rows = []
        group = self._site_group(sender)
        for pair, rects in enumerate(self._site_rects(sender, memo, "senders")):
            rows += [(pair, group, pair, *rect) for rect in rects]  # clean rows come first
        for kind in self.kinds:
            for layer in range(self.n_layers):
                if here < (layer, _STAGE[kind]) < reach:
                    frozen = self._group(kind, layer)
                    a, f = self.sweep._extent(kind)
                    rows += [(pair, frozen, n + pair, 0, a, 0, f) for pair in range(n)]
        self.first_pass.append(torch.tensor(rows, dtype=torch.int64).reshape(-1, 7))
        if receiving not in second_memo:
            second_memo[receiving] = self._second_pass(receiving)
        table, kept, layer = second_memo[receiving]
        self.second_pass.append(table)
        self.kept.append(kept)
        self.start_layers.append((here[0], layer))

    def _second_pass(self, receiving: tuple[int, ...]) -> tuple[torch.Tensor, set[int], int]:
        """Pass-2 writes of the receivers ``receiving`` (overlaps merged), the groups they
        write and their first layer."""
        by_group: dict[int, list[list[Rect]]] = {}
        for j in receiving:
            pair_rects = by_group.setdefault(self._site_group(self.receivers[j]),
                                             [[] for _ in range(self.n_pairs)])
            for pair, rects in enumerate(self.receiver_rects[j]):
                pair_rects[pair].extend(rects)
        rows = [(pair, group, *rect) for group, per_pair in by_group.items()
                for pair, rects in enumerate(per_pair) for rect in _disjoint(rects)]
        layer = min((max(self.groups[g][1], 0) for g in by_group), default=0)
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 6), set(by_group), layer

    # -- forwards -------------------------------------------------------------------------

    def run(self, *, batch_size: int | None, progress: bool) -> PatchingResult:
        n_cells = len(self.senders)
        inert = set(self.inert)
        pending = [c for c in range(n_cells) if c not in inert]
        # Scores stay on the device until the end, so the host queues each forward without
        # waiting for the one before.
        finished: list[tuple[list[int], torch.Tensor]] = []
        bar = tqdm(total=n_cells, desc="path patching", unit="sender", disable=not progress,
                   leave=False)
        try:
            self._unpatched()
            bar.update(len(inert))
            budget = self._rows_per_forward(batch_size)
            queue = self._forwards(pending, budget)
            while queue:
                chunk = queue[0]
                try:
                    scores = self._chunk(chunk)
                except torch.OutOfMemoryError:
                    if budget <= self.n_pairs:
                        raise
                    budget //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    queue = self._forwards(pending, budget)
                    continue
                queue.pop(0)
                finished.append((chunk, scores.reshape(len(chunk), self.n_pairs).t()))
                done = set(chunk)
                pending = [c for c in pending if c not in done]
                bar.update(len(chunk))
        finally:
            bar.close()
        corrupt = self.corrupt_metric.cpu()
        values = torch.full((self.n_pairs, n_cells), float("nan"), dtype=corrupt.dtype)
        values[:, self.inert] = corrupt[:, None]
        for chunk, scores in finished:
            values[:, chunk] = scores.cpu().to(values.dtype)
        return PatchingResult(self.senders, values, self.clean_metric.cpu(), corrupt,
                              self._description())

    def _description(self) -> str:
        if self.output:
            return f"{self.sweep.metric!r} via the output"
        names = [str(site) for site in self.receivers]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"{self.sweep.metric!r} via {shown}"

    def _rows_per_forward(self, batch_size: int | None) -> int:
        if batch_size is not None:
            return batch_size
        rows = self.sweep._rows_per_forward(None)
        if self.output:
            return rows
        # Pass 1 keeps whole receiver tensors until pass 2 writes them, on top of a forward's
        # live activations (which the sweep's budget puts at about 8 residual widths a row).
        kept_groups = set().union(*self.kept)
        kept = sum(a * f for a, f in (self.sweep._extent(self.groups[g][0]) for g in kept_groups))
        live = 8 * self.seq_len * self.model.dims.d_model
        return max(1, int(rows * live / (live + kept)))

    def _forwards(self, pending: list[int], budget: int) -> list[list[int]]:
        """The pending senders cut into batches, by the first layer pass 1 edits."""
        planned = plan_forwards([0] * len(pending), [self.start_layers[c][0] for c in pending],
                                seq_len=self.seq_len, n_layers=self.n_layers,
                                rows_per_cell=self.n_pairs, budget=budget,
                                overhead=self.sweep._overhead_rows())
        return [[pending[i] for i in cells] for cells in planned]

    def _unpatched(self) -> None:
        """One forward of the clean and the corrupted prompts: the metric of both, the clean
        logits, every written group's values (clean rows, then corrupted rows) and the
        corrupted run's block outputs."""
        model, n = self.model, self.n_pairs
        clean, corrupt = self.sweep.clean, self.sweep.corrupt
        tokens = Tokens.cat([clean, corrupt])
        inert = set(self.inert)
        written = sorted({int(g) for c, table in enumerate(self.first_pass) if c not in inert
                          for g in table[:, 1].unique()})
        reads = [_Sweep._site(self.groups[g]) for g in written]
        plan = Plan(model.table, model.base, tokens.attention_mask, reads, [], model._resolved)
        self.corrupted_blocks = CorruptedBlocks(model)
        with self.corrupted_blocks.keeping(n, 2 * n), torch.no_grad():
            output, values = model._forward(tokens, plan, extra_inputs=self.sweep._extra_inputs())
        self.sources = {g: as_rows(values[site]) for g, site in zip(written, reads)}
        if output.logits is None:
            model.table.place("logits")  # raises, naming why there is no head
        logits = self.sweep._scored(output.logits, 2 * n)
        pairs = torch.arange(n)  # on the host: metrics only index with it
        self.clean_logits = logits[:n]
        self.clean_metric = self.sweep.metric(logits[:n], pairs, self.clean_logits)
        self.corrupt_metric = self.sweep.metric(logits[n:], pairs, self.clean_logits)

    def _chunk(self, chunk: list[int]) -> torch.Tensor:
        """Scores ``[len(chunk) * n_pairs]`` of the chunk's senders, after one or both passes."""
        kept: dict[int, torch.Tensor] = {}
        keep = set().union(*(self.kept[c] for c in chunk))
        first = self._boxes([self.first_pass[c] for c in chunk], sources_are_rows=False)
        edits = [_ReadThenPatch(_Sweep._site(self.groups[g]), g, kept if g in keep else None,
                                BoxPatch(_Sweep._site(self.groups[g]), self.sources[g], first[g])
                                if g in first else None)
                 for g in self._in_forward_order(set(first) | keep)]
        layer = min(self.start_layers[c][0] for c in chunk)
        logits = self._forward(len(chunk), edits, layer)
        if self.output:
            return self._score(logits)
        second = self._boxes([self.second_pass[c] for c in chunk], sources_are_rows=True)
        edits = [BoxPatch(_Sweep._site(self.groups[g]), kept[g], second[g])
                 for g in self._in_forward_order(set(second))]
        layer = min(self.start_layers[c][1] for c in chunk)
        return self._score(self._forward(len(chunk), edits, layer))

    def _in_forward_order(self, groups: set[int]) -> list[int]:
        """Groups in the order the forward computes them: edits at one module boundary run in
        the order given, and a sum (``resid_mid``) must see the ``attn_out`` written before it."""
        def order(g: int) -> Order:
            component, layer = self.groups[g]
            return (-1, 0) if component == "embed" else (layer, _STAGE[component])

        return sorted(groups, key=order)

    def _boxes(self, tables: list[torch.Tensor], *, sources_are_rows: bool
               ) -> dict[int, torch.Tensor]:
        """Boxes ``(row, source, a0, a1, f0, f1)`` per group for a batch of senders; a table
        row's source is its own row (pass 2) or a row of the unpatched forward (pass 1)."""
        writes = torch.cat(tables)
        if writes.shape[0] == 0:
            return {}
        cell = torch.repeat_interleave(torch.arange(len(tables)),
                                       torch.tensor([t.shape[0] for t in tables]))
        rows = cell * self.n_pairs + writes[:, 0]
        source = rows if sources_are_rows else writes[:, 2]
        rects = writes[:, -4:]
        boxes = torch.cat([rows[:, None], source[:, None], rects], dim=1)
        group = writes[:, 1]
        order = torch.argsort(group, stable=True)
        groups, counts = torch.unique_consecutive(group[order], return_counts=True)
        pieces = torch.split(boxes[order], counts.tolist())
        return dict(zip(groups.tolist(), pieces))

    def _forward(self, times: int, edits: list[TensorEdit], first_layer: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` at the scored position of ``times`` copies of the corrupted
        prompts run with ``edits``, the blocks below ``first_layer`` returning the corrupted
        run's output."""
        model, corrupt = self.model, self.sweep.corrupt
        tokens = corrupt.repeat(times)
        plan = Plan(model.table, model.base, tokens.attention_mask, [], edits, model._resolved)
        with torch.no_grad():
            output, _ = model._forward(tokens, plan, stubs=self.corrupted_blocks.stubs(first_layer, times),
                                       extra_inputs=self.sweep._extra_inputs())
        return self.sweep._scored(output.logits, times * self.n_pairs)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of runs whose row ``i`` belongs to pair ``i % n_pairs``."""
        pairs = torch.arange(logits.shape[0]) % self.n_pairs
        return self.sweep.metric(logits, pairs, self.clean_logits)



class _ReadThenPatch(TensorEdit):
    """Pass 1 at one (component, layer): keep the tensor as the forward computed it (the
    receivers' values, before any freezing of their own site), then write the boxes."""

    def __init__(self, site: Site, group: int, kept: dict[int, torch.Tensor] | None,
                 patch: BoxPatch | None):
        super().__init__(site)
        self.group, self.kept, self.patch = group, kept, patch

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        if self.kept is not None:
            self.kept[self.group] = as_rows(tensor if current is None else current).clone()
        if self.patch is not None:
            self.patch.write(tensor, current)
