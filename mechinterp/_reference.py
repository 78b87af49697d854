"""Slow pure-PyTorch twins of the kernels in :mod:`mechinterp._ops`.

Each twin computes in float64 with plain indexing, as directly from the definition as possible,
then casts to the dtype the kernel returns. Tests hold the kernels to these.
"""

from __future__ import annotations

import torch

__all__ = ["diagonal_score"]


def diagonal_score(pattern: torch.Tensor, *, offset: int, first_query: int = 0) -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.diagonal_score`: ``[batch, head, query, query] -> [head]``."""
    batch, heads, query, key = pattern.shape
    if key != query:
        msg = f"diagonal_score: pattern must have key == query, got shape {tuple(pattern.shape)}"
        raise ValueError(msg)
    start = max(first_query, offset)
    if start >= query or batch == 0:
        msg = (
            "diagonal_score: nothing to average over, got "
            f"first_query={first_query}, offset={offset}, shape {tuple(pattern.shape)}"
        )
        raise ValueError(msg)
    q = torch.arange(start, query, device=pattern.device)
    scores = pattern.to(torch.float64)[:, :, q, q - offset]  # [batch, head, n_query]
    out = scores.mean(dim=(0, 2))
    return out.to(torch.float64 if pattern.dtype == torch.float64 else torch.float32)
