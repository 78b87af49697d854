"""Tensors an encode derives from an SAE's parameters, kept while those parameters stand.

The fused encode's bounds are small (``[d_sae]``) but each costs the host launches before the
GEMM can start (a gated SAE's bisection about a hundred), on every call. They are kept per
parameter tensor, dropped with it, and worked out again once any of their sources is another
tensor or was changed in place (which bumps its version counter).

Examples:
    >>> import torch
    >>> from mechinterp.sae.derived import derived
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
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["derived"]

T = TypeVar("T")

# id(first source) -> {tag: (weak references to every source, their versions, the value)},
# dropped with the first source. Values must not hold their sources: they would keep them alive.
_KEPT: dict[int, dict[str, tuple]] = {}


def derived(tag: str, sources: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, computed once and reused while ``sources`` are the same tensors with the
    same contents (versions). ``tag`` names what ``make`` computes from them; what it returns
    must not hold any of ``sources`` (copy them), or they would outlive their owner."""
    versions = tuple(t._version for t in sources)
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
