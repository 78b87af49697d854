"""Attention probabilities of diffusers attention modules, exposed as ``pattern`` sites.

A diffusers ``Attention`` module hands its work to a processor object, by default one that calls
``scaled_dot_product_attention``, so the probabilities never exist as a tensor. For a forward
that reads or writes a pattern, mechinterp swaps in diffusers' own eager processor
(``AttnProcessor``), which computes them with the module's ``get_attention_scores``, and wraps
that method on the instance so that the probabilities ``[batch, head, query, key]`` pass through
the site's callback. Both are put back afterwards. The eager path rounds differently from the
fused one, so a forward that touches a pattern is not bit-identical to one that does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

PatternCallback = Callable[[torch.Tensor], torch.Tensor]
_MISSING = object()


def is_processor_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module that delegates to a diffusers processor."""
    return hasattr(module, "processor") and hasattr(module, "get_attention_scores") \
        and hasattr(module, "set_processor")


@contextlib.contextmanager
def exposing_processor_patterns(
        targets: Sequence[tuple[nn.Module, PatternCallback]]) -> Iterator[None]:
    """Run the enclosed forward with each module's probabilities passed through its callback."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = []
    try:
        for module, callback in targets:
            saved.append((module, module.__dict__.get("processor", _MISSING)))
            # Straight into the instance dictionary, not set_processor (which logs) nor
            # nn.Module's setattr (which refuses to replace a processor that is a module).
            module.__dict__["processor"] = AttnProcessor()
            module.__dict__["get_attention_scores"] = _exposing(module, callback)
        yield
    finally:
        for module, processor in reversed(saved):
            if processor is _MISSING:
                del module.__dict__["processor"]
            else:
                module.__dict__["processor"] = processor
            module.__dict__.pop("get_attention_scores", None)


def _exposing(module: nn.Module, callback: PatternCallback):
    scores = type(module).get_attention_scores
    heads = module.heads

    def get_attention_scores(query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        probs = scores(module, query, key, attention_mask)  # [batch * head, query, key]
        shaped = probs.unflatten(0, (-1, heads))
        return callback(shaped).flatten(0, 1)

    return get_attention_scores
