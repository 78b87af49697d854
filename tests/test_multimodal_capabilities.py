"""Causal tracing, attribution patching, games and SAEs over a multimodal model's image tokens.

A tiny random LLaVA in float64 (the configuration of ``tests/test_multimodal.py``): each
capability, run over image tokens, must equal the same intervention written by hand.
"""

from __future__ import annotations

import pytest
import torch

import mechinterp
from mechinterp import Set, Site, Zero
from mechinterp.interactions.model_games import ComponentGame
from mechinterp.patching import LogitDiff, activation_patch
from mechinterp.patching.attribution import attribution_patch
from mechinterp.sae import SAE
from mechinterp.sae.interventions import SAEEdit
from mechinterp.tracing.trace import causal_trace
from tests.hand_patches import assert_cells_equal_hand_patches
from tests.test_multimodal import N_IMAGE, _inputs, _llava

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    return mechinterp.load(_llava())


def _one(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value[:1] for name, value in inputs.items()}


def test_causal_trace_noises_image_tokens_after_the_merge(llava):
    """Noise on an image-token subject reaches the language model (it is added after the image
    features replace the image tokens' embeddings), and each restored cell equals a hand-written
    run with the same noise and the clean state restored."""
    prompt = _one(_inputs(41))
    image = llava.image_positions(prompt)
    begin, end = image[0], image[0] + 6
    samples, scale = 3, 0.5
    draws = torch.randn(samples, end - begin, llava.dims.d_model,
                        generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = causal_trace(llava, prompt, (begin, end), kinds=("hidden",), samples=samples,
                          noise=scale, draws=draws, progress=False)
    assert result.low < result.base - 1e-6  # the noise moved the answer's probability
    answer = result.answer

    def noised_probability(extra_edits) -> float:
        rows = {name: value.repeat(samples, *([1] * (value.dim() - 1)))
                for name, value in prompt.items()}
        merged = llava.run(rows, cache=[Site("resid_pre", layer=0)]).cache[
            Site("resid_pre", layer=0)].clone()
        merged[:, begin:end] += scale * draws
        logits = llava.run(rows, edits=[Set(Site("resid_pre", layer=0), merged), *extra_edits]
                           ).logits[:, -1]
        return float(logits.softmax(-1)[:, answer].mean())

    # Prob scores in float32 (a probability needs no more).
    assert result.low == pytest.approx(noised_probability([]), rel=1e-6)
    for pos, layer in ((begin + 2, 0), (end - 1, 1), (len(prompt["input_ids"][0]) - 1, 1)):
        site = Site("resid_post", layer=layer, pos=pos)
        clean = llava.run(prompt, cache=[site]).cache[site]
        expected = noised_probability([Set(site, clean.expand(samples, -1))])
        assert float(result.scores[0, pos, layer]) == pytest.approx(expected, rel=1e-6)


def test_attribution_patching_over_image_tokens_is_the_first_order_term(llava):
    """AtP over image tokens x layers equals the derivative of exact patching along the patch:
    the central difference of ``activation_patch`` at alpha = +-eps."""
    clean, corrupt = _inputs(43), _inputs(44)
    image = llava.image_positions(clean)
    sites = [Site("resid_pre", layer=layer, pos=pos) for layer in (0, 1)
             for pos in (image[0], image[7], image[-1])]
    metric = LogitDiff(3, 4)
    estimate = attribution_patch(llava, clean, corrupt, sites, metric, progress=False)
    # Llama's RMSNorm computes in float32 even in a float64 model: a step much below 1e-3
    # drowns the difference in its rounding.
    eps = 1e-3
    up = activation_patch(llava, clean, corrupt, sites, metric, alpha=eps, progress=False)
    down = activation_patch(llava, clean, corrupt, sites, metric, alpha=-eps, progress=False)
    derivative = (up.values - down.values) / (2 * eps)
    torch.testing.assert_close(estimate.values - estimate.corrupt[:, None], derivative,
                               rtol=2e-3, atol=5e-5)
    assert float(derivative.abs().max()) > 1e-4  # image tokens do move the metric


def test_shapley_players_can_be_image_patches(llava):
    """A game whose players are groups of image tokens (zeroed at the language model's input,
    where the image features have replaced them): each coalition equals zeroing the absent
    groups by hand, and exact Shapley values are efficient."""
    from mechinterp.interactions import moebius_transform, shapley_values

    prompt = _one(_inputs(45))
    image = llava.image_positions(prompt)
    quarters = [tuple(image[i:i + N_IMAGE // 4]) for i in range(0, N_IMAGE, N_IMAGE // 4)]
    players = [Site("resid_pre", layer=0, pos=quarter) for quarter in quarters]
    game = ComponentGame(llava, prompt, players, output="logit-diff", target=(3, 4),
                         progress=False)
    table = game.table()
    for mask in (0b0000, 0b0101, 0b1110):
        absent = [Zero(Site("resid_pre", layer=0, pos=q)) for bit, q in enumerate(quarters)
                  if not mask >> bit & 1]
        logits = llava.run(prompt, edits=absent).logits[0, -1]
        # The game reads its output in float32.
        assert float(table[mask]) == pytest.approx(float(logits[3] - logits[4]), rel=1e-6)
    phi = shapley_values(moebius_transform(table))
    assert float(phi.sum()) == pytest.approx(float(table[-1] - table[0]), abs=1e-10)


def test_saes_attach_at_image_tokens(llava):
    """An SAE on the language model's residual stream: untouched it leaves the run bit-identical
    (the error term is added back); ablating a feature equals subtracting its decoder direction
    times its activation, which is read at the image tokens like anywhere else."""
    prompt = _inputs(47)
    d = llava.dims.d_model
    g = torch.Generator().manual_seed(3)
    sae = SAE(W_enc=torch.randn(d, 64, generator=g, dtype=torch.float64) / d**0.5,
              b_enc=torch.zeros(64, dtype=torch.float64),
              W_dec=torch.randn(64, d, generator=g, dtype=torch.float64) / 8,
              b_dec=torch.zeros(d, dtype=torch.float64))
    site = Site("resid_post", layer=0)
    base = llava.run(prompt, cache=[site])
    untouched = llava.run(prompt, edits=[SAEEdit(site, sae)]).logits
    assert torch.equal(untouched, base.logits)

    x = base.cache[site]
    acts = sae.encode(x.reshape(-1, d)).reshape(*x.shape[:2], -1)
    image = list(llava.image_positions(prompt))
    feature = int(acts[:, image].sum((0, 1)).argmax())
    assert float(acts[:, image, feature].abs().sum()) > 0  # the feature fires on image tokens
    ablated = llava.run(prompt, edits=[SAEEdit(site, sae, ablate=[feature])]).logits
    by_hand = x - acts[..., feature:feature + 1] * sae.W_dec[feature]
    expected = llava.run(prompt, edits=[Set(site, by_hand)]).logits
    torch.testing.assert_close(ablated, expected, rtol=1e-10, atol=1e-10)


def _masked_by_hand(model, prompt, absent: list[int], baseline: torch.Tensor) -> torch.Tensor:
    """Logits with the language model's input embeddings at ``absent`` replaced by
    ``baseline``: a hook on the language model's own input, after the image was merged in."""
    language = model._language_model()

    def mask(_module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, absent] = baseline
        return args, {**kwargs, "inputs_embeds": embeds}

    handle = language.register_forward_pre_hook(mask, with_kwargs=True)
    try:
        with torch.no_grad():
            return model._module(**prompt).logits[0, -1]
    finally:
        handle.remove()


def test_token_games_mask_image_tokens_at_the_language_models_input(llava):
    """A TokenGame player made of image tokens is masked after the image features replace
    the token embeddings (masking ``embed`` would not reach them): every coalition equals
    the hand-masked input."""
    from mechinterp.interactions.model_games import TokenGame

    prompt = _one(_inputs(51))
    image = list(llava.image_positions(prompt))
    players = [image[:8], image[8:], [0, 1], [image[-1] + 1, image[-1] + 2]]
    game = TokenGame(llava, prompt, players=players, output=lambda logits: logits[:, 3] - logits[:, 4],
                     progress=False)
    values = game.table()
    baseline = llava._module.get_input_embeddings().weight.mean(0)
    for mask in range(1 << len(players)):
        absent = [c for i, group in enumerate(players) if not mask >> i & 1 for c in group]
        logits = _masked_by_hand(llava, prompt, absent, baseline)
        torch.testing.assert_close(values[mask], logits[3] - logits[4], rtol=0, atol=1e-12)
    assert values[0b1110] != values[0b1111]  # the image's first half matters


def test_modalities_are_sites_and_players(llava):
    """All image tokens and all text tokens, as one site each in a sweep and as the two players
    of a token game, equal the hand-written patch and masks."""
    from mechinterp.interactions import exact
    from mechinterp.interactions.model_games import TokenGame

    clean, corrupt = _inputs(53), _inputs(54)
    groups = llava.modality_positions(clean)
    assert groups["image"] == llava.image_positions(clean)
    assert sorted(groups["image"] + groups["text"]) == list(range(clean["input_ids"].shape[1]))
    sites = [Site("resid_pre", layer=1, pos=groups[name]) for name in ("image", "text")]
    swept = activation_patch(llava, clean, corrupt, sites, LogitDiff(3, 4), progress=False)
    assert_cells_equal_hand_patches(llava, clean, corrupt, sites, swept)
    prompt = _one(clean)
    game = TokenGame(llava, prompt, players=[list(groups["image"]), list(groups["text"])],
                     output=lambda logits: logits[:, 3] - logits[:, 4], progress=False)
    values = game.table()
    baseline = llava._module.get_input_embeddings().weight.mean(0)
    for mask, absent in ((0, groups["image"] + groups["text"]), (1, groups["text"]),
                         (2, groups["image"]), (3, ())):
        logits = _masked_by_hand(llava, prompt, list(absent), baseline)
        torch.testing.assert_close(values[mask], logits[3] - logits[4], rtol=0, atol=1e-12)
    shapley = exact(game, index="SV")
    assert shapley[(0,)] + shapley[(1,)] == pytest.approx(float(values[3] - values[0]), abs=1e-10)
