"""An eager attention function that exposes the attention probabilities as a site.

transformers computes attention inside a function chosen by ``config._attn_implementation``;
the probabilities never cross a module boundary, so no hook can reach them. For a forward that
reads or writes ``pattern`` sites, mechinterp switches the model to this function, which is
eager attention with one extra step: it hands the probabilities of each attention module to the
callback registered for that module in the current forward.

The function is registered with transformers under :data:`IMPLEMENTATION` on first use (not at
import) and only selected for the forwards that need it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn

IMPLEMENTATION = "mechinterp_pattern"

PatternCallback = Callable[[torch.Tensor], torch.Tensor]

_callbacks: contextvars.ContextVar[dict[int, PatternCallback] | None] = contextvars.ContextVar(
    "mechinterp_pattern_callbacks", default=None
)
_registered = False


def pattern_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over ``[batch, head, pos, d_head]`` tensors, exposing the probabilities."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    callbacks = _callbacks.get()
    if callbacks is not None and id(module) in callbacks:
        probs = callbacks[id(module)](probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, pattern_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    _registered = True


def _configs(model: nn.Module) -> list[object]:
    """Every config object whose attention implementation the model's modules read."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def exposing_patterns(model: nn.Module, callbacks: dict[int, PatternCallback]) -> Iterator[None]:
    """Run the enclosed forward with :func:`pattern_attention` and the given callbacks."""
    _register()
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    token = _callbacks.set(callbacks)
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
        _callbacks.reset(token)
