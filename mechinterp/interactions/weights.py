"""How much of a Harsanyi dividend each Shapley-type index gives to each subset it contains.

Every index here is linear in the dividends ``m(S)`` of the game and treats players alike, so it
has the form ``I(T) = sum_{S superset T} m(S) * w(|S|, |T|)``: one weight per pair of sizes.
:func:`index_weights` tabulates ``w`` (exactly, in rationals, then rounded once to float64) and
:func:`mechinterp._ops.superset_weighted_sums` applies it.

With ``s = |S|``, ``t = |T|``, ``k`` the order and ``B_j`` the Bernoulli numbers (``B_1 = -1/2``),
for ``s >= t``:

======== ================================================================================
index    ``w(s, t)``
======== ================================================================================
Moebius  ``[s == t]``: the dividends themselves, up to order ``k``
SV       ``1 / s`` (``k = 1``): the Shapley value
BV       ``2**(1 - s)`` (``k = 1``): the Banzhaf value
SII      ``1 / (s - t + 1)``: the Shapley interaction index (Grabisch and Roubens, 1999)
k-SII    ``sum_{b=t}^{min(k, s)} C(s - t, b - t) B_{b-t} / (s - b + 1)``: SII aggregated with
         Bernoulli numbers (Bordt and von Luxburg, 2023)
STII     ``[s == t]`` for ``t < k``, ``1 / C(s, k)`` for ``t = k``: Shapley-Taylor (Sundararajan
         et al., 2020)
FSII     ``[s == t]`` for ``s <= k``, else ``(-1)**(k-t) t/(k+t) C(k, t) C(s-1, k) /
         C(s+k-1, k+t)``: Faithful Shapley (Tsai et al., 2023)
FBII     ``[s == t]`` for ``s <= k``, else ``(-1)**(k-t) 2**(t-s) C(s-t-1, k-t)``: Faithful
         Banzhaf (Tsai et al., 2023)
======== ================================================================================

The empty set (``t = 0``) is entry 0 of every result. It holds what shapiq 1.4.1's
``ExactComputer`` returns there, so results compare entry by entry:

- ``v(empty)`` (weight ``[s == 0]``) for Moebius, SV, k-SII, STII, FSII, and for SII at order 1
  (which shapiq treats as the Shapley value);
- for BV, the mean of ``v`` over all coalitions (weight ``2**-s``, the Banzhaf index of the
  empty set);
- for SII at order >= 2, its formula at ``t = 0`` (weight ``1 / (s + 1)``);
- for FBII, its formula at ``t = 0``: the intercept of the Banzhaf-weighted least-squares fit.

Examples:
    >>> index_weights("SV", 3, 1)
    tensor([[1.0000, 0.0000],
            [0.0000, 1.0000],
            [0.0000, 0.5000],
            [0.0000, 0.3333]], dtype=torch.float64)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from fractions import Fraction
from math import comb

import torch

from mechinterp.errors import InputError

__all__ = ["INDICES", "index_weights"]

#: The indices :func:`index_weights` knows, by shapiq's names.
INDICES = ("Moebius", "SV", "BV", "SII", "k-SII", "STII", "FSII", "FBII")

#: Indices defined for order 1 only.
ORDER_ONE = ("SV", "BV")

_Weight = Callable[[int, int, int], Fraction]


@functools.cache
def bernoulli_numbers(count: int) -> tuple[Fraction, ...]:
    """``B_0, ..., B_{count-1}`` with ``B_1 = -1/2``, from ``sum_{j<=m} C(m+1, j) B_j = 0``."""
    numbers: list[Fraction] = []
    for m in range(count):
        if m == 0:
            numbers.append(Fraction(1))
            continue
        numbers.append(-sum(comb(m + 1, j) * numbers[j] for j in range(m)) / (m + 1))
    return tuple(numbers)


def _same_size(s: int, t: int) -> Fraction:
    return Fraction(int(s == t))


def _moebius(s: int, t: int, k: int) -> Fraction:
    return _same_size(s, t)


def _shapley_value(s: int, t: int, k: int) -> Fraction:
    return _same_size(s, 0) if t == 0 else Fraction(1, s)


def _banzhaf_value(s: int, t: int, k: int) -> Fraction:
    return Fraction(1, 2**s) if t == 0 else Fraction(2, 2**s)


def _shapley_interaction(s: int, t: int, k: int) -> Fraction:
    if t == 0 and k == 1:
        return _same_size(s, 0)
    return Fraction(1, s - t + 1)


def _k_shapley_interaction(s: int, t: int, k: int) -> Fraction:
    if t == 0:
        return _same_size(s, 0)
    bernoulli = bernoulli_numbers(k + 1)
    return sum(
        (comb(s - t, b - t) * bernoulli[b - t] / (s - b + 1) for b in range(t, min(k, s) + 1)),
        Fraction(0),
    )


def _shapley_taylor(s: int, t: int, k: int) -> Fraction:
    return _same_size(s, t) if t < k else Fraction(1, comb(s, k))


def _faithful_shapley(s: int, t: int, k: int) -> Fraction:
    if s <= k:
        return _same_size(s, t)
    return (
        (-1) ** (k - t) * Fraction(t, k + t) * comb(k, t) * Fraction(comb(s - 1, k))
        / comb(s + k - 1, k + t)
    )


def _faithful_banzhaf(s: int, t: int, k: int) -> Fraction:
    if s <= k:
        return _same_size(s, t)
    return (-1) ** (k - t) * Fraction(comb(s - t - 1, k - t), 2 ** (s - t))


_WEIGHTS: dict[str, _Weight] = {
    "Moebius": _moebius,
    "SV": _shapley_value,
    "BV": _banzhaf_value,
    "SII": _shapley_interaction,
    "k-SII": _k_shapley_interaction,
    "STII": _shapley_taylor,
    "FSII": _faithful_shapley,
    "FBII": _faithful_banzhaf,
}


def check_index(index: object, n: int, order: object, op: str = "index_weights") -> int:
    """Validate an index name and order for ``n`` players (errors name ``op``); return the order."""
    if index not in _WEIGHTS:
        msg = f"{op}: index must be one of {list(INDICES)}, got {index!r}"
        raise InputError(msg)
    if not isinstance(order, int) or isinstance(order, bool):
        msg = f"{op}: order must be an int, got {type(order).__name__} {order!r}"
        raise InputError(msg)
    if index in ORDER_ONE and order != 1:
        msg = f"{op}: index {index!r} is a value, defined for order 1 only, got order {order}"
        raise InputError(msg)
    if not 1 <= order <= n:
        msg = f"{op}: order must lie in [1, n] with n={n} players, got {order}"
        raise InputError(msg)
    return order


def index_weights(index: str, n: int, order: int) -> torch.Tensor:
    """The weights ``w(s, t)`` of ``index`` at ``order`` for ``n`` players.

    Args:
        index: one of :data:`INDICES`.
        n: number of players.
        order: highest interaction order ``k``, in ``[1, n]`` (1 for SV and BV).

    Returns:
        ``[n + 1, order + 1]`` float64: entry ``[s, t]`` is the weight of a dividend of ``s``
        players in the index of a subset of ``t`` of them (0 where ``s < t``).

    Raises:
        InputError: unknown index, or order out of range.
    """
    order = check_index(index, n, order)
    return torch.tensor(_weight_table(index, n, order), dtype=torch.float64)


@functools.lru_cache(maxsize=256)
def _weight_table(index: str, n: int, order: int) -> tuple[tuple[float, ...], ...]:
    weight = _WEIGHTS[index]
    return tuple(
        tuple(float(weight(s, t, order)) if s >= t else 0.0 for t in range(order + 1))
        for s in range(n + 1)
    )
