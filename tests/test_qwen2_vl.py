"""Qwen2-VL: packed image inputs ride along per prompt; every site of the language model, the
vision tower and the merger is readable and writable; edits and patches equal hand-written
hooks on the plain model, whose multimodal rotary positions mechinterp leaves untouched."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import mechinterp
from mechinterp import Set, Site, Zero
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.model import Tokens
from mechinterp.patching import LogitDiff, activation_patch
from mechinterp.sites import select

IMAGE, VIDEO, START, END, PAD = 60, 61, 58, 59, 0
GRID = (1, 4, 4)  # one frame of 4 x 4 patches, merged 2 x 2 into 4 image tokens
PATCHES, TOKENS, FEATURES = 16, 4, 3 * 2 * 2 * 2  # features: channels x frames x 2 x 2 pixels
PROMPT = [1, 5, START] + [IMAGE] * TOKENS + [END, 7, 8, 9]
POSITIONS = (3, 4, 5, 6)


def _text_config(config_class: type) -> object:
    # mrope_section splits the rotary frequencies (d_head / 2 = 4) into time, height, width.
    return config_class(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                        bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                         "rope_theta": 10000.0})


def _qwen2_vl() -> nn.Module:
    vision = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=16, hidden_size=32, num_heads=2,
                                              mlp_ratio=2, patch_size=2, spatial_merge_size=2,
                                              temporal_patch_size=2)
    text = _text_config(transformers.Qwen2VLTextConfig)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision,
                                        image_token_id=IMAGE, video_token_id=VIDEO,
                                        vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).eval().double()


def _pixels(generator: torch.Generator, images: int) -> torch.Tensor:
    return torch.randn(images * PATCHES, FEATURES, generator=generator, dtype=torch.float64)


def _inputs(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """A processor's output: one image per prompt, pixel values packed across prompts."""
    ids = torch.tensor([PROMPT] * rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": _pixels(torch.Generator().manual_seed(seed), rows),
            "image_grid_thw": torch.tensor([GRID] * rows)}


def _padded(seed: int) -> dict[str, torch.Tensor]:
    """Two prompts, the first one token shorter and padded on the left."""
    inputs = _inputs(seed)
    ids = inputs["input_ids"].clone()
    ids[0] = torch.tensor([PAD, *PROMPT[:-1]])
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def _plain(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the model's own forward, as its processor's output would be passed."""
    with torch.no_grad():
        return module(**inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int()).logits


def _hooked(module: nn.Module, path: str, hook, inputs: dict[str, torch.Tensor], *,
            pre: bool = False) -> torch.Tensor:
    target = module.get_submodule(path)
    handle = target.register_forward_pre_hook(hook) if pre else target.register_forward_hook(hook)
    try:
        return _plain(module, inputs)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def qwen(one_thread):
    return mechinterp.load(_qwen2_vl())


VISION = ["vision.embed", "vision.resid_pre", "vision.attn_out", "vision.resid_mid",
          "vision.mlp_out", "vision.resid_post", "vision.head", "vision.q", "vision.k", "vision.v",
          "vision.pattern", "vision.neuron"]
LANGUAGE = ["embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "head", "q",
            "k", "v", "pattern", "neuron", "projector", "logits"]


def _site(component: str) -> Site:
    glob = component.rsplit(".", 1)[-1] in ("embed", "projector", "logits")
    return Site(component, layer=None if glob else 0 if component.startswith("vision.") else 1)


@pytest.mark.parametrize("component", VISION + LANGUAGE)
def test_every_site_reads_and_writing_its_own_value_is_bit_identical(qwen, component):
    # The tower attends image by image: its pattern is one image's, so one prompt is run.
    rows = 1 if component == "vision.pattern" else 2
    inputs = _inputs(1, rows)
    site = _site(component)
    base = qwen.run(inputs, cache=[site])
    assert torch.equal(base.logits, _plain(qwen._module, inputs))
    value = base.cache[site]
    assert value.shape[0] == rows
    again = qwen.run(inputs, edits=[Set(site, value)])
    assert torch.equal(again.logits, base.logits)
    if component == "logits":
        return
    # A random shift (a constant one would vanish in the norms).
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    changed = qwen.run(inputs, edits=[Set(site, value + noise)])
    assert not torch.equal(changed.logits, base.logits)


def test_vision_and_projector_sites_split_the_packed_sequence_per_prompt(qwen):
    inputs = _inputs(2)
    sites = [Site("vision.resid_post", layer=0), Site("vision.head", layer=1, head=1),
             Site("vision.q", layer=0, pos=-1), Site("vision.neuron", layer=1, pos=(0, 5), neuron=3),
             Site("projector", pos=2)]
    cache = qwen.run(inputs, cache=[*sites, Site("projector")]).cache
    assert [tuple(cache[s].shape) for s in sites] == [(2, 16, 16), (2, 16, 8), (2, 2, 8), (2, 2),
                                                      (2, 32)]
    # Row r of a packed site is prompt r's image: the merger's output in the model's order.
    with torch.no_grad():
        embeds = qwen._module.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(cache[Site("projector")], torch.stack(embeds.pooler_output),
                               rtol=0, atol=0)
    # One prompt alone sees the same values as in the batch.
    alone = qwen.run(_inputs(2, rows=1) | {"pixel_values": inputs["pixel_values"][PATCHES:]},
                     cache=[sites[0]]).cache[sites[0]]
    torch.testing.assert_close(alone[0], cache[sites[0]][1], rtol=1e-12, atol=1e-12)
    assert len(qwen.sites(select("vision.head").layers().heads())) == 2 * 2
    with pytest.raises(SiteError, match=r"head for vision.head.0\[head=2\] must lie in \[0, 2\)"):
        qwen.run(inputs, cache=[Site("vision.head", layer=0, head=2)])
    with pytest.raises(SiteError, match="ran more than once"):
        qwen.run(inputs, cache=[Site("vision.pattern", layer=0)])


def test_vision_head_ablation_equals_a_hand_written_hook(qwen):
    inputs = _inputs(3)

    def zero_head(_module, args):
        x = args[0].clone()
        x[:, 8:16] = 0  # head 1 of 2, d_head 8; the tower's tensors have no batch axis
        return (x,)

    expected = _hooked(qwen._module, "model.visual.blocks.0.attn.proj", zero_head, inputs, pre=True)
    out = qwen.run(inputs, edits=[Zero(Site("vision.head", layer=0, head=1))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)


def test_head_ablation_at_an_image_token_equals_a_hand_written_hook(qwen):
    inputs = _padded(4)
    assert qwen.image_positions(inputs) == POSITIONS
    pos, head = POSITIONS[1], 2
    columns = [1 + pos, pos]  # the first row starts one column late

    def zero_head(_module, args):
        x = args[0].clone()
        for row, column in enumerate(columns):
            x[row, column, head * 8:(head + 1) * 8] = 0
        return (x,)

    path = "model.language_model.layers.1.self_attn.o_proj"
    expected = _hooked(qwen._module, path, zero_head, inputs, pre=True)
    plain = qwen.run(inputs)
    # Left padding and the multimodal positions are the model's own.
    assert torch.equal(plain.logits, _plain(qwen._module, inputs))
    out = qwen.run(inputs, edits=[Zero(Site("head", layer=1, pos=pos, head=head))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, plain.logits)


def test_image_positions_and_patching_an_image_token(qwen):
    clean, corrupt = _inputs(5), _inputs(6)
    positions = qwen.image_positions(clean)
    assert positions == POSITIONS
    # The language model's input at image positions is the merger's output.
    cache = qwen.run(clean, cache=[Site("projector"), Site("resid_pre", layer=0, pos=positions)]).cache
    torch.testing.assert_close(cache[Site("resid_pre", layer=0, pos=positions)],
                               cache[Site("projector")], rtol=0, atol=0)
    pos = positions[1]
    result = activation_patch(qwen, clean, corrupt, select("resid_pre").layers(1).positions(*positions),
                              LogitDiff(3, 4), progress=False)
    kept = {}

    def keep(_module, args):
        kept["value"] = args[0][:, pos].clone()

    def patch(_module, args):
        x = args[0].clone()
        x[:, pos] = kept["value"]
        return (x,)

    path = "model.language_model.layers.1"
    _hooked(qwen._module, path, keep, clean, pre=True)
    logits = _hooked(qwen._module, path, patch, corrupt, pre=True)[:, -1]
    cell = next(r for r in result.to_records() if r["pos"] == pos)
    assert cell["mean"] == pytest.approx((logits[:, 3] - logits[:, 4]).mean().item(), abs=1e-10)


def test_patching_the_projector_equals_a_hand_written_hook(qwen):
    clean, corrupt = _inputs(7), _inputs(8)
    result = activation_patch(qwen, clean, corrupt, select("projector").positions(0, 2),
                              LogitDiff(3, 4), progress=False)
    kept = {}

    def keep(_module, _args, output):
        kept["value"] = output.clone()

    def patch(_module, _args, output):
        # The merger's rows are the image tokens of every prompt, one prompt after another.
        patched = output.clone()
        rows = [prompt * TOKENS + 2 for prompt in range(2)]
        patched[rows] = kept["value"][rows]
        return patched

    _hooked(qwen._module, "model.visual.merger", keep, clean)
    logits = _hooked(qwen._module, "model.visual.merger", patch, corrupt)[:, -1]
    cell = next(r for r in result.to_records() if r["pos"] == 2)
    assert cell["mean"] == pytest.approx((logits[:, 3] - logits[:, 4]).mean().item(), abs=1e-10)


def _two_and_one_images(seed: int) -> dict[str, torch.Tensor]:
    """A prompt with two images (of different sizes) and one with a single image."""
    generator = torch.Generator().manual_seed(seed)
    first = [1, START] + [IMAGE] * TOKENS + [END, START] + [IMAGE] * 2 + [END, 7]
    second = [1, 5, 6, START] + [IMAGE] * TOKENS + [END, 8, 9, 7]
    ids = torch.tensor([first, second])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2 * PATCHES + 8, FEATURES, generator=generator,
                                        dtype=torch.float64),
            "image_grid_thw": torch.tensor([GRID, (1, 2, 4), GRID])}


def test_batches_with_packed_images_cut_repeat_and_concatenate(qwen):
    inputs = _two_and_one_images(9)
    tokens = qwen._as_tokens(inputs)
    assert tuple(tokens.extras["pixel_values"].shape) == (2, PATCHES + 8, FEATURES)
    assert tokens.extras["image_grid_thw"].tolist() == [[list(GRID), [1, 2, 4]], [list(GRID), [0, 0, 0]]]
    both = _plain(qwen._module, inputs)
    assert torch.equal(qwen.run(tokens).logits, both)
    second = {"input_ids": inputs["input_ids"][1:], "attention_mask": inputs["attention_mask"][1:],
              "pixel_values": inputs["pixel_values"][PATCHES + 8:], "image_grid_thw": torch.tensor([GRID])}
    torch.testing.assert_close(qwen.run(tokens.rows([1])).logits, _plain(qwen._module, second),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qwen.run(tokens.repeat(2)).logits, both.repeat(2, 1, 1),
                               rtol=1e-12, atol=1e-12)
    swapped = qwen.run(Tokens.cat([tokens.rows([1]), tokens.rows([0])])).logits
    torch.testing.assert_close(swapped, both.flip(0), rtol=1e-12, atol=1e-12)
    # Language sites need no equal shares of images; the tower's and the merger's do.
    qwen.run(tokens, cache=[Site("resid_post", layer=0)])
    with pytest.raises(SiteError, match=r"same number of image tokens; got \[6, 4\]"):
        qwen.run(tokens, cache=[Site("projector")])


def test_bad_inputs_name_what_is_wrong(qwen):
    inputs = _inputs(1)
    with pytest.raises(ShapeError, match=r"pixel_values'\] must be \[patches, features\] with the 32"):
        qwen.run(inputs | {"pixel_values": inputs["pixel_values"][:20]})
    with pytest.raises(InputError, match="must also hold image_grid_thw"):
        qwen.run({name: v for name, v in inputs.items() if name != "image_grid_thw"})
    with pytest.raises(InputError, match="row 1 of input_ids holds 4 image tokens"):
        qwen.run(inputs | {"image_grid_thw": torch.tensor([GRID, (1, 2, 2)]),
                           "pixel_values": inputs["pixel_values"][:20]})
    with pytest.raises(InputError, match="holds 3 images"):
        qwen.run(inputs | {"image_grid_thw": torch.tensor([GRID] * 3),
                           "pixel_values": torch.cat([inputs["pixel_values"]] * 2)[:48]})
    with pytest.raises(InputError, match="videos"):
        qwen.run(inputs | {"video_grid_thw": torch.tensor([GRID])})
    with pytest.raises(ShapeError, match=r"image_grid_thw as \[batch, images, 3\]"):
        qwen.run(Tokens(inputs["input_ids"], inputs["attention_mask"],
                        {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}))


# -- Qwen2.5-VL: a gated vision MLP, RMSNorms and windowed attention in the tower ---------


def _qwen2_5_vl() -> nn.Module:
    vision = transformers.Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
        patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=4,
        fullatt_block_indexes=[1])
    text = _text_config(transformers.Qwen2_5_VLTextConfig)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                           image_token_id=IMAGE, video_token_id=VIDEO,
                                           vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval().double()


def test_qwen2_5_vl_sites_read_and_write(one_thread):
    model = mechinterp.load(_qwen2_5_vl())
    assert model.family == "qwen2_5_vl"
    inputs = _inputs(10)
    sites = [Site("vision.resid_mid", layer=0), Site("vision.neuron", layer=1),
             Site("vision.k", layer=0), Site("resid_mid", layer=1), Site("head", layer=0)]
    base = model.run(inputs, cache=sites)
    assert torch.equal(base.logits, _plain(model._module, inputs))
    assert tuple(base.cache[sites[1]].shape) == (2, PATCHES, 24)
    for site in sites:
        value = base.cache[site]
        assert torch.equal(model.run(inputs, edits=[Set(site, value)]).logits, base.logits)
        noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
        assert not torch.equal(model.run(inputs, edits=[Set(site, value + noise)]).logits, base.logits)
    with pytest.raises(SiteError, match="attention windows"):
        model.run(inputs, cache=[Site("projector")])


def test_sweeps_patch_vision_sites_of_the_packed_tower(qwen):
    """The packed vision tower's sites sweep like any other: each cell equals patching that
    site by hand."""
    clean, corrupt = _inputs(5), _inputs(6)
    sites = [Site("vision.resid_post", layer=0, pos=3), Site("vision.head", layer=1, head=1),
             Site("vision.mlp_out", layer=1, pos=(0, 5)), Site("resid_pre", layer=1, pos=-1)]
    swept = activation_patch(qwen, clean, corrupt, sites, LogitDiff(3, 4), progress=False,
                             batch_size=3)
    for cell, site in enumerate(sites):
        value = qwen.run(clean, cache=[site]).cache[site]
        logits = qwen.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
        torch.testing.assert_close(swept.values[:, cell], logits[:, 3] - logits[:, 4], rtol=0,
                                   atol=1e-10)
    assert bool((swept.values[:, :3] != swept.corrupt[:, None]).any())


def test_image_tokens_are_the_merged_grid_row_by_row(qwen):
    """Image token ``(row, col)`` of the 2 x 2 merged grid is filled by the projector row its
    layout names: the merger's output for patches ``2 row + {0, 1}`` x ``2 col + {0, 1}``."""
    inputs = _inputs(12)
    tokens = qwen.image_tokens(inputs)
    assert tokens.positions == POSITIONS
    assert (tokens.row, tokens.col, tokens.feature) == ((0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 2, 3))
    assert tokens.grid == (2, 2)
    assert tokens.at(rows=1) == POSITIONS[2:]
    site = Site("resid_pre", layer=0, pos=tokens.positions)
    cache = qwen.run(inputs, cache=[Site("projector"), site]).cache
    # The image tokens' input embeddings are the projector's rows, in the layout's order.
    torch.testing.assert_close(cache[site], cache[Site("projector")][:, list(tokens.feature)],
                               rtol=0, atol=0)
