"""Sites: one addressable place in a model, named the same way for every architecture.

A :class:`Site` is a component (``resid_pre``, ``head``, ``neuron``...), a layer and an optional
index over positions, heads or neurons. A family's site table (``mechinterp.models``) resolves it
to a tensor in the forward pass. :func:`select` builds grids of sites with a small chainable
selector.

Examples:
    >>> from mechinterp import Site, select
    >>> Site("head", layer=1, head=3, pos=-1)
    Site('head', layer=1, pos=-1, head=3)
    >>> [str(s) for s in select("attn_out").layers(0, 1).positions(-2, -1).sites(n_layers=2)]
    ['attn_out.0[pos=-2]', 'attn_out.0[pos=-1]', 'attn_out.1[pos=-2]', 'attn_out.1[pos=-1]']
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mechinterp.errors import InputError, SiteError

#: The axes of each component's tensor, in order (one vocabulary for every family).
COMPONENT_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("batch", "pos", "d_model"),
    "resid_pre": ("batch", "pos", "d_model"),
    "resid_mid": ("batch", "pos", "d_model"),
    "resid_post": ("batch", "pos", "d_model"),
    "attn_out": ("batch", "pos", "d_model"),
    "mlp_out": ("batch", "pos", "d_model"),
    "head": ("batch", "pos", "head", "d_head"),
    "q": ("batch", "pos", "head", "d_head"),
    "k": ("batch", "pos", "head", "d_head"),
    "v": ("batch", "pos", "head", "d_head"),
    "pattern": ("batch", "head", "pos", "key_pos"),
    "neuron": ("batch", "pos", "neuron"),
    "logits": ("batch", "pos", "vocab"),
    # Image tokens as the language model receives them (a multimodal projector's output); pos
    # indexes the image's tokens.
    "projector": ("batch", "pos", "d_model"),
    # Diffusion U-Nets (``mechinterp.models.unet``). Positions index the feature map's spatial
    # locations row-major (``h * width + w``) at that layer's resolution, and d_model its
    # channels. ``resnet`` is a ResNet block's output, ``block`` a down, mid or up block's;
    # ``cross_*`` are the cross-attention (``attn2``) counterparts of ``attn_out``, ``head``,
    # ``q``, ``k``, ``v`` and ``pattern``, whose keys and values index the text tokens.
    "resnet": ("batch", "pos", "d_model"),
    "block": ("batch", "pos", "d_model"),
    "cross_attn": ("batch", "pos", "d_model"),
    "cross_head": ("batch", "pos", "head", "d_head"),
    "cross_q": ("batch", "pos", "head", "d_head"),
    "cross_k": ("batch", "pos", "head", "d_head"),
    "cross_v": ("batch", "pos", "head", "d_head"),
    "cross_pattern": ("batch", "head", "pos", "key_pos"),
}

#: Components only diffusion U-Nets have.
UNET_COMPONENTS = frozenset({"resnet", "block", "cross_attn", "cross_head", "cross_q", "cross_k",
                             "cross_v", "cross_pattern"})

#: Components that exist once per model rather than once per layer.
GLOBAL_COMPONENTS = frozenset({"embed", "logits", "projector"})

#: Towers of multimodal models besides the main (language) one. ``"vision.resid_post"`` is the
#: residual stream of the vision tower, with the same axes as ``resid_post``; its positions
#: index the tower's tokens (image patches, with any class token first), which are never padded.
#: ``"qformer."`` names BLIP-2's Q-Former, whose positions are its learned query tokens.
TOWERS = ("vision", "qformer")


def base_component(component: str) -> str:
    """``"vision.head"`` -> ``"head"``: the component without its tower prefix."""
    tower, dot, rest = component.partition(".")
    return rest if dot and tower in TOWERS else component


def tower_of(component: str) -> str | None:
    """The tower a component belongs to (``"vision"``), or None for the main tower."""
    tower, dot, _ = component.partition(".")
    return tower if dot and tower in TOWERS else None


def token_axis(component: str) -> str | None:
    """Whose tokens a component's positions count: a tower's (its name) for the tower's
    components, the projector's own rows (``"projector"``: one per image token, or per Q-Former
    query) for ``projector``, or None for the prompt's tokens. Only the prompt's are padded."""
    tower = tower_of(component)
    if tower is not None:
        return tower
    return "projector" if component == "projector" else None


def component_axes(component: str) -> tuple[str, ...]:
    """The axes of a component's tensor, for main-tower and tower components alike."""
    return COMPONENT_AXES[base_component(component)]

Index = int | tuple[int, ...] | None


def _as_index(name: str, value: object) -> Index:
    """Normalise an index argument: None (whole axis), an int, or a tuple of ints."""
    if value is None:
        return None
    if isinstance(value, bool):
        msg = f"{name} must be an int, a sequence of ints or None; got the bool {value!r}"
        raise InputError(msg)
    if isinstance(value, int):
        return value
    if hasattr(value, "__index__"):
        return int(value)  # numpy / torch integer scalars
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = tuple(value)
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            msg = f"{name} must be an int, a non-empty sequence of ints or None; got {value!r}"
            raise InputError(msg)
        return items
    msg = f"{name} must be an int, a sequence of ints or None; got {type(value).__name__} {value!r}"
    raise InputError(msg)


@dataclass(frozen=True)
class Site:
    """One place in a model: a component, a layer and an optional index.

    Args:
        component: one of :data:`COMPONENT_AXES`, or a per-layer one after a tower prefix
            (``"vision.resid_post"``, see :data:`TOWERS`).
        layer: the block index; ``None`` for ``embed`` and ``logits``. Negative values count from
            the last layer and are resolved against the model.
        pos: token position(s). Non-negative positions count from each row's first real token and
            negative ones from its last, so left padding does not shift them. For ``pattern`` this
            indexes the query position.
        head: attention head(s), for ``head``, ``q``, ``k``, ``v`` and ``pattern`` (for ``k`` and
            ``v`` of grouped-query models this is the key/value head).
        neuron: MLP neuron(s), for ``neuron`` only.

    An int index drops its axis from the tensor read at the site; a tuple keeps it.
    """

    component: str
    layer: int | None = None
    pos: Index = None
    head: Index = None
    neuron: Index = None

    def __post_init__(self) -> None:
        base = base_component(self.component) if isinstance(self.component, str) else None
        if base not in COMPONENT_AXES or (base == "projector" and base != self.component):
            msg = (
                f"component must be one of {sorted(COMPONENT_AXES)}, or one of them after a "
                f"tower prefix ({', '.join(t + '.' for t in TOWERS)}); got {self.component!r}"
            )
            raise SiteError(msg)
        axes = COMPONENT_AXES[base]
        if base in GLOBAL_COMPONENTS:
            if self.layer is not None:
                msg = f"component {self.component!r} has no layer; got layer={self.layer!r}"
                raise SiteError(msg)
        elif self.layer is None:
            msg = f"component {self.component!r} needs a layer; got layer=None"
            raise SiteError(msg)
        elif isinstance(self.layer, bool) or not isinstance(self.layer, int):
            msg = f"layer must be an int; got {type(self.layer).__name__} {self.layer!r}"
            raise SiteError(msg)
        for name, axis in (("pos", "pos"), ("head", "head"), ("neuron", "neuron")):
            value = _as_index(name, getattr(self, name))
            object.__setattr__(self, name, value)
            if value is not None and axis not in axes:
                msg = (
                    f"component {self.component!r} has axes {axes}, so it takes no {name} index;"
                    f" got {name}={value!r}"
                )
                raise SiteError(msg)

    @classmethod
    def _checked_fields(cls, component: str, layer: int | None, pos: Index, head: Index,
                        neuron: Index) -> Site:
        """A site from fields that are already known to be valid together (a selector checks
        one site of its grid the normal way, then builds the rest with this)."""
        site = object.__new__(cls)
        # A frozen dataclass refuses attribute assignment, not its instance dictionary.
        site.__dict__.update(component=component, layer=layer, pos=pos, head=head, neuron=neuron)
        return site

    @property
    def axes(self) -> tuple[str, ...]:
        """The axes of the tensor read at this site (int-indexed axes removed)."""
        dropped = {
            axis for axis, value in (("pos", self.pos), ("head", self.head), ("neuron", self.neuron))
            if isinstance(value, int)
        }
        return tuple(a for a in component_axes(self.component) if a not in dropped)

    @classmethod
    def parse(cls, text: str) -> Site:
        """A whole component from its string form: ``"block.1"`` -> ``Site("block", layer=1)``,
        ``"embed"`` -> ``Site("embed")`` (the inverse of ``str`` for sites without indices).

        Examples:
            >>> Site.parse("vision.resid_post.3")
            Site('vision.resid_post', layer=3)
        """
        if not isinstance(text, str) or "[" in text:
            msg = (f"site must be a Site or a component name with an optional layer, such as "
                   f"'block.1'; got {text!r}")
            raise InputError(msg)
        component, _, layer = text.rpartition(".")
        if component and layer.lstrip("-").isdigit():
            return cls(component, layer=int(layer))
        return cls(text)

    def at(self, **changes: object) -> Site:
        """A copy with some fields changed, e.g. ``site.at(pos=3)``."""
        return replace(self, **changes)

    def __str__(self) -> str:
        name = self.component if self.layer is None else f"{self.component}.{self.layer}"
        parts = [
            f"{key}={value}" for key, value in
            (("pos", self.pos), ("head", self.head), ("neuron", self.neuron)) if value is not None
        ]
        return f"{name}[{', '.join(parts)}]" if parts else name

    def __repr__(self) -> str:
        fields = [repr(self.component)]
        fields += [
            f"{key}={value!r}" for key, value in
            (("layer", self.layer), ("pos", self.pos), ("head", self.head), ("neuron", self.neuron))
            if value is not None
        ]
        return f"Site({', '.join(fields)})"


_EACH = object()  # sentinel: "every index of this axis, one site each"


@dataclass(frozen=True)
class SiteSelector:
    """A chainable description of a grid of sites; see :func:`select`.

    Each axis is either left whole (the default), fixed to given values (one site per value), or
    expanded to every valid value of the model (``.layers()`` / ``.heads()`` / ``.neurons()``
    with no arguments). Positions need a prompt to enumerate, so ``.positions()`` with no
    arguments expands over ``range(n_positions)`` given to :meth:`sites`.
    """

    components: tuple[str, ...]
    layer_values: object = _EACH
    pos_values: object = None
    head_values: object = None
    neuron_values: object = None

    def layers(self, *layers: int | Iterable[int]) -> SiteSelector:
        """One site per given layer; no arguments means every layer."""
        return replace(self, layer_values=_flatten("layers", layers))

    def positions(self, *positions: int | Iterable[int]) -> SiteSelector:
        """One site per given position; no arguments means every position."""
        return replace(self, pos_values=_flatten("positions", positions))

    def heads(self, *heads: int | Iterable[int]) -> SiteSelector:
        """One site per given head; no arguments means every head."""
        return replace(self, head_values=_flatten("heads", heads))

    def neurons(self, *neurons: int | Iterable[int]) -> SiteSelector:
        """One site per given neuron; no arguments means every neuron."""
        return replace(self, neuron_values=_flatten("neurons", neurons))

    def __or__(self, other: SiteSelector) -> SiteUnion:
        return SiteUnion((self, other))

    def sites(
        self,
        *,
        n_layers: int | None = None,
        n_heads: int | None = None,
        n_neurons: int | None = None,
        n_positions: int | None = None,
    ) -> list[Site]:
        """Expand to concrete sites: layer-major, then position, head, neuron."""
        out: list[Site] = []
        for component in self.components:
            axes = component_axes(component)
            layers = [None] if base_component(component) in GLOBAL_COMPONENTS else _expand(
                "layers", self.layer_values, n_layers, "n_layers")
            positions = _expand("positions", self.pos_values, n_positions, "n_positions")
            heads = _expand("heads", self.head_values, n_heads, "n_heads") if "head" in axes else [None]
            neurons = (
                _expand("neurons", self.neuron_values, n_neurons, "n_neurons")
                if "neuron" in axes else [None]
            )
            grid = itertools.product(layers, positions, heads, neurons)
            first = next(grid, None)
            if first is None:
                continue
            # Every value was checked when the selector was built, and every combination is
            # valid once one is: only the first site needs the full check.
            out.append(Site(component, *first))
            out.extend(Site._checked_fields(component, *fields) for fields in grid)
        return out


@dataclass(frozen=True)
class SiteUnion:
    """Several selectors whose sites are concatenated in order."""

    parts: tuple[SiteSelector | SiteUnion, ...]

    def __or__(self, other: SiteSelector | SiteUnion) -> SiteUnion:
        return SiteUnion((*self.parts, other))

    def sites(self, **sizes: int | None) -> list[Site]:
        return [site for part in self.parts for site in part.sites(**sizes)]


def select(*components: str) -> SiteSelector:
    """Start a site grid over one or more components.

    Examples:
        >>> sel = select("head").layers(1).heads(0, 2).positions(-1)
        >>> [str(s) for s in sel.sites()]
        ['head.1[pos=-1, head=0]', 'head.1[pos=-1, head=2]']
        >>> len(select("resid_pre", "resid_post").sites(n_layers=3))
        6
    """
    if not components:
        msg = f"select() needs at least one component of {sorted(COMPONENT_AXES)}; got none"
        raise SiteError(msg)
    for component in components:
        if not isinstance(component, str) or base_component(component) not in COMPONENT_AXES:
            msg = (f"component must be one of {sorted(COMPONENT_AXES)}, or one of them after a "
                   f"tower prefix ({', '.join(t + '.' for t in TOWERS)}); got {component!r}")
            raise SiteError(msg)
    return SiteSelector(tuple(components))


def _flatten(name: str, values: Sequence[int | Iterable[int]]) -> object:
    if not values:
        return _EACH
    flat: list[int] = []
    for value in values:
        if isinstance(value, Iterable):
            flat.extend(value)
        else:
            flat.append(value)
    for value in flat:
        if isinstance(value, bool) or not isinstance(value, int):
            msg = f"{name} must be ints; got {type(value).__name__} {value!r}"
            raise InputError(msg)
    return tuple(flat)


def _expand(name: str, values: object, size: int | None, size_name: str) -> list:
    if values is None:
        return [None]
    if values is _EACH:
        if size is None:
            msg = f"selecting every one of the {name} needs {size_name}; got {size_name}=None"
            raise InputError(msg)
        return list(range(size))
    return list(values)  # type: ignore[arg-type]
