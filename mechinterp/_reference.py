"""Slow pure-PyTorch twins of the kernels in :mod:`mechinterp._ops`.

Each twin computes in float64 with plain indexing, as directly from the definition as possible,
then casts to the dtype the kernel returns. Tests hold the kernels to these.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "diagonal_score",
    "fill_noise",
    "moebius_",
    "patch_boxes",
    "patch_metric",
    "philox4x32",
    "superset_weighted_sums",
]


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


def _popcount(masks: torch.Tensor, n: int) -> torch.Tensor:
    return sum(((masks >> i) & 1 for i in range(n)), torch.zeros_like(masks))


def moebius_(table: torch.Tensor, *, kind: str = "moebius") -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.moebius_`, from the definition (``O(4**n)``: n <= 12).

    Each output is a row of the dense matrix of the map (``[T subset S]`` or ``[T superset S]``,
    times ``(-1)**(|S| - |T|)`` for the Moebius maps) times the table, a block of rows at a time.
    """
    n = table.shape[0].bit_length() - 1
    masks = torch.arange(2**n, device=table.device)
    superset = kind in ("moebius_adjoint", "zeta_adjoint")
    negate = kind in ("moebius", "moebius_adjoint")
    # (-1)**(|S| - |T|) = (-1)**|S| * (-1)**|T|
    parity = (1 - 2 * (_popcount(masks, n) % 2)).to(torch.float64)
    x = table.to(torch.float64) * parity if negate else table.to(torch.float64)
    out = torch.empty_like(x)
    for start in range(0, 2**n, 256):
        rows = masks[start:start + 256, None]  # the output coalitions S
        cols = masks[None, :]  # the coalitions T summed over
        related = (rows & ~cols) == 0 if superset else (cols & ~rows) == 0
        out[start:start + 256] = related.to(torch.float64) @ x
    if negate:
        out *= parity
    table.copy_(out)
    return table


def superset_weighted_sums(dividends: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`mechinterp._ops.superset_weighted_sums`: every (superset, subset) pair."""
    from mechinterp.interactions.subsets import subset_masks

    n = dividends.shape[0].bit_length() - 1
    order = weights.shape[1] - 1
    device = dividends.device
    coalitions = torch.arange(2**n, device=device)
    coalition_sizes = _popcount(coalitions, n)
    subsets = subset_masks(n, order).to(device)
    subset_sizes = _popcount(subsets, n)
    w = weights.to(device=device, dtype=torch.float64)
    x = dividends.to(torch.float64)
    out = torch.empty(subsets.shape[0], dtype=torch.float64, device=device)
    for size in range(order + 1):
        weighted = w[coalition_sizes, size] * x  # dividends[S] * weights[|S|, size]
        rows = torch.nonzero(subset_sizes == size).flatten()
        for start in range(0, rows.shape[0], 256):
            chunk = rows[start:start + 256]
            t = subsets[chunk, None]
            contains = (coalitions[None, :] & t) == t
            out[chunk] = contains.to(torch.float64) @ weighted
    return out.to(dividends.dtype)
