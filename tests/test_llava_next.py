"""LLaVA-NeXT: every site reads and writes; the vision tower's and the projector's sites see one
prompt's crops side by side; image tokens say which crop, grid cell and projector row they
show (newline tokens included); sweeps, games and tracing run over them."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import mechinterp
from mechinterp import Set, Site, Tokens, Zero
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.patching import LogitDiff, activation_patch
from mechinterp.sites import select
from tests.hand_patches import assert_cells_equal_hand_patches

IMAGE = 63
SIDE = 4  # 32 x 32 pixel crops in 8 x 8 patches
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _llava_next(dtype=torch.float64):
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text,
                                          image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(config).eval().to(dtype)


@pytest.fixture(scope="module")
def model():
    return mechinterp.load(_llava_next())


def _crops(size: tuple[int, int]) -> int:
    return image_size_to_num_patches(list(size), PINPOINTS, 32)


def _image_token_count(module, size: tuple[int, int]) -> int:
    """How many image tokens the model fills for an image of ``size``, asked of the model."""
    features = [torch.zeros(_crops(size), SIDE * SIDE, 1, dtype=torch.float64)]
    _, lengths = module.model.pack_image_features(features, torch.tensor([size]), "default",
                                                  image_newline=torch.zeros(1, dtype=torch.float64))
    return int(lengths[0])


def _inputs(module, seed: int, rows: int = 2, size: tuple[int, int] = (30, 60)) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [IMAGE] * _image_token_count(module, size) + [7, 8, 9]] * rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(rows, _crops(size), 3, 32, 32, generator=generator,
                                        dtype=torch.float64),
            "image_sizes": torch.tensor([list(size)] * rows)}


VISION = ["vision.embed", "vision.resid_pre", "vision.attn_out", "vision.resid_mid",
          "vision.mlp_out", "vision.resid_post", "vision.head", "vision.q", "vision.k", "vision.v",
          "vision.neuron"]
LANGUAGE = ["embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "head", "q",
            "k", "v", "pattern", "neuron", "projector"]


@pytest.mark.parametrize("component", VISION + LANGUAGE)
def test_every_site_reads_and_writing_its_own_value_is_bit_identical(model, component):
    inputs = _inputs(model._module, 1)
    glob = component in ("embed", "projector", "vision.embed")
    # The tower's features come from its second-to-last layer: layer 0 of 2.
    site = Site(component, layer=None if glob else 0 if component.startswith("vision.") else 1)
    base = model.run(inputs, cache=[site])
    with torch.no_grad():
        plain = model._module(**inputs).logits
    assert torch.equal(base.logits, plain)
    value = base.cache[site]
    assert value.shape[0] == 2
    assert torch.equal(model.run(inputs, edits=[Set(site, value)]).logits, base.logits)
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    assert not torch.equal(model.run(inputs, edits=[Set(site, value + noise)]).logits, base.logits)


def test_tower_and_projector_sites_see_the_crops_side_by_side(model):
    inputs = _inputs(model._module, 2)
    crops = _crops((30, 60))
    sites = [Site("vision.resid_post", layer=0), Site("vision.head", layer=0, head=2),
             Site("projector"), Site("vision.embed", pos=-1)]
    cache = model.run(inputs, cache=sites).cache
    assert [tuple(cache[s].shape) for s in sites] == [
        (2, crops * 17, 32), (2, crops * 17, 8), (2, crops * 16, 32), (2, 32)]
    # Row c * 17 + i of a prompt is token i of its crop c, as the tower holds it.
    with torch.no_grad():
        tower = model._module.model.vision_tower(inputs["pixel_values"].flatten(0, 1),
                                                 output_hidden_states=True)
    torch.testing.assert_close(cache[sites[0]], tower.hidden_states[1].reshape(2, crops * 17, 32),
                               rtol=0, atol=0)
    with pytest.raises(SiteError, match="attends within each image crop"):
        model.run(inputs, cache=[Site("vision.pattern", layer=0)])


def test_a_head_ablation_at_one_crop_token_equals_a_hand_written_hook(model):
    inputs = _inputs(model._module, 3)
    crops = _crops((30, 60))
    module = model._module.model.vision_tower.encoder.layers[0].self_attn.out_proj

    def zero(_module, args):
        x = args[0].clone()  # [prompts * crops, 17, 32]
        x[1 * crops + 2, 5, 1 * 8:2 * 8] = 0  # prompt 1, crop 2, token 5, head 1
        return (x,)

    handle = module.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            expected = model._module(**inputs).logits
    finally:
        handle.remove()
    site = Site("vision.head", layer=0, pos=2 * 17 + 5, head=1)
    ablated = model.run(inputs, edits=[Zero(site, rows=(1,))])
    torch.testing.assert_close(ablated.logits, expected, rtol=0, atol=0)
    assert not torch.equal(ablated.logits, model.run(inputs).logits)


@pytest.mark.parametrize("size", [(30, 60), (20, 60), (60, 20), (64, 64)])
def test_image_tokens_say_what_each_token_shows(model, size):
    """Each image token is filled by the projector row its layout names, newline tokens by the
    model's newline embedding; the base view is the tower's grid, the high-resolution rows end
    in a newline and have one width, and crops sit side by side in the grid."""
    inputs = _inputs(model._module, 4, size=size)
    tokens = model.image_tokens(inputs)
    assert tokens.positions == model.image_positions(inputs)
    cache = model.run(inputs, cache=[Site("projector"), Site("resid_pre", layer=0)]).cache
    projector, embeds = cache[Site("projector")], cache[Site("resid_pre", layer=0)]
    for position, feature in zip(tokens.positions, tokens.feature, strict=True):
        expected = model._module.model.image_newline if feature < 0 else projector[0, feature]
        assert torch.equal(embeds[0, position], expected)
    assert tokens.grid == (SIDE, SIDE)
    base = tokens.at(crop=0)
    assert [tokens.feature[tokens.positions.index(p)] for p in base] == list(range(SIDE * SIDE))
    assert tokens.at(rows=1, cols=(2, 3)) == (tokens.positions[6], tokens.positions[7])
    # High-resolution rows: each a run of cells 0.. then its newline.
    high = [i for i, c in enumerate(tokens.crop) if c != 0]
    rows = max(tokens.row[i] for i in high) + 1
    assert len(tokens.newlines) == rows
    widths = {sum(1 for i in high if tokens.row[i] == r and tokens.crop[i] > 0) for r in range(rows)}
    assert len(widths) == 1
    assert len(set(tokens.feature) - {-1}) == len(tokens.feature) - len(tokens.newlines)
    if size == (30, 60):  # a 1 x 2 grid of crops with nothing to unpad: cell (2, 5) is cell
        # (2, 1) of crop 2, its projector row 2 * 16 + 2 * 4 + 1
        cell = tokens.at(rows=2, cols=5, crop=None)
        assert tokens.feature[tokens.positions.index(cell[0])] == 2 * 16 + 2 * SIDE + 1


# Two images that fill the same 52 image tokens: a 1 x 2 grid of crops, and a 2 x 2 grid
# whose padding rows are dropped.
SAME_COUNT = ((30, 60), (36, 60))


def test_batches_of_different_crop_counts(model):
    """Prompts whose images select different grids run together (their crops padded); image
    tokens, and tower and projector sites, which split the tower's rows per prompt, refuse
    them."""
    parts = [model._as_tokens(_inputs(model._module, 6, rows=1, size=size)) for size in SAME_COUNT]
    assert [_crops(size) for size in SAME_COUNT] == [3, 5]
    assert parts[0].shape == parts[1].shape
    batch = Tokens.cat(parts)
    assert batch.extras["pixel_values"].shape[1] == 5
    assert torch.equal(batch.extras["pixel_values"][0, 3:], torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    site = Site("resid_post", layer=1)
    together = model.run(batch, cache=[site]).cache[site]
    for row, part in enumerate(parts):
        torch.testing.assert_close(together[row], model.run(part, cache=[site]).cache[site][0],
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(SiteError, match="same number of crops"):
        model.run(batch, cache=[Site("vision.resid_post", layer=0)])
    with pytest.raises(InputError, match="fill their image tokens differently"):
        model.image_tokens(batch)
    with pytest.raises(ShapeError, match="same number of positions"):
        Tokens.cat([parts[0], model._as_tokens(_inputs(model._module, 6, rows=1, size=(20, 60)))])


def test_sweeps_over_image_tokens_and_tower_sites_equal_hand_patches(model):
    clean, corrupt = _inputs(model._module, 7, rows=2), _inputs(model._module, 8, rows=2)
    tokens = model.image_tokens(clean)
    image_sites = select("resid_pre", "attn_out").layers().positions(*tokens.newlines[:2],
                                                                      *tokens.at(rows=0))
    reused = activation_patch(model, clean, corrupt, image_sites, LogitDiff(3, 4), progress=False,
                              batch_size=4)
    plain = activation_patch(model, clean, corrupt, image_sites, LogitDiff(3, 4), progress=False,
                             reuse=False)
    torch.testing.assert_close(reused.values, plain.values, rtol=0, atol=1e-12)
    tower = [Site("vision.resid_post", layer=0, pos=2 * 17 + 4), Site("vision.head", layer=0, head=1),
             Site("projector", pos=-1), Site("resid_pre", layer=1, pos=tokens.newlines[0])]
    swept = activation_patch(model, clean, corrupt, tower, LogitDiff(3, 4), progress=False)
    assert_cells_equal_hand_patches(model, clean, corrupt, tower, swept)
    assert bool((swept.values != swept.corrupt[:, None]).all())


def test_games_and_tracing_over_crops(model):
    """A component game whose players are the base view and each high-resolution crop (their
    projector rows), and causal tracing with the image tokens noised."""
    from mechinterp.interactions import exact
    from mechinterp.interactions.model_games import ComponentGame
    from mechinterp.tracing import causal_trace

    prompt = _inputs(model._module, 9, rows=1)
    crops = _crops((30, 60))
    players = [Site("projector", pos=tuple(range(c * 16, (c + 1) * 16))) for c in range(crops)]
    game = ComponentGame(model, prompt, players, output=lambda logits: logits[:, 3] - logits[:, 4],
                         progress=False)
    values = game.table()
    for mask in range(1 << crops):
        absent = [p for i, p in enumerate(players) if not mask >> i & 1]
        logits = model.run(prompt, edits=[Zero(p) for p in absent]).logits[0, -1]
        torch.testing.assert_close(values[mask], logits[3] - logits[4], rtol=0, atol=1e-12)
    shapley = exact(game, index="SV")
    assert abs(sum(shapley[(i,)] for i in range(crops)) - float(values[-1] - values[0])) < 1e-10

    tokens = model.image_tokens(prompt)
    trace = causal_trace(model, prompt, (tokens.positions[0], tokens.positions[-1] + 1),
                         kinds=("hidden",), samples=2, noise=0.5, answer=3, progress=False)
    assert trace.scores.shape == (1, prompt["input_ids"].shape[1], 2)
    assert trace.low != pytest.approx(trace.base, rel=1e-3)  # the noise reached the answer
    # Restoring the last token's final state restores the clean answer.
    assert float(trace.scores[0, -1, 1]) == pytest.approx(trace.base, rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sweeps_and_games_agree_with_cpu(model):
    """In float64, a sweep over image tokens, newlines and crop tokens of the tower, and a
    game over the crops' projector rows, give the CPU's values on the GPU (to float32
    rounding: Llama's RMSNorm computes in float32 whatever the model's dtype)."""
    from mechinterp.interactions.model_games import ComponentGame

    gpu = mechinterp.load(_llava_next().cuda())
    clean, corrupt = _inputs(model._module, 10), _inputs(model._module, 11)
    tokens = model.image_tokens(clean)
    sites = [*model.sites(select("resid_pre").layers().positions(*tokens.newlines, *tokens.at(rows=1))),
             Site("vision.resid_post", layer=0, pos=2 * 17 + 3), Site("projector", pos=-1)]
    on_cpu = activation_patch(model, clean, corrupt, sites, LogitDiff(3, 4), progress=False)
    on_gpu = activation_patch(gpu, {k: v.cuda() for k, v in clean.items()},
                              {k: v.cuda() for k, v in corrupt.items()}, sites, LogitDiff(3, 4),
                              progress=False)
    torch.testing.assert_close(on_gpu.values.cpu(), on_cpu.values, rtol=1e-6, atol=1e-7)
    prompt = _inputs(model._module, 12, rows=1)
    players = [Site("projector", pos=tuple(range(c * 16, (c + 1) * 16))) for c in range(3)]
    values = [ComponentGame(m, {k: v.to(device) for k, v in prompt.items()}, players,
                            output=lambda logits: logits[:, 3] - logits[:, 4], progress=False).table()
              for m, device in ((model, "cpu"), (gpu, "cuda"))]
    torch.testing.assert_close(values[1].cpu(), values[0], rtol=1e-6, atol=1e-7)
