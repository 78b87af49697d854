"""``mechinterp demo --model toy-unet``: the shipped diffusion toy, its cross-attention and its
timesteps.

The U-Net draws "colour shape" captions as 16 x 16 images. Its mechanism is known: the colour
word reaches the image only through cross-attention. The report measures how often the
generations show the caption's colour and shape, maps each word's cross-attention over the
image, recolours images by patching the colour word's keys and values, and patches every
cross-attention layer and U-Net block at every denoising step.
"""

from __future__ import annotations

import time

from mechinterp.report import Report, Section
from mechinterp.sites import Site, select

STEPS = 10  # DDIM steps, as in the toy's own evaluation


def unet_sections(report: Report, model, *, seed: int = 1234) -> None:
    """Add the toy U-Net's sections to ``report``."""
    from mechinterp.zoo.train_toy_unet import captions

    every = captions()
    _model_section(report, model, every, seed)
    _maps_section(report, model, seed)
    _mechanism_section(report, model, every, seed)
    _sweep_section(report, model, seed)


def _colours(captions_: list[str]) -> list[str]:
    return [c.split()[0] for c in captions_]


def _rate(got: list, wanted: list) -> float:
    return sum(a == b for a, b in zip(got, wanted)) / len(wanted)


def _model_section(report: Report, model, every: list[str], seed: int) -> None:
    from mechinterp.zoo.train_toy_unet import classify_colour, classify_shape

    images = model.generate(every * 2, steps=STEPS, seed=seed).images
    scores = {"colour": _rate(classify_colour(images), _colours(every * 2)),
              "shape": _rate(classify_shape(images), [c.split()[1] for c in every * 2])}
    facts = {
        "model": repr(model),
        "generations": f"{len(images)} (every caption twice), {STEPS} DDIM steps, no guidance",
        "colour accuracy": f"{scores['colour']:.3f}",
        "shape accuracy": f"{scores['shape']:.3f}",
    }
    report.add(Section("Diffusion model", "A UNet2DConditionModel on 16 x 16 pixels with a "
                       "layer-free text encoder; the text reaches it only through cross-attention.",
                       facts), data=scores)


def _maps_section(report: Report, model, seed: int) -> None:
    from mechinterp.diffusion.daam import cross_attention_maps

    shown = ["red circle", "blue square", "yellow triangle", "green cross"]
    maps = cross_attention_maps(model, shown, steps=STEPS, seed=seed)
    shape = (maps.images.max(1).values > 0.5).float()
    colour = maps.maps[:, 1]
    inside = float(((colour * shape).sum((1, 2)) / shape.sum((1, 2))).mean())
    outside = float(((colour * (1 - shape)).sum((1, 2)) / (1 - shape).sum((1, 2))).mean())
    names = [report.save_figure(maps.plot(row), f"unet_attention_{row}.png") for row in range(2)]
    facts = {
        "captions": ", ".join(shown),
        "colour word's attention on the shape's pixels": f"{inside:.3f}",
        "... on the background": f"{outside:.3f}",
    }
    report.add(Section("Cross-attention maps",
                       "Each word's cross-attention probability, averaged over heads, layers "
                       "and steps and upsampled to the image (DAAM): the colour word attends to "
                       "the pixels of the shape.", facts, names),
               data={"inside": inside, "outside": outside})


def _mechanism_section(report: Report, model, every: list[str], seed: int) -> None:
    from mechinterp.interventions import Set, Zero
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_unet import classify_colour

    base = every
    # Each caption's source has the next colour round the palette and the next shape.
    source = [f"{shapes.COLOUR_NAMES[(shapes.COLOUR_NAMES.index(c.split()[0]) + 1) % 7]} "
              f"{shapes.SHAPES[(shapes.SHAPES.index(c.split()[1]) + 1) % 4]}" for c in base]
    kv = model.sites(select("cross_k", "cross_v"))
    cached = model.generate(source, steps=STEPS, seed=seed, cache=kv).cache

    def patched(position: int) -> list[str]:
        edits = {step: [Set(site.at(pos=position), cache[site][:, position]) for site in cache]
                 for step, cache in cached.items()}
        return classify_colour(model.generate(base, steps=STEPS, seed=seed, edits=edits).images)

    n = model.table.dims_for("cross_attn").n_layers
    muted = {step: [Zero(Site("cross_attn", layer=layer)) for layer in range(n)]
             for step in range(STEPS)}
    blind = classify_colour(model.generate(base, steps=STEPS, seed=seed, edits=muted).images)
    rates = {"colour_word_patched_source_colour": _rate(patched(1), _colours(source)),
             "shape_word_patched_base_colour": _rate(patched(2), _colours(base)),
             "cross_attention_zeroed_colour": _rate(blind, _colours(base))}
    facts = {
        "colour word's keys and values from another caption: images in that caption's colour":
            f"{rates['colour_word_patched_source_colour']:.3f}",
        "shape word's keys and values patched instead: images keep their colour":
            f"{rates['shape_word_patched_base_colour']:.3f}",
        "every cross-attention output zeroed: colour still right":
            f"{rates['cross_attention_zeroed_colour']:.3f} (chance 1/7)",
    }
    report.add(Section("Cross-attention carries the colour",
                       f"Interventions at `cross_k`/`cross_v` (text position 1 or 2) and "
                       f"`cross_attn` sites of all {n} layers at every step, {len(base)} captions.",
                       facts), data=rates)


def _sweep_section(report: Report, model, seed: int) -> None:
    from mechinterp.diffusion.sweep import timestep_patch
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_unet import ColourShift

    clean = [f"{c} {shapes.SHAPES[i % 4]}" for i, c in enumerate(shapes.COLOUR_NAMES)]
    corrupt = [f"{shapes.COLOUR_NAMES[(i + 3) % 7]} {shapes.SHAPES[i % 4]}"
               for i in range(len(clean))]
    metric = ColourShift(_colours(clean), _colours(corrupt))
    start = time.perf_counter()
    result = timestep_patch(model, clean, corrupt, metric=metric, steps=STEPS, seed=seed,
                            sites=model.sites(select("cross_attn", "block")), window="onward",
                            progress=False)
    seconds = time.perf_counter() - start
    grid = result.normalized()
    name = report.save_figure(result.plot(), "unet_timestep_patching.png")
    facts = {
        "pairs": f"{len(clean)} captions, each against a caption of another colour",
        "cells": f"{grid.numel()} ({len(result.sites)} sites x {len(result.steps)} steps) in "
                 f"{seconds:.1f} s",
        "restored from the first step on, per site": ", ".join(
            f"{site} {float(v):.2f}" for site, v in zip(result.sites, grid[:, 0])),
        "restored from the middle step on, per site": ", ".join(
            f"{site} {float(v):.2f}" for site, v in zip(result.sites, grid[:, STEPS // 2])),
    }
    report.add(Section("Site x timestep patching",
                       "Each cell restores one site's clean value from one denoising step to the "
                       "end of the corrupted generation and scores the finished image by its "
                       "colour (1: the clean colour's score, 0: the corrupted one's).",
                       facts, [name]),
               data={"sites": [str(s) for s in result.sites], "steps": list(result.steps),
                     "grid": grid.tolist()})
