"""Tensors an encode derives from an SAE's parameters, kept while those parameters stand.

The fused encode's bounds are small (``[d_sae]``) but each costs the host launches before the
GEMM can start (a gated SAE's bisection about a hundred), on every call. They are kept per
parameter tensor, dropped with it, and worked out again once any of their sources is another
tensor, holds other memory (``t.data = ...``) or was changed in place (which bumps its version
counter). Changes made in place through ``t.data`` bump no counter and cannot be seen: after
one, call :func:`forget` with the tensor (or change it in place directly, under
``torch.no_grad()``).

Examples:
    >>> import torch
    >>> from mechinterp.sae.derived import derived, forget
    >>> t = torch.ones(3)
    >>> calls = []
    >>> def doubled():
    ...     calls.append(1)
    ...     return 2 * t
    >>> derived("doubled", (t,), doubled).tolist(), derived("doubled", (t,), doubled).tolist()
    ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])
    >>> t.add_(1)  # in place: the version moves on
    tensor([2., 2., 2.])
    >>> derived("doubled", (t,), doubled).tolist(), len(calls)
    ([4.0, 4.0, 4.0], 2)
    >>> t.data.add_(1)  # through .data: no version moves, so it must be forgotten
    tensor([3., 3., 3.])
    >>> forget(t)
    >>> derived("doubled", (t,), doubled).tolist(), len(calls)
    ([6.0, 6.0, 6.0], 3)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

from mechinterp.errors import InputError

__all__ = ["derived", "forget"]

T = TypeVar("T")

# id(first source) -> {tag: (weak references to every source, their (version, address) pairs,
# the value)}, dropped with the first source. Values must not hold their sources: they would
# keep them alive.
_KEPT: dict[int, dict[str, tuple]] = {}


def derived(tag: str, sources: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, computed once and reused while ``sources`` are the same tensors with the
    same contents (versions). ``tag`` names what ``make`` computes from them; what it returns
    must not hold any of ``sources`` (copy them), or they would outlive their owner."""
    # The version moves with in-place changes; the address with ``t.data = other``.
    versions = tuple([(t._version, t.data_ptr()) for t in sources])
    key = id(sources[0])
    kept = _KEPT.get(key)
    if kept is None:
        kept = _KEPT[key] = {}
        weakref.finalize(sources[0], _KEPT.pop, key, None)
    hit = kept.get(tag)
    if hit is not None:
        refs, seen, value = hit
        if seen == versions and all(ref() is t for ref, t in zip(refs, sources)):
            return value
    value = make()
    kept[tag] = (tuple(weakref.ref(t) for t in sources), versions, value)
    return value


def forget(*tensors: torch.Tensor) -> None:
    """Drops every value derived from any of ``tensors``, so that the next use works it out
    again: for changes :func:`derived` cannot see (in place through ``t.data``)."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            msg = f"forget takes tensors; got {type(t).__name__}"
            raise InputError(msg)
    for kept in _KEPT.values():
        for tag in [tag for tag, (refs, _, _) in kept.items()
                    if any(ref() is t for ref in refs for t in tensors)]:
            del kept[tag]
