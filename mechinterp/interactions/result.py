"""Interaction values by subset of players: Shapley values, interaction indices, dividends.

:class:`InteractionResult` holds one value per subset of ``min_order..max_order`` players, in the
canonical order of :mod:`mechinterp.interactions.subsets` (by size, then
:func:`itertools.combinations` order), with the labels of the players, standard errors when the
values are estimates, and how many value-function evaluations they cost.

Examples:
    >>> import torch
    >>> values = torch.tensor([0.5, -2.0, 1.0, 0.25, 0.0, 0.1], dtype=torch.float64)
    >>> result = InteractionResult(values, n_players=3, index="k-SII", min_order=1, max_order=2,
    ...                            players=("the", "cat", "sat"))
    >>> result[("cat", "the")]
    0.25
    >>> result.top_k(2)
    [((1,), -2.0), ((2,), 1.0)]
    >>> result.strength_by_order()
    {1: 3.5, 2: 0.35}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch

from mechinterp.errors import InputError, ShapeError
from mechinterp.interactions.subsets import count_up_to, subset_masks, subsets_up_to
from mechinterp.saved import read_result, write_result

__all__ = ["InteractionResult", "check_players"]

_FORMAT = "mechinterp.InteractionResult/1"


def check_players(players: Sequence[str] | None, n_players: int) -> tuple[str, ...]:
    """Player labels as a tuple of distinct strings (default ``"0"`` .. ``"n-1"``)."""
    if players is None:
        return tuple(str(i) for i in range(n_players))
    if isinstance(players, str) or not isinstance(players, Sequence):
        msg = f"players must be a sequence of {n_players} labels, got {type(players).__name__}"
        raise InputError(msg)
    labels = tuple(str(p) for p in players)
    if len(labels) != n_players:
        msg = f"players must have one label per player ({n_players}), got {len(labels)}"
        raise InputError(msg)
    if len(set(labels)) != len(labels):
        msg = f"players must be distinct labels, got {labels!r}"
        raise InputError(msg)
    return labels


def _nonnegative_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        msg = f"{name} must be a non-negative int, got {value!r}"
        raise InputError(msg)
    return value


def _as_values(tensor: object, name: str, length: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor, dtype=torch.float64)
    if tensor.shape != (length,):
        msg = (f"{name} must have shape [{length}] (one value per subset in the order range), "
               f"got {list(tensor.shape)}")
        raise ShapeError(msg)
    return tensor.detach().to("cpu", torch.float64)


@dataclass(eq=False, repr=False)
class InteractionResult:
    """Interaction values of the subsets of ``min_order..max_order`` players.

    Attributes:
        values: ``[subset]`` float64, canonical subset order.
        n_players: number of players.
        index: the interaction index (``"SV"``, ``"k-SII"``, ``"Moebius"``, ...).
        min_order: size of the smallest subsets listed.
        max_order: size of the largest subsets listed.
        players: one label per player (default ``"0"`` .. ``"n-1"``).
        stderr: ``[subset]`` standard errors of estimates; ``None`` for exact values.
        evaluations: value-function evaluations spent; ``None`` for values from a given table.
        estimator: what computed the values.
        baseline_value: ``v(∅)`` when known.
        full_value: ``v(N)`` when known.
    """

    values: torch.Tensor
    n_players: int
    _: KW_ONLY
    index: str = "SV"
    min_order: int = 1
    max_order: int = 1
    players: tuple[str, ...] | None = None
    stderr: torch.Tensor | None = None
    evaluations: int | None = None
    estimator: str = "exact"
    baseline_value: float | None = None
    full_value: float | None = None

    def __post_init__(self) -> None:
        n = _nonnegative_int(self.n_players, "n_players")
        _nonnegative_int(self.min_order, "min_order")
        _nonnegative_int(self.max_order, "max_order")
        if not self.min_order <= self.max_order <= n:
            msg = (f"orders must satisfy min_order <= max_order <= n_players={n}, got "
                   f"min_order={self.min_order}, max_order={self.max_order}")
            raise InputError(msg)
        if not isinstance(self.index, str) or not self.index:
            msg = f"index must be a non-empty string such as 'SV' or 'k-SII', got {self.index!r}"
            raise InputError(msg)
        length = count_up_to(n, self.max_order, min_order=self.min_order)
        self.values = _as_values(self.values, "values", length)
        if self.stderr is not None:
            self.stderr = _as_values(self.stderr, "stderr", length)
        self.players = check_players(self.players, n)
        if self.evaluations is not None:
            _nonnegative_int(self.evaluations, "evaluations")
        for name in ("baseline_value", "full_value"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, float(value))
        self._label_index = {label: i for i, label in enumerate(self.players)}
        # Offset of the first subset of each size in the canonical list.
        self._offsets = {}
        offset = 0
        for size in range(self.min_order, self.max_order + 1):
            self._offsets[size] = offset
            offset += math.comb(n, size)

    # -- lookup ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def subsets(self) -> list[tuple[int, ...]]:
        """The subsets, in the order of :attr:`values`."""
        return subsets_up_to(self.n_players, self.max_order, min_order=self.min_order)

    @property
    def orders(self) -> torch.Tensor:
        """``[subset]`` int64 size of each subset."""
        counts = [math.comb(self.n_players, s) for s in range(self.min_order, self.max_order + 1)]
        sizes = torch.arange(self.min_order, self.max_order + 1, dtype=torch.int64)
        return sizes.repeat_interleave(torch.tensor(counts, dtype=torch.int64))

    def _player(self, key: object) -> int:
        if isinstance(key, str):
            if key not in self._label_index:
                msg = f"player label {key!r} is not one of {self.players!r}"
                raise InputError(msg)
            return self._label_index[key]
        if hasattr(key, "__index__") and not isinstance(key, bool):
            player = key.__index__()
            if 0 <= player < self.n_players:
                return player
        msg = f"a player must be an index in [0, {self.n_players}) or a label, got {key!r}"
        raise InputError(msg)

    def position(self, subset: object) -> int:
        """Index into :attr:`values` of a subset (player indices or labels, any order)."""
        items = (subset,) if isinstance(subset, str) or hasattr(subset, "__index__") else subset
        if not isinstance(items, (tuple, list, frozenset, set)):
            msg = f"subset must be a tuple of player indices or labels, got {subset!r}"
            raise InputError(msg)
        players = sorted(self._player(p) for p in items)
        if len(set(players)) != len(players):
            msg = f"subset must not repeat a player, got {subset!r}"
            raise InputError(msg)
        size, n = len(players), self.n_players
        if size not in self._offsets:
            msg = (f"subset {subset!r} has {size} players; this result lists sizes "
                   f"{self.min_order}..{self.max_order}")
            raise InputError(msg)
        # Rank in itertools.combinations (lexicographic) order, by the combinatorial number
        # system: no table of all subsets is needed.
        rank = math.comb(n, size) - 1 - sum(math.comb(n - 1 - c, size - i)
                                            for i, c in enumerate(players))
        return self._offsets[size] + rank

    def __getitem__(self, subset: object) -> float:
        return float(self.values[self.position(subset)])

    def label(self, subset: Sequence[int]) -> str:
        """A subset's player labels joined by ``" × "`` (``"∅"`` for the empty set)."""
        return " × ".join(self.players[i] for i in subset) if subset else "∅"

    # -- summaries ---------------------------------------------------------------------------

    def _selected(self, order: int | None) -> torch.Tensor:
        orders = self.orders
        if order is None:
            return orders > 0
        if order not in self._offsets:
            msg = f"order must be in {self.min_order}..{self.max_order}, got {order!r}"
            raise InputError(msg)
        return orders == order

    def _pairs(self, positions: torch.Tensor) -> list[tuple[tuple[int, ...], float]]:
        subsets = self.subsets
        return [(subsets[p], float(self.values[p])) for p in positions.tolist()]

    def top_k(self, k: int, *, order: int | None = None) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` entries largest in absolute value, as ``(subset, value)`` pairs.

        Args:
            k: how many.
            order: only subsets of this size (default: every non-empty subset).
        """
        _nonnegative_int(k, "k")
        candidates = torch.nonzero(self._selected(order)).flatten()
        magnitude = self.values[candidates].abs()
        # A stable sort keeps ties in canonical order, so the answer is deterministic.
        ranked = torch.sort(magnitude, descending=True, stable=True).indices[:k]
        return self._pairs(candidates[ranked])

    def strength_by_order(self) -> dict[int, float]:
        """Sum of ``|value|`` per subset size."""
        orders = self.orders
        return {size: float(self.values[orders == size].abs().sum())
                for size in range(self.min_order, self.max_order + 1)}

    def salient(self, threshold: float = 0.05, *,
                order: int | None = None) -> list[tuple[tuple[int, ...], float]]:
        """Entries with ``|value| > threshold · max |value|``, largest first.

        The maximum is over the same entries (every non-empty subset unless ``order`` is set),
        the criterion of the AND-OR interaction papers (threshold 0.05).
        """
        if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            msg = f"threshold must be a fraction in [0, 1], got {threshold!r}"
            raise InputError(msg)
        candidates = torch.nonzero(self._selected(order)).flatten()
        magnitude = self.values[candidates].abs()
        if magnitude.numel() == 0:
            return []
        keep = magnitude > threshold * magnitude.max()
        chosen, strength = candidates[keep], magnitude[keep]
        return self._pairs(chosen[torch.sort(strength, descending=True, stable=True).indices])

    def sparsity(self, threshold: float = 0.05) -> dict[str, float]:
        """How concentrated the interactions are (over non-empty subsets).

        Returns:
            ``n_interactions``, ``n_salient`` (see :meth:`salient`), ``salient_fraction``
            (of entries), ``salient_strength`` (share of ``Σ|value|`` the salient ones hold) and
            ``gini`` (of ``|value|``; 0 for equal magnitudes, towards 1 for a few large ones).
        """
        magnitude = self.values[self._selected(None)].abs()
        count = magnitude.numel()
        salient = self.salient(threshold)
        total = float(magnitude.sum())
        held = sum(abs(v) for _, v in salient)
        ordered = torch.sort(magnitude).values
        ranks = torch.arange(1, count + 1, dtype=torch.float64)
        gini = float((2 * ranks - count - 1) @ ordered / (count * total)) if total > 0 else 0.0
        return {"n_interactions": float(count), "n_salient": float(len(salient)),
                "salient_fraction": len(salient) / count if count else 0.0,
                "salient_strength": held / total if total > 0 else 0.0, "gini": gini}

    def to_records(self) -> list[dict]:
        """One dict per subset: ``subset``, ``labels``, ``order``, ``value``, ``stderr``."""
        stderr = self.stderr.tolist() if self.stderr is not None else [math.nan] * len(self)
        return [{"subset": subset, "labels": tuple(self.players[i] for i in subset),
                 "order": len(subset), "value": value, "stderr": error}
                for subset, value, error in zip(self.subsets, self.values.tolist(), stderr,
                                                strict=True)]

    def to_frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            msg = "to_frame needs pandas (pip install pandas); to_records() gives the same rows"
            raise InputError(msg) from None
        return pd.DataFrame.from_records(self.to_records(),
                                         columns=["subset", "labels", "order", "value", "stderr"])

    # -- plots -------------------------------------------------------------------------------

    def plot(self, kind: str = "bar", *, k: int = 15, ax=None):
        """A matplotlib figure of the values.

        Args:
            kind: ``"bar"`` (the ``k`` largest entries, with ±1.96 stderr bars when
                estimated), ``"heatmap"`` (the pairwise entries as a player × player matrix,
                singletons on the diagonal) or ``"orders"`` (positive and negative sums per
                order).
            k: entries in the bar chart.
            ax: axes to draw into (default: a new figure).

        Returns:
            The figure.
        """
        import matplotlib.pyplot as plt

        if kind not in ("bar", "heatmap", "orders"):
            msg = f"kind must be 'bar', 'heatmap' or 'orders', got {kind!r}"
            raise InputError(msg)
        if kind == "heatmap" and not self.min_order <= 2 <= self.max_order:
            msg = (f"a heatmap needs pairwise entries (order 2); this result lists orders "
                   f"{self.min_order}..{self.max_order}")
            raise InputError(msg)
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4.5) if kind != "heatmap" else (6, 5))
        if kind == "bar":
            self._plot_bar(ax, k)
        elif kind == "heatmap":
            self._plot_heatmap(ax)
        else:
            self._plot_orders(ax)
        return ax.figure

    def _plot_bar(self, ax, k: int) -> None:
        top = self.top_k(k)
        positions = range(len(top))
        values = [v for _, v in top]
        errors = None
        if self.stderr is not None and top:
            errors = [1.96 * float(self.stderr[self.position(s)]) for s, _ in top]
        ax.barh(list(positions), values, xerr=errors,
                color=["tab:red" if v > 0 else "tab:blue" for v in values])
        ax.set_yticks(list(positions), [self.label(s) for s, _ in top])
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(self.index)
        ax.set_title(f"top {len(top)} {self.index} ({self.estimator})")

    def _plot_heatmap(self, ax) -> None:
        n = self.n_players
        matrix = torch.zeros(n, n, dtype=torch.float64)
        orders = self.orders
        for subset, value in zip(self.subsets, self.values.tolist(), strict=True):
            if len(subset) == 2:
                matrix[subset[0], subset[1]] = matrix[subset[1], subset[0]] = value
            elif len(subset) == 1:
                matrix[subset[0], subset[0]] = value
        limit = float(self.values[(orders == 1) | (orders == 2)].abs().max()) or 1.0
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.figure.colorbar(image, ax=ax)
        ax.set_xticks(range(n), self.players, rotation=90, fontsize=7)
        ax.set_yticks(range(n), self.players, fontsize=7)
        ax.set_title(f"pairwise {self.index} (diagonal: order 1)")

    def _plot_orders(self, ax) -> None:
        orders = self.orders
        sizes = list(range(self.min_order, self.max_order + 1))
        positive = [float(self.values[(orders == s) & (self.values > 0)].sum()) for s in sizes]
        negative = [float(self.values[(orders == s) & (self.values < 0)].sum()) for s in sizes]
        ax.bar(sizes, positive, color="tab:red", label="positive")
        ax.bar(sizes, negative, color="tab:blue", label="negative")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(sizes)
        ax.set_xlabel("order (subset size)")
        ax.set_ylabel(f"sum of {self.index}")
        ax.legend()
        ax.set_title(f"{self.index} by order")

    # -- files -------------------------------------------------------------------------------

    def _metadata(self) -> dict:
        return {"n_players": self.n_players, "index": self.index, "min_order": self.min_order,
                "max_order": self.max_order, "players": list(self.players),
                "evaluations": self.evaluations, "estimator": self.estimator,
                "baseline_value": self.baseline_value, "full_value": self.full_value}

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (safetensors: the values and standard errors, the rest as JSON),
        atomically, so an interrupted write never leaves a broken file."""
        tensors = {"values": self.values}
        if self.stderr is not None:
            tensors["stderr"] = self.stderr
        write_result(path, tensors, {"result": json.dumps(self._metadata())}, format=_FORMAT)

    @staticmethod
    def load(path: str | Path) -> InteractionResult:
        """Read a result written by :meth:`save`.

        Raises:
            InputError: the file is missing, is not safetensors, or is not a well-formed
                interaction result.
        """
        tensors, meta = read_result(path, format=_FORMAT)
        try:
            data = json.loads(meta["result"])
            fields = {key: data[key] for key in (
                "n_players", "index", "min_order", "max_order", "players", "evaluations",
                "estimator", "baseline_value", "full_value")}
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            msg = f"{path} has malformed interaction-result metadata ({error!r})"
            raise InputError(msg) from None
        if "values" not in tensors or set(tensors) - {"values", "stderr"}:
            msg = f"{path} must hold the tensors 'values' (and 'stderr'), got {sorted(tensors)}"
            raise InputError(msg)
        for key, tensor in tensors.items():
            if tensor.dtype != torch.float64:
                msg = f"{path}: tensor {key!r} must be float64, got {tensor.dtype}"
                raise InputError(msg)
        try:
            return InteractionResult(tensors["values"], stderr=tensors.get("stderr"), **fields)
        except (InputError, ShapeError) as error:
            msg = f"{path} is not a consistent interaction result: {error}"
            raise InputError(msg) from None

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def from_table(table: torch.Tensor, *, index: str = "Moebius", min_order: int = 0,
                   max_order: int | None = None, players: Sequence[str] | None = None,
                   estimator: str = "exact", baseline_value: float | None = None,
                   full_value: float | None = None) -> InteractionResult:
        """The entries of a full ``2**n`` table indexed by bitmask, restricted to an order range.

        Args:
            table: ``[2**n]`` values by coalition mask (bit ``i`` = player ``i``), such as the
                Harsanyi dividends of a game.
            index: what the table holds; for ``"Moebius"`` the baseline ``v(∅)`` is entry 0
                and ``v(N)`` the sum of all entries, unless given.
            min_order: smallest subset size kept.
            max_order: largest subset size kept (default ``n``).
            players: one label per player.
            estimator: what computed the table.
            baseline_value: ``v(∅)``.
            full_value: ``v(N)``.

        Examples:
            >>> import torch
            >>> dividends = torch.tensor([0.0, 1.0, 2.0, 0.5])  # m(∅), m({0}), m({1}), m({0,1})
            >>> InteractionResult.from_table(dividends, min_order=1).values.tolist()
            [1.0, 2.0, 0.5]
        """
        if not isinstance(table, torch.Tensor) or table.dim() != 1:
            got = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            msg = f"table must be a 1-D tensor of length 2**n_players, got {got}"
            raise ShapeError(msg)
        length = table.shape[0]
        if length < 1 or length & (length - 1):
            msg = f"table must have a power-of-two length 2**n_players, got length {length}"
            raise ShapeError(msg)
        n = length.bit_length() - 1
        max_order = n if max_order is None else max_order
        table = table.detach().to("cpu", torch.float64)
        if index == "Moebius":
            baseline_value = float(table[0]) if baseline_value is None else baseline_value
            full_value = float(table.sum()) if full_value is None else full_value
        _nonnegative_int(min_order, "min_order")
        _nonnegative_int(max_order, "max_order")
        if not min_order <= max_order <= n:
            msg = (f"orders must satisfy min_order <= max_order <= n_players={n}, got "
                   f"min_order={min_order}, max_order={max_order}")
            raise InputError(msg)
        values = table[subset_masks(n, max_order, min_order=min_order)]
        return InteractionResult(values, n, index=index, min_order=min_order,
                                 max_order=max_order, players=players, estimator=estimator,
                                 baseline_value=baseline_value, full_value=full_value)

    def __repr__(self) -> str:
        kind = "estimated" if self.stderr is not None else "exact"
        cost = f", evaluations={self.evaluations}" if self.evaluations is not None else ""
        return (f"InteractionResult(index={self.index!r}, n_players={self.n_players}, "
                f"orders={self.min_order}..{self.max_order}, {len(self)} values, {kind}, "
                f"estimator={self.estimator!r}{cost})")
