"""Exact interactions from a table of values over every coalition.

A game on ``n`` players is given by its values on all ``2**n`` coalitions: a 1-D float64 or
float32 tensor whose entry ``S`` is the value of the coalition with bitmask ``S`` (player ``i`` in
it when bit ``i`` is set). Its Moebius transform (Harsanyi dividends) ``m`` splits ``v`` into
the pure interaction of each coalition, ``v(S) = sum_{T subset S} m(T)``; every Shapley-type
index is then a weighted sum of dividends over supersets (:mod:`mechinterp.interactions.weights`),
computed in ``O(n 2**n)`` by the compiled kernels, on cpu or cuda.

Interaction results have one value per subset of at most ``order`` players, the empty set
first, in the canonical order of :mod:`mechinterp.interactions.subsets`; they match shapiq
1.4.1's ``ExactComputer`` entry by entry (see :mod:`mechinterp.interactions.weights` for the
empty set).

Functions copy their input unless ``inplace=True``, which overwrites it instead and saves one
table of memory at large ``n``. Nothing here is differentiable.

Examples:
    >>> import torch
    >>> from mechinterp.interactions import exact_interactions, moebius_transform
    >>> v = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)  # two players
    >>> moebius_transform(v)  # m(empty), m({0}), m({1}), m({0, 1})
    tensor([0., 1., 2., 2.], dtype=torch.float64)
    >>> exact_interactions(v, index="SV", order=1)  # empty set, then players 0 and 1
    tensor([0., 2., 3.], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from mechinterp import _ops
from mechinterp.errors import ShapeError
from mechinterp.interactions.weights import INDICES, check_index, index_weights

__all__ = [
    "INDICES",
    "banzhaf_values",
    "exact_interactions",
    "interaction_index",
    "inverse_moebius_transform",
    "moebius_transform",
    "or_interactions",
    "shapley_values",
]


def _working_table(table: torch.Tensor, op: str, name: str, *, inplace: bool) -> torch.Tensor:
    """``table`` itself when in place (it must then be contiguous), else a contiguous copy."""
    n = _ops.players_of_table(table, op, name)
    if inplace:
        if not table.is_contiguous():
            msg = (
                f"{op}: inplace=True needs a contiguous {name}, got stride {table.stride()}; "
                "pass inplace=False to work on a copy"
            )
            raise ShapeError(msg)
        return table
    _ops.require_memory(op, table.numel() * table.element_size(), table.device,
                        f"a copy of {name} for n={n} players")
    return table.clone(memory_format=torch.contiguous_format)


def moebius_transform(values: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Harsanyi dividends ``m(S) = sum_{T subset S} (-1)**(|S|-|T|) v(T)`` of a game.

    Args:
        values: ``[2**n]`` float64 or float32 values of every coalition (cpu or cuda).
        inplace: overwrite ``values`` (which must be contiguous) instead of copying it.

    Returns:
        ``[2**n]`` dividends, indexed by coalition bitmask, with the dtype and device of
        ``values``.

    Raises:
        ShapeError: ``values`` is not 1-D with a power-of-two length.
        DTypeError: ``values`` is neither float64 nor float32.
        InputError: the copy does not fit in memory.

    Examples:
        >>> import torch
        >>> moebius_transform(torch.tensor([1.0, 3.0, 4.0, 10.0]))
        tensor([1., 2., 3., 4.])
    """
    table = _working_table(values, "moebius_transform", "values", inplace=inplace)
    return _ops.moebius_(table, kind="moebius")


def inverse_moebius_transform(dividends: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """The values ``v(S) = sum_{T subset S} m(T)`` of the game with these dividends.

    Args:
        dividends: ``[2**n]`` float64 or float32 dividends (cpu or cuda).
        inplace: overwrite ``dividends`` (which must be contiguous) instead of copying it.

    Returns:
        ``[2**n]`` values, with the dtype and device of ``dividends``.

    Examples:
        >>> import torch
        >>> inverse_moebius_transform(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([ 1.,  3.,  4., 10.])
    """
    table = _working_table(dividends, "inverse_moebius_transform", "dividends", inplace=inplace)
    return _ops.moebius_(table, kind="zeta")


def _reverse_negated_(table: torch.Tensor) -> None:
    """Reverse a 1-D tensor and negate it in place, a bounded chunk at a time.

    ``0 - x`` rather than ``-x`` keeps zeros positive, and no full-size temporary is made.
    """
    length = table.shape[0]
    if length == 1:
        table.copy_(torch.rsub(table, 0.0))
        return
    chunk = 1 << 20
    for start in range(0, length // 2, chunk):
        stop = min(start + chunk, length // 2)
        front = table[start:stop]
        back = table[length - stop:length - start]
        saved = front.clone()
        front.copy_(torch.rsub(back.flip(0), 0.0))
        back.copy_(torch.rsub(saved.flip(0), 0.0))


def or_interactions(values: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """OR interactions of a game (Li and Zhang, 2023), one per coalition.

    ``I_or(empty) = v(empty)`` and, for ``S`` not empty,
    ``I_or(S) = -sum_{T subset S} (-1)**(|S|-|T|) v(N minus T)``: minus the Moebius transform of
    the table read at complements. They rebuild the game through any shared player,
    ``v(S) = I_or(empty) + sum_{T: T and S share a player} I_or(T)``. For the AND-OR split of a
    game, apply this to its OR part and :func:`moebius_transform` to its AND part.

    Args:
        values: ``[2**n]`` float64 or float32 values of every coalition (cpu or cuda).
        inplace: overwrite ``values`` (which must be contiguous) instead of copying it.

    Returns:
        ``[2**n]`` OR interactions, indexed by coalition bitmask.

    Examples:
        >>> import torch
        >>> or_game = torch.tensor([0.0, 1.0, 1.0, 1.0])  # 1 as soon as anyone is present
        >>> or_interactions(or_game)  # a single OR interaction between players 0 and 1
        tensor([0., 0., 0., 1.])
    """
    op = "or_interactions"
    table = _working_table(values, op, "values", inplace=inplace)
    empty_value = table[0].clone()
    _reverse_negated_(table)  # entry T now holds -v(N minus T)
    _ops.moebius_(table, kind="moebius")
    table[0] = empty_value
    return table


def interaction_index(dividends: torch.Tensor, index: str, order: int) -> torch.Tensor:
    """An interaction index of every subset of at most ``order`` players, from dividends.

    Args:
        dividends: ``[2**n]`` float64 or float32 Harsanyi dividends (cpu or cuda), as
            :func:`moebius_transform` returns; any strides.
        index: one of ``"Moebius"``, ``"SV"``, ``"BV"``, ``"SII"``, ``"k-SII"``, ``"STII"``,
            ``"FSII"``, ``"FBII"`` (shapiq's names; defined in
            :mod:`mechinterp.interactions.weights`).
        order: highest interaction order, in ``[1, n]``; 1 for ``"SV"`` and ``"BV"``.

    Returns:
        ``[count_up_to(n, order)]`` values in canonical subset order (the empty set first),
        with the dtype and device of ``dividends``.

    Raises:
        InputError: unknown index, or order out of range.
        ShapeError, DTypeError: bad ``dividends`` (see :func:`moebius_transform`).

    Examples:
        >>> import torch
        >>> from mechinterp.interactions import subsets_up_to
        >>> dividends = torch.zeros(8, dtype=torch.float64)
        >>> dividends[0b111] = 6.0  # a unanimity game on three players
        >>> subsets_up_to(3, 2)
        [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
        >>> interaction_index(dividends, "k-SII", 2)  # sums to v(N) - v(empty) = 6
        tensor([ 0., -1., -1., -1.,  3.,  3.,  3.], dtype=torch.float64)
        >>> interaction_index(dividends, "STII", 2)
        tensor([0., 0., 0., 0., 2., 2., 2.], dtype=torch.float64)
    """
    op = "interaction_index"
    n = _ops.players_of_table(dividends, op, "dividends")
    order = check_index(index, n, order, op)
    return _ops.superset_weighted_sums(dividends.contiguous(), index_weights(index, n, order))


def shapley_values(dividends: torch.Tensor) -> torch.Tensor:
    """Shapley values ``phi_i = sum_{S containing i} m(S) / |S|`` of every player.

    Args:
        dividends: ``[2**n]`` float64 or float32 Harsanyi dividends (cpu or cuda).

    Returns:
        ``[n]`` values, with the dtype and device of ``dividends``. They sum to
        ``v(N) - v(empty)``.

    Examples:
        >>> import torch
        >>> shapley_values(torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=torch.float64))
        tensor([2., 3.], dtype=torch.float64)
    """
    return _player_values(dividends, "SV", "shapley_values")


def banzhaf_values(dividends: torch.Tensor) -> torch.Tensor:
    """Banzhaf values ``b_i = sum_{S containing i} m(S) / 2**(|S| - 1)`` of every player.

    Args:
        dividends: ``[2**n]`` float64 or float32 Harsanyi dividends (cpu or cuda).

    Returns:
        ``[n]`` values, with the dtype and device of ``dividends``.

    Examples:
        >>> import torch
        >>> banzhaf_values(torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=torch.float64))
        tensor([2., 3.], dtype=torch.float64)
    """
    return _player_values(dividends, "BV", "banzhaf_values")


def _player_values(dividends: torch.Tensor, index: str, op: str) -> torch.Tensor:
    n = _ops.players_of_table(dividends, op, "dividends")
    if n == 0:
        return dividends.new_empty(0)
    return _ops.superset_weighted_sums(dividends.contiguous(), index_weights(index, n, 1))[1:]


def exact_interactions(
    values: torch.Tensor, *, index: str, order: int, inplace: bool = False
) -> torch.Tensor:
    """An interaction index straight from the values of every coalition.

    :func:`moebius_transform` then :func:`interaction_index`.

    Args:
        values: ``[2**n]`` float64 or float32 values of every coalition (cpu or cuda).
        index: see :func:`interaction_index`.
        order: see :func:`interaction_index`.
        inplace: let the dividends overwrite ``values`` (which must be contiguous) instead of
            taking a copy.

    Returns:
        ``[count_up_to(n, order)]`` values in canonical subset order (the empty set first).

    Examples:
        >>> import torch
        >>> v = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
        >>> exact_interactions(v, index="SII", order=2)  # (), (0,), (1,), (0, 1)
        tensor([2.1667, 2.0000, 3.0000, 2.0000], dtype=torch.float64)
    """
    op = "exact_interactions"
    n = _ops.players_of_table(values, op, "values")
    check_index(index, n, order, op)
    dividends = moebius_transform(values, inplace=inplace)
    return interaction_index(dividends, index, order)
