"""Token positions relative to each row's real tokens, so padding never shifts a site.

A batch may be padded on the left (decoders) or the right (encoders). Position ``p >= 0`` means
the ``p``-th real token of a row and ``p < 0`` counts back from its last real token, so
``pos=-1`` is the final prompt token of every row whichever side was padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechinterp.errors import SiteError
from mechinterp.sites import Index


@dataclass(frozen=True)
class RowSpans:
    """Where each row's real tokens lie: ``[start, start + length)`` along the sequence."""

    start: torch.Tensor  # [batch] int64
    length: torch.Tensor  # [batch] int64
    seq_len: int
    uniform: bool  # every row is unpadded, so positions map to the same column in every row

    @staticmethod
    def from_mask(attention_mask: torch.Tensor) -> RowSpans:
        # One copy to the host (a mask is small), instead of a wait for each reduction's result.
        mask = attention_mask.to("cpu", torch.bool)
        length = mask.sum(dim=1)
        # The first real column: argmax of the boolean mask finds the first True.
        start = mask.to(torch.int8).argmax(dim=1).to(torch.int64)
        seq_len = attention_mask.shape[1]
        uniform = bool((length == seq_len).all())
        return RowSpans(start, length, seq_len, uniform)

    def columns(self, pos: Index, rows: torch.Tensor | None = None) -> torch.Tensor | int | slice:
        """Sequence columns of ``pos`` for each row.

        Returns an int when every row agrees (no padding), else an int64 tensor ``[rows]`` for
        an int position or ``[rows, k]`` for a tuple of positions.
        """
        if pos is None:
            return slice(None)
        start, length = self.start, self.length
        if rows is not None:
            start, length = start[rows], length[rows]
        wanted = torch.tensor([pos] if isinstance(pos, int) else list(pos), dtype=torch.int64)
        shortest = int(length.min())
        bad = [p for p in wanted.tolist() if not -shortest <= p < shortest]
        if bad:
            msg = (
                f"pos must lie in [{-shortest}, {shortest}) for a batch whose shortest row has "
                f"{shortest} tokens; got pos={bad[0]}"
            )
            raise SiteError(msg)
        if self.uniform and isinstance(pos, int):
            return pos if pos >= 0 else self.seq_len + pos
        cols = torch.where(wanted >= 0, start[:, None] + wanted, start[:, None] + length[:, None] + wanted)
        return cols[:, 0] if isinstance(pos, int) else cols

    def int_columns(self, positions: Sequence[int]) -> np.ndarray:
        """Columns ``[len(positions), rows]`` of many int positions at once, checked as
        :meth:`columns` checks them."""
        wanted = np.asarray(positions, dtype=np.int64).reshape(-1, 1)
        length = self.length.numpy()
        shortest = int(length.min()) if length.size else 0
        bad = wanted[(wanted < -shortest) | (wanted >= shortest)]
        if bad.size:
            msg = (
                f"pos must lie in [{-shortest}, {shortest}) for a batch whose shortest row has "
                f"{shortest} tokens; got pos={int(bad[0])}"
            )
            raise SiteError(msg)
        start = self.start.numpy()[None, :]
        return np.where(wanted >= 0, start + wanted, start + length[None, :] + wanted)
