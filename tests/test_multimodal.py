"""Multimodal models (LLaVA): every site of the language model, the vision tower and the
projector is readable and writable; edits equal hand-written hooks; image tokens are positions
that sweeps, circuits and caches understand."""

from __future__ import annotations

import pytest
import torch
import transformers

import mechinterp
from mechinterp import Set, Site, Zero
from mechinterp.circuits import CircuitTask
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.patching import LogitDiff, activation_patch
from mechinterp.sites import select
from tests.hand_patches import assert_cells_equal_hand_patches

IMAGE = 63
N_IMAGE = 16  # 32 x 32 pixels in 8 x 8 patches; LLaVA's default drops the class token


def _llava(dtype=torch.float64):
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval().to(dtype)


def _inputs(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [IMAGE] * N_IMAGE + [7, 8, 9]] * rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator, dtype=torch.float64)}


@pytest.fixture(scope="module")
def llava():
    return mechinterp.load(_llava())


VISION = ["vision.embed", "vision.resid_pre", "vision.attn_out", "vision.resid_mid",
          "vision.mlp_out", "vision.resid_post", "vision.head", "vision.q", "vision.k", "vision.v",
          "vision.pattern", "vision.neuron"]
LANGUAGE = ["embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "head", "q",
            "k", "v", "pattern", "neuron", "projector"]


def _site(component: str) -> Site:
    glob = component.rsplit(".", 1)[-1] in ("embed", "projector", "logits")
    # LLaVA reads the vision tower's second-to-last layer: with two layers, the last one never
    # reaches the logits.
    return Site(component, layer=None if glob else 0 if component.startswith("vision.") else 1)


@pytest.mark.parametrize("component", VISION + LANGUAGE)
def test_every_site_reads_and_writing_its_own_value_is_bit_identical(llava, component):
    inputs = _inputs(1)
    site = _site(component)
    base = llava.run(inputs, cache=[site])
    value = base.cache[site]
    assert value.shape[0] == 2
    again = llava.run(inputs, edits=[Set(site, value)])
    assert torch.equal(again.logits, base.logits)
    # A random shift (a constant one would vanish in the LayerNorms).
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    changed = llava.run(inputs, edits=[Set(site, value + noise)])
    assert not torch.equal(changed.logits, base.logits)


def test_vision_sites_have_the_towers_shapes(llava):
    inputs = _inputs(1)
    sites = [Site("vision.resid_post", layer=0), Site("vision.head", layer=1, head=2),
             Site("vision.pattern", layer=0), Site("vision.resid_post", layer=1, pos=-1),
             Site("vision.neuron", layer=0, pos=(0, 3), neuron=5), Site("projector", pos=2)]
    cache = llava.run(inputs, cache=sites).cache
    assert [tuple(cache[s].shape) for s in sites] == [
        (2, 17, 32), (2, 17, 8), (2, 4, 17, 17), (2, 32), (2, 2), (2, 32)]
    with pytest.raises(SiteError, match=r"head for vision.head.0\[head=4\] must lie in \[0, 4\)"):
        llava.run(inputs, cache=[Site("vision.head", layer=0, head=4)])
    with pytest.raises(SiteError, match="tower prefix"):
        Site("audio.resid_post", layer=0)
    assert len(llava.sites(select("vision.head").layers().heads())) == 2 * 4


def test_vision_head_ablation_equals_a_hand_written_hook(llava):
    inputs = _inputs(2)
    module = llava._module.model.vision_tower.encoder.layers[0].self_attn.out_proj

    def zero_head(_module, args):
        x = args[0].clone()
        x[..., 2 * 8:3 * 8] = 0  # head 2 of 4, d_head 8
        return (x,)

    handle = module.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = llava._module(**inputs).logits
    finally:
        handle.remove()
    out = llava.run(inputs, edits=[Zero(Site("vision.head", layer=0, head=2))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)


def test_image_positions_and_patching_an_image_token(llava):
    clean, corrupt = _inputs(3), _inputs(4)
    positions = llava.image_positions(clean)
    assert positions == tuple(range(2, 2 + N_IMAGE))
    # The language model's input at image positions is the projector's output.
    cache = llava.run(clean, cache=[Site("projector"), Site("resid_pre", layer=0, pos=positions)]).cache
    torch.testing.assert_close(cache[Site("resid_pre", layer=0, pos=positions)], cache[Site("projector")])
    # A sweep over image positions equals patching one cell by hand.
    result = activation_patch(llava, clean, corrupt, select("resid_pre").layers(1).positions(*positions[:3]),
                              LogitDiff(3, 4), progress=False)
    site = Site("resid_pre", layer=1, pos=positions[1])
    value = llava.run(clean, cache=[site]).cache[site]
    logits = llava.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
    expected = (logits[:, 3] - logits[:, 4]).mean()
    cell = next(r for r in result.to_records() if r["pos"] == positions[1])
    assert cell["mean"] == pytest.approx(expected.item(), abs=1e-10)


def test_sweeps_over_image_tokens_reuse_the_corrupted_prefix(llava):
    """Forwards that start at a later image token take the corrupted run's merged input
    embeddings and keys/values for the positions before it: the values equal a sweep that
    recomputes everything, and patching by hand."""
    clean, corrupt = _inputs(21, rows=3), _inputs(22, rows=3)
    positions = llava.image_positions(clean)
    sites = select("resid_pre", "attn_out").layers().positions(*positions[::3], positions[-1] + 2)
    reused = activation_patch(llava, clean, corrupt, sites, LogitDiff(3, 4), progress=False,
                              batch_size=4)
    plain = activation_patch(llava, clean, corrupt, sites, LogitDiff(3, 4), progress=False,
                             reuse=False)
    torch.testing.assert_close(reused.values, plain.values, rtol=0, atol=1e-12)
    site = Site("attn_out", layer=1, pos=positions[9])
    value = llava.run(clean, cache=[site]).cache[site]
    logits = llava.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
    cell = reused.sites.index(site)
    torch.testing.assert_close(reused.values[:, cell], logits[:, 3] - logits[:, 4], rtol=0,
                               atol=1e-12)


def test_sweeps_patch_vision_tower_sites(llava):
    """Vision-tower cells (patches of the image encoder, by patch and by head) sweep together
    with language-model cells; each equals patching that site by hand, and a tower layer's
    patch runs every language-model layer after it."""
    clean, corrupt = _inputs(31, rows=2), _inputs(32, rows=2)
    image_position = llava.image_positions(clean)[4]
    sites = [Site("vision.resid_post", layer=0, pos=3), Site("vision.resid_post", layer=1),
             Site("vision.head", layer=1, pos=(0, 5), head=2), Site("vision.mlp_out", layer=0, pos=-1),
             Site("resid_pre", layer=1, pos=image_position)]
    swept = activation_patch(llava, clean, corrupt, sites, LogitDiff(3, 4), progress=False,
                             batch_size=3)
    assert_cells_equal_hand_patches(llava, clean, corrupt, sites, swept)
    assert bool((swept.values[:, :4] != swept.corrupt[:, None]).any())  # the patches mattered
    mean = activation_patch(llava, clean, corrupt, sites[:2], LogitDiff(3, 4), source="mean",
                            progress=False)
    site = sites[0]
    value = llava.run(clean, cache=[site]).cache[site].mean(0, keepdim=True).expand(2, -1)
    logits = llava.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
    torch.testing.assert_close(mean.values[:, 0], logits[:, 3] - logits[:, 4], rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="tower's attention patterns"):
        activation_patch(llava, clean, corrupt, [Site("vision.pattern", layer=0)],
                         LogitDiff(3, 4), progress=False)
    with pytest.raises(SiteError):
        activation_patch(llava, clean, corrupt, [Site("vision.resid_post", layer=0, pos=10**4)],
                         LogitDiff(3, 4), progress=False)


def test_projector_positions_count_its_own_rows_in_sweeps_and_games(llava):
    """``projector[pos=p]`` is the projector's ``p``-th row (the ``p``-th image token), also
    for negative positions and in padded batches: sweeps and component games write there, not
    at the prompt's ``p``-th token."""
    from mechinterp.interactions import exact
    from mechinterp.interactions.model_games import ComponentGame

    clean, corrupt = _inputs(41, rows=2), _inputs(42, rows=2)
    for batch in (clean, corrupt):  # left-pad the second prompt by two tokens
        ids = batch["input_ids"]
        batch["input_ids"] = torch.cat([torch.zeros(2, 2, dtype=ids.dtype), ids], 1)
        batch["attention_mask"] = torch.cat([torch.tensor([[1, 1], [0, 0]]), batch["attention_mask"]], 1)
    sites = [Site("projector", pos=-1), Site("projector", pos=(0, -3)), Site("projector", pos=5)]
    swept = activation_patch(llava, clean, corrupt, sites, LogitDiff(3, 4), progress=False)
    full = llava.cache(clean, [Site("projector")])[Site("projector")]
    assert full.shape[1] == N_IMAGE
    for cell, site in enumerate(sites):
        rows = [site.pos] if isinstance(site.pos, int) else list(site.pos)
        value = full[:, rows].squeeze(1) if isinstance(site.pos, int) else full[:, rows]
        logits = llava.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
        torch.testing.assert_close(swept.values[:, cell], logits[:, 3] - logits[:, 4], rtol=0,
                                   atol=1e-12)
    with pytest.raises(SiteError):
        activation_patch(llava, clean, corrupt, [Site("projector", pos=N_IMAGE)], LogitDiff(3, 4),
                         progress=False)

    # Players: the last projector row, two rows, and a head of the vision tower (with the
    # tower's four heads, not the language model's; LLaVA takes the features of layer 0 of 2).
    prompt = {name: value[:1] for name, value in _inputs(43, rows=1).items()}
    players = [Site("projector", pos=-1), Site("projector", pos=(1, 2)),
               Site("vision.head", layer=0, head=3)]
    game = ComponentGame(llava, prompt, players, output=lambda logits: logits[:, 3] - logits[:, 4],
                         progress=False)
    values = game.table()
    for mask in range(1 << len(players)):  # bit i: player i present
        absent = [p for i, p in enumerate(players) if not mask >> i & 1]
        logits = llava.run(prompt, edits=[Zero(p) for p in absent]).logits[:, -1]
        torch.testing.assert_close(values[mask], logits[0, 3] - logits[0, 4], rtol=0, atol=1e-12)
    assert len(set(values.tolist())) == len(values)  # every player moves the output
    shapley = exact(game, index="SV")
    assert abs(sum(shapley[(i,)] for i in range(len(players))) - float(values[-1] - values[0])) < 1e-10


def test_inputs_must_have_a_row_per_prompt(llava):
    bad = _inputs(1)
    bad["pixel_values"] = bad["pixel_values"][:1]
    with pytest.raises(ShapeError, match=r"inputs\['pixel_values'\] must be a tensor with one row"):
        llava.run(bad)
    mixed = _inputs(1)
    mixed["input_ids"] = mixed["input_ids"].clone()
    mixed["input_ids"][1, 2] = 5
    with pytest.raises(InputError, match="same image-token positions"):
        llava.image_positions(mixed)


def test_edge_patching_runs_on_the_language_model(llava):
    clean, corrupt = _inputs(5, rows=3), _inputs(6, rows=3)
    task = CircuitTask(llava, clean, corrupt, metric=lambda logits, pairs: logits[:, 3] - logits[:, 4],
                       progress=False)
    graph = task.graph
    full, empty = task.evaluate(torch.stack([graph.valid, ~graph.valid]))
    with torch.no_grad():
        clean_logits = llava._module(**clean).logits[:, -1]
        corrupt_logits = llava._module(**corrupt).logits[:, -1]
    torch.testing.assert_close(full, clean_logits[:, 3] - clean_logits[:, 4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(empty, corrupt_logits[:, 3] - corrupt_logits[:, 4], rtol=1e-10, atol=1e-10)


# -- CLIP: the text transformer is the main tower, the vision transformer runs first ----------


def _clip():
    text = transformers.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=16, eos_token_id=63,
                                       bos_token_id=1, pad_token_id=0)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     projection_dim=16)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval().double()


@pytest.fixture(scope="module")
def clip():
    return mechinterp.load(_clip())


def _clip_inputs(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 6, 7, 63], [1, 9, 8, 7, 63]])
    return {"input_ids": ids,
            "pixel_values": torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)}


FINAL = [Site("resid_post", layer=1), Site("vision.resid_post", layer=1)]


@pytest.mark.parametrize("component", [c for c in VISION + LANGUAGE if c != "projector"])
def test_clip_sites_read_and_write(clip, component):
    inputs = _clip_inputs(1)
    glob = component.rsplit(".", 1)[-1] == "embed"
    site = Site(component, layer=None if glob else 0)
    base = clip.run(inputs, cache=[site, *FINAL])
    assert base.logits is None
    value = base.cache[site]
    again = clip.run(inputs, edits=[Set(site, value)], cache=FINAL).cache
    assert all(torch.equal(again[s], base.cache[s]) for s in FINAL)
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    changed = clip.run(inputs, edits=[Set(site, value + noise)], cache=FINAL).cache
    # Each tower's edit reaches its own final layer and leaves the other tower alone.
    own, other = (FINAL[1], FINAL[0]) if component.startswith("vision.") else FINAL
    assert not torch.equal(changed[own], base.cache[own])
    assert torch.equal(changed[other], base.cache[other])


def test_clip_runs_the_vision_tower_first_and_its_head_ablation_equals_a_hook(clip):
    inputs = _clip_inputs(2)
    clip.run(inputs)
    order = clip.execution_order
    assert order.index("vision_model.encoder.layers.0") < order.index("text_model.encoder.layers.0")
    module = clip._module.text_model.encoder.layers[1].self_attn.out_proj

    def zero_head(_module, args):
        x = args[0].clone()
        x[..., 8:16] = 0  # head 1 of 4, d_head 8
        return (x,)

    handle = module.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = clip._module.text_model(input_ids=inputs["input_ids"]).last_hidden_state
    finally:
        handle.remove()
    final = Site("resid_post", layer=1)
    out = clip.run(inputs, edits=[Zero(Site("head", layer=1, head=1))], cache=[final]).cache[final]
    # CLIP's final LayerNorm follows the last layer's output.
    torch.testing.assert_close(clip._module.text_model.final_layer_norm(out), expected,
                               rtol=1e-12, atol=1e-12)


# -- the shipped toy VLM: the answer comes from the image tokens of the asked-about shape ------


def test_toy_vlm_answer_flows_from_the_asked_shapes_image_tokens():
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_vlm import answer_ids, sample_mechanism_cases, vlm_inputs

    model = mechinterp.load("toy-vlm")
    cases = sample_mechanism_cases(torch.Generator().manual_seed(7), 96, ask="colour")
    rows = [i for i, cell in enumerate(cases.target_cells) if cell == 0][:16]
    assert len(rows) >= 8

    def inputs(scenes):
        images = shapes.render_batch([scenes[i] for i in rows])
        return vlm_inputs(model.tokenizer, images, [cases.questions[i] for i in rows])

    clean, corrupt = inputs(cases.clean), inputs(cases.corrupted)
    image = model.image_positions(clean)
    metric = LogitDiff(answer_ids(model.tokenizer, [cases.clean_answers[i] for i in rows]),
                       answer_ids(model.tokenizer, [cases.corrupt_answers[i] for i in rows]))
    cells = [Site("resid_pre", layer=0,
                  pos=tuple(image[p] for p in shapes.cell_patches(cell, patch_size=8)))
             for cell in range(shapes.N_CELLS)]
    result = activation_patch(model, clean, corrupt, cells, metric, progress=False)
    restored = [r["normalized"] for r in result.to_records()]
    # Restoring the four image tokens of the asked-about shape's cell restores the answer; the
    # other cells (other shapes, or empty) restore nothing.
    assert restored[0] > 0.8
    assert max(abs(v) for v in restored[1:]) < 0.2


def test_shapley_values_of_image_cells_single_out_the_asked_shape():
    from mechinterp.interactions import exact
    from mechinterp.interactions.model_games import ComponentGame
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_vlm import sample_mechanism_cases, vlm_inputs

    model = mechinterp.load("toy-vlm")
    cases = sample_mechanism_cases(torch.Generator().manual_seed(3), 4, ask="colour")
    for i in range(2):
        clean = vlm_inputs(model.tokenizer, shapes.render_batch([cases.clean[i]]), [cases.questions[i]])
        corrupt = vlm_inputs(model.tokenizer, shapes.render_batch([cases.corrupted[i]]),
                             [cases.questions[i]])
        # Players: the four image cells, each its four image tokens; an absent cell takes the
        # corrupted scene's tokens.
        cells = [Site("projector", pos=tuple(shapes.cell_patches(c, patch_size=8)))
                 for c in range(shapes.N_CELLS)]
        game = ComponentGame(model, clean, cells, ablation="resample", reference=corrupt,
                             progress=False)
        result = exact(game, index="SV")
        values = torch.tensor([result[(c,)] for c in range(shapes.N_CELLS)])
        target = cases.target_cells[i]
        assert values[target] > 0.95 * values.abs().sum()
