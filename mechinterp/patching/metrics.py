"""Metrics: how a patched run is scored, one number per run from the logits at one position.

Built-in metrics reduce the logits in one fused pass (:func:`mechinterp._ops.patch_metric`, no
log-softmax materialised); any callable ``metric(logits, pairs) -> [rows]`` works too, where
``logits`` is ``[rows, vocab]`` at the scored position and ``pairs[i]`` (on the logits' device) is
the prompt pair that run ``i`` belongs to.

Answers are token ids or single-token strings: one for every pair, or one per pair.

Examples:
    >>> import torch
    >>> from mechinterp.patching import LogitDiff
    >>> metric = LogitDiff(answer=[2, 0], wrong=1).bind(None, n_pairs=2)
    >>> metric(torch.tensor([[0.0, 1.0, 3.0], [5.0, 1.0, 0.0]]), torch.tensor([0, 1]), None)
    tensor([2., 4.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mechinterp import _ops
from mechinterp.errors import InputError, ShapeError

Answer = int | str | Sequence[int | str] | torch.Tensor


class Metric:
    """Base class. :meth:`bind` resolves answers for a model; calling scores runs."""

    name = "metric"

    def bind(self, model: object, n_pairs: int) -> Metric:
        """Resolve string answers with ``model``'s tokenizer and check them against its vocabulary."""
        return self

    def __call__(self, logits: torch.Tensor, pairs: torch.Tensor,
                 clean: torch.Tensor | None) -> torch.Tensor:
        """``[rows]`` scores of runs with final logits ``[rows, vocab]`` from prompt ``pairs``.

        ``clean`` holds the clean runs' logits ``[pair, vocab]`` at the same position.
        """
        raise NotImplementedError

    def differentiable(self, logits: torch.Tensor, pairs: torch.Tensor,
                       clean: torch.Tensor | None) -> torch.Tensor:
        """The same scores through autograd-tracked torch operations (for gradients)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _token_ids(model: object, answer: Answer, n_pairs: int, name: str) -> torch.Tensor:
    """``[n_pairs]`` int64 ids from an id, a single-token string, or one of those per pair."""
    if isinstance(answer, torch.Tensor):
        items = answer.reshape(-1).tolist() if answer.dim() else [int(answer)]
    elif isinstance(answer, (int, str)):
        items = [answer]
    else:
        items = list(answer)
    if len(items) == 1:
        items = items * n_pairs
    if len(items) != n_pairs:
        msg = f"{name} must be one token or one per prompt pair ({n_pairs}); got {len(items)}"
        raise ShapeError(msg)
    ids = [token_id(model, item, name) for item in items]
    return torch.tensor(ids, dtype=torch.int64)


def token_id(model: object, value: object, name: str) -> int:
    """A token id from an id (an int, or an integer tensor of one element) or a single-token
    string, checked against the model's vocabulary when it has one."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            msg = f"{name} {value!r} is a string but the model has no tokenizer; pass token ids"
            raise InputError(msg)
        found = tokenizer(value, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            msg = f"{name} {value!r} must be a single token; the tokenizer gives {found}"
            raise InputError(msg)
        value = found[0]
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must hold token ids (int) or strings; got {type(value).__name__} {value!r}"
        raise InputError(msg)
    vocab = getattr(getattr(model, "dims", None), "d_vocab", None)
    if vocab is not None and not 0 <= value < vocab:
        msg = f"{name} token ids must lie in [0, {vocab}); got {value}"
        raise InputError(msg)
    return value


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; narrower floats compute in float32, as the fused kernel does."""
    return x if x.dtype == torch.float64 else x.float()


def _describe(answer: Answer) -> str:
    if isinstance(answer, torch.Tensor):
        return repr(answer.tolist())
    return repr(answer if isinstance(answer, (int, str)) else list(answer))


class LogitDiff(Metric):
    """``z[answer] - z[wrong]``: the logit difference between the right and a wrong answer."""

    name = "logit_diff"

    def __init__(self, answer: Answer, wrong: Answer):
        self.answer, self.wrong = answer, wrong
        self._ids: torch.Tensor | None = None

    def bind(self, model: object, n_pairs: int) -> LogitDiff:
        bound = LogitDiff(self.answer, self.wrong)
        bound._ids = torch.stack([_token_ids(model, self.answer, n_pairs, "answer"),
                                  _token_ids(model, self.wrong, n_pairs, "wrong")], dim=1)
        return bound

    def __call__(self, logits, pairs, clean):
        assert self._ids is not None, "bind the metric first"
        return _ops.patch_metric(logits, "logit_diff", self._ids[pairs.cpu()])

    def differentiable(self, logits, pairs, clean):
        assert self._ids is not None, "bind the metric first"
        ids = self._ids.to(logits.device)[pairs]
        rows = torch.arange(logits.shape[0], device=logits.device)
        return _wide(logits[rows, ids[:, 0]]) - _wide(logits[rows, ids[:, 1]])

    def __repr__(self) -> str:
        return f"LogitDiff(answer={_describe(self.answer)}, wrong={_describe(self.wrong)})"


class LogProb(Metric):
    """``log p(answer)`` at the scored position."""

    name = "logprob"

    def __init__(self, answer: Answer):
        self.answer = answer
        self._ids: torch.Tensor | None = None

    def bind(self, model: object, n_pairs: int) -> LogProb:
        bound = type(self)(self.answer)
        ids = _token_ids(model, self.answer, n_pairs, "answer")
        bound._ids = torch.stack([ids, torch.zeros_like(ids)], dim=1)
        return bound

    def __call__(self, logits, pairs, clean):
        assert self._ids is not None, "bind the metric first"
        return _ops.patch_metric(logits, self.name, self._ids[pairs.cpu()])

    def differentiable(self, logits, pairs, clean):
        assert self._ids is not None, "bind the metric first"
        ids = self._ids.to(logits.device)[pairs, 0]
        rows = torch.arange(logits.shape[0], device=logits.device)
        logprob = _wide(logits).log_softmax(-1)[rows, ids]
        return logprob.exp() if self.name == "prob" else logprob

    def __repr__(self) -> str:
        return f"{type(self).__name__}(answer={_describe(self.answer)})"


class Prob(LogProb):
    """``p(answer)`` at the scored position."""

    name = "prob"


class KL(Metric):
    """``KL(p_clean || p_patched)`` at the scored position: 0 for the clean run."""

    name = "kl"

    def __call__(self, logits, pairs, clean):
        if clean is None:
            msg = "KL needs the clean run's logits"
            raise InputError(msg)
        index = torch.stack([pairs.cpu(), torch.zeros_like(pairs.cpu())], dim=1)
        return _ops.patch_metric(logits, "kl", index, ref=clean.to(logits.dtype))

    def differentiable(self, logits, pairs, clean):
        if clean is None:
            msg = "KL needs the clean run's logits"
            raise InputError(msg)
        ref = _wide(clean).log_softmax(-1)[pairs]
        terms = ref.exp() * (ref - _wide(logits).log_softmax(-1))
        return torch.where(ref.exp() > 0, terms, 0.0).sum(-1)


class CallableMetric(Metric):
    """A user function ``metric(logits [rows, vocab], pairs [rows]) -> [rows]``."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, logits, pairs, clean):
        out = self.fn(logits, pairs.to(logits.device))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (logits.shape[0],):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            msg = (
                f"metric {self.name!r} must return a tensor [rows] = [{logits.shape[0]}] (one value "
                f"per run, given logits [rows, vocab] and pairs [rows]); got {got}"
            )
            raise ShapeError(msg)
        return out.detach().float() if out.dtype != torch.float64 else out.detach()

    def differentiable(self, logits, pairs, clean):
        return self.fn(logits, pairs.to(logits.device))

    def __repr__(self) -> str:
        return f"CallableMetric({self.name})"


def as_metric(metric: Metric | Callable) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return CallableMetric(metric)
    msg = (
        f"metric must be a Metric (LogitDiff, LogProb, Prob, KL) or a callable "
        f"(logits, pairs) -> [rows]; got {type(metric).__name__}"
    )
    raise InputError(msg)
