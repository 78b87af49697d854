"""Causal tracing with ROME's semantics: noise the subject, restore states, measure recovery.

Examples:
    >>> import mechinterp
    >>> from mechinterp.tracing import causal_trace
    >>> model = mechinterp.load("induction-2l")
    >>> trace = causal_trace(model, "fuba bu mabi fuba", subject="bu", kinds=("hidden",),
    ...                      samples=4, progress=False)
    >>> trace.scores.shape  # [kind, pos, layer]
    torch.Size([1, 5, 2])
"""

from mechinterp.tracing.result import TraceResult
from mechinterp.tracing.trace import KINDS, causal_trace, embedding_noise_scale

__all__ = ["KINDS", "TraceResult", "causal_trace", "embedding_noise_scale"]
