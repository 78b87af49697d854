"""Interventions: what happens to the tensor at a site during a forward.

Each intervention maps the current value at its site (the selection, with the site's axes) to a
new one. ``rows`` restricts it to some batch rows, so one forward can carry a different edit per
row.

Examples:
    >>> import torch
    >>> from mechinterp import Site, Set, Zero, Scale
    >>> Zero(Site("head", layer=0, head=1)).apply(torch.ones(2, 3))
    tensor([[0., 0., 0.],
            [0., 0., 0.]])
    >>> Scale(Site("mlp_out", layer=0), 0.5).apply(torch.ones(2))
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechinterp.errors import DeviceError, DTypeError, InputError, ShapeError
from mechinterp.sites import Site


class Intervention:
    """Base class: an edit of the tensor at ``site``, optionally only in batch ``rows``."""

    def __init__(self, site: Site, rows: int | Sequence[int] | None = None):
        if not isinstance(site, Site):
            msg = f"site must be a Site; got {type(site).__name__} {site!r}"
            raise InputError(msg)
        self.site = site
        self.rows = _rows(rows)

    def __repr__(self) -> str:
        rows = "" if self.rows is None else f", rows={list(self.rows)}"
        return f"{type(self).__name__}({self.site!r}{self._detail()}{rows})"

    def _detail(self) -> str:
        return ""

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        """The new value for the selection ``current``."""
        raise NotImplementedError

    def _check_value(self, name: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            msg = f"{name} for {self.site} must be a floating-point tensor; got dtype {value.dtype}"
            raise DTypeError(msg)
        if value.dtype != current.dtype:
            msg = (
                f"{name} for {self.site} must have the activation's dtype {current.dtype}; got "
                f"{value.dtype} (cast it with .to({current.dtype}))"
            )
            raise DTypeError(msg)
        if value.device != current.device:
            msg = (
                f"{name} for {self.site} must be on the activation's device {current.device}; "
                f"got {value.device}"
            )
            raise DeviceError(msg)
        try:
            return value.expand(current.shape)
        except RuntimeError:
            msg = (
                f"{name} for {self.site} must broadcast to the selection's shape "
                f"{tuple(current.shape)} (axes {('batch',) + self.site.axes[1:]}); "
                f"got shape {tuple(value.shape)}"
            )
            raise ShapeError(msg) from None


def checked_edits(edits: object) -> tuple[Intervention, ...]:
    """``edits`` as a tuple, after checking that each is an :class:`Intervention`."""
    edits = tuple(edits)
    for edit in edits:
        if not isinstance(edit, Intervention):
            msg = (f"edits must be Intervention objects (Set, Add, Zero, Scale); got "
                   f"{type(edit).__name__}")
            raise InputError(msg)
    return edits


def _describe(name: str, value: torch.Tensor | float) -> str:
    """Repr fragment: a number as itself, a tensor by its shape."""
    if isinstance(value, torch.Tensor):
        return f", {name} of shape {tuple(value.shape)}"
    return f", {value!r}"


class TensorEdit(Intervention):
    """An edit of the whole tensor of a component at one layer, in place.

    Subclasses implement :meth:`write`, which gets the component's tensor with the site's axes
    (``[batch, pos, d_model]``, ``[batch, pos, head, d_head]``, ...) and, when the component is a
    sum the model never materialises (``resid_mid`` of pre-LayerNorm blocks), the tensor it may
    write through (one summand) as ``tensor`` and the current sum as ``current``. Used to apply
    many batched patches at one site in a single kernel call.
    """

    def __init__(self, site: Site):
        super().__init__(site)
        if any(getattr(site, axis) is not None for axis in ("pos", "head", "neuron")):
            msg = f"site of a TensorEdit must name a whole component at one layer; got {site}"
            raise InputError(msg)

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        """Edit ``tensor`` in place; ``current`` is the sum when ``tensor`` is one summand."""
        raise NotImplementedError


def _rows(rows: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if rows is None:
        return None
    if isinstance(rows, int) and not isinstance(rows, bool):
        return (rows,)
    items = tuple(rows)
    if not items or not all(isinstance(r, int) and not isinstance(r, bool) for r in items):
        msg = f"rows must be an int, a non-empty sequence of ints or None; got {rows!r}"
        raise InputError(msg)
    return items


class Set(Intervention):
    """Replace the selection with ``value`` (broadcast to its shape): a patch."""

    def __init__(self, site: Site, value: torch.Tensor, *, rows: int | Sequence[int] | None = None):
        super().__init__(site, rows)
        if not isinstance(value, torch.Tensor):
            msg = f"value for {site} must be a torch.Tensor; got {type(value).__name__}"
            raise InputError(msg)
        self.value = value

    def _detail(self) -> str:
        return _describe("value", self.value)

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        return self._check_value("value", self.value, current)


class Add(Intervention):
    """Add ``delta`` (a tensor broadcast to the selection, or a number): steering."""

    def __init__(self, site: Site, delta: torch.Tensor | float, *,
                 rows: int | Sequence[int] | None = None):
        super().__init__(site, rows)
        self.delta = delta

    def _detail(self) -> str:
        return _describe("delta", self.delta)

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if isinstance(self.delta, torch.Tensor):
            return current + self._check_value("delta", self.delta, current)
        return current + self.delta


class Zero(Intervention):
    """Zero the selection: zero ablation."""

    def __init__(self, site: Site, *, rows: int | Sequence[int] | None = None):
        super().__init__(site, rows)

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(current)


class Scale(Intervention):
    """Multiply the selection by ``factor`` (a number or a broadcastable tensor)."""

    def __init__(self, site: Site, factor: torch.Tensor | float, *,
                 rows: int | Sequence[int] | None = None):
        super().__init__(site, rows)
        self.factor = factor

    def _detail(self) -> str:
        return _describe("factor", self.factor)

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if isinstance(self.factor, torch.Tensor):
            return current * self._check_value("factor", self.factor, current)
        return current * self.factor
