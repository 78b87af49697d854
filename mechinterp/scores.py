"""The check of what a user's scoring callable returns (a metric of generations, a game's
output of logits): one score per row, as a tensor."""

from __future__ import annotations

import torch

from mechinterp.errors import DTypeError, ShapeError


def checked_scores(values: object, rows: int, *, name: str, given: str, each: str,
                   floating: bool = False) -> torch.Tensor:
    """``values`` if it is a ``[rows]`` tensor (floating, with ``floating``), else a clear
    error naming ``name``, what it was ``given`` and what each score stands for."""
    if not isinstance(values, torch.Tensor) or values.shape != (rows,):
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        msg = (f"{name} must map {given} to a tensor of shape [{rows}] (one score per {each}); "
               f"got {got}")
        raise ShapeError(msg)
    if floating and not values.is_floating_point():
        msg = f"{name} must return floating scores; got {values.dtype}"
        raise DTypeError(msg)
    return values
