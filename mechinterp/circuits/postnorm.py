"""Source contributions through post-LayerNorm blocks (BERT, RoBERTa).

A post-LayerNorm block renormalises the residual sum after each sublayer,
``x' = LN(x + f(x))``, so the residual stream is not the sum of what its sources wrote. It is
the sum of their *contributions*: with the scale ``sigma`` (one per row and position) taken from
the run, a LayerNorm is an affine map of its input,
``LN(x) = g * (x - mean(x)) / sigma + b``, and each source's output reaches a later reader
pushed through the LayerNorms in between, linearised at that run's own scales. The constant
terms (the LayerNorm biases and the attention output bias, which no head owns) belong to
``embed``, the source of everything that is not a head or an MLP. The contributions of a run
sum exactly to its residual stream at every read point, so patching every edge of a reader
gives it the other run's input.

A *ledger* holds the contributions ``[batch, source, pos, d_model]`` of the sources written so
far. It grows when a head or MLP writes and is renormalised at every LayerNorm. The residual
stream is read at ``2 * n_layers + 1`` points: before each block (its heads' queries, keys and
values), after each block's attention LayerNorm (its MLP), and after the last block (the
logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PostNormStream:
    """The LayerNorms and biases of a post-LayerNorm model's residual stream.

    Attributes:
        norms: the stream's LayerNorms in order: block 0's attention and MLP LayerNorms, then
            block 1's, and so on.
        attn_outputs: each block's attention output projection, whose bias no head owns.
        heads: heads per block.
    """

    norms: tuple[nn.LayerNorm, ...]
    attn_outputs: tuple[nn.Module, ...]
    heads: int

    @property
    def n_reads(self) -> int:
        return len(self.norms) + 1

    @staticmethod
    def scale(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """``[batch, pos]`` the LayerNorm's divisor for input ``x`` ``[batch, pos, d_model]``."""
        return (x.var(dim=-1, unbiased=False) + norm.eps).sqrt()

    @staticmethod
    def normalise(ledger: torch.Tensor, norm: nn.LayerNorm, scale: torch.Tensor) -> torch.Tensor:
        """The ledger after LayerNorm ``norm`` whose divisor in this run is ``scale``."""
        centred = ledger - ledger.mean(dim=-1, keepdim=True)
        out = centred / scale[:, None, :, None].to(ledger.dtype)
        if norm.weight is not None:
            out = out * norm.weight.to(ledger.dtype)
        if norm.bias is not None:
            out = torch.cat([out[:, :1] + norm.bias.to(ledger.dtype), out[:, 1:]], dim=1)
        return out

    @staticmethod
    def write(ledger: torch.Tensor, written: torch.Tensor, constant: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The ledger with new sources ``written`` ``[batch, n, pos, d_model]`` appended and an
        unowned ``constant`` (a bias) credited to ``embed``."""
        if constant is not None:
            ledger = torch.cat([ledger[:, :1] + constant.to(ledger.dtype), ledger[:, 1:]], dim=1)
        if written.shape[0] != ledger.shape[0]:
            written = written.expand(ledger.shape[0], *written.shape[1:])
        return torch.cat([ledger, written.to(ledger.dtype)], dim=1)

    def ledgers(self, sources: torch.Tensor, scales: torch.Tensor) -> Iterator[torch.Tensor]:
        """A run's ledger at each read point, from the source outputs it recorded
        ``[batch, source, pos, d_model]`` and its LayerNorm divisors ``[batch, norm, pos]``."""
        ledger = sources[:, :1]
        yield ledger
        for layer, projection in enumerate(self.attn_outputs):
            first = 1 + layer * (self.heads + 1)
            ledger = self.write(ledger, sources[:, first:first + self.heads],
                                getattr(projection, "bias", None))
            ledger = self.normalise(ledger, self.norms[2 * layer], scales[:, 2 * layer])
            yield ledger
            ledger = self.write(ledger, sources[:, first + self.heads:first + self.heads + 1])
            ledger = self.normalise(ledger, self.norms[2 * layer + 1], scales[:, 2 * layer + 1])
            yield ledger
