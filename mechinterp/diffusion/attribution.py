"""Attribution patching (AtP) over site x denoising step: every cell of
:func:`~mechinterp.diffusion.sweep.timestep_patch` (``window="step"``) from two generations and
one backward pass.

Restoring a site's clean value at one step is estimated to first order around the corrupted
generation: ``m(patched) ~ m(corrupt) + sum over the site's elements of
(a_clean - a_corrupt) * dm/da``, with ``a`` the site's value at that step and the gradient taken
through every later step, the sampler and the image decoding. One clean generation reads the
sites, one corrupted generation with gradients carries a zero probe at every (site, step), and
one backward pass of the summed metric gives every probe's gradient: every cell from about the
cost of three generations instead of one generation per step and site.

The estimate is exact for a metric linear in the site's value and degrades where the loop
saturates it. Four things are worth knowing about diffusion:

- The sampler is differentiated as it runs, clipping included: a DDIM scheduler with
  ``clip_sample`` clamps each step's predicted clean sample, and a clamped pixel passes no
  gradient through that prediction. That is the sampler's true derivative; the estimate is the
  first-order expansion of what :func:`timestep_patch` computes.
- Finished images are the generation's images (:func:`~mechinterp.diffusion.denoise.to_images`:
  the VAE's decoding for latent models, ``sample / 2 + 0.5`` for pixel-space ones, clamped to
  [0, 1], float32 on the CPU), so the metric scores exactly the images the exact sweep scores
  and ``corrupt`` equals its value. Only the final clamp is differentiated as if it were the
  identity (a straight-through gradient): a pixel a sampler without clipping overshoots to 1.05
  would otherwise pass no gradient at all, and AtP could not see a patch that brings it back
  into range, whereas a model trained on saturated colours overshoots exactly where its colours
  are. Where no pixel is clamped (any sampler that clips, such as DDIM's default) this changes
  nothing; elsewhere it estimates the change of the unclamped image.
- The noisiest steps are where the linear estimate is weakest. There the sampler's predicted
  clean image divides the noise prediction by ``sqrt(alpha_bar)`` (alpha_bar is 2.4e-9 at
  toy-unet's first step: a factor of 2e4). The gradient is exact but holds over a tiny
  neighbourhood only; a whole patch moves far past it, into the sampler's clipping. On
  toy-unet (4 steps, SoftColourShift, colour-swapped captions) the estimates of restoring a
  block or a cross-attention layer correlate with the exact effects at Pearson 0.84-0.90 over
  steps 1-3, and about 0.15 once step 0 is included.
- The metric must be differentiable. Metrics that classify pixels (``ColourShift``) have no
  gradient; use a soft counterpart (``SoftColourShift`` of ``mechinterp.zoo.train_toy_unet``).

Memory: the backward pass needs every step's U-Net activations from the first patched step on.
``checkpoint=True`` keeps only each step's inputs and recomputes its forward during the backward
pass (``torch.utils.checkpoint``), so about one step's activations are alive at a time, for about
one more generation of compute.

Examples:
    >>> import mechinterp
    >>> from mechinterp.diffusion.attribution import attribution_patch
    >>> from mechinterp.zoo.train_toy_unet import SoftColourShift
    >>> model = mechinterp.load("toy-unet")
    >>> estimate = attribution_patch(model, ["red circle"], ["blue circle"],
    ...                              metric=SoftColourShift(["red"], ["blue"]), steps=4,
    ...                              progress=False)
    >>> tuple(estimate.values.shape), estimate.metric  # [row, site, step]
    ((1, 5, 4), 'AtP estimate of soft colour shift')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from mechinterp.diffusion.denoise import (
    Denoiser,
    _noise,
    _step_set,
    generate,
    unet_states,
)
from mechinterp.diffusion.sweep import Metric, TimestepPatchResult, checked_pair
from mechinterp.errors import InputError
from mechinterp.interventions import Intervention
from mechinterp.scores import checked_scores
from mechinterp.sites import Site


def attribution_patch(model, clean: str | Sequence[str] | torch.Tensor,
                      corrupt: str | Sequence[str] | torch.Tensor, *, metric: Metric,
                      sites: object = None, at_steps: Iterable[int] | None = None,
                      steps: int = 50, seed: int = 0, noise: torch.Tensor | None = None,
                      guidance_scale: float | None = None,
                      negative_prompt: str | torch.Tensor = "", checkpoint: bool = False,
                      progress: bool = True) -> TimestepPatchResult:
    """Estimate :func:`~mechinterp.diffusion.sweep.timestep_patch` (``window="step"``) for every
    site at every step from gradients.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel`.
        clean, corrupt: prompts (or encoder hidden states), one corrupted per clean row.
        metric: finished images ``[rows, 3, height, width]`` in [0, 1] (the final sample for a
            latent model without a VAE) -> ``[rows]`` scores, differentiable.
        sites: U-Net sites to restore (a selector or sites; default every down, mid and up
            block, ``select("block")``).
        at_steps: step indices to patch at (default every step).
        steps, seed, noise, guidance_scale, negative_prompt: the generation's, as in
            ``model.generate``; clean and corrupted generations share the noise. Under guidance
            a cell restores the site's clean value in both halves of the U-Net's batch, as the
            exact sweep does, and its estimate sums both halves' terms.
        checkpoint: recompute each step's U-Net forward (and the VAE's decoding) in the backward
            pass instead of keeping its activations.
        progress: show a progress bar over the corrupted generation's steps.

    Returns:
        :class:`~mechinterp.diffusion.sweep.TimestepPatchResult` with ``window="step"``, to be
        compared cell by cell with the exact sweep: ``values [row, site, step]`` are
        ``corrupt + sum (a_clean - a_corrupt) * dm/da``, in float64 because a cell's effect is
        often small beside the metric's value and float32 would round it away; ``clean`` and
        ``corrupt`` are the metric of the two generations, as the exact sweep reports them.

    Raises:
        InputError: the metric's scores carry no gradient, or no site or step is chosen.
        ShapeError: ``clean`` and ``corrupt`` differ in rows, or the metric does not return one
            score per row.
    """
    name = getattr(metric, "__name__", None) or type(metric).__name__
    sites, clean_states, corrupt_states = checked_pair(model, sites, clean, corrupt)
    batch = clean_states.shape[0]
    chosen = sorted(_step_set(at_steps, steps, "at_steps"))
    if not chosen:
        msg = f"at_steps must name at least one step in [{-steps}, {steps}); got none"
        raise InputError(msg)
    noise = _noise(model, noise, batch, seed)
    source = generate(model, clean_states, cache=sites, cache_steps=chosen, steps=steps,
                      seed=seed, noise=noise, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt)
    with torch.no_grad():
        clean_scores = _scores(metric, source.sample, source.images, batch).float().cpu()

    # One probe per (site, step), shaped like the clean value it stands beside: the U-Net's
    # rows, doubled under guidance, so that a cell restores both halves as the exact sweep does.
    probes = {step: [_Probe(site, source.cache[step][site]) for site in sites] for step in chosen}
    corrupt_unet = unet_states(model, corrupt_states, guidance_scale, negative_prompt)
    loop = Denoiser(model, corrupt_unet, steps, seed=seed, guidance_scale=guidance_scale,
                    checkpoint=checkpoint)
    unedited = model._plan([], [])
    sample = loop.start(noise)
    with torch.enable_grad():
        for i in tqdm(range(steps), desc="attribution patching", disable=not progress):
            # No gradient reaches a step before the first probe: it need not keep a graph.
            loop.grad = i >= chosen[0]
            plan = model._plan([], probes[i]) if i in probes else unedited
            sample, _ = loop.step(i, sample, plan)
        images = _differentiable_images(model, sample, checkpoint=checkpoint)
        scores = _scores(metric, sample, images, batch)
        if not scores.requires_grad:
            msg = (f"metric must be differentiable: its scores of the corrupted images carry no "
                   f"gradient (got {name!r}, whose output does not require grad; a metric that "
                   f"classifies or thresholds pixels, such as ColourShift, has none). Pass a soft "
                   f"metric, such as mechinterp.zoo.train_toy_unet.SoftColourShift")
            raise InputError(msg)
        cells = [(j, k, probe) for k, step in enumerate(chosen)
                 for j, probe in enumerate(probes[step])]
        # One backward pass for every cell: the probes are the only inputs asked for, so the
        # model's parameters get no gradient.
        grads = torch.autograd.grad(scores.sum(), [probe.delta for _, _, probe in cells],
                                    allow_unused=True)
    guided = guidance_scale is not None
    effects = torch.zeros(batch, len(sites), len(chosen), dtype=torch.float64)
    for (j, k, probe), grad in zip(cells, grads):
        if grad is not None:  # None: the site does not reach the metric from that step
            effects[:, j, k] = _effect(probe, grad, batch, guided)
    corrupt_scores = scores.detach().float().cpu()
    timesteps = tuple(int(source.timesteps[i]) for i in chosen)
    return TimestepPatchResult(sites, tuple(chosen), timesteps,
                               corrupt_scores.double()[:, None, None] + effects, clean_scores,
                               corrupt_scores, f"AtP estimate of {name}", "step")


class _Probe(Intervention):
    """Adds a zero tensor that requires grad to a site's value, so that the metric's gradient
    with respect to the probe is its gradient with respect to the value, and keeps the value
    the corrupted generation had there.

    A non-TensorEdit intervention, so that sites naming positions, heads or neurons work too:
    the probe is the shape of the selection.
    """

    def __init__(self, site: Site, clean: torch.Tensor):
        super().__init__(site)
        self.clean = clean
        # A leaf created outside any checkpointed forward, so that a recomputed forward adds
        # the same tensor and its gradient accumulates in one place.
        self.delta = torch.zeros_like(clean, requires_grad=True)
        self.corrupt: torch.Tensor | None = None

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if self.corrupt is None:  # a checkpointed step runs again in the backward pass
            self.corrupt = current.detach().clone()
        return current + self.delta


def _effect(probe: _Probe, grad: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """``[batch]``: ``sum (a_clean - a_corrupt) * dm/da`` over the site's elements, both halves
    of a guided batch added for each prompt row."""
    difference = probe.clean.double() - probe.corrupt.double()
    per_row = (difference * grad.double()).flatten(1).sum(1)
    if guided:
        per_row = per_row.view(2, batch).sum(0)
    return per_row.cpu()


class _ClampStraightThrough(torch.autograd.Function):
    """``x.clamp(0, 1)`` whose backward pass is the identity's (see the module's notes)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _differentiable_images(model, sample: torch.Tensor, *,
                           checkpoint: bool) -> torch.Tensor | None:
    """:func:`~mechinterp.diffusion.denoise.to_images` with the autograd graph kept: the same
    values, with the final clamp differentiated as the identity."""
    if model.vae is not None:
        vae = model.vae

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents).sample

        latents = sample.to(vae.dtype) / vae.config.scaling_factor
        sample = (torch.utils.checkpoint.checkpoint(decode, latents, use_reentrant=False)
                  if checkpoint else decode(latents))
    elif sample.shape[1] != 3:
        return None
    return _ClampStraightThrough.apply(sample.float() / 2 + 0.5).cpu()


def _scores(metric: Metric, final: torch.Tensor, images: torch.Tensor | None,
            batch: int) -> torch.Tensor:
    """The metric of finished generations (of the final sample where there are no images)."""
    return checked_scores(metric(final if images is None else images), batch, name="metric",
                          given=f"finished generations [{batch}, ...]", each="generation")


__all__ = ["attribution_patch"]
