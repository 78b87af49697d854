"""Site x timestep patching: restore one site's clean value at one denoising step, or at that
step and every later one.

For each cell (site, step) the corrupted prompts are generated again from the same noise, with
the site's value at that step (``window="step"``), or at it and every later step
(``window="onward"``), taken from the clean prompts' generation, and the finished images are
scored. Cells are batched, and each cell starts where it first differs from the
corrupted generation: every cell patched at step ``s`` goes on from the corrupted sample
entering step ``s`` (and the scheduler's state there, widened to the cells' rows), so steps
before ``s`` are never recomputed. A per-cell loop runs all ``steps`` for every cell.

Examples:
    >>> import mechinterp
    >>> from mechinterp.diffusion.sweep import timestep_patch
    >>> from mechinterp.zoo.train_toy_unet import ColourShift
    >>> model = mechinterp.load("toy-unet")
    >>> result = timestep_patch(model, ["red circle"], ["blue circle"],
    ...                         metric=ColourShift(["red"], ["blue"]), steps=4, progress=False)
    >>> tuple(result.values.shape), [str(s) for s in result.sites][:2]  # [row, site, step]
    ((1, 5, 4), ['block.0', 'block.1'])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechinterp.diffusion.denoise import (
    Denoiser,
    _noise,
    _states,
    _step_set,
    generate,
    to_images,
    unet_states,
)
from mechinterp.errors import InputError, ShapeError
from mechinterp.interventions import Set
from mechinterp.patching.result import _site_dict, _site_from_dict
from mechinterp.saved import read_result, write_result
from mechinterp.scores import checked_scores
from mechinterp.sites import Site, select

Metric = Callable[[torch.Tensor], torch.Tensor]
WINDOWS = ("step", "onward")
_FORMAT = "mechinterp.TimestepPatchResult/1"


@dataclass
class TimestepPatchResult:
    """Metric values of generations with one site restored at one step.

    Attributes:
        sites: the patched sites.
        steps: the patched step indices (0 is the noisiest).
        window: ``"step"`` (each cell restores its step only), ``"onward"`` (its step and
            every later one) or ``"all"`` (every step: causal tracing's restores).
        timesteps: the scheduler's timestep at each of ``steps``.
        values: ``[row, site, step]`` metric of each patched generation.
        clean: ``[row]`` metric of the clean generations.
        corrupt: ``[row]`` metric of the corrupted generations.
        metric: description of the metric.
    """

    sites: list[Site]
    steps: tuple[int, ...]
    timesteps: tuple[int, ...]
    values: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    metric: str
    window: str = "step"

    def normalized(self) -> torch.Tensor:
        """``[site, step]``: 0 is the corrupted generations' mean metric, 1 the clean ones'."""
        clean, corrupt = self.clean.mean(), self.corrupt.mean()
        return (self.values.mean(0) - corrupt) / (clean - corrupt)

    def to_frame(self):
        """A long pandas frame: row, site, component, layer, step, timestep, value, normalized."""
        import pandas as pd

        normalized = self.normalized()
        records = [
            {"row": row, "site": str(site), "component": site.component, "layer": site.layer,
             "step": step, "timestep": timestep, "value": float(self.values[row, j, k]),
             "normalized": float(normalized[j, k])}
            for row in range(self.values.shape[0]) for j, site in enumerate(self.sites)
            for k, (step, timestep) in enumerate(zip(self.steps, self.timesteps))
        ]
        return pd.DataFrame.from_records(records)

    def plot(self):
        """A matplotlib figure: the normalized effect, sites down, steps across."""
        import matplotlib.pyplot as plt

        grid = self.normalized()
        figure, ax = plt.subplots(figsize=(1.2 + 0.45 * len(self.steps), 0.9 + 0.3 * len(self.sites)))
        shown = ax.imshow(grid.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(self.steps)), [str(t) for t in self.timesteps], rotation=90)
        ax.set_yticks(range(len(self.sites)), [str(s) for s in self.sites])
        ax.set_xlabel("restored at every step" if self.window == "all" else
                      "timestep restored" + (" and every later one" if self.window == "onward"
                                             else "") + " (noisiest first)")
        figure.colorbar(shown, ax=ax, label="restored fraction")
        figure.tight_layout()
        return figure

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors: the scores, the labels as JSON metadata), atomically."""
        meta = {"sites": [_site_dict(s) for s in self.sites], "steps": list(self.steps),
                "timesteps": list(self.timesteps), "metric": self.metric, "window": self.window}
        write_result(path, {"values": self.values, "clean": self.clean, "corrupt": self.corrupt},
                     {"labels": json.dumps(meta)}, format=_FORMAT)

    @classmethod
    def load(cls, path: str | Path) -> TimestepPatchResult:
        """Read a result written by :meth:`save`."""
        tensors, metadata = read_result(path, format=_FORMAT)
        meta = json.loads(metadata["labels"])
        return cls([_site_from_dict(s) for s in meta["sites"]], tuple(meta["steps"]),
                   tuple(meta["timesteps"]), tensors["values"], tensors["clean"],
                   tensors["corrupt"], meta["metric"], meta.get("window", "step"))


def timestep_patch(model, clean: str | Sequence[str] | torch.Tensor,
                   corrupt: str | Sequence[str] | torch.Tensor, *, metric: Metric,
                   sites: object = None, at_steps: Iterable[int] | None = None, steps: int = 50,
                   seed: int = 0, noise: torch.Tensor | None = None,
                   guidance_scale: float | None = None, negative_prompt: str = "",
                   window: str = "step", max_rows: int | None = None,
                   progress: bool = True) -> TimestepPatchResult:
    """Restore each site's clean value at each step of the corrupted generation.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel`.
        clean, corrupt: prompts (or encoder hidden states), one corrupted per clean row.
        metric: finished images ``[rows, 3, height, width]`` in [0, 1] (the final sample for a
            latent model without a VAE) -> ``[rows]`` scores.
        sites: U-Net sites to restore (a selector or sites; default every down, mid and up
            block, ``select("block")``).
        at_steps: step indices to patch at (default every step).
        window: ``"step"`` restores each cell's step only; ``"onward"`` restores its step and
            every later one (where in the loop a site's information is committed).
        steps, seed, noise, guidance_scale, negative_prompt: the generation's, as in
            ``model.generate``; clean and corrupted generations share the noise.
        max_rows: most generations per U-Net forward (default: every site of a step at once);
            halved on a CUDA out-of-memory error without losing finished cells.
        progress: show a progress bar over the cells.
    """
    sites, clean_states, corrupt_states = checked_pair(model, sites, clean, corrupt)
    batch = clean_states.shape[0]
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < batch):
        msg = f"max_rows must be an int of at least the batch ({batch}); got {max_rows!r}"
        raise InputError(msg)
    if window not in WINDOWS:
        msg = f"window must be one of {WINDOWS}; got {window!r}"
        raise InputError(msg)
    chosen = sorted(_step_set(at_steps, steps, "at_steps"))
    noise = _noise(model, noise, batch, seed)
    guided = guidance_scale is not None
    run = {"steps": steps, "seed": seed, "noise": noise, "guidance_scale": guidance_scale,
           "negative_prompt": negative_prompt}

    restored = chosen if window == "step" else range(chosen[0], steps)
    source = generate(model, clean_states, cache=sites, cache_steps=restored, **run)
    corrupt_unet = unet_states(model, corrupt_states, guidance_scale, negative_prompt)
    loop = Denoiser(model, corrupt_unet, steps, seed=seed, guidance_scale=guidance_scale)
    unedited = model._plan([], [])
    sample = loop.start(noise)
    entering: dict[int, tuple[torch.Tensor, Denoiser]] = {}
    for i in range(steps):
        if i in chosen:
            entering[i] = (sample, loop.widened(sample, 1, corrupt_unet))  # a snapshot
        sample, _ = loop.step(i, sample, unedited)

    def score(final: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        images = to_images(model, final) if images is None else images
        out = checked_scores(metric(final if images is None else images), final.shape[0],
                             name="metric", given=f"finished generations [{final.shape[0]}, ...]",
                             each="generation")
        return out.detach().float().cpu()

    values = torch.full((batch, len(sites), len(chosen)), float("nan"))
    per_forward = len(sites) if max_rows is None else max(1, max_rows // batch)
    bar = tqdm(total=len(sites) * len(chosen), desc="site x step", disable=not progress)
    for k, step in enumerate(chosen):
        start_sample, snapshot = entering[step]
        first = 0
        while first < len(sites):
            group = list(range(first, min(first + per_forward, len(sites))))
            try:
                finals = _patched_generations(model, snapshot, start_sample, step, steps,
                                              [sites[j] for j in group], source.cache,
                                              corrupt_unet, guided, window == "onward")
            except torch.cuda.OutOfMemoryError:
                if per_forward == 1:
                    raise
                per_forward = max(1, per_forward // 2)
                torch.cuda.empty_cache()
                continue
            values[:, group, k] = score(finals).view(len(group), batch).T
            bar.update(len(group))
            first += len(group)
    bar.close()
    timesteps = tuple(int(source.timesteps[i]) for i in chosen)
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return TimestepPatchResult(sites, tuple(chosen), timesteps, values,
                               score(source.sample, source.images), score(sample), name, window)


def checked_pair(model, sites: object, clean: object, corrupt: object
                 ) -> tuple[list[Site], torch.Tensor, torch.Tensor]:
    """The sites (default every block) and the clean and corrupted text states of a
    site x step sweep, checked: at least one site, as many corrupted rows as clean ones."""
    sites = model.sites(select("block") if sites is None else sites)
    if not sites:
        msg = "sites must name at least one U-Net site; got none"
        raise InputError(msg)
    clean_states = _states(model, clean, "clean")
    corrupt_states = _states(model, corrupt, "corrupt")
    if corrupt_states.shape[0] != clean_states.shape[0]:
        msg = (f"clean and corrupt must have as many rows; got {clean_states.shape[0]} and "
               f"{corrupt_states.shape[0]}")
        raise ShapeError(msg)
    return sites, clean_states, corrupt_states


def _patched_generations(model, snapshot: Denoiser, start: torch.Tensor, step: int, steps: int,
                         sites: list[Site], clean_caches, corrupt_unet: torch.Tensor, guided: bool,
                         onward: bool) -> torch.Tensor:
    """The finished samples of ``sites`` each restored at ``step`` (and every later step when
    ``onward``), ``len(sites) * batch`` rows (site-major), going on from the corrupted sample
    ``start`` entering that step."""
    batch, n = start.shape[0], len(sites)
    halves = corrupt_unet.chunk(2) if guided else (corrupt_unet,)
    states = torch.cat([half.repeat(n, 1, 1) for half in halves])
    loop = snapshot.widened(start, n, states)

    def restoring(i: int):
        edits = []
        for j, site in enumerate(sites):
            value = clean_caches[i][site]
            for h in range(len(halves)):
                rows = range(h * n * batch + j * batch, h * n * batch + (j + 1) * batch)
                edits.append(Set(site, value[h * batch:(h + 1) * batch], rows=rows))
        return model._plan([], edits)

    sample = start.repeat(n, 1, 1, 1)
    unedited = model._plan([], [])
    for i in range(step, steps):
        sample, _ = loop.step(i, sample, restoring(i) if i == step or onward else unedited)
    return sample
