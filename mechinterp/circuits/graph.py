"""The computational graph of a transformer, as circuit discovery sees it.

Sources write into the residual stream: ``embed`` (token and position embeddings), every
attention head ``a{layer}.h{head}`` (its slice of the output projection) and every MLP
``m{layer}``. Destinations read from it: each head's query, key and value input separately
(``a{layer}.h{head}.q``; with grouped-query attention keys and values belong to key/value heads,
``a{layer}.g{group}.k``), each MLP ``m{layer}``, and ``logits``. An edge runs from a source to
every destination that reads the residual stream after the source wrote to it; the edge
``"a0.h1->a1.h3.k"`` is head 1 of layer 0 as seen by the key of head 3 of layer 1.

Edges are held as a ``[source, destination]`` matrix; :attr:`CircuitGraph.valid` marks the
entries that are edges.

Examples:
    >>> import mechinterp
    >>> from mechinterp.circuits import CircuitGraph
    >>> graph = CircuitGraph.of(mechinterp.load("induction-2l"))
    >>> graph.n_sources, graph.n_destinations, graph.n_edges
    (11, 27, 110)
    >>> graph.edge_name(graph.edge_index("a0.h1->a1.h3.k"))
    'a0.h1->a1.h3.k'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from mechinterp.circuits.anatomy import Anatomy, anatomy_of
from mechinterp.errors import InputError, SiteError


@dataclass(frozen=True)
class CircuitGraph:
    """Sources, destinations and edges of one model.

    Create it with :meth:`of`. Index layout: source 0 is ``embed``; layer ``l``'s heads are
    sources ``1 + l * (heads + 1) + h`` and its MLP follows them. Layer ``l``'s destinations are
    its query inputs, key inputs, value inputs and MLP, in that order; ``logits`` is last.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool
    # Where the model's modules are; not part of the graph's identity (a loaded circuit has none).
    anatomy: Anatomy | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: object) -> CircuitGraph:
        """The graph of an :class:`~mechinterp.InterpModel`: decoder families, the language
        models of LLaVA, Qwen2-VL and BLIP-2, CLIP's text tower, and the post-LayerNorm
        encoders BERT and RoBERTa (:func:`~mechinterp.circuits.anatomy.anatomy_of`)."""
        table = getattr(model, "table", None)
        module = getattr(model, "_module", None)
        if table is None or module is None:
            msg = f"model must be a mechinterp InterpModel (mechinterp.load); got {type(model).__name__}"
            raise InputError(msg)
        anatomy = anatomy_of(module, table)
        d = table.dims
        return cls(d.n_layers, d.n_heads, d.n_kv_heads, anatomy.parallel, anatomy)

    # -- layout ------------------------------------------------------------------------------

    @property
    def n_sources(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def layer_width(self) -> int:
        """Destinations per layer: query, key and value inputs and the MLP."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_destinations(self) -> int:
        return self.n_layers * self.layer_width + 1

    def head_sources(self, layer: int) -> slice:
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def qkv_destinations(self, layer: int, part: str) -> slice:
        """Destinations of the ``"q"``, ``"k"`` or ``"v"`` inputs of layer ``layer``."""
        start = layer * self.layer_width
        if part == "q":
            return slice(start, start + self.n_heads)
        offset = self.n_heads + (0 if part == "k" else self.n_kv_heads)
        return slice(start + offset, start + offset + self.n_kv_heads)

    def mlp_destination(self, layer: int) -> int:
        return layer * self.layer_width + self.layer_width - 1

    @property
    def logits_destination(self) -> int:
        return self.n_destinations - 1

    def sources_before(self, destination: int) -> int:
        """How many sources (a prefix of the source order) a destination can read."""
        if destination == self.logits_destination:
            return self.n_sources
        layer, offset = divmod(destination, self.layer_width)
        reads_own_heads = offset == self.layer_width - 1 and not self.parallel
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if reads_own_heads else 0)

    def read_at(self, point: int) -> slice:
        """Destinations reading the residual stream at read point ``point`` of a post-LayerNorm
        model: ``2 * l`` is block ``l``'s input (its queries, keys and values), ``2 * l + 1`` its
        attention sublayer's output (its MLP), ``2 * n_layers`` the final one (the logits)."""
        layer, after_attention = divmod(point, 2)
        if layer == self.n_layers:
            return slice(self.logits_destination, self.logits_destination + 1)
        if after_attention:
            return slice(self.mlp_destination(layer), self.mlp_destination(layer) + 1)
        return slice(layer * self.layer_width, self.mlp_destination(layer))

    @cached_property
    def valid(self) -> torch.Tensor:
        """``[source, destination]`` bool: which entries are edges."""
        reach = torch.tensor([self.sources_before(d) for d in range(self.n_destinations)])
        return torch.arange(self.n_sources)[:, None] < reach[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    # -- names -------------------------------------------------------------------------------

    @cached_property
    def source_names(self) -> tuple[str, ...]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            names.append(f"m{layer}")
        return tuple(names)

    @cached_property
    def destination_names(self) -> tuple[str, ...]:
        grouped = self.n_kv_heads != self.n_heads
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}.q" for h in range(self.n_heads)]
            for part in ("k", "v"):
                names += [f"a{layer}.{'g' if grouped else 'h'}{j}.{part}"
                          for j in range(self.n_kv_heads)]
            names.append(f"m{layer}")
        names.append("logits")
        return tuple(names)

    @cached_property
    def _source_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.source_names)}

    @cached_property
    def _destination_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.destination_names)}

    def source_index(self, name: str) -> int:
        if name not in self._source_index:
            msg = f"no source named {name!r} in this graph; sources look like 'embed', 'a0.h1', 'm0'"
            raise SiteError(msg)
        return self._source_index[name]

    def destination_index(self, name: str) -> int:
        if name not in self._destination_index:
            msg = (f"no destination named {name!r} in this graph; destinations look like "
                   f"'a1.h0.q', 'm0', 'logits'")
            raise SiteError(msg)
        return self._destination_index[name]

    def edge_index(self, name: str) -> tuple[int, int]:
        """``(source, destination)`` of an edge named ``"source->destination"``."""
        if not isinstance(name, str) or name.count("->") != 1:
            msg = f"an edge name must look like 'a0.h1->a1.h0.k'; got {name!r}"
            raise InputError(msg)
        source, destination = name.split("->")
        index = self.source_index(source), self.destination_index(destination)
        if not self.valid[index]:
            msg = f"{name!r} is not an edge: {destination} reads the residual stream before {source} writes it"
            raise SiteError(msg)
        return index

    def edge_name(self, index: tuple[int, int]) -> str:
        return f"{self.source_names[index[0]]}->{self.destination_names[index[1]]}"

    def edges(self, mask: torch.Tensor | None = None) -> list[str]:
        """Names of the edges set in a ``[source, destination]`` mask (default: all), in
        source-major order."""
        chosen = self.valid if mask is None else self.valid & self.check_mask(mask, "mask")
        return [self.edge_name((s, d)) for s, d in chosen.nonzero().tolist()]

    def mask_of(self, edges: list[str] | tuple[str, ...]) -> torch.Tensor:
        """``[source, destination]`` bool mask of named edges."""
        mask = torch.zeros(self.n_sources, self.n_destinations, dtype=torch.bool)
        for name in edges:
            mask[self.edge_index(name)] = True
        return mask

    def check_mask(self, mask: object, name: str) -> torch.Tensor:
        """A ``[source, destination]`` tensor, checked against this graph's shape."""
        if not isinstance(mask, torch.Tensor) or mask.shape != (self.n_sources, self.n_destinations):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            msg = (f"{name} must be a [source, destination] tensor of shape "
                   f"({self.n_sources}, {self.n_destinations}); got {got}")
            raise InputError(msg)
        return mask.to("cpu", torch.bool) if mask.dtype == torch.bool else mask.cpu() != 0

    def node_of_destination(self, destination: int) -> str:
        """The node (head, MLP or logits) a destination input belongs to; key and value inputs
        of a key/value group belong to the group's first query head."""
        name = self.destination_names[destination]
        if name in ("logits",) or name.startswith("m"):
            return name
        layer, index, _ = name.split(".")
        head = int(index[1:])
        if index[0] == "g":
            head *= self.n_heads // self.n_kv_heads
        return f"{layer}.h{head}"
