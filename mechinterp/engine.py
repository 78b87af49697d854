"""One forward pass that reads and writes any set of sites.

Requests are grouped by the module boundary that holds them, one hook per boundary, registered
for this forward only and removed afterwards even when the forward fails. At each boundary the
edits run first, in the order given, then the reads, so a read sees what the model used.

Why plain PyTorch hooks rather than an nnsight trace for this path: a read/write plan is fixed
before the forward starts, so it needs none of nnsight's deferred execution, and a trace costs a
fixed few hundred microseconds plus tens per saved value, which is more than the forward itself
for small models at batch 1 (see ``benchmarks/bench_sites.py``). The model stays an nnsight
``Envoy`` for everything a trace is good for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mechinterp.attention import exposing_patterns
from mechinterp.errors import SiteError
from mechinterp.interventions import Intervention, TensorEdit
from mechinterp.models.processor_attention import (
    exposing_processor_patterns,
    is_processor_attention,
)
from mechinterp.models.table import PatternTap, SiteTable, Sum, Tap
from mechinterp.positions import RowSpans
from mechinterp.sites import Site, base_component, component_axes, token_axis


@dataclass(frozen=True)
class Resolved:
    """A site checked against the model, with the concrete module path of its place."""

    site: Site
    layer: int | None
    place: Tap | PatternTap
    path: str


def resolve(site: Site, table: SiteTable, base: str) -> Resolved:
    """Check a site's indices against the model and find the module path of its place."""
    dims = table.dims_for(site.component)
    layer = site.layer
    if layer is not None:
        if not -dims.n_layers <= layer < dims.n_layers:
            msg = f"layer for {site} must lie in [{-dims.n_layers}, {dims.n_layers}); got {layer}"
            raise SiteError(msg)
        layer %= dims.n_layers
    check_indices(site, table, layer)
    place = table.place(site.component)
    if isinstance(place, Sum):
        place = place.read
    return Resolved(site, layer, place, table.module_path(site.component, place.path, base, layer))


def check_indices(site: Site, table: SiteTable, layer: int | None = None) -> None:
    """Check a site's head and neuron indices against the model (against the sizes of unit
    ``layer`` for components with units of their own, such as a U-Net's)."""
    if layer is None and site.layer is not None and site.component in table.units:
        layer = site.layer % table.dims_for(site.component).n_layers
    dims = table.dims_for(site.component, layer)
    n_heads = dims.n_kv_heads if base_component(site.component) in ("k", "v") else dims.n_heads
    _check_range(site, "head", site.head, n_heads)
    _check_range(site, "neuron", site.neuron, dims.d_mlp)


def _check_range(site: Site, name: str, value: int | tuple[int, ...] | None, size: int) -> None:
    if value is None:
        return
    for item in (value,) if isinstance(value, int) else value:
        if not 0 <= item < size:
            msg = f"{name} for {site} must lie in [0, {size}); got {item}"
            raise SiteError(msg)


class Selection:
    """The part of a component's tensor that a site (and optional batch rows) names."""

    def __init__(self, site: Site, spans: Callable[[], RowSpans], rows: tuple[int, ...] | None,
                 *, padded: bool = True):
        self.site = site
        self.axes = component_axes(site.component)
        self.rows = rows
        if site.pos is None:
            columns = slice(None)
        elif not padded or token_axis(site.component) is not None:
            # A tower's tokens (image patches) and a U-Net's spatial positions are never padded:
            # positions are the same columns in every row, negative ones counted from the end
            # by indexing itself.
            columns = site.pos if isinstance(site.pos, int) else torch.tensor(site.pos)[None, :]
        else:
            # Row spans cost a device sync; only positions need them.
            columns = spans().columns(site.pos, None if rows is None else torch.tensor(rows))
        self.columns = columns
        self.whole = rows is None and site.pos is None and site.head is None and site.neuron is None
        self.basic = (
            rows is None
            and isinstance(columns, (int, slice))
            and not isinstance(site.head, tuple)
            and not isinstance(site.neuron, tuple)
        )

    def _basic_index(self) -> tuple:
        chosen = {"pos": self.columns, "head": self.site.head, "neuron": self.site.neuron}
        return tuple(
            slice(None) if chosen.get(axis) is None else chosen[axis] for axis in self.axes
        )

    def _advanced_index(self, x: torch.Tensor) -> tuple[tuple, list[int]]:
        """Broadcast index tensors over the leading (batch, pos/head/neuron) axes."""
        device = x.device
        batch = x.shape[0]
        rows = torch.arange(batch) if self.rows is None else torch.tensor(self.rows)
        if any(not -batch <= r < batch for r in rows.tolist()):
            msg = f"rows for {self.site} must lie in [{-batch}, {batch}); got {list(rows.tolist())}"
            raise SiteError(msg)
        indexed = [a for a in self.axes if a in ("batch", "pos", "head", "neuron")]
        slots = len(indexed)
        index: list[torch.Tensor] = []
        squeeze: list[int] = []
        for slot, axis in enumerate(indexed):
            shape = [1] * slots
            if axis == "batch":
                values = rows
                shape[slot] = -1
            elif axis == "pos":
                columns = self.columns
                if isinstance(columns, slice):
                    values = torch.arange(x.shape[self.axes.index("pos")]).expand(len(rows), -1)
                elif isinstance(columns, int):
                    values = torch.full((len(rows), 1), columns)
                elif columns.dim() == 1:
                    values = columns[:, None]
                else:
                    values = columns.expand(len(rows), -1)
                if isinstance(self.site.pos, int):
                    squeeze.append(slot)
                # positions differ per row, so this slot shares the batch slot's extent
                shape[0] = len(rows)
                shape[slot] = values.shape[1]
            else:
                chosen = getattr(self.site, axis)
                size = x.shape[self.axes.index(axis)]
                if chosen is None:
                    values = torch.arange(size)
                else:
                    values = torch.tensor([chosen] if isinstance(chosen, int) else list(chosen))
                    if isinstance(chosen, int):
                        squeeze.append(slot)
                shape[slot] = -1
            index.append(values.reshape(shape).to(device))
        return tuple(index), squeeze

    def get(self, x: torch.Tensor) -> torch.Tensor:
        """The selection (a view where possible) with the site's axes."""
        if self.whole:
            return x
        if self.basic:
            return x[self._basic_index()]
        index, squeeze = self._advanced_index(x)
        return _squeeze(x[index], squeeze)

    def put(self, x: torch.Tensor, new_value: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Overwrite the selection of ``x`` in place with ``new_value(selection)``."""
        if self.basic:
            view = x[self._basic_index()]
            view.copy_(new_value(view))
            return
        index, squeeze = self._advanced_index(x)
        current = _squeeze(x[index], squeeze)
        new = new_value(current).expand(current.shape)
        for dim in squeeze:
            new = new.unsqueeze(dim)
        x[index] = new


def _squeeze(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = x.squeeze(dim)
    return x


@dataclass
class _Boundary:
    """Everything one forward does at one module boundary."""

    path: str
    io: str  # "output" | "input" | "pattern"
    item: int = 0
    kwarg: str | None = None
    flat: bool = False  # the tensor is [batch * pos, ...] (see Tap.flat)
    edits: list[Callable[[torch.Tensor, dict], None]] = field(default_factory=list)
    reads: list[Callable[[torch.Tensor, dict], None]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    calls: int = 0

    def apply(self, raw: torch.Tensor, state: dict) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            msg = (
                f"module {self.path!r} ran more than once in one forward, so sites "
                f"{[str(s) for s in self.sites]} are ambiguous"
            )
            raise SiteError(msg)
        if self.edits:
            raw = raw.clone()  # never write into a tensor the caller or autograd may hold
        # A view with batch and position apart, so that writes through it reach ``raw``.
        shaped = raw.unflatten(0, (state["batch"], -1)) if self.flat else raw
        for edit in self.edits:
            edit(shaped, state)
        for read in self.reads:
            read(shaped, state)
        return raw


class Plan:
    """Reads and edits of one forward, grouped by module boundary."""

    def __init__(
        self,
        table: SiteTable,
        base: str,
        attention_mask: torch.Tensor | None,
        reads: Sequence[Site],
        edits: Sequence[Intervention],
        resolved: dict[Site, Resolved] | None = None,
    ):
        self.table = table
        self.base = base
        self._mask = attention_mask
        self._spans: RowSpans | None = None
        self._resolved = {} if resolved is None else resolved
        self.boundaries: dict[tuple[str, str], _Boundary] = {}
        self._captured: set[tuple] = set()
        self._ordered: list[_Boundary] | None = None
        for edit in edits:
            self._add_edit(edit)
        for site in reads:
            self._add_read(site)

    def spans(self) -> RowSpans:
        if self._spans is None:
            if self._mask is None:
                msg = "positions of padded tokens need the batch's attention mask; the plan has none"
                raise SiteError(msg)
            self._spans = RowSpans.from_mask(self._mask)
        return self._spans

    def _resolve(self, site: Site) -> Resolved:
        if site not in self._resolved:
            self._resolved[site] = resolve(site, self.table, self.base)
        return self._resolved[site]

    def _read_place(self, site: Site, resolved: Resolved) -> tuple[Tap | PatternTap, str]:
        """Where to read ``site``: ``resid_pre`` of layer ``l > 0`` is the output of block
        ``l - 1``, so it is read there (one hook fewer) unless it is itself edited."""
        if site.component != "resid_pre" or not resolved.layer or not self.table.sequential:
            return resolved.place, resolved.path
        own = self.boundaries.get((resolved.path, resolved.place.io))
        if own is not None and own.edits:
            return resolved.place, resolved.path
        previous = self._resolve(Site("resid_post", layer=resolved.layer - 1))
        return previous.place, previous.path

    def _boundary(self, place: Tap | PatternTap, path: str) -> _Boundary:
        io = "pattern" if isinstance(place, PatternTap) else place.io
        key = (path, io)
        if key not in self.boundaries:
            item = getattr(place, "item", 0)
            kwarg = getattr(place, "kwarg", None)
            flat = getattr(place, "flat", False)
            self.boundaries[key] = _Boundary(path, io, item, kwarg, flat)
        return self.boundaries[key]

    def _view(self, place: Tap | PatternTap, component: str,
              layer: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        view = getattr(place, "view", None)
        # The component's own sizes: a tower's, or its layer's where layers differ (a U-Net).
        dims = self.table.dims_for(component, layer)
        return (lambda raw: view(raw, dims)) if view is not None else (lambda raw: raw)

    def _selection(self, site: Site, rows: tuple[int, ...] | None) -> Selection:
        return Selection(site, self.spans, rows, padded=self.table.padded)

    def _add_read(self, site: Site) -> None:
        resolved = self._resolve(site)
        selection = self._selection(site, None)
        place, path = self._read_place(site, resolved)
        view = self._view(place, site.component, resolved.layer)

        def read(raw: torch.Tensor, state: dict) -> None:
            value = selection.get(view(raw)).detach()
            if selection.whole and not state["copy"]:
                # A whole tensor is kept as the model made it, not copied; run_plan checks its
                # version counter afterwards in case the model changed it in place.
                state["shared"].append((value, value._version))
            else:
                value = value.clone()  # a slice is copied so it does not pin the whole tensor
            state["reads"][site] = value

        boundary = self._boundary(place, path)
        boundary.reads.append(read)
        boundary.sites.append(site)

    def _add_edit(self, edit: Intervention) -> None:
        site = edit.site
        resolved = self._resolve(site)
        place = self.table.place(site.component)
        if isinstance(edit, TensorEdit):
            self._add_tensor_edit(edit, place, resolved)
            return
        selection = self._selection(site, edit.rows)
        if isinstance(place, Sum):
            self._add_sum_edit(edit, place, resolved.layer, selection)
            return
        view = self._view(resolved.place, site.component, resolved.layer)
        boundary = self._boundary(resolved.place, resolved.path)
        boundary.edits.append(lambda raw, state: selection.put(view(raw), edit.apply))
        boundary.sites.append(site)

    def _add_tensor_edit(self, edit: TensorEdit, place: Tap | PatternTap | Sum,
                         resolved: Resolved) -> None:
        if isinstance(place, Sum):
            base_key = self._capture_sum_base(place, resolved.layer)
            shifted_place = self.table.place(place.shifted)
            path = self.table.module_path(place.shifted, shifted_place.path, self.base,
                                          resolved.layer)
            boundary = self._boundary(shifted_place, path)
            shifted_view = self._view(shifted_place, place.shifted, resolved.layer)

            def write(raw: torch.Tensor, state: dict) -> None:
                shifted = shifted_view(raw)
                edit.write(shifted, state["scratch"][base_key] + shifted)

            boundary.edits.append(write)
        else:
            view = self._view(resolved.place, edit.site.component, resolved.layer)
            boundary = self._boundary(resolved.place, resolved.path)
            boundary.edits.append(lambda raw, state: edit.write(view(raw), None))
        boundary.sites.append(edit.site)

    def _capture_sum_base(self, place: Sum, layer: int) -> tuple:
        """Keep the base summand of ``place`` at ``layer`` in the forward's scratch space."""
        base_place = self.table.place(place.base)
        assert isinstance(base_place, Tap)
        base_key = ("sum_base", place.base, layer)
        view = self._view(base_place, place.base, layer)

        def capture(raw: torch.Tensor, state: dict) -> None:
            state["scratch"][base_key] = view(raw)

        if base_key not in self._captured:
            self._captured.add(base_key)
            path = self.table.module_path(place.base, base_place.path, self.base, layer)
            self._boundary(base_place, path).reads.append(capture)
        return base_key

    def _add_sum_edit(self, edit: Intervention, place: Sum, layer: int, selection: Selection) -> None:
        """Write ``base + shifted`` by moving ``shifted`` by ``new - current``.

        When the edit leaves the value unchanged the shift is exactly zero, so the forward is
        bit-identical to an unedited one.
        """
        shifted_place = self.table.place(place.shifted)
        assert isinstance(shifted_place, Tap)
        base_key = self._capture_sum_base(place, layer)

        view = self._view(shifted_place, place.shifted, layer)

        def shift(raw: torch.Tensor, state: dict) -> None:
            shifted = view(raw)  # the summands' views (crops side by side) see the sum's axes
            current = state["scratch"][base_key] + shifted
            selected = selection.get(current)
            delta = edit.apply(selected) - selected
            selection.put(shifted, lambda value: value + delta)

        boundary = self._boundary(shifted_place, self.table.module_path(
            place.shifted, shifted_place.path, self.base, layer))
        boundary.edits.append(shift)
        boundary.sites.append(edit.site)

    def ordered(self, execution_order: dict[str, int]) -> list[_Boundary]:
        """Boundaries in the order the forward reaches them (sorted once per plan)."""
        if self._ordered is None:
            stage = {"input": 0, "pattern": 1, "output": 2}
            self._ordered = sorted(
                self.boundaries.values(),
                key=lambda b: (execution_order.get(b.path, len(execution_order)), stage[b.io]),
            )
        return self._ordered


def run_plan(
    module: nn.Module,
    plan: Plan,
    inputs: dict[str, torch.Tensor],
    execution_order: dict[str, int],
    modules: dict[str, nn.Module] | None = None,
    stubs: Mapping[str, object] | None = None,
) -> tuple[object, dict[Site, torch.Tensor]]:
    """Run one forward of ``module`` on ``inputs`` with the plan's hooks in place.

    ``modules`` memoises path -> submodule across calls. ``stubs`` maps module paths to outputs
    those modules return without computing anything: blocks whose output is known already (the
    unpatched prefix of a patching sweep) are not recomputed.
    """
    output, reads, changed = _forward(module, plan, inputs, execution_order, modules, stubs,
                                      copy=False)
    if changed:  # the model edited a kept tensor in place after it was read: read copies instead
        output, reads, _ = _forward(module, plan, inputs, execution_order, modules, stubs,
                                    copy=True)
    return output, reads


class _Stubbed:
    """Makes modules return fixed outputs for the duration of a ``with`` block.

    The module's ``forward`` is shadowed by an instance attribute (torch calls ``self.forward``),
    and whatever instance attribute was there before (nnsight installs one) is put back.
    """

    _MISSING = object()

    def __init__(self, targets: list[tuple[nn.Module, object]]):
        self.targets = targets
        self.saved: list[tuple[nn.Module, object]] = []

    def __enter__(self) -> None:
        for target, output in self.targets:
            self.saved.append((target, target.__dict__.get("forward", self._MISSING)))
            target.forward = lambda *args, _output=output, **kwargs: _output

    def __exit__(self, *exc: object) -> None:
        for target, previous in reversed(self.saved):
            if previous is self._MISSING:
                del target.forward
            else:
                target.forward = previous


def _forward(module, plan, inputs, execution_order, modules, stubs, *, copy: bool):
    # The batch size, for modules that flatten batch and position (Tap.flat): language models
    # take token ids, U-Nets a noisy sample.
    batch = next((inputs[name].shape[0] for name in ("input_ids", "sample") if name in inputs), 0)
    state: dict = {"reads": {}, "scratch": {}, "shared": [], "copy": copy, "batch": batch}
    handles = []
    patterns: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    processor_patterns: list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = []
    boundaries = plan.ordered(execution_order)
    modules = {} if modules is None else modules
    stubbed = _Stubbed([(_cached_submodule(module, path, modules), output)
                        for path, output in (stubs or {}).items()])
    try:
        stubbed.__enter__()
        for boundary in boundaries:
            boundary.calls = 0
            target = _cached_submodule(module, boundary.path, modules)
            # First in line: transformers records hidden states with hooks of its own (the
            # vision features LLaVA takes from a middle layer), which must see the edit.
            if boundary.io == "output":
                handles.append(target.register_forward_hook(_output_hook(boundary, state),
                                                            prepend=True))
            elif boundary.io == "input":
                handles.append(target.register_forward_pre_hook(
                    _input_hook(boundary, state), with_kwargs=True, prepend=True))
            elif is_processor_attention(target):
                processor_patterns.append((target, lambda probs, b=boundary: b.apply(probs, state)))
            else:
                patterns[id(target)] = lambda probs, b=boundary: b.apply(probs, state)
        with contextlib.ExitStack() as exposed:
            if patterns:
                exposed.enter_context(exposing_patterns(module, patterns))
            if processor_patterns:
                exposed.enter_context(exposing_processor_patterns(processor_patterns))
            output = module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        stubbed.__exit__()
    missed = [b for b in boundaries if b.calls == 0]
    if missed:
        sites = [str(site) for b in missed for site in b.sites]
        msg = f"sites {sites} were never reached in the forward (module {missed[0].path!r} did not run)"
        raise SiteError(msg)
    changed = any(value._version != version for value, version in state["shared"])
    return output, state["reads"], changed


def _cached_submodule(module: nn.Module, path: str, modules: dict[str, nn.Module]) -> nn.Module:
    target = modules.get(path)
    if target is None:
        target = modules[path] = _submodule(module, path)
    return target


def _submodule(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        msg = f"the model has no module {path!r}; its site table does not match this model"
        raise SiteError(msg) from None


def _output_hook(boundary: _Boundary, state: dict):
    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            item = boundary.item
            old = output[item]
            new = boundary.apply(old, state)
            if new is old:
                return output
            # A tensor a module returns twice is one value: a U-Net down block's hidden state
            # is also its last skip connection, and an edit must reach both.
            return tuple(new if part is old else _replaced_in(part, old, new) for part in output)
        return boundary.apply(output, state)

    return hook


def _replaced_in(part: object, old: torch.Tensor, new: torch.Tensor) -> object:
    """``part`` with ``old`` replaced by ``new`` where it holds it in a tuple."""
    if isinstance(part, tuple) and any(x is old for x in part):
        return tuple(new if x is old else x for x in part)
    return part


def _input_hook(boundary: _Boundary, state: dict):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        item = boundary.item
        if len(args) > item:
            new = boundary.apply(args[item], state)
            return args[:item] + (new,) + args[item + 1:], kwargs
        if boundary.kwarg is not None and boundary.kwarg in kwargs:
            kwargs = dict(kwargs)
            kwargs[boundary.kwarg] = boundary.apply(kwargs[boundary.kwarg], state)
            return args, kwargs
        msg = f"module {boundary.path!r} was called without input {item} ({boundary.kwarg!r})"
        raise SiteError(msg)

    return hook


def record_execution_order(module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Module paths in the order a forward first calls them (not registration order)."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def note(name: str):
        def hook(_module: nn.Module, _args: tuple) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(note(name)))
        with torch.no_grad():
            module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(order)

