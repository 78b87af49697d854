"""The site-table format: where each component of the site vocabulary lives in one architecture.

A family module (``gpt2.py``, ``llama.py``...) builds a :class:`SiteTable` from a model config.
Each component maps to one of three kinds of place:

- :class:`Tap`: a tensor at a module boundary (a module's output, or one of its inputs), with an
  optional ``view`` that turns the raw tensor into the component's axes (``COMPONENT_AXES``), e.g.
  splitting ``[batch, pos, n_heads * d_head]`` into heads, or taking the query third of a fused
  qkv projection. Views must be views, so that writes through them reach the raw tensor.
- :class:`Sum`: a value the forward computes inline and never passes through a module boundary
  (``resid_mid`` of pre-LayerNorm blocks is ``resid_pre + attn_out``). It is read where it is
  next consumed and written by shifting one of its terms, so an unchanged value stays bit-exact.
- :class:`PatternTap`: the attention probabilities of an attention module, served by mechinterp's
  own eager attention function (``mechinterp.attention``) because no module boundary holds them.

Multimodal towers and U-Net blocks use the same three kinds; their families add components and
position resolvers of their own. A U-Net's layers are not numbered uniformly (a transformer
layer sits at ``down_blocks.1.attentions.0.transformer_blocks.0``) and differ in size, so its
components name their layers through :class:`Units`: a place's ``{unit}`` expands to the
layer's module path, and each layer has sizes of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

from mechinterp.errors import SiteError
from mechinterp.image_tokens import LayoutOf
from mechinterp.sites import Site, tower_of

if TYPE_CHECKING:
    from mechinterp.model import Tokens


@dataclass(frozen=True)
class Dims:
    """The sizes every site index is checked against."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int


View = Callable[[torch.Tensor, Dims], torch.Tensor]


@dataclass(frozen=True)
class Tap:
    """A tensor at a module boundary.

    Args:
        path: module path; ``{base}`` expands to the base model's prefix (``"transformer."``) and
            ``{layer}`` to the layer index.
        io: ``"output"`` or ``"input"`` of that module.
        item: for an output, the tuple element (ignored when the output is a plain tensor); for
            an input, the positional argument index.
        kwarg: for an input, its keyword name when the caller passes it by keyword.
        view: raw tensor -> tensor with the component's axes (a view of the raw tensor).
        flat: the module sees batch and position flattened into one axis ``[batch * pos, ...]``
            (OPT's MLP); edits and reads see the two axes apart, before ``view``.
    """

    path: str
    io: str = "output"
    item: int = 0
    kwarg: str | None = None
    view: View | None = None
    flat: bool = False


@dataclass(frozen=True)
class Sum:
    """A component equal to ``base + shifted``, computed inline by the block.

    Args:
        read: where the sum is next consumed (e.g. the input of the second LayerNorm).
        base: the component added unchanged (``resid_pre``).
        shifted: the component moved by ``new - current`` to write the sum (``attn_out``).
    """

    read: Tap
    base: str
    shifted: str


@dataclass(frozen=True)
class PatternTap:
    """Attention probabilities ``[batch, head, query, key]`` of the attention module at ``path``."""

    path: str


Place = Tap | Sum | PatternTap


@dataclass(frozen=True)
class Units:
    """The layers of components that are not the table's numbered blocks (a U-Net's ResNets,
    transformer layers or down/mid/up blocks): one module path and one set of sizes each.

    Args:
        paths: the module path of each layer, in forward order; a place's ``{unit}`` expands to
            it. None for a layer without the component (BLIP-2's Q-Former cross-attends in
            every other layer only).
        dims: the sizes of each layer (``n_layers`` is the number of units).
        missing: why a layer whose path is None lacks the component.
    """

    paths: tuple[str | None, ...]
    dims: tuple[Dims, ...]
    missing: str = ""


class InputPacking(Protocol):
    """Inputs a model takes packed across prompts (no batch axis), carried per prompt.

    ``Tokens`` keep every extra input batch-first, so that rows can be selected, repeated and
    concatenated whatever the model; a family whose model packs some of them (all images of a
    batch as one sequence of patches) turns them into padded per-prompt tensors once, and packs
    them again for each forward.
    """

    def to_rows(self, input_ids: torch.Tensor, extras: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """A processor's extra inputs with the packed ones as ``[batch, ...]`` tensors."""
        ...

    def to_model(self, inputs: dict[str, object]) -> dict[str, object]:
        """The forward's keyword inputs with the per-prompt tensors packed as the model takes
        them."""
        ...

    def check_sites(self, tokens: Tokens, sites: Sequence[Site]) -> None:
        """Raise a SiteError when ``sites`` of a packed tensor cannot be split per prompt."""
        ...


@dataclass(frozen=True)
class SiteTable:
    """Everything mechinterp knows about one architecture.

    Args:
        family: display name (``"gpt2"``).
        dims: sizes read from the config.
        places: component -> place; a component missing here is not supported by the family.
        unsupported: component -> reason, for components that exist in the vocabulary but not
            in this configuration (e.g. ``resid_mid`` of parallel-residual blocks).
        blocks: path of the ``ModuleList`` of blocks (with ``{base}``).
        causal: whether position ``t`` only sees positions ``<= t`` (decoders).
        position_ids: whether the forward takes ``position_ids`` (so left padding is honoured).
        sequential: each block's input is the previous block's output, so ``resid_pre`` of
            layer ``l > 0`` equals ``resid_post`` of layer ``l - 1``.
        towers: sizes of the other towers of a multimodal model (``{"vision": Dims(...)}``);
            their components are the main vocabulary after the tower's prefix.
        image_token_id: the id that marks image tokens in the main tower's input, if any.
        image_layout: what each image token of a prompt shows (its image, crop, grid cell and
            projector row; see :mod:`mechinterp.image_tokens`), where the family knows it.
        packing: for models that take some inputs packed across prompts, with no batch axis
            (Qwen2-VL's pixel values), how mechinterp carries them per prompt instead.
        units: component -> its layers, for components whose layers are not ``blocks`` (see
            :class:`Units`).
        padded: whether positions index tokens of a padded batch, counted from each row's first
            real token; a U-Net's spatial positions are the same columns in every row.
    """

    family: str
    dims: Dims
    places: dict[str, Place]
    blocks: str
    causal: bool
    position_ids: bool
    unsupported: dict[str, str] = field(default_factory=dict)
    sequential: bool = True
    towers: dict[str, Dims] = field(default_factory=dict)
    image_token_id: int | None = None
    image_layout: LayoutOf | None = None
    packing: InputPacking | None = None
    units: dict[str, Units] = field(default_factory=dict)
    padded: bool = True

    def dims_for(self, component: str, layer: int | None = None) -> Dims:
        """The sizes a component's indices are checked against: its tower's, or those of its
        unit ``layer`` (the first unit's, with the number of units, when ``layer`` is None)."""
        units = self.units.get(component)
        if units is not None:
            own = units.dims[0 if layer is None else layer]
            return replace(own, n_layers=len(units.paths))
        tower = tower_of(component)
        if tower is None:
            return self.dims
        if tower not in self.towers:
            msg = f"component {component!r}: this {self.family} model has no {tower} tower"
            raise SiteError(msg)
        return self.towers[tower]

    def module_path(self, component: str, path: str, base: str, layer: int | None) -> str:
        """The module path of ``path`` (a place of ``component``) at ``layer``."""
        units = self.units.get(component)
        unit = None
        if units is not None and layer is not None:
            unit = units.paths[layer]
            if unit is None:
                msg = f"component {component!r} has no layer {layer} in this model: {units.missing}"
                raise SiteError(msg)
            unit = unit.format(base=base, layer=layer)
        return path.format(base=base, layer=layer, unit=unit)

    def place(self, component: str) -> Place:
        """The place of ``component``, or a SiteError saying why there is none."""
        if component in self.places:
            return self.places[component]
        if component in self.unsupported:
            msg = f"component {component!r} is not available in this {self.family} model: " \
                  f"{self.unsupported[component]}"
            raise SiteError(msg)
        msg = (
            f"component {component!r} is not available for family {self.family!r}; "
            f"available: {sorted(self.places)}"
        )
        raise SiteError(msg)


def split_heads(n_heads_of: Callable[[Dims], int] = lambda d: d.n_heads) -> View:
    """View ``[..., n * d_head]`` as ``[..., n, d_head]``."""

    def view(raw: torch.Tensor, dims: Dims) -> torch.Tensor:
        return raw.unflatten(-1, (n_heads_of(dims), dims.d_head))

    return view


def kv_heads(dims: Dims) -> int:
    """Number of key/value heads (grouped-query attention shares them between query heads)."""
    return dims.n_kv_heads


def dims_from_config(config: object) -> Dims:
    """Sizes from a transformers config, whichever of the usual names it uses."""
    d_model = config_int(config, "hidden_size", "n_embd")
    n_heads = config_int(config, "num_attention_heads", "n_head")
    return Dims(
        n_layers=config_int(config, "num_hidden_layers", "n_layer"),
        n_heads=n_heads,
        n_kv_heads=config_int(config, "num_key_value_heads", default=n_heads),
        d_model=d_model,
        d_head=config_int(config, "head_dim", default=d_model // n_heads),
        d_mlp=config_int(config, "intermediate_size", "n_inner", default=4 * d_model),
        d_vocab=config_int(config, "vocab_size"),
    )


def add_logits(model: object, names: tuple[str, ...], places: dict[str, Place],
               unsupported: dict[str, str]) -> None:
    """Map ``logits`` to the first of ``names`` the model has, or say it has no head."""
    head = next((name for name in names if hasattr(model, name)), None)
    if head is not None:
        places["logits"] = Tap(head)
    else:
        unsupported["logits"] = f"{type(model).__name__} has no language-model head"


def config_int(config: object, *names: str, default: int | None = None) -> int:
    """The first of ``names`` set on ``config`` (architectures name the same size differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is not None:
        return default
    msg = f"the model config has none of {names}; cannot size the site table"
    raise SiteError(msg)
