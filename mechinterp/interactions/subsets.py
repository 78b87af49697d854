"""Subsets of players, in the one order every interaction result uses.

A coalition of ``n`` players is a bitmask: player ``i`` is in it when bit ``i`` is set, so a
table of values over all coalitions has length ``2**n`` and is indexed by the mask. Interaction
indices of order ``k`` have one value per subset of at most ``k`` players; those subsets are
listed by size, then in :func:`itertools.combinations` order (shapiq lists them the same way, so
results compare entry by entry).

Examples:
    >>> subsets_up_to(3, 2)
    [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
    >>> subset_masks(3, 2).tolist()
    [0, 1, 2, 4, 3, 5, 6]
    >>> count_up_to(3, 2)
    7
"""

from __future__ import annotations

import itertools
import math

import torch

from mechinterp.errors import InputError

__all__ = ["count_up_to", "mask_of", "subset_masks", "subset_of", "subsets_up_to"]


def _check(n: int, order: int, min_order: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        msg = f"n (number of players) must be a non-negative int, got {n!r}"
        raise InputError(msg)
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        msg = f"order must be a non-negative int, got {order!r}"
        raise InputError(msg)
    if not isinstance(min_order, int) or isinstance(min_order, bool) or not 0 <= min_order:
        msg = f"min_order must be a non-negative int, got {min_order!r}"
        raise InputError(msg)


def subsets_up_to(n: int, order: int, *, min_order: int = 0) -> list[tuple[int, ...]]:
    """Every subset of ``range(n)`` with ``min_order <= size <= order``, in canonical order."""
    _check(n, order, min_order)
    return [
        subset
        for size in range(min_order, min(order, n) + 1)
        for subset in itertools.combinations(range(n), size)
    ]


def count_up_to(n: int, order: int, *, min_order: int = 0) -> int:
    """How many subsets :func:`subsets_up_to` lists."""
    _check(n, order, min_order)
    return sum(math.comb(n, size) for size in range(min_order, min(order, n) + 1))


def mask_of(subset: tuple[int, ...] | list[int]) -> int:
    """The bitmask of a subset: bit ``i`` set for each player ``i`` in it."""
    mask = 0
    for player in subset:
        mask |= 1 << player
    return mask


def subset_of(mask: int) -> tuple[int, ...]:
    """The players of a bitmask, ascending."""
    if mask < 0:
        msg = f"mask must be non-negative, got {mask}"
        raise InputError(msg)
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def subset_masks(n: int, order: int, *, min_order: int = 0) -> torch.Tensor:
    """The bitmasks of :func:`subsets_up_to` as an int64 tensor (n <= 62)."""
    if isinstance(n, int) and n > 62:
        msg = f"n must be at most 62 for int64 masks, got {n}"
        raise InputError(msg)
    masks = [mask_of(subset) for subset in subsets_up_to(n, order, min_order=min_order)]
    return torch.tensor(masks, dtype=torch.int64)
