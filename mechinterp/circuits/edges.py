"""The edge-patching forward: every destination reads its own mixture of source outputs.

In one forward, destination ``d`` reads ``x_d + sum_s w[s, d] * (patched_s - current_s)``, where
``x_d`` is the residual stream ``d`` reads, ``current_s`` is what source ``s`` wrote in this same
forward, ``patched_s`` is what it wrote in another run (the corrupted input, or an ablation), and
``w`` is a ``[source, destination]`` weight (1 patches the edge, 0 keeps it, values between
interpolate). Weights may differ per row (``[batch, source, destination]``), so many circuits run
side by side in one batch.

Queries, keys and values of different heads read different mixtures, so they cannot share one
projection of one normalised residual: for layer ``l`` the shifted residuals of all heads are
normalised together (``[batch, head, pos, d_model]``) and projected with each head's slice of the
projection weight, found by applying the site table's head view to the weight's output axis.
Layers whose shifts are all zero keep the model's own output, so weights of zero reproduce the
unpatched forward bit for bit.

Post-LayerNorm models (BERT) renormalise the residual stream after every sublayer, so a
destination reads its sources' *contributions* (their outputs carried through the LayerNorms in
between at each run's own scales, :mod:`mechinterp.circuits.postnorm`): the forward keeps a
ledger of this run's contributions and one of the patched run's, rebuilt from its recorded
outputs and LayerNorm divisors, and each destination reads
``x_d + sum_s w[s, d] * (patched contribution_s - current contribution_s)``.

Probes: zero tensors added to every destination's input whose gradients are the gradients of the
output with respect to each destination's input (what edge attribution patching multiplies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mechinterp.circuits.anatomy import in_out_weight, per_head_projection
from mechinterp.circuits.graph import CircuitGraph
from mechinterp.circuits.postnorm import PostNormStream
from mechinterp.errors import ShapeError
from mechinterp.models.table import Tap


@dataclass
class EdgeState:
    """What one edge-patching forward reads and leaves behind.

    Attributes:
        weights: ``[source, destination]`` or ``[batch, source, destination]`` patch weights, or
            None for a forward that only records or probes.
        patched: ``[batch, source, pos, d_model]`` source outputs to patch in (needed with
            ``weights``).
        embed: ``[batch, pos, d_model]`` replacement of the embeddings (the residual stream
            entering layer 0), or None.
        patched_scales: post-LayerNorm models: ``[batch, norm, pos]`` LayerNorm divisors of the
            run that ``patched`` comes from.
        patched_ledgers: post-LayerNorm models: the patched contributions at each read point
            (``[batch or 1, source, pos, d_model]``), for patched values that are no single run's
            (zero, the mean); replaces ``patched`` and ``patched_scales``.
        record: keep ``current`` source outputs (for the corrupted or clean reference runs).
        probe: add zero probes with gradients to every destination input.
        current: recorded source outputs, in source order of chunks.
        scales: recorded LayerNorm divisors ``[batch, pos]`` of a post-LayerNorm model's stream.
        probes: destination slice start -> probe tensor ``[batch, n, pos, d_model]``.
    """

    weights: torch.Tensor | None = None
    patched: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    patched_scales: torch.Tensor | None = None
    patched_ledgers: list[torch.Tensor] | None = None
    record: bool = False
    probe: bool = False
    current: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    probes: dict[int, torch.Tensor] = field(default_factory=dict)
    # (first source, [batch, n, pos, d_model] patched - current) for each source chunk so far.
    deltas: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    # (chunk start, destination start, stop) -> whether any weight there is non-zero.
    nonzero: dict[tuple[int, int, int], bool] = field(default_factory=dict)
    # Post-LayerNorm models: this run's and the patched run's contributions so far, how many
    # LayerNorms they have passed, and their difference at the current read point.
    ledger: torch.Tensor | None = None
    patched_ledger: torch.Tensor | None = None
    read_point: int = 0
    read_delta: torch.Tensor | None = None

    def recorded(self) -> torch.Tensor:
        """``[batch, source, pos, d_model]`` source outputs recorded by the forward."""
        return torch.cat(self.current, dim=1)


class EdgeForward:
    """Hooks that turn a model's forward into an edge-patching forward over ``graph``."""

    def __init__(self, model: object, graph: CircuitGraph):
        self.model = model
        self.graph = graph
        self.module: nn.Module = model._module
        anatomy = graph.anatomy
        table = model.table
        base = model.base
        dims = table.dims

        def at(path: str, layer: int | None = None) -> nn.Module:
            path = path.replace("{base}", base)
            if layer is not None:
                path = path.replace("{layer}", str(layer))
            return self.module.get_submodule(path.rstrip("."))

        self.blocks = [at(table.blocks + ".{layer}", layer) for layer in range(graph.n_layers)]
        self.attn_norms = [nn.Identity() if anatomy.attn_norm is None else at(anatomy.attn_norm, layer)
                           for layer in range(graph.n_layers)]
        self.mlp_norms = [at(anatomy.mlp_norm, layer) for layer in range(graph.n_layers)]
        self.final_norm = at(anatomy.final_norm)
        self.mlps = [at(_tap(table, "mlp_out").path, layer) for layer in range(graph.n_layers)]
        head_tap = _tap(table, "head")
        self.out_projections = [at(head_tap.path, layer) for layer in range(graph.n_layers)]
        # Per layer: projection module -> [(part, tap)] (one module serves q, k and v when fused).
        self.projections: list[dict[nn.Module, list[tuple[str, Tap]]]] = []
        for layer in range(graph.n_layers):
            by_module: dict[nn.Module, list[tuple[str, Tap]]] = {}
            for part in ("q", "k", "v"):
                tap = _tap(table, part)
                by_module.setdefault(at(tap.path, layer), []).append((part, tap))
            self.projections.append(by_module)
        self.dims = dims
        self.stream: PostNormStream | None = None
        if anatomy.post_norms is not None:
            norms = tuple(at(path, layer) for layer in range(graph.n_layers)
                          for path in anatomy.post_norms)
            self.stream = PostNormStream(norms, tuple(self.out_projections), graph.n_heads)

    # -- running -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hooked(self, state: EdgeState) -> Iterator[EdgeState]:
        """Install the hooks for one forward that follows ``state``."""
        if state.weights is not None:
            self._prepare(state)
        handles = []
        try:
            for layer, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(
                    self._block_input(state, layer), with_kwargs=True))
                handles.append(self.out_projections[layer].register_forward_pre_hook(
                    self._head_outputs(state, layer)))
                for module, parts in self.projections[layer].items():
                    handles.append(module.register_forward_hook(
                        self._projection(state, layer, parts)))
                handles.append(self.mlp_norms[layer].register_forward_pre_hook(
                    self._residual_input(state, self.graph.mlp_destination(layer))))
                handles.append(self.mlps[layer].register_forward_hook(self._mlp_output(state, layer)))
            handles.append(self.final_norm.register_forward_pre_hook(
                self._residual_input(state, self.graph.logits_destination)))
            if self.stream is not None:
                for index, norm in enumerate(self.stream.norms):
                    handles.append(norm.register_forward_pre_hook(self._renormalise(state, index)))
            yield state
        finally:
            for handle in handles:
                handle.remove()

    def _prepare(self, state: EdgeState) -> None:
        """Note which (source chunk, destination range) blocks of the weights are non-zero, once
        on the host, so the forward skips the rest without synchronising."""
        graph = self.graph
        weights = state.weights
        any_row = weights.ne(0) if weights.dim() == 2 else weights.ne(0).any(dim=0)
        if self.stream is not None:
            chunks = [(0, graph.n_sources)]  # one difference of all contributions per read point
        else:
            chunks = [(0, 1)]
            for layer in range(graph.n_layers):
                heads, mlp = graph.head_sources(layer), graph.mlp_source(layer)
                chunks += [(heads.start, heads.stop), (mlp, mlp + 1)]
        ranges = []
        for layer in range(graph.n_layers):
            for part in ("q", "k", "v"):
                span = graph.qkv_destinations(layer, part)
                ranges.append((span.start, span.stop))
            ranges.append((graph.mlp_destination(layer), graph.mlp_destination(layer) + 1))
        ranges.append((graph.logits_destination, graph.logits_destination + 1))
        # Block sums of the non-zero pattern from a 2-D prefix sum: one pass on the device and
        # one copy to the host, however many blocks there are.
        prefix = torch.nn.functional.pad(any_row.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))
        rows = torch.tensor([[a, b] for a, b in chunks])
        cols = torch.tensor([[c, d] for c, d in ranges])
        prefix = prefix.cpu()
        a, b = rows[:, 0, None], rows[:, 1, None]
        c, d = cols[None, :, 0], cols[None, :, 1]
        block = (prefix[b, d] - prefix[a, d] - prefix[b, c] + prefix[a, c]) > 0
        for i, (a, _) in enumerate(chunks):
            for j, (c, d) in enumerate(ranges):
                state.nonzero[(a, c, d)] = bool(block[i, j])

    # -- sources -----------------------------------------------------------------------------

    def _add_source(self, state: EdgeState, start: int, current: torch.Tensor,
                    unowned: torch.Tensor | None = None) -> None:
        """Source outputs ``[batch, n, pos, d_model]`` starting at source ``start``; ``unowned``
        is a bias written with them that no source owns."""
        if state.record:
            state.current.append(current)
        if state.weights is None:
            return
        rebuilt = state.patched_ledgers is None
        patched = state.patched[:, start:start + current.shape[1]] if rebuilt else None
        if self.stream is None:
            state.deltas.append((start, patched.to(current.dtype) - current))
            return
        if state.ledger is None:  # the embeddings open the ledgers
            state.ledger = current
            if rebuilt:
                state.patched_ledger = patched.to(current.dtype).expand_as(current)
        else:
            state.ledger = self.stream.write(state.ledger, current, unowned)
            if rebuilt:
                state.patched_ledger = self.stream.write(state.patched_ledger, patched, unowned)
        state.read_delta = None

    def _renormalise(self, state: EdgeState, index: int):
        """A pre-hook on the stream's LayerNorm ``index``: record its divisor, carry the ledgers
        through it."""
        stream = self.stream
        norm = stream.norms[index]

        def hook(_module: nn.Module, args: tuple):
            scale = stream.scale(norm, _unflat(state, args[0]))
            if state.record:
                state.scales.append(scale)
            if state.weights is None:
                return
            state.ledger = stream.normalise(state.ledger, norm, scale)
            if state.patched_ledgers is None:
                state.patched_ledger = stream.normalise(state.patched_ledger, norm,
                                                        state.patched_scales[:, index])
            state.read_point = index + 1
            state.read_delta = None

        return hook

    def _deltas(self, state: EdgeState) -> list[tuple[int, torch.Tensor]]:
        """(first source, patched minus current) chunks that the destinations read now."""
        if self.stream is None:
            return state.deltas
        if state.read_delta is None:
            if state.patched_ledgers is None:
                patched = state.patched_ledger
            else:
                patched = state.patched_ledgers[state.read_point][:, :state.ledger.shape[1]]
            state.read_delta = patched.to(state.ledger.dtype) - state.ledger
        return [(0, state.read_delta)]

    def _block_input(self, state: EdgeState, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["hidden_states"]
            changed = None
            if layer == 0 and state.embed is not None:
                if state.embed.shape != x.shape:
                    msg = (f"embed must have the shape of the embeddings {tuple(x.shape)}; got "
                           f"{tuple(state.embed.shape)}")
                    raise ShapeError(msg)
                x = changed = state.embed.to(x.dtype)
            state.block_inputs[layer] = x
            if layer == 0:
                self._add_source(state, 0, x.unsqueeze(1))
            if changed is None:
                return None
            if args:
                return (changed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": changed}

        return hook

    def _head_outputs(self, state: EdgeState, layer: int):
        module = self.out_projections[layer]
        graph = self.graph

        def hook(_module: nn.Module, args: tuple):
            if not (state.record or state.weights is not None):
                return
            z = args[0].unflatten(-1, (graph.n_heads, -1))  # [batch, pos, head, d_head]
            w_out = in_out_weight(module, "the attention output projection")
            w_out = w_out.unflatten(0, (graph.n_heads, -1))  # [head, d_head, d_model]
            current = torch.einsum("bphe,hed->bhpd", z, w_out.to(z.dtype))
            self._add_source(state, graph.head_sources(layer).start, current,
                             getattr(module, "bias", None))

        return hook

    def _mlp_output(self, state: EdgeState, layer: int):
        def hook(_module: nn.Module, _args: tuple, output: object):
            out = output[0] if isinstance(output, tuple) else output
            self._add_source(state, self.graph.mlp_source(layer), _unflat(state, out).unsqueeze(1))

        return hook

    # -- destinations ------------------------------------------------------------------------

    def _shift(self, state: EdgeState, start: int, stop: int, like: torch.Tensor
               ) -> torch.Tensor | None:
        """``[batch, stop - start, pos, d_model]`` shift of destinations ``start:stop``, or None
        when it is zero and nothing probes it."""
        shift = None
        if state.weights is not None:
            for first, delta in self._deltas(state):
                if not state.nonzero.get((first, start, stop), False):
                    continue
                rows = slice(first, first + delta.shape[1])
                w = state.weights[..., rows, start:stop].to(delta.dtype)
                equation = "bspd,sn->bnpd" if w.dim() == 2 else "bspd,bsn->bnpd"
                term = torch.einsum(equation, delta, w)
                shift = term if shift is None else shift + term
        if state.probe:
            probe = torch.zeros(like.shape[0], stop - start, *like.shape[1:], dtype=like.dtype,
                                device=like.device, requires_grad=True)
            state.probes[start] = probe
            shift = probe if shift is None else shift + probe
        return shift

    def _projection(self, state: EdgeState, layer: int, parts: list[tuple[str, Tap]]):
        graph = self.graph

        def hook(module: nn.Module, _args: tuple, output: torch.Tensor):
            x = state.block_inputs[layer]
            new = None
            for part, tap in parts:
                span = graph.qkv_destinations(layer, part)
                shift = self._shift(state, span.start, span.stop, x)
                if shift is None:
                    continue
                normed = self.attn_norms[layer](x.unsqueeze(1) + shift)  # [batch, head, pos, d]
                weight, bias = per_head_projection(module, tap, self.dims, f"the {part} projection")
                value = torch.einsum("bhpd,dhe->bphe", normed, weight.to(normed.dtype))
                if bias is not None:
                    value = value + bias.to(value.dtype)
                if new is None:
                    new = output.clone()
                tap.view(new, self.dims).copy_(value)
            return new

        return hook

    def _residual_input(self, state: EdgeState, destination: int):
        """A pre-hook shifting the input of the normalisation in front of an MLP or the
        unembedding (one destination each)."""

        def hook(_module: nn.Module, args: tuple):
            x = args[0]
            shift = self._shift(state, destination, destination + 1, _unflat(state, x))
            if shift is None:
                return None
            return (x + shift[:, 0].reshape(x.shape), *args[1:])

        return hook


def _unflat(state: EdgeState, x: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_model]`` from a tensor that a module (OPT's MLP) sees flattened to
    ``[batch * pos, d_model]``."""
    if x.dim() != 2:
        return x
    return x.unflatten(0, (state.block_inputs[0].shape[0], -1))


def _tap(table: object, component: str) -> Tap:
    place = table.place(component)
    if not isinstance(place, Tap):
        msg = f"edge patching needs {component!r} at a module boundary; the site table has {place}"
        raise ShapeError(msg)
    return place
