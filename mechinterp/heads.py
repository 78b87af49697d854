"""Find attention heads by what their patterns do: previous-token and induction heads.

On a random token span repeated twice, an induction head at a query in the second repeat attends
to the token just after the same token's earlier occurrence, ``span - 1`` positions back; a
previous-token head attends one position back. Scores are the mean attention on that diagonal,
computed by the compiled ``diagonal_score`` kernel from the ``pattern`` sites of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechinterp import _ops
from mechinterp.errors import InputError
from mechinterp.model import InterpModel, Tokens
from mechinterp.sites import select


@dataclass(frozen=True)
class RepeatedTokens:
    """A batch of ``[bos] + span + span`` sequences; the second span starts at ``second``."""

    tokens: Tokens
    span: int
    second: int  # column of the first token of the second repeat


def repeated_tokens(model: InterpModel, *, batch: int, span: int, seed: int = 0) -> RepeatedTokens:
    """Random spans of ordinary (non-special) tokens, each repeated twice, BOS first if any.

    Examples:
        >>> import mechinterp
        >>> from mechinterp.heads import repeated_tokens
        >>> model = mechinterp.load("induction-2l")
        >>> data = repeated_tokens(model, batch=2, span=5, seed=0)
        >>> data.tokens.shape, data.second
        ((2, 11), 6)
    """
    if batch < 1 or span < 2:
        msg = f"repeated_tokens needs batch >= 1 and span >= 2; got batch={batch}, span={span}"
        raise InputError(msg)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    ordinary = torch.tensor([i for i in range(model.dims.d_vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    chosen = ordinary[torch.randint(len(ordinary), (batch, span), generator=generator)]
    ids = torch.cat([chosen, chosen], dim=1)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos), ids], dim=1)
    offset = 1 if bos is not None else 0
    return RepeatedTokens(Tokens(ids, torch.ones_like(ids)), span, offset + span)


def diagonal_scores(model: InterpModel, inputs: Tokens, *, offset: int, first_query: int = 0
                    ) -> torch.Tensor:
    """Mean attention ``offset`` positions back, for every head: ``[layer, head]`` float32."""
    sites = model.sites(select("pattern"))
    cache = model.cache(inputs, sites)
    return torch.stack([
        _ops.diagonal_score(cache[site], offset=offset, first_query=first_query).float().cpu()
        for site in sites
    ])


def previous_token_scores(model: InterpModel, data: RepeatedTokens) -> torch.Tensor:
    """Attention to the previous token, ``[layer, head]``."""
    return diagonal_scores(model, data.tokens, offset=1, first_query=1)


def induction_scores(model: InterpModel, data: RepeatedTokens) -> torch.Tensor:
    """Attention from the second repeat to the token after the earlier occurrence, ``[layer, head]``."""
    return diagonal_scores(model, data.tokens, offset=data.span - 1, first_query=data.second)


def induction_accuracy(logits: torch.Tensor, data: RepeatedTokens) -> float:
    """Share of second-repeat tokens (after its first) predicted exactly by argmax."""
    ids = data.tokens.input_ids.to(logits.device)
    # Logits at column c predict column c + 1; the second repeat's first token is unpredictable.
    predicted = logits[:, data.second:-1].argmax(-1)
    target = ids[:, data.second + 1:]
    return float((predicted == target).float().mean())


@dataclass(frozen=True)
class InductionPairs:
    """Clean/corrupted prompt pairs whose answer is found by induction.

    Each clean prompt is ``[bos] + span + span[:k + 1]``: its last token ``span[k]`` occurred
    before, followed by ``span[k + 1]``, the answer an induction circuit copies. The corrupted
    prompt replaces that earlier ``span[k + 1]`` (at column ``changed``) by another token, the
    wrong answer, which the circuit then copies instead.
    """

    clean: Tokens
    corrupt: Tokens
    answer: torch.Tensor  # [pair] int64
    wrong: torch.Tensor  # [pair] int64
    changed: int  # column of the replaced token


def induction_pairs(model: InterpModel, *, pairs: int, span: int, k: int, seed: int = 0
                    ) -> InductionPairs:
    """Prompt pairs for patching an induction circuit (see :class:`InductionPairs`).

    Examples:
        >>> import mechinterp
        >>> from mechinterp.heads import induction_pairs
        >>> model = mechinterp.load("induction-2l")
        >>> data = induction_pairs(model, pairs=3, span=8, k=4, seed=0)
        >>> data.clean.shape, data.changed, bool((data.answer != data.wrong).all())
        ((3, 14), 6, True)
    """
    if not 0 <= k < span - 1:
        msg = f"k must lie in [0, span - 1) = [0, {span - 1}); got {k}"
        raise InputError(msg)
    data = repeated_tokens(model, batch=pairs, span=span, seed=seed)
    first = data.second - span  # column of span[0]
    clean_ids = data.tokens.input_ids[:, :data.second + k + 1]
    changed = first + k + 1
    answer = clean_ids[:, changed].clone()
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    generator = torch.Generator().manual_seed(seed + 1)
    wrong = answer.clone()
    for row in range(pairs):
        # A token absent from the row, so the corrupted prompt has one clear induction target.
        present = set(clean_ids[row].tolist()) | special
        candidates = [t for t in range(model.dims.d_vocab) if t not in present]
        wrong[row] = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    corrupt_ids = clean_ids.clone()
    corrupt_ids[:, changed] = wrong
    mask = torch.ones_like(clean_ids)
    return InductionPairs(Tokens(clean_ids, mask), Tokens(corrupt_ids, mask.clone()), answer, wrong,
                          changed)
