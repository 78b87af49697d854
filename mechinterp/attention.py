"""An eager attention function that exposes the attention probabilities as a site.

transformers computes attention inside a function chosen by ``config._attn_implementation``;
the probabilities never cross a module boundary, so no hook can reach them. For a forward that
reads or writes ``pattern`` sites, mechinterp switches the model to this function, which is
eager attention with one extra step: it hands the probabilities of each attention module to the
callback registered for that module in the current forward.

A forward can also ask for what the probabilities were computed from (:func:`exposing_inputs`):
the queries and keys after the rotary embedding, the scaling and the mask, which no module
boundary holds either. Attribution patching recomputes the softmax from them (the QK fix).

The function is registered with transformers under :data:`IMPLEMENTATION` on first use (not at
import) and only selected for the forwards that need it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

IMPLEMENTATION = "mechinterp_pattern"

PatternCallback = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionInputs:
    """What one attention module computed its probabilities from, and the probabilities.

    Attributes:
        query: ``[batch, head, query, d_head]`` queries as the scores see them (after any rotary
            embedding).
        key: ``[batch, kv_head, key, d_head]`` keys likewise, one per key/value head: with
            grouped-query attention each serves ``head / kv_head`` consecutive query heads.
        scaling: the factor of the scores ``query . key``.
        mask: the additive mask ``[batch, 1 or head, query, key]`` added to the scaled scores,
            or None.
        probs: ``[batch, head, query, key]`` the probabilities the module went on with (after
            any pattern callback).
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    mask: torch.Tensor | None
    probs: torch.Tensor


InputsCallback = Callable[[AttentionInputs], None]

_callbacks: contextvars.ContextVar[dict[int, PatternCallback] | None] = contextvars.ContextVar(
    "mechinterp_pattern_callbacks", default=None
)
# Separate from the pattern callbacks so that a forward reading attention inputs can also read
# or write pattern sites: the engine sets the pattern callbacks inside this forward.
_input_callbacks: contextvars.ContextVar[dict[int, InputsCallback] | None] = (
    contextvars.ContextVar("mechinterp_attention_input_callbacks", default=None)
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
    shared_key = key
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    if mask is not None:
        scores = scores + mask
    # At least float32, as transformers' eager attention, without rounding float64 models down.
    precision = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=precision).to(query.dtype)
    callbacks = _callbacks.get()
    if callbacks is not None and id(module) in callbacks:
        probs = callbacks[id(module)](probs)
    readers = _input_callbacks.get()
    if readers is not None and id(module) in readers:
        readers[id(module)](AttentionInputs(query, shared_key, scaling, mask, probs))
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
def _selected(model: nn.Module) -> Iterator[None]:
    """Select :func:`pattern_attention` for the enclosed forward, then restore what was there."""
    _register()
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation


@contextlib.contextmanager
def exposing_patterns(model: nn.Module, callbacks: dict[int, PatternCallback]) -> Iterator[None]:
    """Run the enclosed forward with :func:`pattern_attention` and the given callbacks."""
    token = _callbacks.set(callbacks)
    try:
        with _selected(model):
            yield
    finally:
        _callbacks.reset(token)


@contextlib.contextmanager
def exposing_inputs(model: nn.Module, callbacks: dict[int, InputsCallback]) -> Iterator[None]:
    """Run the enclosed forward with :func:`pattern_attention`, handing each attention module's
    :class:`AttentionInputs` to the callback registered under ``id(module)``.

    Pattern callbacks (:func:`exposing_patterns`) still apply inside, and the inputs a callback
    receives carry the probabilities after them.
    """
    token = _input_callbacks.set(callbacks)
    try:
        with _selected(model):
            yield
    finally:
        _input_callbacks.reset(token)
