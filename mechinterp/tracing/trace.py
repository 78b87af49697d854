"""Causal tracing (Meng et al., ROME): which hidden states carry a fact about the subject.

The subject tokens' embeddings get Gaussian noise (the same ``samples`` noise draws for every
run; in a multimodal model, the language model's input embeddings, so that a subject of image
tokens is noised after the image features replace them); then, one (token, layer) at a time, a
state is restored to its clean value and the probability of the clean answer at the last
position is measured, averaged over the draws.

Kinds of state, per (token, layer):
- ``hidden``: the block output (``resid_post``);
- ``mlp`` / ``attn``: the MLP / attention outputs of a window of layers around it
  (``[layer - window // 2, layer + ceil(window / 2))``, clipped), as ROME restores them;
- ``hidden-no-mlp`` / ``hidden-no-attn``: the block output restored while every later layer's
  MLP (attention) output stays at its noised value, at every token: ROME's severed paths.

Runs are batched like activation-patching sweeps: the clean and noised runs ride in the first
forward, and blocks below a batch's first restored layer return the noised run's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mechinterp import _ops
from mechinterp.errors import InputError, ShapeError
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, Tokens
from mechinterp.patching.metrics import Prob
from mechinterp.patching.sweep import _Sweep
from mechinterp.sites import Site
from mechinterp.tracing.result import TraceResult

KINDS = ("hidden", "mlp", "attn", "hidden-no-mlp", "hidden-no-attn")
_RESTORED = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out",
             "hidden-no-mlp": "resid_post", "hidden-no-attn": "resid_post"}
_FROZEN = {"hidden-no-mlp": "mlp_out", "hidden-no-attn": "attn_out"}


def embedding_noise_scale(model: InterpModel, factor: float = 3.0) -> float:
    """``factor`` times the standard deviation of the token-embedding matrix's entries.

    ROME scales its noise by 3 standard deviations of subject-token embeddings over a dataset;
    without a dataset, the whole embedding matrix stands in for it.
    """
    path = model.table.place("embed").path.format(base=model.base, layer=None)
    weight = getattr(model._module.get_submodule(path), "weight", None)
    if weight is None:
        msg = f"the embedding module {path!r} has no weight; pass noise= explicitly"
        raise InputError(msg)
    return factor * float(weight.detach().float().std())


def noised_site(model: InterpModel) -> Site:
    """Where the subject's noise goes: the token embeddings (ROME's choice), or, in a
    multimodal model whose image features replace the image tokens' embeddings
    (``projector``), the language model's input after that merge, so that image tokens can be
    noised too."""
    if "projector" in model.table.places:
        return Site("resid_pre", layer=0)
    return Site("embed")


def causal_trace(
    model: InterpModel,
    prompt: Inputs,
    subject: str | tuple[int, int],
    *,
    kinds: Sequence[str] = ("hidden", "mlp", "attn"),
    samples: int = 10,
    noise: float | None = None,
    uniform: bool = False,
    multivariate: bool = False,
    replace: bool = False,
    window: int = 10,
    answer: int | str | None = None,
    seed: int = 0,
    draws: torch.Tensor | None = None,
    batch_size: int | None = None,
    reuse: bool = True,
    progress: bool = True,
) -> TraceResult:
    """Trace how the answer to ``prompt`` recovers when each (token, layer) state is restored.

    Args:
        model: a model from :func:`mechinterp.load`.
        prompt: one prompt (a string, one row of token ids, or :class:`Tokens` of one row).
        subject: the noised tokens: a substring of the prompt (its first occurrence), or a
            range of positions ``(begin, end)`` counted like ``Site.pos``, ``end`` exclusive.
        kinds: any of :data:`KINDS`.
        samples: noise draws, each a row of every run.
        noise: the noise's standard deviation (the half-width for ``uniform``); by default
            :func:`embedding_noise_scale` (3 standard deviations of the embeddings).
        uniform: draw from ``U[-noise, noise)`` instead of ``N(0, noise^2)``.
        multivariate: draw from the Gaussian fitted to the rows of the embedding matrix (its
            mean and covariance: ROME's multivariate option, with the embedding matrix standing
            in for a dataset's subject embeddings); ``noise`` must then be left unset.
        replace: replace the subject's embeddings by the draws instead of adding them.
        window: layers restored together for ``mlp`` and ``attn``.
        answer: the token whose probability is measured; by default the clean prediction.
        seed: the noise's seed (the same seed gives the same noise on a device).
        draws: unscaled noise ``[samples, subject tokens, d_model]`` to use instead of seeded
            draws (to reproduce another tool's noise); it is multiplied by ``noise``.
        batch_size, reuse, progress: as for :func:`mechinterp.patching.activation_patch`.

    Returns:
        :class:`TraceResult` with ``scores [kind, pos, layer]``.
    """
    if not isinstance(model, InterpModel):
        msg = f"model must be an InterpModel from mechinterp.load; got {type(model).__name__}"
        raise InputError(msg)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        msg = f"kinds must be a non-empty selection of {list(KINDS)}; got {list(kinds)}"
        raise InputError(msg)
    for name, value in (("samples", samples), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} must be a positive int; got {value!r}"
            raise InputError(msg)
    tokens = model._as_tokens(prompt)
    if tokens.shape[0] != 1:
        msg = f"prompt must be a single prompt; got {tokens.shape[0]} rows"
        raise ShapeError(msg)
    begin, end = _subject_columns(model, tokens, subject)
    if multivariate and (noise is not None or uniform):
        msg = ("multivariate draws take their scale from the embeddings' covariance; leave noise "
               "and uniform unset")
        raise InputError(msg)
    scale = 1.0 if multivariate else embedding_noise_scale(model) if noise is None else float(noise)
    if not math.isfinite(scale) or scale < 0:
        msg = f"noise must be a finite non-negative number; got {noise!r}"
        raise InputError(msg)
    if answer is None:
        with torch.no_grad():
            answer = int(model.run(tokens).logits[0, -1].argmax())
    n_layers, seq = model.dims.n_layers, tokens.shape[1]
    labels, parts = [], []
    for kind in kinds:
        for pos in range(seq):
            for layer in range(n_layers):
                labels.append(Site(_RESTORED[kind], layer=layer, pos=pos))
                parts.append(_parts(kind, layer, pos, n_layers, window))
    d_model = model.dims.d_model
    dtype = next(model._module.parameters()).dtype
    draw_shape = (samples, end - begin, d_model)
    if draws is None:
        draws = _ops.fill_noise(torch.empty(draw_shape, device=tokens.input_ids.device), seed=seed,
                                kind="uniform" if uniform else "gaussian")
    elif not isinstance(draws, torch.Tensor) or tuple(draws.shape) != draw_shape:
        got = tuple(draws.shape) if isinstance(draws, torch.Tensor) else type(draws).__name__
        msg = (f"draws must be a tensor [samples, subject tokens, d_model] = {list(draw_shape)}; "
               f"got {got}")
        raise ShapeError(msg)
    draws = draws.to(tokens.input_ids.device).double()
    if multivariate:
        mean, factor = _embedding_gaussian(model)
        draws = mean.to(draws.device) + draws @ factor.to(draws.device).T
    noise_edit = _EmbedNoise((draws * scale).to(dtype), begin, end, seed, scale, uniform,
                             multivariate, replace, noised_site(model))
    repeated = tokens.repeat(samples)
    sweep = _Sweep(model, repeated, repeated, labels, Prob(answer), "clean", 1.0, -1, seed,
                   parts=parts, corruption=noise_edit.from_row, corrupted_from=begin)
    result = sweep.run(batch_size=batch_size, reuse=reuse, progress=progress, results=None)
    shape = (len(kinds), seq, n_layers)
    tokenizer = model.tokenizer
    ids = tokens.input_ids[0].tolist()
    texts = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    answer_text = tokenizer.decode([answer]) if tokenizer is not None else str(answer)
    return TraceResult(kinds=kinds, scores=result.mean().reshape(shape).float(),
                       stderr=result.stderr().reshape(shape).float(),
                       base=float(result.clean.mean()), low=float(result.corrupt.mean()),
                       tokens=texts, subject=(begin, end), answer=answer, answer_text=answer_text,
                       samples=samples, noise=scale, window=window, uniform=uniform, seed=seed,
                       multivariate=multivariate, replace=replace)


def _embedding_gaussian(model: InterpModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and Cholesky factor ``[d, d]`` of the embedding matrix's rows (float64)."""
    path = model.table.place("embed").path.format(base=model.base, layer=None)
    weight = model._module.get_submodule(path).weight.detach().double().cpu()
    mean = weight.mean(0)
    centred = weight - mean
    covariance = centred.T @ centred / max(1, weight.shape[0] - 1)
    jitter = 1e-9 * float(covariance.diagonal().mean()) * torch.eye(weight.shape[1], dtype=torch.float64)
    return mean, torch.linalg.cholesky(covariance + jitter)


def _parts(kind: str, layer: int, pos: int, n_layers: int, window: int) -> list[tuple[Site, str]]:
    if kind in ("mlp", "attn"):
        low, high = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
        return [(Site(_RESTORED[kind], layer=l, pos=pos), "clean") for l in range(low, high)]
    parts = [(Site("resid_post", layer=layer, pos=pos), "clean")]
    if kind in _FROZEN:
        parts += [(Site(_FROZEN[kind], layer=l), "corrupt") for l in range(layer + 1, n_layers)]
    return parts


def _subject_columns(model: InterpModel, tokens: Tokens, subject: str | tuple[int, int]
                     ) -> tuple[int, int]:
    return subject_range(tokens.input_ids[0].tolist(), subject, model.tokenizer)


def subject_range(ids: list[int], subject: str | tuple[int, int], tokenizer: object
                  ) -> tuple[int, int]:
    """Positions ``[begin, end)`` of a subject in a prompt's token ids: the first occurrence of
    ``subject``'s tokens (with or without a leading space), or a range given directly
    (negative ends count from the last position)."""
    seq = len(ids)
    if isinstance(subject, str):
        if tokenizer is None:
            msg = "subject as a string needs a tokenizer; pass a range of positions (begin, end)"
            raise InputError(msg)
        for text in (subject, " " + subject):
            wanted = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(seq - len(wanted) + 1):
                if wanted and ids[start:start + len(wanted)] == wanted:
                    return start, start + len(wanted)
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        shown = [tokenizer.decode([i]) for i in ids if i not in special]
        msg = f"subject {subject!r} does not occur in the prompt's tokens {shown}"
        raise InputError(msg)
    if (not isinstance(subject, tuple) or len(subject) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in subject)):
        msg = f"subject must be a substring of the prompt or a (begin, end) range; got {subject!r}"
        raise InputError(msg)
    begin, end = (v + seq if v < 0 else v for v in subject)
    if not 0 <= begin < end <= seq:
        msg = f"subject range must select at least one of the prompt's {seq} positions; got {subject}"
        raise InputError(msg)
    return begin, end


class _EmbedNoise:
    """The noise of every noised row: ``samples`` draws, added to (or replacing) the subject's
    embeddings."""

    def __init__(self, noise: torch.Tensor, begin: int, end: int, seed: int, scale: float,
                 uniform: bool, multivariate: bool, replace: bool, site: Site):
        self.noise, self.begin, self.end, self.replace = noise, begin, end, replace
        self.site = site
        self.description = (f"EmbedNoise(samples={noise.shape[0]}, subject=[{begin}, {end}), "
                            f"seed={seed}, scale={scale!r}, uniform={uniform}, "
                            f"multivariate={multivariate}, replace={replace})")

    def from_row(self, first_row: int, start: int = 0) -> TensorEdit:
        """The edit for rows from ``first_row`` on, in a forward of the positions from
        ``start`` on."""
        return _AddNoise(self, first_row, start)

    def __repr__(self) -> str:
        return self.description


class _AddNoise(TensorEdit):
    def __init__(self, noise: _EmbedNoise, first_row: int, start: int):
        super().__init__(noise.site)
        self.source, self.first_row, self.start = noise, first_row, start

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        source, start = self.source, self.start
        begin, end = max(source.begin, start), source.end
        if end <= begin:
            return  # the subject lies wholly before the positions this forward runs
        noise = source.noise[:, begin - source.begin:]
        rows = torch.arange(self.first_row, tensor.shape[0], device=noise.device) % noise.shape[0]
        subject = tensor[self.first_row:, begin - start:end - start]
        if source.replace:
            subject.copy_(noise[rows])
        else:
            subject += noise[rows]
