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


class CircuitTask:
    """Binds a model, clean prompts, what removed edges read, and a metric.

    Args:
        model: an :class:`~mechinterp.InterpModel` of a pre-normalisation family.
        clean: the prompts whose behaviour the circuit must explain.
        corrupt: prompts of the same shape and padding (needed for ``ablation="corrupt"``; for
            ``"mean"`` the mean is taken over them when given, else over ``clean``).
        metric: a :class:`~mechinterp.patching.Metric` (``LogitDiff``, ``LogProb``, ``KL``...)
            or a callable ``(logits [rows, vocab], pairs [rows]) -> [rows]``, scored at
            ``position``.
        ablation: ``"corrupt"``, ``"zero"``, ``"mean"`` or ``"resample"``.
        position: the scored position, counted like ``Site.pos`` (-1: each row's last token).
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
    ):
        self.model = model
        self.graph = CircuitGraph.of(model)
        self.engine = EdgeForward(model, self.graph)
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
        self.clean_sources, self.clean_logits = self._record(self.clean)
        if self._auto_batch and self.clean_sources.is_cuda:
            # Three [rows, source, pos, d_model] tensors live per row of a forward.
            per_row = 3 * self.clean_sources[0].numel() * self.clean_sources.element_size()
            self.batch_size = max(1, min(1024, (2 << 30) // per_row))
        self.patched = self._patched_sources()
        self._reference: _Reference | None = None

    # -- reference runs ----------------------------------------------------------------------

    def _chunks(self, rows: int | None = None) -> Iterator[slice]:
        rows = self.n_rows if rows is None else rows
        for start in range(0, rows, self.batch_size):
            yield slice(start, min(start + self.batch_size, rows))

    @torch.no_grad()
    def _record(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Source outputs ``[rows, source, pos, d_model]`` and scored logits ``[rows, vocab]``."""
        sources, logits = [], []
        for rows in self._chunks():
            state = EdgeState(record=True)
            out = self._forward(tokens, rows, state)
            sources.append(state.recorded())
            logits.append(self._scored(out, rows))
        return torch.cat(sources), torch.cat(logits)

    def _patched_sources(self) -> torch.Tensor:
        if self.ablation == "corrupt":
            return self._record(self.corrupt)[0]
        if self.ablation == "zero":
            return torch.zeros(1, self.graph.n_sources, 1, 1, dtype=self.clean_sources.dtype,
                               device=self.clean_sources.device)
        if self.ablation == "mean":
            sources = self.clean_sources if self.corrupt is None else self._record(self.corrupt)[0]
            mask = self.clean.attention_mask.to(sources.dtype)[:, None, :, None]
            # Mean over the real tokens of every prompt at each position.
            counts = mask.sum(0, keepdim=True).clamp(min=1)
            return (sources * mask).sum(0, keepdim=True) / counts
        generator = torch.Generator().manual_seed(self._seed)
        order = _derangement(self.n_rows, generator)
        return self.clean_sources[order.to(self.clean_sources.device)]

    def _forward(self, tokens, rows: slice | torch.Tensor, state: EdgeState,
                 repeat: int = 1) -> torch.Tensor:
        part = tokens.rows(rows)
        if repeat > 1:
            part = part.repeat(repeat)
        with self.engine.hooked(state):
            out = self.model._module(**self.model._forward_inputs(part))
        return out.logits

    def _scored(self, logits: torch.Tensor, rows: slice, repeat: int = 1) -> torch.Tensor:
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
            patched = self._patched_rows(rows)
            if patched.shape[0] > 1:
                patched = patched.repeat(group, 1, 1, 1)
            state = EdgeState(weights=weight, patched=patched)
            logits = self._forward(self.clean, rows, state, repeat=group)
            values = self._metric(logits, rows, repeat=group).double().cpu()
            out[start:stop, rows] = values.view(group, n)
        return out

    # -- gradients ---------------------------------------------------------------------------

    def delta(self, rows: slice) -> torch.Tensor:
        """``[rows, source, pos, d_model]`` patched minus clean source outputs, zero on padding."""
        patched = self._patched_rows(rows)
        mask = self.clean.attention_mask[rows].to(self.clean_sources.dtype)[:, None, :, None]
        return (patched - self.clean_sources[rows]) * mask

    def destination_gradients(self, rows: slice, *, embed: torch.Tensor | None = None,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows, destination, pos, d_model]`` gradients of the summed metric with respect to
        every destination's input, in a clean forward (with ``embed`` replacing the embeddings,
        and ``weights`` patching edges, when given)."""
        state = EdgeState(probe=True, embed=embed, weights=weights,
                          patched=None if weights is None else self._patched_rows(rows))
        with torch.enable_grad():
            logits = self._forward(self.clean, rows, state)
            total = self._metric(logits, rows, grad=True).sum()
            probes = [state.probes[start] for start in sorted(state.probes)]
            grads = torch.autograd.grad(total, probes, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)]
        return torch.cat(grads, dim=1)

    def _patched_rows(self, rows: slice) -> torch.Tensor:
        """The patched source outputs of ``rows`` (one broadcast row for zero and mean)."""
        return self.patched if self.patched.shape[0] == 1 else self.patched[rows]


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
