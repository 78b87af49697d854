"""AND-OR interactions: a game split into an AND part and an OR part, each sparse.

Li and Zhang (2023, "Does a neural network really encode symbolic concepts?") explain a model's
output ``v`` on the ``2**n`` masked versions of an input as a sum of AND interactions (the
Harsanyi dividends of an AND part) and OR interactions (of an OR part), and choose the split
that makes both as sparse as possible. With learnable tables ``p`` and ``q`` over all
coalitions:

- ``v_and = (v + q) / 2 + p`` and ``v_or = (v + q) / 2 - p``, so ``v_and + v_or = v + q``;
  ``q`` absorbs small noise in the output and is kept to ``|q| <= qthres * |v(N) - v(empty)|``;
- ``I_and`` = the Moebius transform of ``v_and``, ``I_or`` = the OR transform of ``v_or``
  (:func:`~mechinterp.interactions.or_interactions`);
- ``p`` and ``q`` minimise the L1 loss ``sum_S |I_and(S)| + |I_or(S)|`` by SGD with momentum 0.9
  and a learning rate decayed log-linearly from ``lr`` to ``lr / 10``.

The papers' settings: ``lr = 1e-5``, ``qthres = 0.04``, 20,000 steps for language models and
10,000 for image models; Chen et al. (ICLR 2024, "Defining and extracting generalizable
interaction primitives from DNNs", arXiv:2401.16318) use ``lr = 1e-7``, ``qthres = 0.02``, and
bound ``|p| <= pthres`` with ``pthres`` half the model's mean output over the data set.

The papers' code builds ``2**n x 2**n`` transform matrices (``n <= ~12``). Here every step costs
four ``O(n 2**n)`` compiled transforms (two forward, two backward through
:mod:`mechinterp.interactions.autograd`), all on the device of the table, so ``n = 20`` and
beyond fit; on cuda the step is captured once as a CUDA graph and replayed. :func:`generalizable_and_or_interactions` extracts interactions shared by several
models (Chen et al.).

Examples:
    >>> import torch
    >>> v = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # v(S) = |S|
    >>> and_interactions, or_interactions = and_or_split(v, torch.zeros(4, dtype=torch.float64),
    ...                                                  torch.zeros(4, dtype=torch.float64))
    >>> and_interactions  # half the Harsanyi dividends
    tensor([0.0000, 0.5000, 0.5000, 0.0000], dtype=torch.float64)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechinterp import _ops
from mechinterp.errors import DeviceError, InputError, ShapeError
from mechinterp.interactions.autograd import (
    differentiable_inverse_moebius_transform,
    differentiable_moebius_transform,
    differentiable_or_interactions,
)
from mechinterp.interactions.games import Game
from mechinterp.interactions.result import InteractionResult, check_players
from mechinterp.interactions.subsets import subset_masks, subset_of

__all__ = [
    "AndOrResult",
    "GeneralizableAndOrResult",
    "and_or_interactions",
    "and_or_loss",
    "and_or_split",
    "generalizable_and_or_interactions",
]

_ESTIMATOR = "AND-OR (SGD)"


# -- checks -----------------------------------------------------------------------------------


def _real(value: object, name: str, *, low: float, high: float = math.inf,
          low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float inside the interval, else an InputError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        msg = f"{name} must be a finite real number in {interval}, got {value!r}"
        raise InputError(msg)
    return float(value)


def _steps(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        msg = f"steps must be a non-negative int, got {value!r}"
        raise InputError(msg)
    return value


def _table_of(source: object, op: str, name: str) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    """The ``[2**n]`` table of a tensor or a game (its labels too), checked."""
    players = None
    if isinstance(source, Game):
        players = source.players
        source = source.table()
    _ops.players_of_table(source, op, name)
    if not bool(torch.isfinite(source).all()):
        bad = int((~torch.isfinite(source)).sum())
        msg = f"{op}: {name} must hold finite values, got {bad} NaN or infinite entries"
        raise InputError(msg)
    return source, players


def _target_device(tensors: Sequence[object], device: object, op: str) -> torch.device:
    if device is not None:
        return torch.device(device)
    found = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(found) > 1:
        msg = (f"{op}: the tables must be on one device, got {sorted(map(str, found))}; pass "
               "device= to choose one")
        raise DeviceError(msg)
    return found.pop() if found else torch.device("cpu")


@functools.lru_cache(maxsize=4)
def _canonical_masks(n: int) -> torch.Tensor:
    """Bitmasks of all subsets in canonical order (built once per ``n``)."""
    return subset_masks(n, n)


# -- the decomposition and its loss -----------------------------------------------------------


def _split(values: torch.Tensor, p: torch.Tensor, q: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    half = torch.add(values, q).mul_(0.5)
    return (differentiable_moebius_transform(half + p),
            differentiable_or_interactions(half - p))


def and_or_split(values: torch.Tensor, p: torch.Tensor, q: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """AND and OR interactions of the split ``v_and = (v + q)/2 + p``, ``v_or = (v + q)/2 - p``.

    Differentiable with respect to all three tables; for any ``p`` and ``q`` the interactions
    rebuild ``v + q``: ``v_and(S) = sum_{T subset S} I_and(T)`` and
    ``v_or(S) = I_or(empty) + sum_{T meeting S} I_or(T)``.

    Args:
        values: ``[2**n]`` float64 or float32 values ``v`` of every coalition (cpu or cuda).
        p: ``[2**n]`` how much of each coalition's value moves from the OR to the AND part.
        q: ``[2**n]`` noise added to ``v`` before it is split.

    Returns:
        ``(I_and, I_or)``, each ``[2**n]`` by coalition bitmask.

    Raises:
        ShapeError: the tables are not all ``[2**n]`` of one length.
        DTypeError: ``values`` is neither float64 nor float32.

    Examples:
        >>> import torch
        >>> v = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # an OR game
        >>> p = -0.5 * v  # move all of it to the OR part
        >>> and_or_split(v, p, torch.zeros_like(v))[1]
        tensor([0., 0., 0., 1.], dtype=torch.float64)
    """
    op = "and_or_split"
    _ops.players_of_table(values, op, "values")
    for name, table in (("p", p), ("q", q)):
        if not isinstance(table, torch.Tensor) or table.shape != values.shape:
            got = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            msg = f"{op}: {name} must be a tensor of shape {list(values.shape)} like values, got {got}"
            raise ShapeError(msg)
    return _split(values, p, q)


def and_or_loss(and_interactions: torch.Tensor, or_interactions: torch.Tensor, *,
                alpha: float = 0.1) -> torch.Tensor:
    """The sparsity loss of AND-OR interactions, for one model or several.

    For one model (1-D tables) it is Li and Zhang's L1 loss ``sum_S |I_and(S)| + |I_or(S)|``.
    For ``m`` models on the same players (``[m, 2**n]`` tables) it is Eq. (6) of Chen et al.
    (ICLR 2024), which makes interactions that all models share cheaper than ones that only some
    use: ``sum_S (1 - alpha) max_i |I_i(S)| + alpha sum_i |I_i(S)|``, summed over the AND and
    the OR interactions. With one model both forms agree.

    Args:
        and_interactions: ``[2**n]`` or ``[m, 2**n]`` AND interactions.
        or_interactions: OR interactions of the same shape.
        alpha: the weight of the sum over models, in ``[0, 1]`` (Chen et al.: 0.1).

    Returns:
        A 0-d tensor, differentiable.

    Examples:
        >>> import torch
        >>> and_i = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # two models, one player
        >>> or_i = torch.zeros(2, 2)
        >>> and_or_loss(and_i, or_i)  # 0.9 * (3 + 2) + 0.1 * (1 + 2 + 3)
        tensor(5.1000)
    """
    alpha = _real(alpha, "alpha", low=0.0, high=1.0)
    if and_interactions.shape != or_interactions.shape or and_interactions.dim() not in (1, 2):
        msg = (f"and_or_loss: the AND and OR interactions must have one shape, [2**n] or "
               f"[m, 2**n], got {list(and_interactions.shape)} and "
               f"{list(or_interactions.shape)}")
        raise ShapeError(msg)
    if and_interactions.dim() == 1:
        return and_interactions.abs().sum() + or_interactions.abs().sum()
    return _joint_loss(and_interactions, or_interactions, alpha)


def _joint_loss(and_tables: Sequence[torch.Tensor], or_tables: Sequence[torch.Tensor],
                alpha: float) -> torch.Tensor:
    """Eq. (6) of Chen et al. over per-model tables (rows of a tensor or a list of them)."""
    total = and_tables[0].new_zeros(())
    for tables in (and_tables, or_tables):
        magnitudes = [table.abs() for table in tables]
        largest = functools.reduce(torch.maximum, magnitudes)
        total = total + (1.0 - alpha) * largest.sum() + alpha * sum(m.sum() for m in magnitudes)
    return total


# -- results ----------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class AndOrResult:
    """AND and OR interactions of one game, with the split that produced them.

    Attributes:
        and_result: AND interactions of every subset (orders ``0..n``, index ``"AND"``);
            ``baseline_value`` and ``full_value`` are ``v_and(empty)`` and ``v_and(N)``.
        or_result: OR interactions of every subset (index ``"OR"``), likewise for ``v_or``.
        values: ``[2**n]`` the decomposed values ``v``, by coalition bitmask.
        p: ``[2**n]`` the learnt split, by bitmask (``v_and = (v + q)/2 + p``).
        q: ``[2**n]`` the learnt noise, by bitmask; ``v_and + v_or = v + q``.
        loss: ``[steps + 1]`` float64, the loss before each step and after the last.
        q_bound: the bound on ``|q|``.
        p_bound: the bound on ``|p|`` (on the model-specific part of ``p`` in a generalizable
            extraction), or ``None``.
    """

    and_result: InteractionResult
    or_result: InteractionResult
    values: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    loss: torch.Tensor
    q_bound: float
    p_bound: float | None = None

    @property
    def n_players(self) -> int:
        return self.and_result.n_players

    @property
    def players(self) -> tuple[str, ...]:
        return self.and_result.players

    def _table(self, result: InteractionResult) -> torch.Tensor:
        table = torch.empty(1 << self.n_players, dtype=torch.float64)
        table[_canonical_masks(self.n_players)] = result.values
        return table.to(self.p.device)

    def reconstruct(self) -> torch.Tensor:
        """``v_and + v_or`` rebuilt from the interactions alone; it equals ``v + q``.

        The AND part is the inverse Moebius transform of ``I_and``; the OR part is
        ``v_or(S) = I_or(empty) + sum_{T meeting S} I_or(T)``.

        Returns:
            ``[2**n]`` float64 by coalition bitmask, on the device of :attr:`p`.
        """
        and_part = differentiable_inverse_moebius_transform(self._table(self.and_result))
        below = differentiable_inverse_moebius_transform(self._table(self.or_result))
        # The subsets meeting S are all subsets but those inside N minus S.
        or_part = below[0] + below[-1] - below.flip(0)
        return (and_part + or_part).detach()

    def salient(self, threshold: float = 0.05) -> list[tuple[str, tuple[int, ...], float]]:
        """Interactions with ``|I(S)| > threshold * max |I|``, the maximum over both kinds.

        Only non-empty subsets count (``I(empty)`` is no interaction between players), as in
        :meth:`InteractionResult.salient`.

        Returns:
            ``(kind, subset, value)`` triples, ``kind`` ``"AND"`` or ``"OR"``, largest
            ``|value|`` first (ties: AND first, then canonical order).
        """
        threshold = _real(threshold, "threshold", low=0.0, high=1.0)
        cut = threshold * self._largest()
        masks = _canonical_masks(self.n_players)
        found = []
        for kind, result in (("AND", self.and_result), ("OR", self.or_result)):
            magnitude = result.values[1:].abs()
            for position in torch.nonzero(magnitude > cut).flatten().tolist():
                value = float(result.values[position + 1])
                found.append((kind, subset_of(int(masks[position + 1])), value))
        return sorted(found, key=lambda item: -abs(item[2]))

    def _largest(self) -> float:
        if self.n_players == 0:
            return 0.0
        return max(float(self.and_result.values[1:].abs().max()),
                   float(self.or_result.values[1:].abs().max()))

    def sparsity(self, threshold: float = 0.05) -> dict[str, float]:
        """How concentrated the AND and OR interactions are, over both kinds together.

        Per kind, :meth:`InteractionResult.sparsity` of :attr:`and_result` or
        :attr:`or_result` gives the same figures with that kind's own maximum.

        Returns:
            ``n_interactions`` (``2 (2**n - 1)``), ``n_salient`` (see :meth:`salient`),
            ``n_salient_and``, ``n_salient_or``, ``salient_fraction``, ``salient_strength``
            (share of ``sum |I|`` the salient ones hold) and ``gini`` of ``|I|``.
        """
        threshold = _real(threshold, "threshold", low=0.0, high=1.0)
        parts = [self.and_result.values[1:].abs(), self.or_result.values[1:].abs()]
        magnitude = torch.cat(parts)
        count = magnitude.numel()
        cut = threshold * self._largest()
        salient = [int((part > cut).sum()) for part in parts]
        total = float(magnitude.sum())
        held = float(magnitude[magnitude > cut].sum())
        ordered = torch.sort(magnitude).values
        ranks = torch.arange(1, count + 1, dtype=torch.float64)
        gini = float((2 * ranks - count - 1) @ ordered / (count * total)) if total > 0 else 0.0
        return {"n_interactions": float(count), "n_salient": float(sum(salient)),
                "n_salient_and": float(salient[0]), "n_salient_or": float(salient[1]),
                "salient_fraction": sum(salient) / count if count else 0.0,
                "salient_strength": held / total if total > 0 else 0.0, "gini": gini}

    def __repr__(self) -> str:
        return (f"AndOrResult(n_players={self.n_players}, steps={self.loss.numel() - 1}, "
                f"loss {float(self.loss[0]):.6g} -> {float(self.loss[-1]):.6g})")


@dataclass(eq=False, repr=False)
class GeneralizableAndOrResult:
    """AND-OR interactions of several models on the same players, extracted jointly.

    Attributes:
        models: one :class:`AndOrResult` per model; its ``p`` is the shared part plus the
            model's own, and its ``loss`` is the joint loss.
        shared_p: ``[2**n]`` the part of ``p`` all models share.
        loss: ``[steps + 1]`` float64, the joint loss before each step and after the last.
        alpha: the weight of the sum over models in the loss.
    """

    models: tuple[AndOrResult, ...]
    shared_p: torch.Tensor
    loss: torch.Tensor
    alpha: float

    def shared_salient(self, threshold: float = 0.05) -> list[tuple[str, tuple[int, ...]]]:
        """``(kind, subset)`` of the interactions salient in every model, in the first model's
        order of strength (see :meth:`AndOrResult.salient`)."""
        found = [{(kind, subset) for kind, subset, _ in model.salient(threshold)}
                 for model in self.models[1:]]
        return [(kind, subset) for kind, subset, _ in self.models[0].salient(threshold)
                if all((kind, subset) in other for other in found)]

    def __repr__(self) -> str:
        return (f"GeneralizableAndOrResult({len(self.models)} models, n_players="
                f"{self.models[0].n_players}, steps={self.loss.numel() - 1}, loss "
                f"{float(self.loss[0]):.6g} -> {float(self.loss[-1]):.6g})")


# -- the optimisation -------------------------------------------------------------------------


@dataclass
class _Fit:
    shared: torch.Tensor  # [2**n] the shared part of p
    p: torch.Tensor  # [m, 2**n] shared plus specific
    q: torch.Tensor  # [m, 2**n]
    and_tables: torch.Tensor  # [m, 2**n]
    or_tables: torch.Tensor  # [m, 2**n]
    loss: torch.Tensor  # [steps + 1] float64 cpu


def _optimise(values: torch.Tensor, *, steps: int, lr: float, lr_decay: float, momentum: float,
              q_bounds: Sequence[float], p_bound: float | None, alpha: float,
              progress: bool, graph: bool = True) -> _Fit:
    """Projected SGD on the split of ``m`` tables ``values [m, 2**n]``.

    One model learns ``p``; several learn a shared ``p`` plus one ``p`` per model, and only the
    per-model parts are bounded by ``p_bound`` (Chen et al.). The update is torch's SGD with
    momentum (no dampening; a zero momentum buffer makes the first step plain SGD), written out
    so that the learning rate can live in a tensor: on cuda, with ``graph``, the whole step is
    captured once as a CUDA graph and replayed, since at small ``n`` launching its ~80 kernels
    one by one costs more than running them.
    """
    m = values.shape[0]
    rows = list(values.unbind(0))
    # One 1-D parameter per model: slicing a [m, 2**n] parameter would cost a full-size
    # zero-filled gradient per slice in the backward pass.
    qs = [torch.zeros_like(row, requires_grad=True) for row in rows]
    specific = [torch.zeros_like(row, requires_grad=True) for row in rows]
    shared = torch.zeros_like(rows[0], requires_grad=m > 1)
    params = [*specific, *qs] + ([shared] if m > 1 else [])
    buffers = [torch.zeros_like(param) for param in params]
    neg_lr = values.new_zeros(())  # minus the learning rate of the coming step
    last = values.new_zeros(())  # the loss before the last step taken
    curve = torch.empty(steps + 1, dtype=torch.float64, device=values.device)

    def evaluate() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        ps = [own + shared for own in specific] if m > 1 else specific
        pairs = [_split(rows[i], ps[i], qs[i]) for i in range(m)]
        and_tables = [pair[0] for pair in pairs]
        or_tables = [pair[1] for pair in pairs]
        if m == 1:
            loss = and_tables[0].abs().sum() + or_tables[0].abs().sum()
        else:
            loss = _joint_loss(and_tables, or_tables, alpha)
        return loss, and_tables, or_tables

    def step() -> None:
        loss, _, _ = evaluate()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, buffer, grad in zip(params, buffers, grads, strict=True):
                buffer.mul_(momentum).add_(grad)
                param.addcmul_(buffer, neg_lr)
            for q, bound in zip(qs, q_bounds, strict=True):
                q.clamp_(-bound, bound)
            if p_bound is not None:
                for own in specific:
                    own.clamp_(-p_bound, p_bound)
            last.copy_(loss)

    run = step
    report_every = max(1, steps // 100)
    with tqdm(total=steps, desc="AND-OR interactions", unit="step", disable=not progress,
              leave=False) as bar:
        for index in range(steps):
            # Log-linear decay: lr at the first step, lr * lr_decay at the last.
            neg_lr.fill_(-lr * lr_decay ** (index / max(steps - 1, 1)))
            run()
            curve[index] = last
            warm = index == _WARMUP - 1 and index < steps - 1
            if warm and graph and values.is_cuda:
                run = _captured(step, values.device) or step
            bar.update(1)
            if progress and (index % report_every == 0 or index == steps - 1):
                bar.set_postfix(loss=f"{float(last):.6g}", refresh=False)
    with torch.no_grad():
        loss, and_tables, or_tables = evaluate()
        curve[steps] = loss
        ps = [own + shared for own in specific] if m > 1 else specific
        return _Fit(shared.detach(), torch.stack(ps), torch.stack(qs), torch.stack(and_tables),
                    torch.stack(or_tables), curve.cpu())


# Eager steps before a CUDA graph is captured (the capture needs warm caches and allocators).
_WARMUP = 3


def _captured(step, device: torch.device):
    """``step`` captured as a CUDA graph (its replay function), or None if it cannot be.

    Every tensor ``step`` reads or writes outside itself already exists, so replaying the graph
    repeats the step on the current values of the parameters and the learning rate.
    """
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:
        # Something in the step cannot be captured here: keep running it eagerly.
        torch.cuda.synchronize(device)
        warnings.warn(f"AND-OR interactions: the optimisation step could not be captured as a "
                      f"CUDA graph, so it runs one kernel at a time ({error})", RuntimeWarning,
                      stacklevel=4)
        return None
    return graph.replay


def _result(values: torch.Tensor, fit: _Fit, row: int, q_bound: float, p_bound: float | None,
            players: tuple[str, ...]) -> AndOrResult:
    n = values.shape[-1].bit_length() - 1
    masks = _canonical_masks(n)
    parts = []
    for index, tables in (("AND", fit.and_tables), ("OR", fit.or_tables)):
        table = tables[row].detach().to("cpu", torch.float64)
        # Rebuild v_and or v_or at the empty and full coalitions: both are two numbers away.
        part = (0.5 * (values[row] + fit.q[row]) + (1 if index == "AND" else -1) * fit.p[row])
        parts.append(InteractionResult(
            table[masks], n, index=index, min_order=0, max_order=n, players=players,
            estimator=_ESTIMATOR, baseline_value=float(part[0]), full_value=float(part[-1])))
    return AndOrResult(parts[0], parts[1], values[row], fit.p[row], fit.q[row], fit.loss,
                       q_bound, p_bound)


def _hyperparameters(steps: object, lr: object, lr_decay: object, momentum: object,
                     qthres: object, pthres: object) -> tuple:
    return (_steps(steps), _real(lr, "lr", low=0.0, low_open=True),
            _real(lr_decay, "lr_decay", low=0.0, high=1.0, low_open=True),
            _real(momentum, "momentum", low=0.0, high=1.0, high_open=True),
            _real(qthres, "qthres", low=0.0),
            None if pthres is None else _real(pthres, "pthres", low=0.0))


def and_or_interactions(
    values_or_game: torch.Tensor | Game, *, steps: int = 20_000, lr: float = 1e-5,
    qthres: float = 0.04, pthres: float | None = None, lr_decay: float = 0.1,
    momentum: float = 0.9, players: Sequence[str] | None = None,
    device: str | torch.device | None = None, progress: bool = True,
) -> AndOrResult:
    """Sparse AND-OR interactions of a game (Li and Zhang, 2023).

    Learns ``p`` and ``q`` (see the module) by ``steps`` steps of SGD with momentum on
    ``sum_S |I_and(S)| + |I_or(S)|``, the learning rate decayed log-linearly from ``lr`` to
    ``lr * lr_decay``; after every step ``|q| <= qthres * |v(N) - v(empty)|`` and, when
    ``pthres`` is given, ``|p| <= pthres`` (Chen et al.'s variant). Everything runs on the
    device of the table (or ``device``), in its dtype.

    Args:
        values_or_game: ``[2**n]`` float64 or float32 values of every coalition by bitmask
            (bit ``i`` = player ``i``), or a :class:`~mechinterp.interactions.Game`, whose
            :meth:`~mechinterp.interactions.Game.table` is taken (``2**n`` evaluations).
        steps: SGD steps (papers: 20,000 for language models, 10,000 for image models).
        lr: initial learning rate (papers: 1e-5; Chen et al.: 1e-7). The loss grows with the
            scale of ``v`` and with ``2**n``, so the papers' value suits log-odds outputs.
        qthres: bound on the noise relative to ``|v(N) - v(empty)|`` (papers: 0.04; Chen
            et al.: 0.02); 0 makes ``v_and + v_or = v`` exactly.
        pthres: bound on ``|p|`` (Chen et al.: half the mean model output), or ``None``.
        lr_decay: ratio of the last learning rate to the first, in ``(0, 1]``.
        momentum: SGD momentum, in ``[0, 1)``.
        players: one label per player (default: the game's labels, else ``"0"`` .. ``"n-1"``).
        device: where to run (default: the table's device; a game's table is on the cpu).
        progress: show a progress bar with the loss.

    Returns:
        The interactions, ``p``, ``q`` and the loss curve.

    Raises:
        ShapeError: the table is not 1-D with a power-of-two length.
        DTypeError: the table is neither float64 nor float32.
        InputError: the table holds NaN or infinite values, or a hyperparameter is out of
            range.

    Examples:
        >>> import torch
        >>> v = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # both players needed
        >>> result = and_or_interactions(v, steps=300, lr=0.01, qthres=0.0, progress=False)
        >>> [(kind, subset, round(value, 1)) for kind, subset, value in result.salient()]
        [('AND', (0, 1), 1.0)]
        >>> round(float(result.loss[0]), 3), round(float(result.loss[-1]), 1)  # from v/2 + v/2
        (2.0, 1.0)
        >>> torch.allclose(result.reconstruct(), v)  # qthres=0: no noise, v_and + v_or = v
        True
    """
    op = "and_or_interactions"
    steps, lr, lr_decay, momentum, qthres, pthres = _hyperparameters(
        steps, lr, lr_decay, momentum, qthres, pthres)
    table, labels = _table_of(values_or_game, op, "values_or_game")
    table = table.to(_target_device([table], device, op))
    n = table.shape[0].bit_length() - 1
    labels = check_players(players if players is not None else labels, n)
    q_bound = qthres * abs(float(table[-1] - table[0]))
    fit = _optimise(table[None], steps=steps, lr=lr, lr_decay=lr_decay, momentum=momentum,
                    q_bounds=[q_bound], p_bound=pthres, alpha=0.0,
                    progress=progress)
    return _result(table[None], fit, 0, q_bound, pthres, labels)


def generalizable_and_or_interactions(
    values_or_games: Sequence[torch.Tensor | Game], *, alpha: float = 0.1, steps: int = 20_000,
    lr: float = 1e-5, qthres: float = 0.04, pthres: float | None = None, lr_decay: float = 0.1,
    momentum: float = 0.9, players: Sequence[str] | None = None,
    device: str | torch.device | None = None, progress: bool = True,
) -> GeneralizableAndOrResult:
    """AND-OR interactions shared by several models on the same players (Chen et al., 2024).

    Implements Eq. (6) of Chen, Lou, Huang and Zhang, "Defining and extracting generalizable
    interaction primitives from DNNs" (ICLR 2024, arXiv:2401.16318): model ``i`` splits its
    output as ``v_and^(i) = (v_i + q_i)/2 + p^(i)`` and ``v_or^(i) = (v_i + q_i)/2 - p^(i)``
    with ``p^(i) = p_shared + p_i`` (a part common to all models plus the model's own), and
    all parts minimise

        ``sum_S [(1 - alpha) max_i |I_and^(i)(S)| + alpha sum_i |I_and^(i)(S)|]``
        ``+ sum_S [(1 - alpha) max_i |I_or^(i)(S)| + alpha sum_i |I_or^(i)(S)|]``

    (:func:`and_or_loss`): only the strongest model pays in full for an interaction, so the
    models are pushed towards the same salient interactions, while the ``alpha`` term keeps the
    others from growing. The optimisation is :func:`and_or_interactions`' (SGD with momentum,
    log-decayed learning rate), with ``|q_i| <= qthres * |v_i(N) - v_i(empty)|`` for each
    model and, when ``pthres`` is given, ``|p_i| <= pthres`` on the model-specific parts (the
    shared part is free), as in the paper's code.

    Args:
        values_or_games: two or more ``[2**n]`` tables (or games) over the same ``n`` players.
        alpha: weight of the sum over models (paper: 0.1), in ``[0, 1]``.
        steps, lr, qthres, pthres, lr_decay, momentum, progress: as in
            :func:`and_or_interactions` (Chen et al.: ``lr = 1e-7``, 20,000 steps,
            ``qthres = 0.02``, ``pthres`` half the mean model output).
        players: one label per player (default: the first game's labels).
        device: where to run (default: the tables' device, which must be one).

    Returns:
        One :class:`AndOrResult` per model, the shared ``p`` and the joint loss curve.

    Raises:
        InputError: fewer than two tables, bad values or hyperparameters (see
            :func:`and_or_interactions`).
        ShapeError: the tables have different numbers of players.
        DeviceError: the tables are on different devices and ``device`` is not given.

    Examples:
        >>> import torch
        >>> first = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        >>> second = torch.tensor([0.0, 0.1, 0.0, 1.2], dtype=torch.float64)
        >>> result = generalizable_and_or_interactions([first, second], steps=300, lr=0.01,
        ...                                            progress=False)
        >>> result.shared_salient()
        [('AND', (0, 1))]
    """
    op = "generalizable_and_or_interactions"
    alpha = _real(alpha, "alpha", low=0.0, high=1.0)
    steps, lr, lr_decay, momentum, qthres, pthres = _hyperparameters(
        steps, lr, lr_decay, momentum, qthres, pthres)
    if isinstance(values_or_games, (torch.Tensor, Game)) or not isinstance(
            values_or_games, Sequence) or len(values_or_games) < 2:
        got = (f"a sequence of {len(values_or_games)}" if isinstance(values_or_games, Sequence)
               and not isinstance(values_or_games, torch.Tensor)
               else type(values_or_games).__name__)
        msg = (f"{op}: values_or_games must be a sequence of two or more tables or games (use "
               f"and_or_interactions for one), got {got}")
        raise InputError(msg)
    target = _target_device(values_or_games, device, op)
    tables, labels = [], None
    for i, source in enumerate(values_or_games):
        table, found = _table_of(source, op, f"values_or_games[{i}]")
        if tables and table.shape != tables[0].shape:
            msg = (f"{op}: every table must cover the same players; values_or_games[0] has "
                   f"length {tables[0].shape[0]}, values_or_games[{i}] has {table.shape[0]}")
            raise ShapeError(msg)
        labels = labels if labels is not None else found
        tables.append(table)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tables))
    stacked = torch.stack([t.to(target, dtype) for t in tables])
    n = stacked.shape[1].bit_length() - 1
    labels = check_players(players if players is not None else labels, n)
    bounds = (qthres * (stacked[:, -1] - stacked[:, 0]).abs()).tolist()
    fit = _optimise(stacked, steps=steps, lr=lr, lr_decay=lr_decay, momentum=momentum,
                    q_bounds=bounds, p_bound=pthres, alpha=alpha, progress=progress)
    models = tuple(_result(stacked, fit, i, bounds[i], pthres, labels)
                   for i in range(stacked.shape[0]))
    return GeneralizableAndOrResult(models, fit.shared, fit.loss, alpha)
