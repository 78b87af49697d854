"""Causal tracing on diffusion U-Nets (``mechinterp.diffusion.trace``).

The trace must equal the site x timestep sweep run on text states noised by hand, and on the
shipped toy-unet it must find the known route: the colour word reaches the image through the
cross-attention of the last transformer layer, and restoring the last blocks restores the
image.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import mechinterp
from mechinterp import Site, select
from mechinterp.diffusion.denoise import generate
from mechinterp.diffusion.sweep import timestep_patch
from mechinterp.diffusion.trace import CleanSimilarity, causal_trace, subject_positions
from mechinterp.errors import InputError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


@pytest.fixture(scope="module")
def toy():
    return mechinterp.load("toy-unet")


def test_subject_positions(toy):
    assert subject_positions(toy, "red circle", "red") == (1, 2)
    assert subject_positions(toy, "red circle", "circle") == (2, 3)
    assert subject_positions(toy, "red circle", (1, 3)) == (1, 3)
    length = toy.token_ids("red circle").shape[1]
    assert subject_positions(toy, "red circle", (-2, -1)) == (length - 2, length - 1)
    with pytest.raises(InputError, match="does not occur"):
        subject_positions(toy, "red circle", "square")
    with pytest.raises(InputError, match="at least one"):
        subject_positions(toy, "red circle", (2, 2))
    with pytest.raises(InputError, match="substring"):
        subject_positions(toy, "red circle", 1)


def test_trace_equals_the_sweep_on_hand_noised_states(toy):
    """Same seed, same draws: the trace is the sweep over states noised by hand, with every
    row starting from the same noise, and the default metric is the distance to the clean
    image."""
    samples, seed, scale = 3, 5, 0.7
    sites = [Site("block", layer=4), Site("cross_v", layer=3, pos=1)]
    result = causal_trace(toy, "red circle", "red", sites=sites, samples=samples, noise=scale,
                          steps=STEPS, seed=seed, progress=False)

    clean = toy.encode(["red circle"])
    draws = torch.randn(samples, 1, clean.shape[-1], generator=torch.Generator().manual_seed(seed))
    noised = clean.repeat(samples, 1, 1)
    noised[:, 1:2] += scale * draws.to(noised.dtype)
    start = torch.randn(1, *toy.sample_shape, generator=torch.Generator().manual_seed(seed))
    reference = generate(toy, clean, steps=STEPS, noise=start)
    by_hand = timestep_patch(toy, clean.repeat(samples, 1, 1), noised,
                             metric=CleanSimilarity(reference.images), sites=sites, at_steps=[0],
                             window="onward", steps=STEPS, noise=start.repeat(samples, 1, 1, 1),
                             progress=False)
    assert torch.equal(result.values, by_hand.values)
    assert torch.equal(result.corrupt, by_hand.corrupt)
    assert result.window == "all" and result.steps == (0,)
    # The clean rows are the clean image itself: distance 0 on every row.
    assert torch.allclose(result.clean, torch.zeros(samples), atol=1e-10)


def test_toy_unet_route_of_the_colour_word(toy):
    """Noise on the colour word changes the image; the last blocks restore it, and of the
    colour word's cross-attention values only the last transformer layer's restore much."""
    layers = len(toy.layer_names("cross_v"))
    sites = [*toy.sites(select("block")),
             *(Site("cross_v", layer=layer, pos=1) for layer in range(layers))]
    result = causal_trace(toy, "red circle", "red", sites=sites, samples=4, steps=8,
                          progress=False)
    assert bool((result.corrupt < result.clean - 1e-3).all())  # every draw moved the image
    restored = dict(zip([str(s) for s in result.sites], result.normalized()[:, 0].tolist()))
    assert restored["block.3"] > 0.9 and restored["block.4"] > 0.9
    last = restored[f"cross_v.{layers - 1}[pos=1]"]
    earlier = [restored[f"cross_v.{layer}[pos=1]"] for layer in range(layers - 1)]
    assert last > 0.3 and last > 3 * max(earlier)


def test_windows_per_step(toy):
    """Restoring the last block from the first step on restores the whole image; from a later
    step on, or at the first step alone, it restores less (the noised text keeps acting)."""
    block = [Site("block", layer=4)]
    onward = causal_trace(toy, "red circle", "red", sites=block, samples=2, steps=STEPS,
                          window="onward", at_steps=[0, 3], progress=False)
    assert onward.values.shape == (2, 1, 2) and onward.window == "onward"
    once = causal_trace(toy, "red circle", "red", sites=block, samples=2, steps=STEPS,
                        window="step", at_steps=[0], progress=False)
    from_start, from_later = onward.normalized()[0].tolist()
    assert from_start > 0.99
    assert from_later < from_start - 0.1
    assert float(once.normalized()[0, 0]) < from_start - 0.1


def test_bad_input(toy):
    with pytest.raises(InputError, match="window"):
        causal_trace(toy, "red circle", "red", window="some", steps=2, progress=False)
    with pytest.raises(InputError, match="at_steps"):
        causal_trace(toy, "red circle", "red", at_steps=[0], steps=2, progress=False)
    with pytest.raises(InputError, match="samples"):
        causal_trace(toy, "red circle", "red", samples=0, steps=2, progress=False)
    with pytest.raises(InputError, match="noise"):
        causal_trace(toy, "red circle", "red", noise=-1.0, steps=2, progress=False)
    with pytest.raises(ShapeError, match="single prompt"):
        causal_trace(toy, toy.encode(["red circle", "blue square"]), (1, 2), steps=2,
                     progress=False)
    with pytest.raises(InputError, match="text prompt"):
        causal_trace(toy, toy.encode(["red circle"]), "red", steps=2, progress=False)
