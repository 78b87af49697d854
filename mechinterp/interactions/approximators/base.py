"""What every estimator shares: argument checks, the evaluation budget, the stopping schedule.

An :class:`Approximator` estimates an interaction index of a :class:`~mechinterp.interactions.
games.Game` from at most ``budget`` evaluations of its value function (the empty and the full
coalition count like any other). Subclasses implement :meth:`Approximator._estimate`, which gets
an :class:`Evaluator` (the game behind a budget guard) and a seeded generator, and evaluates
coalitions in large blocks: a model game runs one batched forward per block, never one
coalition per call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mechinterp.errors import InputError
from mechinterp.interactions.games import Game
from mechinterp.interactions.result import InteractionResult
from mechinterp.interactions.transforms import exact_interactions

__all__ = ["Approximator", "Estimate", "Evaluator", "exact_index", "schedule"]

# With at least 2**n evaluations to spend, estimators that are not exact by construction
# enumerate the game instead, up to this many players (the table is 2**n float64 values).
_TABLE_PLAYERS = 20


class Evaluator:
    """A game behind a budget: evaluates blocks of coalitions and refuses to overspend.

    Attributes:
        game: the game.
        budget: evaluations allowed.
        used: evaluations spent so far.
    """

    def __init__(self, game: Game, budget: int, batch_size: int | None) -> None:
        self.game = game
        self.budget = budget
        self.batch_size = batch_size
        self.used = 0

    @property
    def n_players(self) -> int:
        return self.game.n_players

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def ends(self) -> tuple[float, float]:
        """``v(empty)`` and ``v(all players)``, for two evaluations."""
        n = self.n_players
        values = self(torch.stack([torch.zeros(n, dtype=torch.bool),
                                   torch.ones(n, dtype=torch.bool)]))
        return float(values[0]), float(values[1])

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        """``[coalition]`` float64 values of a block of coalitions."""
        if coalitions.shape[0] > self.remaining:
            # An estimator bug, not a user error: each plans its spending from the budget.
            msg = (f"estimator asked for {coalitions.shape[0]} evaluations with "
                   f"{self.remaining} of budget {self.budget} left")
            raise RuntimeError(msg)
        if coalitions.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64)
        self.used += coalitions.shape[0]
        return self.game(coalitions, batch_size=self.batch_size)


@dataclass
class Estimate:
    """What :meth:`Approximator._estimate` returns."""

    values: torch.Tensor
    stderr: torch.Tensor
    baseline_value: float
    full_value: float


def lone_player(empty: float, full: float) -> Estimate:
    """A one-player game's values, exact: the player's value is ``v({0}) - v(empty)``."""
    delta = torch.tensor([full - empty], dtype=torch.float64)
    return Estimate(delta, torch.zeros(1, dtype=torch.float64), empty, full)


def schedule(total: int, *, first: int, tolerance: float | None) -> list[int]:
    """Cumulative amounts of work after which an estimator checks its standard errors.

    Without a tolerance there is one step (all the work, in the largest blocks). With one, the
    steps double from ``first``, so the checks cost at most about twice the final estimate
    while the evaluations stay in large blocks.
    """
    if tolerance is None or total <= first:
        return [total]
    steps, amount = [], first
    while amount < total:
        steps.append(amount)
        amount *= 2
    steps.append(total)
    return steps


def exact_index(table: torch.Tensor, index: str, order: int) -> torch.Tensor:
    """An index of orders ``1..order`` from a full value table, in canonical order (the
    compiled exact transforms, without the empty set)."""
    return exact_interactions(table.to(torch.float64), index=index, order=order)[1:]


def _check_int(value: object, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}"
        raise InputError(msg)
    return value


class Approximator(ABC):
    """Base of the estimators: ``approximate(game, budget=...)`` returns an interaction result.

    Subclasses set :attr:`index` and :attr:`order`, take their options as keyword-only
    constructor arguments, and implement :meth:`_estimate` and :meth:`minimum_budget`.
    """

    #: The index estimated ("SV" or "k-SII").
    index: str = "SV"
    #: The index's order.
    order: int = 1
    #: Whether a budget of 2**n or more should be spent enumerating the game (for estimators
    #: that are not exact by construction when every coalition is affordable).
    enumerate_when_affordable: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def minimum_budget(self, n_players: int) -> int:
        """Fewest evaluations the estimator can work with for ``n_players`` players."""

    @abstractmethod
    def _estimate(self, evaluator: Evaluator, generator: torch.Generator,
                  tolerance: float | None) -> Estimate:
        """Estimate the index, spending at most ``evaluator.budget`` evaluations."""

    def approximate(self, game: Game, *, budget: int, seed: int | None = None,
                    tolerance: float | None = None,
                    batch_size: int | None = None) -> InteractionResult:
        """Estimate the index of ``game`` from at most ``budget`` evaluations.

        Args:
            game: the game.
            budget: most value-function evaluations to spend (the empty and full coalitions
                count).
            seed: seed of the sampling (``None``: fresh randomness).
            tolerance: stop early once the largest standard error is below this.
            batch_size: most coalitions per value-function call (default: the game's).

        Returns:
            The estimate with standard errors, orders ``1..order``.

        Raises:
            InputError: a bad game, budget, seed or tolerance, or a budget below
                :meth:`minimum_budget`.
        """
        if not isinstance(game, Game):
            msg = f"game must be a mechinterp Game, got {type(game).__name__}"
            raise InputError(msg)
        n = game.n_players
        if n < 1:
            msg = f"game must have at least one player, got n_players={n}"
            raise InputError(msg)
        _check_int(budget, "budget", 0)
        if seed is not None:
            _check_int(seed, "seed", 0)
        if batch_size is not None:
            _check_int(batch_size, "batch_size", 1)
        if tolerance is not None and (not isinstance(tolerance, (int, float))
                                      or not 0 < tolerance < math.inf):
            msg = f"tolerance must be a positive number or None, got {tolerance!r}"
            raise InputError(msg)
        if self.order > n:
            msg = f"order must be at most n_players={n}, got {self.order}"
            raise InputError(msg)
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        evaluator = Evaluator(game, budget, batch_size)
        if (self.enumerate_when_affordable and n <= _TABLE_PLAYERS and budget >= 1 << n):
            table = game.table(max_players=_TABLE_PLAYERS, batch_size=batch_size)
            evaluator.used = 1 << n
            values = exact_index(table, self.index, self.order)
            estimate = Estimate(values, torch.zeros_like(values), float(table[0]),
                                float(table[-1]))
        else:
            minimum = self.minimum_budget(n)
            if budget < minimum:
                msg = (f"budget must be at least {minimum} evaluations for {self.name} with "
                       f"{n} players, got {budget}")
                raise InputError(msg)
            estimate = self._estimate(evaluator, generator, tolerance)
        return InteractionResult(estimate.values, n, index=self.index, min_order=1,
                                 max_order=self.order, players=game.players,
                                 stderr=estimate.stderr, evaluations=evaluator.used,
                                 estimator=self.name, baseline_value=estimate.baseline_value,
                                 full_value=estimate.full_value)

    def __repr__(self) -> str:
        return f"{self.name}()"
