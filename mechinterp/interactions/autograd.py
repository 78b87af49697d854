"""Differentiable Moebius, inverse Moebius and OR transforms over ``2**n`` coalition tables.

The compiled transforms (:func:`mechinterp._ops.moebius_`) work in place and are invisible to
autograd. These wrappers run them on a copy in the forward pass and apply the transposed map in
the backward pass: the transpose of the Moebius transform sums over supersets with alternating
signs (``"moebius_adjoint"``), that of its inverse sums over supersets (``"zeta_adjoint"``), so a
gradient costs one more ``O(n 2**n)`` pass instead of a ``2**n x 2**n`` matrix. Backward passes
are themselves differentiable, so second derivatives work too. Tables are 1-D float64 or float32
tensors on cpu or cuda, indexed by coalition bitmask (bit ``i`` = player ``i``).

Examples:
    >>> import torch
    >>> v = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    >>> dividends = differentiable_moebius_transform(v)
    >>> dividends.detach()
    tensor([0., 1., 2., 2.], dtype=torch.float64)
    >>> dividends[3].backward()  # m({0, 1}) = v({0, 1}) - v({0}) - v({1}) + v(empty)
    >>> v.grad
    tensor([ 1., -1., -1.,  1.], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from mechinterp import _ops
from mechinterp.errors import InputError

__all__ = [
    "MoebiusFunction",
    "OrFunction",
    "differentiable_inverse_moebius_transform",
    "differentiable_moebius_transform",
    "differentiable_or_interactions",
]

# Each linear map and its transpose; the transpose of the transpose is the map again.
_TRANSPOSE = {
    "moebius": "moebius_adjoint",
    "moebius_adjoint": "moebius",
    "zeta": "zeta_adjoint",
    "zeta_adjoint": "zeta",
}


def _transformed_copy(table: torch.Tensor, kind: str, op: str) -> torch.Tensor:
    """A contiguous copy of ``table`` transformed by the compiled kernel."""
    n = _ops.players_of_table(table, op, "table")
    _ops.require_memory(op, table.numel() * table.element_size(), table.device,
                        f"a copy of the table for n={n} players")
    copy = table.detach().clone(memory_format=torch.contiguous_format)
    return _ops.moebius_(copy, kind=kind)


class MoebiusFunction(torch.autograd.Function):
    """One of the four subset transforms of :func:`mechinterp._ops.moebius_`, differentiable.

    ``MoebiusFunction.apply(table, kind)`` with ``kind`` one of ``"moebius"``, ``"zeta"``,
    ``"moebius_adjoint"``, ``"zeta_adjoint"``. The map is linear, so the backward pass is the
    transposed kind applied to the incoming gradient, through this same function.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, kind: str) -> torch.Tensor:
        if kind not in _TRANSPOSE:
            msg = f"MoebiusFunction: kind must be one of {sorted(_TRANSPOSE)}, got {kind!r}"
            raise InputError(msg)
        ctx.kind = kind
        return _transformed_copy(table, kind, "MoebiusFunction")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return MoebiusFunction.apply(grad, _TRANSPOSE[ctx.kind]), None


def _or_transpose(grad: torch.Tensor) -> torch.Tensor:
    """The transpose of the OR transform applied to ``grad`` (see :class:`OrFunction`).

    The OR transform is ``x -> -M R x`` with entry 0 replaced by ``x[0]`` (``M`` the Moebius
    matrix, ``R`` the reversal ``x[T] -> x[N minus T]``, which is its own transpose), so its
    transpose is ``y -> -R M^T y'`` plus ``y[0]`` at entry 0, where ``y'`` is ``y`` with entry 0
    zeroed.
    """
    if torch.is_grad_enabled() and grad.requires_grad:
        # Building a graph for second derivatives: out-of-place, differentiable steps only.
        head = torch.zeros_like(grad[:1])
        rest = MoebiusFunction.apply(torch.cat([head, grad[1:]]), "moebius_adjoint")
        out = -rest.flip(0)
        return torch.cat([out[:1] + grad[:1], out[1:]])
    table = grad.detach().clone(memory_format=torch.contiguous_format)
    # Slices, not scalar indexing: writing a Python number into a cuda tensor goes through a host
    # copy, which a CUDA graph cannot capture.
    table[:1].zero_()
    _ops.moebius_(table, kind="moebius_adjoint")
    out = table.flip(0)
    torch.neg(out, out=out)
    out[:1].add_(grad[:1])
    return out


class OrFunction(torch.autograd.Function):
    """The OR interactions of a table (as :func:`mechinterp.interactions.or_interactions`),
    differentiable. ``OrFunction.apply(table)``."""

    @staticmethod
    def forward(ctx, table: torch.Tensor) -> torch.Tensor:
        op = "OrFunction"
        n = _ops.players_of_table(table, op, "table")
        _ops.require_memory(op, table.numel() * table.element_size(), table.device,
                            f"a copy of the table for n={n} players")
        # flip() copies; the negation and the transform then work in place on that copy.
        out = table.detach().flip(0)
        torch.neg(out, out=out)
        _ops.moebius_(out, kind="moebius")
        out[:1].copy_(table[:1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _or_transpose(grad)


def differentiable_moebius_transform(values: torch.Tensor) -> torch.Tensor:
    """Harsanyi dividends ``m(S) = sum_{T subset S} (-1)**(|S|-|T|) v(T)``, with gradients.

    Args:
        values: ``[2**n]`` float64 or float32 values of every coalition (cpu or cuda), any
            strides.

    Returns:
        ``[2**n]`` dividends with the dtype and device of ``values``; differentiable with
        respect to ``values`` (the backward pass is one superset-sum transform).

    Raises:
        ShapeError: ``values`` is not 1-D with a power-of-two length.
        DTypeError: ``values`` is neither float64 nor float32.

    Examples:
        >>> import torch
        >>> v = torch.tensor([1.0, 3.0, 4.0, 10.0], requires_grad=True)
        >>> differentiable_moebius_transform(v).sum().backward()
        >>> v.grad  # d/dv(T) of sum_S m(S) is 1 for T = N, 0 elsewhere
        tensor([0., 0., 0., 1.])
    """
    return MoebiusFunction.apply(values, "moebius")


def differentiable_inverse_moebius_transform(dividends: torch.Tensor) -> torch.Tensor:
    """Values ``v(S) = sum_{T subset S} m(T)`` of the game with these dividends, with gradients.

    Args:
        dividends: ``[2**n]`` float64 or float32 dividends (cpu or cuda), any strides.

    Returns:
        ``[2**n]`` values, differentiable with respect to ``dividends``.

    Examples:
        >>> import torch
        >>> m = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        >>> differentiable_inverse_moebius_transform(m)[3].backward()
        >>> m.grad  # v(N) is the sum of every dividend
        tensor([1., 1., 1., 1.])
    """
    return MoebiusFunction.apply(dividends, "zeta")


def differentiable_or_interactions(values: torch.Tensor) -> torch.Tensor:
    """OR interactions (Li and Zhang, 2023), with gradients.

    ``I_or(empty) = v(empty)`` and ``I_or(S) = -sum_{T subset S} (-1)**(|S|-|T|) v(N minus T)``
    for ``S`` not empty, exactly as :func:`mechinterp.interactions.or_interactions`.

    Args:
        values: ``[2**n]`` float64 or float32 values of every coalition (cpu or cuda), any
            strides.

    Returns:
        ``[2**n]`` OR interactions by coalition bitmask, differentiable with respect to
        ``values``.

    Examples:
        >>> import torch
        >>> v = torch.tensor([0.0, 1.0, 1.0, 1.0], requires_grad=True)  # an OR game
        >>> interactions = differentiable_or_interactions(v)
        >>> interactions.detach()
        tensor([0., 0., 0., 1.])
        >>> interactions[3].backward()  # I_or({0, 1}) = -v(empty) + v({0}) + v({1}) - v(N)
        >>> v.grad
        tensor([-1.,  1.,  1., -1.])
    """
    return OrFunction.apply(values)
