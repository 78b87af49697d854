"""Exact interaction results of a game, from its values on every coalition.

The game is evaluated on all ``2**n`` coalitions (in large batches, through
:meth:`Game.table`), and the compiled transforms turn the table into the index. Practical to
n of about 20 for model games (a million coalitions) and to n = 28 for tables already in memory.

Examples:
    >>> import torch
    >>> from mechinterp.interactions import SumOfUnanimityGame, exact
    >>> game = SumOfUnanimityGame([[0, 1], [2]], [2.0, 1.0], n_players=3)
    >>> exact(game, index="SV").values.tolist()  # the empty set first, then players 0, 1, 2
    [0.0, 1.0, 1.0, 1.0]
    >>> exact(game, index="Moebius", order=2)[(0, 1)]
    2.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechinterp.errors import InputError
from mechinterp.interactions.games import Game
from mechinterp.interactions.result import InteractionResult
from mechinterp.interactions.transforms import interaction_index, moebius_transform

__all__ = ["exact"]


def exact(game: Game | torch.Tensor, *, index: str = "SV", order: int = 1,
          players: Sequence[str] | None = None) -> InteractionResult:
    """The exact interaction index of a game, for every subset of at most ``order`` players.

    Args:
        game: a :class:`Game`, or a ``[2**n]`` table of its values by coalition bitmask.
        index: ``"Moebius"`` (Harsanyi dividends), ``"SV"``, ``"BV"``, ``"SII"``, ``"k-SII"``,
            ``"STII"``, ``"FSII"`` or ``"FBII"`` (shapiq's definitions).
        order: the largest subsets listed (1 for ``"SV"`` and ``"BV"``).
        players: labels; by default the game's.

    Returns:
        :class:`InteractionResult` over the subsets of ``0..order`` players (the empty set's
        entry is each index's own, see :mod:`mechinterp.interactions.weights`), with
        ``evaluations`` the coalitions the game was evaluated on.
    """
    if isinstance(game, Game):
        before = game.evaluations
        table = game.table()
        evaluations = game.evaluations - before
        players = game.players if players is None else players
    elif isinstance(game, torch.Tensor):
        table, evaluations = game, None
    else:
        msg = f"game must be a Game or a [2**n] tensor of values; got {type(game).__name__}"
        raise InputError(msg)
    table = table.to(torch.float64)
    dividends = moebius_transform(table)
    baseline, full = float(table[0]), float(table[-1])
    if index == "Moebius":
        result = InteractionResult.from_table(dividends, index="Moebius", max_order=order,
                                              players=players, baseline_value=baseline,
                                              full_value=full)
    else:
        values = interaction_index(dividends, index, order)
        result = InteractionResult(values, dividends.numel().bit_length() - 1, index=index,
                                   min_order=0, max_order=order, players=players,
                                   baseline_value=baseline, full_value=full)
    result.evaluations = evaluations
    return result
