"""The denoising loop with interventions at chosen steps and per-step caches.

Any diffusers scheduler drives the loop through its public interface (``set_timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``step``), so interventions do not depend on the
sampler. With classifier-free guidance the U-Net sees a doubled batch, the unconditional rows
first: rows ``[0, batch)`` unconditional, ``[batch, 2 batch)`` conditional. Edits name prompt
rows and are applied to the halves ``edit_rows`` chooses; cached tensors keep the U-Net's rows.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from mechinterp.errors import InputError, ShapeError
from mechinterp.interventions import Intervention, Set, TensorEdit, checked_edits
from mechinterp.model import ActivationCache, Sites

EDIT_ROWS = ("both", "cond", "uncond")

Edits = Sequence[Intervention] | Mapping[int, Sequence[Intervention]]


@dataclass
class Generation:
    """The outcome of one denoising loop.

    Attributes:
        sample: ``[batch, channels, height, width]`` the final sample (latents for latent models).
        images: ``float32 [batch, 3, height, width]`` in [0, 1] on the CPU: the sample itself for
            pixel-space U-Nets, decoded by the VAE for latent ones; None for a latent model
            without a VAE.
        timesteps: the scheduler's timestep at each step.
        cache: step index -> the sites read at that step (with guidance, each tensor has the
            U-Net's doubled batch, unconditional rows first).
        guided: whether classifier-free guidance doubled the U-Net's batch.
        trajectory: the sample entering each step, then the final sample (``steps + 1`` tensors),
            when asked for.
    """

    sample: torch.Tensor
    images: torch.Tensor | None
    timesteps: torch.Tensor
    cache: dict[int, ActivationCache]
    guided: bool
    trajectory: list[torch.Tensor] | None = None


def generate(model, prompts: str | Sequence[str] | torch.Tensor, *, steps: int = 50,
             seed: int = 0, noise: torch.Tensor | None = None,
             guidance_scale: float | None = None,
             negative_prompt: str | torch.Tensor = "", edits: Edits = (), cache: Sites = (),
             cache_steps: Iterable[int] | None = None, edit_rows: str = "both",
             trajectory: bool = False, progress: bool = False,
             callback: Callable[[int, ActivationCache], None] | None = None) -> Generation:
    """Denoise from noise to a sample, with ``edits`` at chosen steps; see
    :meth:`DiffusionModel.generate`. With ``callback``, each step's reads go to
    ``callback(step, cache)`` instead of the result (for reads too large to keep)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int; got {steps!r}"
        raise InputError(msg)
    if model.scheduler is None:
        msg = "this model was loaded without a scheduler; pass DiffusionModel(..., scheduler=...)"
        raise InputError(msg)
    if edit_rows not in EDIT_ROWS:
        msg = f"edit_rows must be one of {EDIT_ROWS}; got {edit_rows!r}"
        raise InputError(msg)
    prompt_states = _states(model, prompts, "prompts")
    batch = prompt_states.shape[0]
    guided = guidance_scale is not None
    states = unet_states(model, prompt_states, guidance_scale, negative_prompt)
    if not guided and edit_rows != "both":
        msg = f"edit_rows={edit_rows!r} needs classifier-free guidance (guidance_scale)"
        raise InputError(msg)
    at_step = _edits_by_step(edits, steps)
    if guided:
        halves = {"both": (0, 1), "uncond": (0,), "cond": (1,)}[edit_rows]
        at_step = {i: _for_guidance(step_edits, batch, halves) for i, step_edits in at_step.items()}
    reads = model.sites(cache)
    read_steps = _step_set(cache_steps, steps, "cache_steps") if reads else set()

    loop = Denoiser(model, states, steps, seed=seed, guidance_scale=guidance_scale)
    sample = loop.start(_noise(model, noise, batch, seed))
    plans: dict[tuple[int, bool], object] = {}
    caches: dict[int, ActivationCache] = {}
    path = [sample] if trajectory else None
    for i in tqdm(range(steps), desc="denoising", disable=not progress):
        step_edits = at_step.get(i, ())
        key = (id(step_edits), i in read_steps)
        if key not in plans:
            plans[key] = model._plan(reads if i in read_steps else [], step_edits)
        sample, values = loop.step(i, sample, plans[key])
        if i in read_steps:
            if callback is not None:
                callback(i, ActivationCache(values, reads))
            else:
                caches[i] = ActivationCache(values, reads)
        if path is not None:
            path.append(sample)
    return Generation(sample, to_images(model, sample), loop.timesteps.cpu(), caches, guided, path)


class Denoiser:
    """One denoising loop's fixed parts: the U-Net's text states (doubled under guidance), a
    fresh copy of the scheduler set to ``steps``, and the scheduler's step arguments.

    :meth:`step` runs one step under a plan. The scheduler's state can be copied at any step
    and widened to more rows (:meth:`widened`), so that runs which share their first steps
    can go on from one of them.

    The U-Net runs without gradients unless ``grad`` (attribution patching differentiates the
    whole loop); with ``checkpoint`` too, each step's U-Net forward keeps only its inputs and is
    recomputed in the backward pass, so that a backward through many steps holds about one
    step's activations. Both are attributes a caller may change between steps.
    """

    def __init__(self, model, states: torch.Tensor, steps: int, *, seed: int,
                 guidance_scale: float | None, grad: bool = False, checkpoint: bool = False):
        self.model = model
        self.states = states
        self.guidance_scale = guidance_scale
        self.grad = grad
        self.checkpoint = checkpoint
        # A fresh scheduler: set_timesteps and multistep samplers' history mutate it.
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        self.scheduler.set_timesteps(steps, device=model.device)
        self.timesteps = self.scheduler.timesteps
        self.step_kwargs = _step_kwargs(self.scheduler, seed)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.scheduler.init_noise_sigma

    def step(self, i: int, sample: torch.Tensor, plan) -> tuple[torch.Tensor, dict]:
        """The sample after step ``i`` and the values the plan read."""
        t = self.timesteps[i]
        guided = self.guidance_scale is not None
        model_input = torch.cat([sample, sample]) if guided else sample
        model_input = self.scheduler.scale_model_input(model_input, t)
        with torch.set_grad_enabled(self.grad):
            inputs = self.model._inputs(model_input, t, self.states)
            if self.grad and self.checkpoint:
                # Non-reentrant: gradients reach tensors the plan's edits hold (probes), not
                # only the explicit inputs, and torch.autograd.grad works through it.
                output, values = torch.utils.checkpoint.checkpoint(
                    self.model._forward, inputs, plan, use_reentrant=False)
            else:
                output, values = self.model._forward(inputs, plan)
        prediction = output.sample
        if guided:
            uncond_pred, cond_pred = prediction.chunk(2)
            prediction = uncond_pred + self.guidance_scale * (cond_pred - uncond_pred)
        return self.scheduler.step(prediction, t, sample, **self.step_kwargs).prev_sample, values

    def widened(self, sample: torch.Tensor, times: int, states: torch.Tensor) -> Denoiser:
        """A copy at the current step whose rows are this loop's rows repeated ``times`` times
        (row-block major), with ``states`` as the U-Net's text states.

        Scheduler state with the sample's shape (a multistep sampler's earlier predictions) is
        repeated along with the rows.
        """
        wide = copy.copy(self)
        wide.states = states
        wide.scheduler = copy.deepcopy(self.scheduler)
        shape = sample.shape
        for name, value in vars(wide.scheduler).items():
            if isinstance(value, torch.Tensor) and value.shape == shape:
                setattr(wide.scheduler, name, value.repeat(times, 1, 1, 1))
            elif isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.shape == shape
                                                 for v in value):
                setattr(wide.scheduler, name, [
                    v.repeat(times, 1, 1, 1) if isinstance(v, torch.Tensor) and v.shape == shape
                    else v for v in value])
        return wide


def unet_states(model, states: torch.Tensor, guidance_scale: float | None,
                negative_prompt: str | torch.Tensor) -> torch.Tensor:
    """The text states the U-Net sees: ``states``, or under guidance the negative prompt's
    states for every row first, then ``states``."""
    if guidance_scale is None:
        return states
    batch = states.shape[0]
    uncond = _states(model, negative_prompt, "negative_prompt", batch=batch)
    return torch.cat([uncond.expand(batch, *uncond.shape[1:]), states])


def to_images(model, sample: torch.Tensor) -> torch.Tensor | None:
    """``float32 [batch, 3, height, width]`` in [0, 1] on the CPU from a final sample."""
    if model.vae is not None:
        vae = model.vae
        with torch.no_grad():
            sample = vae.decode(sample.to(vae.dtype) / vae.config.scaling_factor).sample
    elif sample.shape[1] != 3:
        return None
    return (sample.float() / 2 + 0.5).clamp(0, 1).cpu()


def _states(model, prompts: object, name: str, *, batch: int | None = None) -> torch.Tensor:
    """Encoder hidden states from prompts, or checked states given directly."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 3 or (batch is not None and prompts.shape[0] not in (1, batch)):
            rows = "" if batch is None else f" with 1 or {batch} rows"
            msg = f"{name} as a tensor must be encoder hidden states [batch, tokens, width]" \
                  f"{rows}; got shape {tuple(prompts.shape)}"
            raise ShapeError(msg)
        return prompts.to(model.device, model.dtype)
    if batch is not None and isinstance(prompts, str):
        return model.encode([prompts])
    return model.encode(prompts)


def _noise(model, noise: torch.Tensor | None, batch: int, seed: int) -> torch.Tensor:
    """The starting noise: given, or drawn on the CPU from ``seed`` (the same on any device)."""
    shape = (batch, *model.sample_shape)
    if noise is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            msg = f"seed must be an int; got {seed!r}"
            raise InputError(msg)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    elif not isinstance(noise, torch.Tensor) or noise.shape[0] != batch or noise.dim() != 4 \
            or noise.shape[1] != shape[1]:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        msg = f"noise must be [batch={batch}, {shape[1]}, height, width]; got {got}"
        raise ShapeError(msg)
    return noise.to(model.device, model.dtype)


def _step_kwargs(scheduler: object, seed: int) -> dict[str, object]:
    """A seeded generator for schedulers that draw noise in ``step`` (DDPM, ancestral ones)."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed + 1)}
    return {}


def _step_index(step: object, steps: int, name: str) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not -steps <= step < steps:
        msg = f"{name} must hold step indices in [{-steps}, {steps}); got {step!r}"
        raise InputError(msg)
    return step % steps


def _step_set(values: Iterable[int] | None, steps: int, name: str) -> set[int]:
    if values is None:
        return set(range(steps))
    return {_step_index(v, steps, name) for v in values}


def _edits_by_step(edits: Edits, steps: int) -> dict[int, tuple[Intervention, ...]]:
    """step index -> its edits: a sequence applies at every step, a mapping at the steps it
    names."""
    if isinstance(edits, Mapping):
        chosen: dict[int, tuple[Intervention, ...]] = {}
        for step, step_edits in edits.items():
            index = _step_index(step, steps, "edits keys")
            chosen[index] = chosen.get(index, ()) + _checked(step_edits)
        return chosen
    every = _checked(edits)
    return {i: every for i in range(steps)} if every else {}


def _checked(edits: object) -> tuple[Intervention, ...]:
    if isinstance(edits, Intervention) or not isinstance(edits, Iterable):
        msg = (f"edits must be a sequence of interventions, or a mapping from step index to "
               f"one; got {type(edits).__name__}")
        raise InputError(msg)
    return checked_edits(edits)


def _for_guidance(edits: tuple[Intervention, ...], batch: int,
                  halves: tuple[int, ...]) -> tuple[Intervention, ...]:
    """Edits of prompt rows as edits of the guided U-Net's rows, in the chosen halves.

    Each edit is copied once per half with its rows moved there, so that a value with one row
    per prompt still matches its selection.
    """
    out: list[Intervention] = []
    for edit in edits:
        if isinstance(edit, TensorEdit):
            if halves != (0, 1):
                msg = f"{type(edit).__name__} edits every row; it cannot take edit_rows"
                raise InputError(msg)
            out.append(edit)
            continue
        if edit.rows is None and halves == (0, 1) and not isinstance(edit, Set):
            out.append(edit)  # the same edit on every row of both halves
            continue
        rows = range(batch) if edit.rows is None else edit.rows
        for row in rows:
            if not -batch <= row < batch:
                msg = f"rows of {edit!r} must lie in [{-batch}, {batch}) (prompt rows); got {row}"
                raise InputError(msg)
        for half in halves:
            moved = copy.copy(edit)
            moved.rows = tuple(half * batch + row % batch for row in rows)
            out.append(moved)
    return tuple(out)
