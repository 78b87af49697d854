"""A circuit-discovery task: a model, prompts, what a removed edge carries, and a metric.

Removing an edge (``patching`` it) makes its destination read the source's output from another
run instead of this one: the corrupted prompt's (``ablation="corrupt"``), zero, the mean over
the dataset, or another prompt's (``"resample"``). Every circuit is scored by running the clean
prompts with the edges outside the circuit removed; the full graph is the clean run and, for
``"corrupt"``, the empty graph is the corrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechinterp.circuits.edges import EdgeForward, EdgeState
from mechinterp.circuits.graph import CircuitGraph
from mechinterp.errors import InputError, ShapeError
from mechinterp.model import Inputs
from mechinterp.patching.metrics import Metric, as_metric
from mechinterp.positions import RowSpans

ABLATIONS = ("corrupt", "zero", "mean", "resample")


@dataclass(frozen=True)
class _Reference:
    """Per-row metric of the full and the empty graph, and the clean logits it is scored on."""

    full: torch.Tensor  # [rows]
    empty: torch.Tensor  # [rows]


@dataclass(frozen=True)
class _Patched:
    """What removed edges read.

    ``sources`` ``[rows or 1, source, pos, d_model]`` are source outputs; in post-LayerNorm
    models ``scales`` ``[rows, norm, pos]`` are the LayerNorm divisors of the run they come from,
    or, for values that are no run's (zero, the mean), ``ledgers`` hold the contributions at
    each read point directly.
    """

    sources: torch.Tensor
    scales: torch.Tensor | None = None
    ledgers: list[torch.Tensor] | None = None


class CircuitTask:
    """Binds a model, clean prompts, what removed edges read, and a metric.

    Args:
        model: an :class:`~mechinterp.InterpModel` of a family with a circuit graph
            (:meth:`CircuitGraph.of`).
        clean: the prompts whose behaviour the circuit must explain.
        corrupt: prompts of the same shape and padding (needed for ``ablation="corrupt"``; for
            ``"mean"`` the mean is taken over them when given, else over ``clean``).
        metric: a :class:`~mechinterp.patching.Metric` (``LogitDiff``, ``LogProb``, ``KL``...)
            or a callable ``(logits [rows, vocab], pairs [rows]) -> [rows]``, scored at
            ``position``.
        ablation: ``"corrupt"``, ``"zero"``, ``"mean"`` or ``"resample"``.
        position: the scored position, counted like ``Site.pos`` (-1: each row's last token).
        images: CLIP only, and needed there: candidate images ``[n, 3, height, width]`` (pixel
            values) that every prompt is scored against. The graph is the text tower's; the
            metric sees CLIP's logits of each prompt over the candidates (``logits_per_text``),
            so ``LogitDiff(0, 1)`` prefers candidate 0 to candidate 1.
        batch_size: rows per forward; circuits evaluated together share a forward, each on
            its own copy of the prompts. Default: 64 on the CPU; on a GPU as many as keep the
            per-row source outputs, their differences and gradients within about 2 GiB (at
            most 1024).
        seed: seed of the resample permutation.
        progress: show progress bars on long loops.

    Examples:
        >>> import mechinterp, torch
        >>> from mechinterp.circuits import CircuitTask
        >>> from mechinterp.patching import LogitDiff
        >>> model = mechinterp.load("induction-2l")
        >>> task = CircuitTask(model, "fuba bu mabi fuba bu", "fuba bu mabi lo ki",
        ...                    metric=LogitDiff("mabi", "lo"), progress=False)
        >>> full, empty = task.evaluate(torch.stack([task.graph.valid, ~task.graph.valid]))
        >>> [round(v, 3) for v in (full.item(), empty.item())]  # clean and corrupted runs
        [3.729, 0.862]
    """

    def __init__(
        self,
        model: object,
        clean: Inputs,
        corrupt: Inputs | None = None,
        *,
        metric: Metric | object,
        ablation: str = "corrupt",
        position: int = -1,
        batch_size: int | None = None,
        seed: int = 0,
        progress: bool = True,
        images: torch.Tensor | None = None,
    ):
        self.model = model
        self.graph = CircuitGraph.of(model)
        self.engine = EdgeForward(model, self.graph)
        self._candidates = _candidate_embeddings(model, images)
        if ablation not in ABLATIONS:
            msg = f"ablation must be one of {ABLATIONS}; got {ablation!r}"
            raise InputError(msg)
        self.ablation = ablation
        self.clean = model._as_tokens(clean)
        self.corrupt = None if corrupt is None else model._as_tokens(corrupt)
        if self.corrupt is None and ablation == "corrupt":
            msg = 'ablation="corrupt" needs corrupt prompts; pass corrupt= or choose another ablation'
            raise InputError(msg)
        if self.corrupt is not None and (self.corrupt.shape != self.clean.shape or not torch.equal(
                self.clean.attention_mask, self.corrupt.attention_mask)):
            msg = (f"clean and corrupt must tokenize to the same shape and padding; got shapes "
                   f"{self.clean.shape} and {self.corrupt.shape}")
            raise ShapeError(msg)
        self.n_rows, self.seq_len = self.clean.shape
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            msg = f"batch_size must be a positive int; got {batch_size!r}"
            raise InputError(msg)
        self.batch_size = batch_size or 64
        self._auto_batch = batch_size is None
        self.progress = progress
        self.metric = as_metric(metric).bind(model, self.n_rows)
        if isinstance(position, bool) or not isinstance(position, int):
            msg = f"position must be an int; got {type(position).__name__} {position!r}"
            raise InputError(msg)
        columns = RowSpans.from_mask(self.clean.attention_mask).columns(position)
        self._columns = torch.full((self.n_rows,), columns) if isinstance(columns, int) else columns
        self._seed = seed
        self.clean_sources, self.clean_logits, self.clean_scales = self._record(self.clean)
        if self._auto_batch and self.clean_sources.is_cuda:
            # Three [rows, source, pos, d_model] tensors live per row of a forward; post-LayerNorm
            # models keep two ledgers and their difference besides.
            live = 3 if self.engine.stream is None else 6
            per_row = live * self.clean_sources[0].numel() * self.clean_sources.element_size()
            self.batch_size = max(1, min(1024, (2 << 30) // per_row))
        self.patched = self._patched_sources()
        self._reference: _Reference | None = None

    # -- reference runs ----------------------------------------------------------------------

    def _chunks(self, rows: int | None = None) -> Iterator[slice]:
        rows = self.n_rows if rows is None else rows
        for start in range(0, rows, self.batch_size):
            yield slice(start, min(start + self.batch_size, rows))

    @torch.no_grad()
    def _record(self, tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Source outputs ``[rows, source, pos, d_model]``, scored logits ``[rows, vocab]`` and,
        for post-LayerNorm models, the stream's LayerNorm divisors ``[rows, norm, pos]``."""
        sources, logits, scales = [], [], []
        for rows in self._chunks():
            state = EdgeState(record=True)
            out = self._forward(tokens, rows, state)
            sources.append(state.recorded())
            logits.append(self._scored(out, rows))
            if state.scales:
                scales.append(torch.stack(state.scales, dim=1))
        return torch.cat(sources), torch.cat(logits), torch.cat(scales) if scales else None

    def _patched_sources(self) -> _Patched:
        stream = self.engine.stream
        if self.ablation == "corrupt":
            sources, _, scales = self._record(self.corrupt)
            return _Patched(sources, scales)
        if self.ablation == "zero":
            zero = torch.zeros(1, self.graph.n_sources, 1, 1, dtype=self.clean_sources.dtype,
                               device=self.clean_sources.device)
            return _Patched(zero, ledgers=None if stream is None else [zero] * stream.n_reads)
        if self.ablation == "mean":
            sources, scales = self.clean_sources, self.clean_scales
            if self.corrupt is not None:
                sources, _, scales = self._record(self.corrupt)
            # Means over the real tokens of every prompt at each position.
            counts = self._token_mask(None, sources.dtype).sum(0, keepdim=True).clamp(min=1)
            mean = self._masked_sum(sources, None) / counts
            if stream is None:
                return _Patched(mean)
            # The mean contribution at each read point, which no single run's divisors give.
            sums = None
            for rows in self._chunks():
                part = [self._masked_sum(ledger, rows)
                        for ledger in stream.ledgers(sources[rows], scales[rows])]
                sums = part if sums is None else [a + b for a, b in zip(sums, part)]
            return _Patched(mean, ledgers=[total / counts for total in sums])
        generator = torch.Generator().manual_seed(self._seed)
        order = _derangement(self.n_rows, generator).to(self.clean_sources.device)
        return _Patched(self.clean_sources[order],
                        None if self.clean_scales is None else self.clean_scales[order])

    def _token_mask(self, rows: slice | None, dtype: torch.dtype) -> torch.Tensor:
        """``[rows, 1, pos, 1]``: 1 at real tokens, 0 at padding."""
        mask = self.clean.attention_mask if rows is None else self.clean.attention_mask[rows]
        return mask.to(dtype=dtype, device=self.clean_sources.device)[:, None, :, None]

    def _masked_sum(self, tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """``[1, ...]`` sum over prompts of ``tensor``'s real tokens at each position."""
        return (tensor * self._token_mask(rows, tensor.dtype)).sum(0, keepdim=True)

    def _forward(self, tokens, rows: slice | torch.Tensor, state: EdgeState,
                 repeat: int = 1) -> torch.Tensor:
        part = tokens.rows(rows)
        if repeat > 1:
            part = part.repeat(repeat)
        inputs = self.model._forward_inputs(part)
        with self.engine.hooked(state):
            if self._candidates is not None:
                return _image_logits(self.model._module, inputs, self._candidates)
            return self.model._module(**inputs).logits

    def _scored(self, logits: torch.Tensor, rows: slice, repeat: int = 1) -> torch.Tensor:
        if logits.dim() == 2:  # already one score per candidate (CLIP)
            return logits
        columns = self._columns[rows].repeat(repeat).to(logits.device)
        return logits[torch.arange(logits.shape[0], device=logits.device), columns]

    def _pairs(self, rows: slice, repeat: int = 1) -> torch.Tensor:
        return torch.arange(self.n_rows)[rows].repeat(repeat)

    def _metric(self, logits: torch.Tensor, rows: slice, repeat: int = 1, *,
                grad: bool = False) -> torch.Tensor:
        scored = self._scored(logits, rows, repeat)
        pairs = self._pairs(rows, repeat).to(scored.device)
        values = self.metric.differentiable(scored, pairs, self.clean_logits)
        return values if grad else values.detach()

    # -- evaluation --------------------------------------------------------------------------

    @property
    def clean_metric(self) -> torch.Tensor:
        """``[rows]`` metric of the clean run (the full graph)."""
        return self.reference.full

    @property
    def reference(self) -> _Reference:
        """Per-row metric of the full graph (every edge kept) and the empty graph (none)."""
        if self._reference is None:
            valid = self.graph.valid
            values = self.evaluate(torch.stack([valid, torch.zeros_like(valid)]))
            self._reference = _Reference(values[0], values[1])
        return self._reference

    def patch_weights(self, kept: torch.Tensor) -> torch.Tensor:
        """Patch weights ``[..., source, destination]``: 1 on every edge not in ``kept``."""
        return (self.graph.valid & ~kept.to("cpu", torch.bool)).to(self.clean_sources.dtype)

    @torch.no_grad()
    def evaluate(self, circuits: torch.Tensor, *, weights: bool = False) -> torch.Tensor:
        """Metric ``[circuit, rows]`` of each circuit: the clean prompts run with every edge
        outside the circuit removed.

        Args:
            circuits: ``[circuit, source, destination]`` bool masks of kept edges (entries
                outside :attr:`CircuitGraph.valid` are ignored), or, with ``weights=True``,
                patch weights (1 removes an edge, fractions interpolate).
        """
        if circuits.dim() == 2:
            circuits = circuits[None]
        graph = self.graph
        if circuits.shape[1:] != (graph.n_sources, graph.n_destinations):
            msg = (f"circuits must be [circuit, {graph.n_sources}, {graph.n_destinations}] masks "
                   f"of kept edges; got {tuple(circuits.shape)}")
            raise ShapeError(msg)
        if weights:
            patch = circuits.to(self.clean_sources.dtype).cpu() * graph.valid
        else:
            patch = self.patch_weights(circuits)
        device = self.clean_sources.device
        n_circuits = patch.shape[0]
        out = torch.empty(n_circuits, self.n_rows, dtype=torch.float64)
        per_forward = max(1, self.batch_size // min(self.n_rows, self.batch_size))
        steps = [(rows, start) for rows in self._chunks()
                 for start in range(0, n_circuits, per_forward)]
        bar = tqdm(steps, desc="edge patching", disable=not self.progress or len(steps) < 4,
                   leave=False)
        for rows, start in bar:
            stop = min(start + per_forward, n_circuits)
            group = stop - start
            n = rows.stop - rows.start
            weight = patch[start:stop].repeat_interleave(n, dim=0).to(device)
            state = EdgeState(weights=weight, **self._patched_state(rows, group))
            logits = self._forward(self.clean, rows, state, repeat=group)
            values = self._metric(logits, rows, repeat=group).double().cpu()
            out[start:stop, rows] = values.view(group, n)
        return out

    # -- gradients ---------------------------------------------------------------------------

    def read_deltas(self, rows: slice) -> Iterator[tuple[slice, torch.Tensor]]:
        """Per group of destinations, ``[rows, source, pos, d_model]`` patched minus clean
        values of the sources they read (zero on padding): the source outputs themselves in
        pre-normalisation models (one group: every destination), the contributions at each
        read point in post-LayerNorm models (only the sources written before it)."""
        mask = self._token_mask(rows, self.clean_sources.dtype)
        stream = self.engine.stream
        if stream is None:
            yield slice(0, self.graph.n_destinations), (self._patched_rows(rows) - self.clean_sources[rows]) * mask
            return
        clean = stream.ledgers(self.clean_sources[rows], self.clean_scales[rows])
        patched = self.patched.ledgers
        if patched is None:
            patched = stream.ledgers(self._patched_rows(rows), self.patched.scales[rows])
        for point, (current, other) in enumerate(zip(clean, patched)):
            yield self.graph.read_at(point), (other[:, :current.shape[1]] - current) * mask

    def destination_gradients(self, rows: slice, *, embed: torch.Tensor | None = None,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows, destination, pos, d_model]`` gradients of the summed metric with respect to
        every destination's input, in a clean forward (with ``embed`` replacing the embeddings,
        and ``weights`` patching edges, when given)."""
        state = EdgeState(probe=True, embed=embed, weights=weights,
                          **({} if weights is None else self._patched_state(rows)))
        with torch.enable_grad():
            logits = self._forward(self.clean, rows, state)
            total = self._metric(logits, rows, grad=True).sum()
            probes = [state.probes[start] for start in sorted(state.probes)]
            grads = torch.autograd.grad(total, probes, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)]
        return torch.cat(grads, dim=1)

    def _patched_rows(self, rows: slice) -> torch.Tensor:
        """The patched source outputs of ``rows`` (one broadcast row for zero and mean)."""
        sources = self.patched.sources
        return sources if sources.shape[0] == 1 else sources[rows]

    def _patched_state(self, rows: slice, repeat: int = 1) -> dict:
        """What an :class:`EdgeState` reads to patch ``rows``, each row repeated ``repeat``
        times (one copy per circuit of a forward)."""
        sources = self._patched_rows(rows)
        if sources.shape[0] > 1:
            sources = sources.repeat(repeat, 1, 1, 1)
        scales = self.patched.scales
        if scales is not None:
            scales = scales[rows].repeat(repeat, 1, 1)
        return {"patched": sources, "patched_scales": scales,
                "patched_ledgers": self.patched.ledgers}


def _candidate_embeddings(model: object, images: torch.Tensor | None) -> torch.Tensor | None:
    """CLIP's unit-norm embeddings ``[n, d_projection]`` of the candidate images."""
    is_clip = model.table.family == "clip"
    if images is None:
        if is_clip:
            msg = ("a CLIP circuit task needs images=: candidate images [n, 3, height, width] "
                   "that every prompt is scored against")
            raise InputError(msg)
        return None
    if not is_clip:
        msg = f"images= is for CLIP's text-tower circuits; this model is {model.table.family!r}"
        raise InputError(msg)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        msg = f"images must be pixel values [n, 3, height, width]; got {got}"
        raise ShapeError(msg)
    clip = model._module
    parameter = next(clip.parameters())
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=images.to(parameter.device, parameter.dtype)).pooler_output
        embeds = clip.visual_projection(pooled)
    return embeds / embeds.norm(dim=-1, keepdim=True)


def _image_logits(clip: torch.nn.Module, inputs: dict, candidates: torch.Tensor) -> torch.Tensor:
    """CLIP's ``logits_per_text`` ``[rows, candidate]`` from the text tower alone."""
    text = {name: inputs[name] for name in ("input_ids", "attention_mask", "position_ids")
            if name in inputs}
    embeds = clip.text_projection(clip.text_model(**text).pooler_output)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * embeds @ candidates.to(embeds.dtype).T


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded permutation with no fixed point (each prompt reads another prompt's values)."""
    if n < 2:
        msg = f'ablation="resample" needs at least 2 prompts; got {n}'
        raise InputError(msg)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    order = torch.randperm(n, generator=generator)
    result = torch.empty(n, dtype=torch.int64)
    result[order] = order.roll(shift)
    return result
