"""Cooperative games: a value function over coalitions of players, evaluated in batches.

A coalition of ``n`` players is a boolean row of length ``n`` (column ``i`` is player ``i``).
:class:`Game` turns a user's ``value_function`` into a checked, counted, batched callable:
estimators hand it thousands of coalitions at once, and it passes them to the value function
``batch_size`` rows at a time, so that a model game fills its device instead of running one
coalition per forward pass. Every row passed to the value function counts as one evaluation.

Three games come with the package: :class:`TabularGame` (a stored table of ``2**n`` values),
:class:`CallableGame` (wraps a function) and :class:`SumOfUnanimityGame`, whose interaction
indices are known in closed form and serve as ground truth for estimators at any ``n``.

Examples:
    >>> import torch
    >>> game = SumOfUnanimityGame([(0,), (0, 1)], [1.0, 2.0], n_players=3)
    >>> game(torch.tensor([[True, False, False], [True, True, False]])).tolist()
    [1.0, 3.0]
    >>> game.evaluations
    2
    >>> game.exact("SV").values.tolist()
    [2.0, 1.0, 0.0]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.interactions.result import InteractionResult, check_players
from mechinterp.interactions.subsets import subsets_up_to
from mechinterp.interactions.weights import index_weights

__all__ = [
    "BatchedGame",
    "CallableGame",
    "Game",
    "SumOfUnanimityGame",
    "TabularGame",
    "index_from_dividends",
]

# Enumerating every coalition of more players than this is refused unless asked for.
_TABLE_PLAYERS = 24


def _positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}"
        raise InputError(msg)
    return value


class Game(ABC):
    """A cooperative game over ``n_players`` players.

    Subclasses implement :meth:`value_function`; callers use the game itself, which checks the
    coalitions, evaluates them ``batch_size`` rows at a time and counts evaluations.

    Args:
        n_players: number of players.
        players: one label per player (default ``"0"`` .. ``"n-1"``).
        batch_size: most coalitions handed to :meth:`value_function` in one call.
        device: device the coalitions are moved to before :meth:`value_function` sees them
            (the device of a model game's model); values come back as float64 on the CPU.

    Attributes:
        evaluations: coalitions evaluated so far (set it to 0 to start counting afresh).
    """

    def __init__(self, n_players: int, *, players: Sequence[str] | None = None,
                 batch_size: int = 4096, device: str | torch.device = "cpu") -> None:
        self.n_players = _positive_int(n_players, "n_players", minimum=0)
        self.players = check_players(players, self.n_players)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.device = torch.device(device)
        self.evaluations = 0
        self._empty: float | None = None
        self._full: float | None = None

    @abstractmethod
    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Values of coalitions.

        Args:
            coalitions: ``[coalition, player]`` bool; row ``r`` holds coalition ``r``.

        Returns:
            ``[coalition]`` float values.
        """

    def __call__(self, coalitions: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Evaluate coalitions in batches of ``batch_size`` rows.

        Args:
            coalitions: ``[coalition, player]`` bool tensor with ``n_players`` columns.
            batch_size: rows per call of :meth:`value_function` (default: the game's).

        Returns:
            ``[coalition]`` float64 values on the CPU.

        Raises:
            DTypeError: the coalitions are not boolean.
            ShapeError: the coalitions are not 2-D with ``n_players`` columns, or the value
                function returned something other than one value per coalition.
        """
        if not isinstance(coalitions, torch.Tensor):
            msg = f"coalitions must be a bool torch.Tensor, got {type(coalitions).__name__}"
            raise DTypeError(msg)
        if coalitions.dtype != torch.bool:
            msg = f"coalitions must have dtype torch.bool, got {coalitions.dtype}"
            raise DTypeError(msg)
        if coalitions.dim() != 2 or coalitions.shape[1] != self.n_players:
            msg = (f"coalitions must have shape [coalition, {self.n_players}] (one column per "
                   f"player), got {list(coalitions.shape)}")
            raise ShapeError(msg)
        step = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        out = torch.empty(coalitions.shape[0], dtype=torch.float64)
        for start in range(0, coalitions.shape[0], step):
            chunk = coalitions[start:start + step].to(self.device)
            values = self.value_function(chunk)
            if not isinstance(values, torch.Tensor) or values.shape != (chunk.shape[0],):
                got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                msg = (f"{type(self).__name__}.value_function must return a tensor of shape "
                       f"[{chunk.shape[0]}] (one value per coalition), got {got}")
                raise ShapeError(msg)
            self.evaluations += chunk.shape[0]
            out[start:start + chunk.shape[0]] = values.detach().to("cpu", torch.float64)
        return out

    def table(self, *, max_players: int = _TABLE_PLAYERS,
              batch_size: int | None = None) -> torch.Tensor:
        """Values of all ``2**n`` coalitions, indexed by bitmask (bit ``i`` = player ``i``).

        Args:
            max_players: refuse games with more players than this (the table has ``2**n``
                entries and costs as many evaluations).
            batch_size: rows per call of :meth:`value_function` (default: the game's).

        Returns:
            ``[2**n]`` float64 values.

        Raises:
            InputError: the game has more than ``max_players`` players.
        """
        n = self.n_players
        if n > max_players:
            msg = (f"table() enumerates 2**n coalitions; n_players must be at most max_players="
                   f"{max_players}, got {n} (pass max_players to allow more)")
            raise InputError(msg)
        bits = 1 << torch.arange(n, dtype=torch.int64)
        out = torch.empty(1 << n, dtype=torch.float64)
        # Enumerate in blocks so that only the values, not all coalitions, live at once.
        block = max(self.batch_size, 1 << 16)
        for start in range(0, 1 << n, block):
            masks = torch.arange(start, min(start + block, 1 << n), dtype=torch.int64)
            coalitions = (masks[:, None] & bits) != 0
            out[start:start + masks.shape[0]] = self(coalitions, batch_size=batch_size)
        return out

    @property
    def empty_value(self) -> float:
        """``v(∅)``; costs one evaluation the first time it is read."""
        if self._empty is None:
            self._empty = float(self(torch.zeros(1, self.n_players, dtype=torch.bool))[0])
        return self._empty

    @property
    def full_value(self) -> float:
        """``v(N)``; costs one evaluation the first time it is read."""
        if self._full is None:
            self._full = float(self(torch.ones(1, self.n_players, dtype=torch.bool))[0])
        return self._full

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_players={self.n_players})"


class BatchedGame(Game):
    """A game whose value function runs a model, many coalitions per call: the shared part of
    the model games (:mod:`mechinterp.interactions.model_games`) and the diffusion games
    (:mod:`mechinterp.diffusion.games`).

    Subclasses compute one batch in :meth:`_batch_values` and call :meth:`_start_batching` once
    :meth:`Game.__init__` has run. This class subtracts ``v(empty)`` when asked, halves the
    batch on out-of-memory (later calls start at the size that fit) and shows a progress bar
    when a call takes more than one batch.
    """

    def _start_batching(self, *, progress: bool, subtract_empty: bool) -> None:
        self.progress = bool(progress)
        self.subtract_empty = bool(subtract_empty)
        self._bar = None
        self._offset = 0.0

    def _batch_values(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Values ``[rows]`` of one batch of coalitions, before ``v(empty)`` is subtracted."""
        raise NotImplementedError

    def _raw_values(self, coalitions: torch.Tensor) -> torch.Tensor:
        """:meth:`_batch_values`, halving the batch on out-of-memory."""
        try:
            return self._batch_values(coalitions)
        except torch.OutOfMemoryError:
            rows = coalitions.shape[0]
            if rows == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (rows + 1) // 2
            self.batch_size = min(self.batch_size, half)
            return torch.cat([self._raw_values(coalitions[:half]),
                              self._raw_values(coalitions[half:])])

    def _refresh_offset(self) -> None:
        """``v(empty)`` to subtract (computed again when the game's masking changes)."""
        self._empty = self._full = None
        self._offset = 0.0
        if self.subtract_empty:
            empty = torch.zeros(1, self.n_players, dtype=torch.bool, device=self.device)
            with torch.no_grad():
                self._offset = float(self._raw_values(empty)[0])

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            values = self._raw_values(coalitions).detach().to("cpu", torch.float64) - self._offset
        if self._bar is not None:
            self._bar.update(coalitions.shape[0])
        return values

    def _with_bar(self, total: int, step: int, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()``, under a progress bar over ``total`` coalitions when they take more than
        one batch of ``step`` (and no bar is already shown)."""
        if self._bar is not None or not self.progress or total <= step:
            return run()
        self._bar = tqdm(total=total, desc=type(self).__name__, unit="coalition", leave=False)
        try:
            return run()
        finally:
            self._bar.close()
            self._bar = None

    def __call__(self, coalitions: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        rows = coalitions.shape[0] if isinstance(coalitions, torch.Tensor) and coalitions.dim() else 0
        step = batch_size if isinstance(batch_size, int) else self.batch_size
        return self._with_bar(rows, step,
                              lambda: Game.__call__(self, coalitions, batch_size=batch_size))

    def table(self, *, max_players: int = _TABLE_PLAYERS, batch_size: int | None = None) -> torch.Tensor:
        """Values of all ``2**n`` coalitions, indexed by bitmask; see :meth:`Game.table`."""
        step = batch_size if isinstance(batch_size, int) else self.batch_size
        total = 1 << self.n_players if self.n_players <= max_players else 0
        return self._with_bar(total, step, lambda: Game.table(
            self, max_players=max_players, batch_size=batch_size))


class TabularGame(Game):
    """A game given by a table of ``2**n`` values indexed by bitmask.

    Args:
        values: ``[2**n]`` floating values; entry ``mask`` is the value of the coalition whose
            players are the set bits of ``mask``.
        players: one label per player.

    Examples:
        >>> import torch
        >>> game = TabularGame(torch.tensor([0.0, 1.0, 2.0, 4.0]))
        >>> game.n_players, game(torch.tensor([[True, True]])).item()
        (2, 4.0)
    """

    def __init__(self, values: torch.Tensor, *, players: Sequence[str] | None = None,
                 batch_size: int = 1 << 20) -> None:
        if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            msg = f"values must be a floating torch.Tensor, got {got}"
            raise DTypeError(msg)
        length = values.shape[0] if values.dim() == 1 else -1
        if values.dim() != 1 or length < 1 or length & (length - 1):
            msg = (f"values must be 1-D with a power-of-two length 2**n_players, got shape "
                   f"{list(values.shape)}")
            raise ShapeError(msg)
        super().__init__(length.bit_length() - 1, players=players, batch_size=batch_size)
        self.values = values.detach().to("cpu", torch.float64)
        self._bits = 1 << torch.arange(self.n_players, dtype=torch.int64)

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.values[(coalitions.to(torch.int64) * self._bits).sum(1)]


class CallableGame(Game):
    """A game whose value function is a callable ``fn(coalitions) -> values``.

    Args:
        fn: maps ``[coalition, player]`` bool to ``[coalition]`` floats.
        n_players: number of players.
        players: one label per player.
        batch_size: most coalitions handed to ``fn`` at once.

    Examples:
        >>> import torch
        >>> game = CallableGame(lambda c: c.sum(1).double() ** 2, n_players=3)
        >>> game(torch.tensor([[True, True, False]])).item()
        4.0
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n_players: int, *,
                 players: Sequence[str] | None = None, batch_size: int = 4096,
                 device: str | torch.device = "cpu") -> None:
        if not callable(fn):
            msg = f"fn must be callable, got {type(fn).__name__}"
            raise InputError(msg)
        super().__init__(n_players, players=players, batch_size=batch_size, device=device)
        self.fn = fn

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.fn(coalitions)


# -- closed forms from dividends --------------------------------------------------------------


def index_from_dividends(terms: torch.Tensor, dividends: torch.Tensor, index: str, order: int,
                         *, min_order: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """An interaction index of the game ``v(S) = Σ_j dividends[j] [terms[j] ⊆ S]``.

    Args:
        terms: ``[term, player]`` bool, one row per coalition with a non-zero dividend.
        dividends: ``[term]`` the dividends.
        index: one of :data:`~mechinterp.interactions.weights.INDICES` (weights from
            :func:`~mechinterp.interactions.weights.index_weights`).
        order: the index's order.
        min_order: smallest order returned.
        chunk: bound on the ``terms × subsets`` work held in memory at once.

    Returns:
        ``[subset]`` float64 values in canonical subset order, sizes ``min_order..order``.
    """
    n = terms.shape[1]
    weights = index_weights(index, n, order).T  # [t, s]
    term_float = terms.to(torch.float64)
    sizes = terms.sum(1)
    out = []
    for t in range(min_order, min(order, n) + 1):
        subsets = torch.tensor(subsets_up_to(n, t, min_order=t), dtype=torch.int64)
        values = torch.zeros(subsets.shape[0], dtype=torch.float64)
        weighted = dividends.to(torch.float64) * weights[t, sizes]
        step = max(1, chunk // max(1, terms.shape[0]))
        for start in range(0, subsets.shape[0], step):
            block = subsets[start:start + step]
            # A term contains a subset when it contains each of the subset's players.
            contains = torch.ones(terms.shape[0], block.shape[0], dtype=torch.float64)
            for column in range(t):
                contains = contains * term_float[:, block[:, column]]
            values[start:start + block.shape[0]] = weighted @ contains
        out.append(values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class SumOfUnanimityGame(Game):
    """``v(S) = Σ_j c_j [T_j ⊆ S]``: a sum of unanimity games with known dividends.

    Its Harsanyi dividends are the coefficients (summed over repeated terms), so every
    interaction index has a closed form (:meth:`exact`), at any number of players.

    Args:
        terms: the coalitions ``T_j``, as tuples of player indices or a ``[term, player]``
            bool tensor.
        coefficients: ``[term]`` the coefficients ``c_j``.
        n_players: number of players.
        players: one label per player.
        batch_size: most coalitions evaluated at once.

    Examples:
        >>> game = SumOfUnanimityGame.random(6, n_terms=4, min_size=1, max_size=3, seed=0)
        >>> sv = game.exact("SV")
        >>> round(float(sv.values.sum()), 12) == round(game.full_value - game.empty_value, 12)
        True
    """

    def __init__(self, terms: Sequence[Sequence[int]] | torch.Tensor,
                 coefficients: Sequence[float] | torch.Tensor, n_players: int, *,
                 players: Sequence[str] | None = None, batch_size: int = 1 << 16) -> None:
        super().__init__(n_players, players=players, batch_size=batch_size)
        n = self.n_players
        if isinstance(terms, torch.Tensor):
            if terms.dtype != torch.bool or terms.dim() != 2 or terms.shape[1] != n:
                msg = (f"terms must be a bool tensor of shape [term, {n}] or a list of tuples, "
                       f"got {terms.dtype} {list(terms.shape)}")
                raise ShapeError(msg)
            self.terms = terms.detach().cpu().clone()
        else:
            self.terms = torch.zeros(len(terms), n, dtype=torch.bool)
            for row, term in enumerate(terms):
                for player in term:
                    if not isinstance(player, int) or not 0 <= player < n:
                        msg = f"terms[{row}] must hold player indices in [0, {n}), got {term!r}"
                        raise InputError(msg)
                    self.terms[row, player] = True
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
        if coefficients.shape != (self.terms.shape[0],):
            msg = (f"coefficients must have shape [{self.terms.shape[0]}] (one per term), got "
                   f"{list(coefficients.shape)}")
            raise ShapeError(msg)
        self.coefficients = coefficients
        self._sizes = self.terms.sum(1).to(torch.float64)

    @classmethod
    def random(cls, n_players: int, *, n_terms: int, min_size: int = 1, max_size: int = 5,
               seed: int = 0, low: float = -1.0, high: float = 1.0) -> SumOfUnanimityGame:
        """A random game: ``n_terms`` terms of uniform size in ``[min_size, max_size]`` over
        uniformly chosen players, coefficients uniform in ``[low, high)``."""
        _positive_int(n_terms, "n_terms", minimum=0)
        if not 0 <= min_size <= max_size <= n_players:
            msg = (f"sizes must satisfy 0 <= min_size <= max_size <= n_players={n_players}, got "
                   f"min_size={min_size}, max_size={max_size}")
            raise InputError(msg)
        generator = torch.Generator().manual_seed(seed)
        sizes = torch.randint(min_size, max_size + 1, (n_terms,), generator=generator)
        order = torch.rand(n_terms, n_players, generator=generator).argsort(1)
        terms = torch.zeros(n_terms, n_players, dtype=torch.bool)
        for row in range(n_terms):
            terms[row, order[row, :sizes[row]]] = True
        coefficients = low + (high - low) * torch.rand(n_terms, generator=generator,
                                                       dtype=torch.float64)
        return cls(terms, coefficients, n_players)

    def value_function(self, coalitions: torch.Tensor) -> torch.Tensor:
        inside = coalitions.to(torch.float64) @ self.terms.to(torch.float64).T
        return (inside == self._sizes).to(torch.float64) @ self.coefficients

    def exact(self, index: str = "SV", *, order: int | None = None,
              min_order: int | None = None) -> InteractionResult:
        """The closed-form interaction index (no evaluations).

        Args:
            index: one of :data:`~mechinterp.interactions.weights.INDICES`.
            order: the index's order (default 1 for SV/BV, 2 otherwise, ``n`` for Moebius).
            min_order: smallest order listed (default 1, 0 for Moebius).

        Returns:
            The exact index, with ``baseline_value`` and ``full_value`` set.
        """
        n = self.n_players
        if order is None:
            order = 1 if index in ("SV", "BV") else (n if index == "Moebius" else min(2, n))
        if min_order is None:
            min_order = 0 if index == "Moebius" else 1
        values = index_from_dividends(self.terms, self.coefficients, index, order,
                                      min_order=min_order)
        empty = float(self.coefficients[self._sizes == 0].sum())
        return InteractionResult(values, n_players=n, index=index, min_order=min_order,
                                 max_order=min(order, n), players=self.players,
                                 estimator="closed form", baseline_value=empty,
                                 full_value=float(self.coefficients.sum()))

    def dividends(self) -> dict[tuple[int, ...], float]:
        """The non-zero Harsanyi dividends by coalition (repeated terms summed)."""
        out: dict[tuple[int, ...], float] = {}
        for term, coefficient in zip(self.terms, self.coefficients.tolist(), strict=True):
            key = tuple(torch.nonzero(term).flatten().tolist())
            out[key] = out.get(key, 0.0) + coefficient
        return {key: value for key, value in out.items() if value != 0.0}

