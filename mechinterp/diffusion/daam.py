"""Cross-attention maps: for each text token, where in the image the U-Net attends to it.

In the spirit of DAAM (Tang et al., 2023): the cross-attention probabilities of every
``attn2`` (``cross_pattern`` sites) at every denoising step are averaged over heads, each layer's
map over its own feature-map grid is upsampled bilinearly to the sample's resolution, and the
maps are averaged over layers and steps. A map is a mean attention probability, so a token's
map lies in [0, 1] and the maps of one row sum to 1 at every pixel.

Examples:
    >>> import mechinterp
    >>> from mechinterp.diffusion.daam import cross_attention_maps
    >>> model = mechinterp.load("toy-unet")
    >>> maps = cross_attention_maps(model, ["red circle"], steps=10)
    >>> tuple(maps.maps.shape), maps.tokens[0]
    ((1, 4, 16, 16), ['<bos>', 'red', 'circle', '<eos>'])
    >>> float(maps.maps.sum(1).mean())  # every pixel's attention sums to one over the tokens
    1.0...
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechinterp.errors import InputError
from mechinterp.saved import read_result, write_result
from mechinterp.sites import Site

_FORMAT = "mechinterp.AttentionMaps/1"


@dataclass
class AttentionMaps:
    """Per-token cross-attention heatmaps of generated images.

    Attributes:
        maps: ``float32 [batch, token, height, width]`` at the sample's resolution.
        tokens: each row's token strings (one per text position).
        layers: the transformer layers averaged.
        steps: the denoising steps averaged.
        images: ``[batch, 3, height, width]`` the generated images, if the model makes images.
    """

    maps: torch.Tensor
    tokens: list[list[str]]
    layers: tuple[int, ...]
    steps: tuple[int, ...]
    images: torch.Tensor | None = None

    def token_map(self, row: int, token: int | str) -> torch.Tensor:
        """``[height, width]`` map of one row's token, by position or by its string."""
        if isinstance(token, str):
            if token not in self.tokens[row]:
                msg = f"token {token!r} is not in row {row}'s tokens {self.tokens[row]}"
                raise InputError(msg)
            token = self.tokens[row].index(token)
        return self.maps[row, token]

    def to_frame(self):
        """A long pandas frame: row, position, token, y, x, value."""
        import pandas as pd

        batch, n_tokens, height, width = self.maps.shape
        grid = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width),
                                          indexing="ij"), -1).reshape(-1, 2)
        records = [
            {"row": b, "position": t, "token": self.tokens[b][t], "y": int(y), "x": int(x),
             "value": float(v)}
            for b in range(batch) for t in range(n_tokens)
            for (y, x), v in zip(grid.tolist(), self.maps[b, t].flatten().tolist())
        ]
        return pd.DataFrame.from_records(records)

    def plot(self, row: int = 0, tokens: Sequence[int | str] | None = None):
        """A matplotlib figure: the image (if any), then one heatmap per token."""
        import matplotlib.pyplot as plt

        chosen = list(range(len(self.tokens[row]))) if tokens is None else list(tokens)
        maps = [self.token_map(row, t) for t in chosen]
        names = [self.tokens[row][t] if isinstance(t, int) else t for t in chosen]
        panels = len(maps) + (self.images is not None)
        figure, axes = plt.subplots(1, panels, figsize=(2 * panels, 2.3), squeeze=False)
        axes = list(axes[0])
        if self.images is not None:
            ax = axes.pop(0)
            ax.imshow(self.images[row].permute(1, 2, 0).numpy())
            ax.set_title("image")
            ax.axis("off")
        for ax, name, heat in zip(axes, names, maps):
            ax.imshow(heat.numpy(), cmap="magma")
            ax.set_title(name)
            ax.axis("off")
        figure.tight_layout()
        return figure

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors: the maps and images, the labels as JSON metadata),
        atomically."""
        tensors = {"maps": self.maps}
        if self.images is not None:
            tensors["images"] = self.images
        meta = {"tokens": self.tokens, "layers": list(self.layers), "steps": list(self.steps)}
        write_result(path, tensors, {"labels": json.dumps(meta)}, format=_FORMAT)

    @classmethod
    def load(cls, path: str | Path) -> AttentionMaps:
        """Read maps written by :meth:`save`."""
        tensors, metadata = read_result(path, format=_FORMAT)
        meta = json.loads(metadata["labels"])
        return cls(tensors["maps"], meta["tokens"], tuple(meta["layers"]), tuple(meta["steps"]),
                   tensors.get("images"))


def cross_attention_maps(model, prompts: str | Sequence[str], *, steps: int = 50, seed: int = 0,
                         noise: torch.Tensor | None = None, guidance_scale: float | None = None,
                         negative_prompt: str = "", layers: Iterable[int] | None = None,
                         at_steps: Iterable[int] | None = None,
                         progress: bool = False) -> AttentionMaps:
    """Generate from ``prompts`` and map each text token's cross-attention over the image.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel`.
        prompts: the prompts (one image each).
        steps, seed, noise, guidance_scale, negative_prompt: as in ``model.generate``; with
            guidance, the maps are the conditional rows'.
        layers: transformer layers to average (default: all).
        at_steps: denoising steps to average (default: all).
        progress: show a progress bar over the steps.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    n_layers = model.table.dims_for("cross_pattern").n_layers
    chosen = list(range(n_layers)) if layers is None else list(layers)
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            msg = f"layers must be transformer layers in [0, {n_layers}); got {layer!r}"
            raise InputError(msg)
    if not chosen:
        msg = "layers must name at least one transformer layer; got none"
        raise InputError(msg)
    _, height, width = model.sample_shape if noise is None else (0, *noise.shape[2:])
    sites = [Site("cross_pattern", layer=layer) for layer in chosen]
    grids = [model.grid("cross_pattern", layer, (height, width)) for layer in chosen]
    batch = len(prompts)
    total: list[torch.Tensor] = []
    seen: list[int] = []

    def accumulate(step: int, cache) -> None:
        step_sum = None
        for site, (rows, cols) in zip(sites, grids):
            probs = cache[site][-batch:].float()  # the conditional rows under guidance
            heads = probs.mean(1)  # [batch, pixels of the layer, tokens]
            grid = heads.transpose(1, 2).unflatten(2, (rows, cols))
            up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            step_sum = up if step_sum is None else step_sum + up
        total.append(step_sum / len(sites))
        seen.append(step)
        if len(total) > 1:  # keep one running sum rather than every step's maps
            total[:] = [total[0] + total[1]]

    generation = model.generate(prompts, steps=steps, seed=seed, noise=noise,
                                guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                cache=sites, cache_steps=at_steps, progress=progress,
                                callback=accumulate)
    maps = (total[0] / len(seen)).cpu()
    return AttentionMaps(maps, _token_strings(model, prompts, maps.shape[1]), tuple(chosen),
                         tuple(seen), generation.images)


def _token_strings(model, prompts: Sequence[str], n_tokens: int) -> list[list[str]]:
    """Each prompt's tokens as strings, as the text encoder saw them."""
    ids = model.token_ids(prompts)
    tokenizer = model.tokenizer
    if tokenizer is None or ids.shape[1] != n_tokens:
        return [[str(i) for i in range(n_tokens)] for _ in prompts]
    return [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
