"""Slow pure-PyTorch twins of the kernels in :mod:`mechinterp._ops`.

Each twin computes in float64 with plain indexing, as directly from the definition as possible,
then casts to the dtype the kernel returns. Tests hold the kernels to these.
"""

from __future__ import annotations

import math

import torch

__all__ = ["diagonal_score", "fill_noise", "patch_boxes", "patch_metric", "philox4x32"]


def diagonal_score(pattern: torch.Tensor, *, offset: int, first_query: int = 0) -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.diagonal_score`: ``[batch, head, query, query] -> [head]``."""
    batch, _, query, key = pattern.shape
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


def patch_boxes(dest: torch.Tensor, src: torch.Tensor, boxes: torch.Tensor, *,
                alpha: float | torch.Tensor = 1.0, cur: torch.Tensor | None = None) -> None:
    """Twin of :func:`mechinterp._ops.patch_boxes`, one box at a time, in place."""
    weights = torch.as_tensor(alpha, dtype=torch.float64).expand(boxes.shape[0])
    for (row, source, a0, a1, f0, f1), weight in zip(boxes.tolist(), weights.tolist()):
        here = dest[row, a0:a1, f0:f1]
        new = src[source, a0:a1, f0:f1]
        if cur is None and weight == 1.0:
            here.copy_(new)
            continue
        wide = torch.float64 if dest.dtype == torch.float64 else torch.float32
        base = here if cur is None else cur[row, a0:a1, f0:f1]
        here.copy_(here.to(wide) + weight * (new.to(wide) - base.to(wide)))


def patch_metric(logits: torch.Tensor, kind: str, index: torch.Tensor, *,
                 ref: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.patch_metric`, through ``log_softmax`` in float64."""
    z = logits.to(torch.float64)
    rows = torch.arange(z.shape[0], device=z.device)
    first, second = index[:, 0].to(z.device), index[:, 1].to(z.device)
    if kind == "logit_diff":
        out = z[rows, first] - z[rows, second]
    elif kind in ("logprob", "prob"):
        out = z.log_softmax(-1)[rows, first]
        out = out.exp() if kind == "prob" else out
    elif kind == "kl":
        assert ref is not None
        ref_logprob = ref.to(torch.float64).log_softmax(-1)[first]
        ref_prob = ref_logprob.exp()
        terms = ref_prob * (ref_logprob - z.log_softmax(-1))
        out = torch.where(ref_prob > 0, terms, 0.0).sum(-1)  # 0 log 0 = 0
    else:
        msg = f"patch_metric: unknown kind {kind!r}"
        raise ValueError(msg)
    return out.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


_MASK32 = 0xFFFFFFFF


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = 10
               ) -> tuple[int, int, int, int]:
    """Philox4x32 (Salmon et al., SC 2011) on one 128-bit counter, in plain Python integers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK32, p1 & _MASK32, \
            ((p0 >> 32) ^ c3 ^ k1) & _MASK32, p0 & _MASK32
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def fill_noise(out: torch.Tensor, *, seed: int, kind: str = "gaussian", offset: int = 0) -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.fill_noise`, one element at a time (slow: small sizes)."""
    key = (seed & _MASK32, seed >> 32)
    values = []
    for index in range(offset, offset + out.numel()):
        r = philox4x32(((index >> 1) & _MASK32, (index >> 1) >> 32, 0, 0), key)
        u1 = (((r[0] << 21) ^ (r[1] >> 11)) & ((1 << 53) - 1)) / 2.0**53
        u2 = (((r[2] << 21) ^ (r[3] >> 11)) & ((1 << 53) - 1)) / 2.0**53
        second = index & 1
        if kind == "uniform":
            values.append(2.0 * (u2 if second else u1) - 1.0)
            continue
        radius = math.sqrt(-2.0 * math.log(1.0 - u1))
        angle = 6.283185307179586 * u2
        values.append(radius * (math.sin(angle) if second else math.cos(angle)))
    wide = torch.tensor(values, dtype=torch.float64).reshape(out.shape)
    narrow = wide if out.dtype in (torch.float64, torch.float32) else wide.float()
    out.copy_(narrow)
    return out
