"""Causal tracing on a diffusion U-Net: which sites carry a prompt's subject into the image.

ROME's causal tracing (Meng et al. 2022), in the form text-to-image work gives it (Basu et al.
2024, "Localizing and editing knowledge in text-to-image generative models"): the subject
tokens' text states, the encoder hidden states the U-Net cross-attends to, get Gaussian noise
(``samples`` draws, one per generation row); then each site's value from the clean prompt's
generation is restored in the noised generations, and the finished images are scored. A site
that restores the score carries what the noised tokens said.

The restore covers every step (``window="all"``: the site's whole trajectory, as the papers
restore it), one step (``"step"``) or a step and every later one (``"onward"``), per
:func:`~mechinterp.diffusion.sweep.timestep_patch`, which batches the restored generations and
never recomputes the steps before a restore. Every generation starts from the same noise, so
the rows differ only in the text noise.

Sites are U-Net sites: blocks and layers (``select("block")``, the default), or the subject's
own cross-attention keys and values in one transformer layer (``Site("cross_v", layer=3,
pos=(1,))``), the route by which the text reaches that layer.

Examples:
    >>> import mechinterp
    >>> from mechinterp.diffusion.trace import causal_trace
    >>> model = mechinterp.load("toy-unet")
    >>> result = causal_trace(model, "red circle", "red", samples=2, steps=4, progress=False)
    >>> tuple(result.values.shape)  # [noise sample, site, window]
    (2, 5, 1)
    >>> bool(result.normalized()[-1, 0] > 0.5)  # the last block restores the clean image
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mechinterp.diffusion.denoise import _noise, _states, generate
from mechinterp.diffusion.sweep import TimestepPatchResult, timestep_patch
from mechinterp.errors import InputError, ShapeError
from mechinterp.tracing.trace import subject_range

WINDOWS = ("all", "step", "onward")
Metric = Callable[[torch.Tensor], torch.Tensor]


class CleanSimilarity:
    """A metric: per image, minus the mean squared difference from the clean image (0 is the
    clean image itself); tracing's default, which needs no labels."""

    __name__ = "similarity to the clean image"

    def __init__(self, clean: torch.Tensor):
        self.clean = clean.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().to(self.clean.device)
        return -(images - self.clean).pow(2).flatten(1).mean(1)


def subject_positions(model, prompt: str | torch.Tensor, subject: str | tuple[int, int]
                      ) -> tuple[int, int]:
    """The noised token positions ``[begin, end)`` of the prompt's text states: the first
    occurrence of ``subject``'s tokens, or a range given directly (negative ends count from the
    last position)."""
    if isinstance(prompt, torch.Tensor):
        if isinstance(subject, str):
            msg = "subject as a string needs a text prompt; pass a range of positions (begin, end)"
            raise InputError(msg)
        ids = [0] * prompt.shape[1]  # only the length counts for a range
    else:
        ids = model.token_ids(prompt)[0].tolist()
    return subject_range(ids, subject, model.tokenizer)


def causal_trace(model, prompt: str | torch.Tensor, subject: str | tuple[int, int], *,
                 metric: Metric | None = None, sites: object = None, samples: int = 4,
                 noise: float | None = None, window: str = "all",
                 at_steps: Iterable[int] | None = None, steps: int = 50, seed: int = 0,
                 guidance_scale: float | None = None, negative_prompt: str = "",
                 max_rows: int | None = None, progress: bool = True) -> TimestepPatchResult:
    """Noise the subject's text states, then restore each site's clean value and score.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel`.
        prompt: one prompt, or its encoder hidden states ``[1, tokens, width]``.
        subject: the noised tokens: a substring of the prompt (its first occurrence) or a range
            of positions ``(begin, end)``, ``end`` exclusive.
        metric: finished images ``[rows, 3, height, width]`` -> ``[rows]``; by default
            :class:`CleanSimilarity` to the clean prompt's image.
        sites: U-Net sites to restore (default every block, ``select("block")``).
        samples: noise draws, one generation row each.
        noise: the noise's standard deviation; by default 3 standard deviations of the prompt's
            text states (ROME's 3 sigma, measured on the states the noise is added to).
        window: ``"all"`` restores each site at every step; ``"step"`` and ``"onward"`` restore
            it at each of ``at_steps`` only, or from there on.
        at_steps, steps, seed, guidance_scale, negative_prompt, max_rows, progress: as for
            :func:`~mechinterp.diffusion.sweep.timestep_patch`; ``seed`` draws both the starting
            noise (shared by every row) and the text noise.

    Returns:
        :class:`~mechinterp.diffusion.sweep.TimestepPatchResult` whose rows are the noise draws
        (``clean`` is the clean generation's score on every row, ``corrupt`` each noised one's);
        with ``window="all"`` its one step column is the whole trajectory.
    """
    if window not in WINDOWS:
        msg = f"window must be one of {WINDOWS}; got {window!r}"
        raise InputError(msg)
    if window == "all" and at_steps is not None:
        msg = "at_steps needs window='step' or 'onward'; window='all' restores every step"
        raise InputError(msg)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        msg = f"samples must be a positive int; got {samples!r}"
        raise InputError(msg)
    clean = _states(model, prompt if isinstance(prompt, torch.Tensor) else [prompt], "prompt")
    if clean.shape[0] != 1:
        msg = f"prompt must be a single prompt; got states of {clean.shape[0]} rows"
        raise ShapeError(msg)
    begin, end = subject_positions(model, prompt, subject)
    scale = _noise_scale(clean, noise)

    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, end - begin, clean.shape[-1], generator=g)
    noised = clean.repeat(samples, 1, 1)
    noised[:, begin:end] += scale * draws.to(noised.device, noised.dtype)
    start = _noise(model, None, 1, seed).repeat(samples, 1, 1, 1)
    run = {"steps": steps, "seed": seed, "noise": start, "guidance_scale": guidance_scale,
           "negative_prompt": negative_prompt}
    if metric is None:
        reference = generate(model, clean, **dict(run, noise=start[:1]))
        metric = CleanSimilarity(reference.images if reference.images is not None
                                 else reference.sample)
    result = timestep_patch(model, clean.repeat(samples, 1, 1), noised, metric=metric,
                            sites=sites, at_steps=[0] if window == "all" else at_steps,
                            window="onward" if window == "all" else window,
                            max_rows=max_rows, progress=progress, **run)
    result.window = window
    return result


def _noise_scale(states: torch.Tensor, noise: float | None) -> float:
    if noise is None:
        return 3.0 * float(states.float().std())
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        msg = f"noise must be a non-negative standard deviation; got {noise!r}"
        raise InputError(msg)
    return float(noise)

