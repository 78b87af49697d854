"""BLIP-2 through a tiny random config: every site of the vision tower, the Q-Former, the
projection and the (OPT) language model reads and writes; head ablations equal hand-written
hooks; the query outputs sit at the prompt's image tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

import mechinterp
from mechinterp import Add, Set, Site, Zero, select
from mechinterp.errors import InputError, ShapeError, SiteError, UnsupportedModelError
from mechinterp.patching import LogitDiff, activation_patch
from tests.hand_patches import assert_cells_equal_hand_patches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IMAGE = 63
N_QUERY = 4
PREFIX = 2  # prompt tokens before the image tokens


def _config(text: transformers.PretrainedConfig | None = None, *, image_token: int | None = IMAGE,
            ) -> transformers.Blip2Config:
    # The vision config's default initializer_range (1e-10) would leave the tower's weights
    # near zero, and every attention pattern uniform.
    vision = transformers.Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, initializer_range=0.02)
    # Three heads of width 8 and its own layer count: the towers' sizes differ from the
    # language model's, so a size taken from the wrong tower shows.
    qformer = transformers.Blip2QFormerConfig(hidden_size=24, intermediate_size=40,
                                              num_hidden_layers=3, num_attention_heads=3,
                                              cross_attention_frequency=2)
    if text is None:
        text = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=64,
                                      max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                    text_config=text.to_dict(), num_query_tokens=N_QUERY,
                                    image_token_index=image_token)


def _blip2() -> transformers.Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(_config()).eval().double()
    with torch.no_grad():
        # BLIP-2 initialises its query tokens to zero, which makes every query alike.
        model.query_tokens.normal_()
    return model


def _inputs(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [IMAGE] * N_QUERY + [7, 8, 9]] * rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator, dtype=torch.float64)}


@pytest.fixture(scope="module")
def blip2():
    return mechinterp.load(_blip2())


PER_TOWER = ["embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "head", "q",
             "k", "v", "pattern", "neuron"]
CROSS = ["cross_attn", "cross_head", "cross_q", "cross_k", "cross_v", "cross_pattern"]
COMPONENTS = ([f"vision.{c}" for c in PER_TOWER] + [f"qformer.{c}" for c in PER_TOWER + CROSS]
              + PER_TOWER + ["projector", "logits"])


def _site(component: str) -> Site:
    glob = component.rsplit(".", 1)[-1] in ("embed", "projector", "logits")
    # Q-Former layer 1 has no cross-attention (frequency 2).
    return Site(component, layer=None if glob else 2 if ".cross_" in component else 1)


def test_the_table_names_every_component(blip2):
    assert sorted(blip2.table.places) == sorted(COMPONENTS)
    assert blip2.family == "blip-2"
    assert blip2.table.blocks == "{base}language_model.model.decoder.layers"
    assert blip2.dims.n_layers == 2 and blip2.dims.d_mlp == 48
    assert blip2.table.towers["qformer"].n_layers == 3
    assert len(blip2.sites(select("qformer.head").layers().heads())) == 3 * 3


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_site_reads_and_writing_its_own_value_is_bit_identical(blip2, component):
    inputs = _inputs(1)
    site = _site(component)
    base = blip2.run(inputs, cache=[site])
    value = base.cache[site]
    assert value.shape[0] == 2
    again = blip2.run(inputs, edits=[Set(site, value)])
    assert torch.equal(again.logits, base.logits)
    if not component.endswith("pattern"):  # patterns run eager attention, which rounds apart
        with torch.no_grad():
            assert torch.equal(base.logits, blip2._module(**inputs).logits)
    # A random shift (a constant one would vanish in the LayerNorms).
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    changed = blip2.run(inputs, edits=[Set(site, value + noise)])
    assert not torch.equal(changed.logits, base.logits)


def test_sites_have_their_towers_shapes(blip2):
    sites = [Site("vision.resid_post", layer=0), Site("vision.q", layer=1, head=2),
             Site("vision.pattern", layer=0), Site("qformer.embed"),
             Site("qformer.head", layer=2, head=(0, 2)), Site("qformer.pattern", layer=1),
             Site("qformer.neuron", layer=0, pos=-1), Site("projector", pos=1),
             Site("neuron", layer=1, pos=-1), Site("logits")]
    cache = blip2.run(_inputs(1), cache=sites).cache
    assert [tuple(cache[s].shape) for s in sites] == [
        (2, 17, 32), (2, 17, 8), (2, 4, 17, 17), (2, 4, 24), (2, 4, 2, 8), (2, 3, 4, 4),
        (2, 40), (2, 32), (2, 48), (2, 9, 64)]


def _reference(blip2, inputs, module: torch.nn.Module, columns: slice) -> torch.Tensor:
    """Logits of a forward with a plain torch pre-hook zeroing some input columns of a module."""
    def zero_columns(_module, args):
        x = args[0].clone()
        x[..., columns] = 0
        return (x,)

    handle = module.register_forward_pre_hook(zero_columns)
    try:
        with torch.no_grad():
            return blip2._module(**inputs).logits
    finally:
        handle.remove()


def test_language_model_head_ablation_equals_a_hand_written_hook(blip2):
    inputs = _inputs(2)
    out_proj = blip2._module.language_model.model.decoder.layers[1].self_attn.out_proj
    expected = _reference(blip2, inputs, out_proj, slice(2 * 8, 3 * 8))  # head 2, d_head 8
    out = blip2.run(inputs, edits=[Zero(Site("head", layer=1, head=2))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, blip2.logits(inputs))


def test_vision_head_ablation_equals_a_hand_written_hook(blip2):
    inputs = _inputs(3)
    attention = blip2._module.vision_model.encoder.layers[0].self_attn
    expected = _reference(blip2, inputs, attention.projection, slice(1 * 8, 2 * 8))
    out = blip2.run(inputs, edits=[Zero(Site("vision.head", layer=0, head=1))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, blip2.logits(inputs))


@pytest.mark.parametrize(("component", "part"), [("vision.q", 0), ("vision.k", 1), ("vision.v", 2)])
def test_fused_qkv_parts_are_the_thirds_of_the_projection(blip2, component, part):
    # A shift rather than a zero: zeroing one head's queries or its keys both flatten its
    # pattern. At one position: the same shift of every key would leave the softmax unchanged.
    inputs = _inputs(4)
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    start = part * 32 + 3 * 8  # head 3 of the part

    def shifted(_module, _args, out):
        out = out.clone()
        out[:, 5, start:start + 8] += shift
        return out

    qkv = blip2._module.vision_model.encoder.layers[1].self_attn.qkv
    handle = qkv.register_forward_hook(shifted)
    try:
        with torch.no_grad():
            expected = blip2._module(**inputs).logits
    finally:
        handle.remove()
    out = blip2.run(inputs, edits=[Add(Site(component, layer=1, pos=5, head=3), shift)])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, blip2.logits(inputs))


def test_qformer_head_ablation_equals_a_hand_written_hook(blip2):
    inputs = _inputs(5)
    dense = blip2._module.qformer.encoder.layer[2].attention.output.dense
    expected = _reference(blip2, inputs, dense, slice(0, 8))  # head 0 of 3, d_head 8
    out = blip2.run(inputs, edits=[Zero(Site("qformer.head", layer=2, head=0))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, blip2.logits(inputs))


def test_qformer_cross_attention_sites(blip2):
    """Layers 0 and 2 of the 3 cross-attend (frequency 2); keys and values index the vision
    tower's tokens (a class token and 16 patches)."""
    inputs = _inputs(11)
    sites = [Site(f"qformer.{c}", layer=layer) for layer in (0, 2) for c in CROSS]
    read = blip2.run(inputs, cache=sites)
    shapes = {"cross_attn": (2, N_QUERY, 24), "cross_head": (2, N_QUERY, 3, 8),
              "cross_q": (2, N_QUERY, 3, 8), "cross_k": (2, 17, 3, 8), "cross_v": (2, 17, 3, 8),
              "cross_pattern": (2, 3, N_QUERY, 17)}
    for site in sites:
        assert tuple(read.cache[site].shape) == shapes[site.component.split(".")[1]], site
    pattern = read.cache[Site("qformer.cross_pattern", layer=2)]
    q = read.cache[Site("qformer.cross_q", layer=2)].transpose(1, 2)
    k = read.cache[Site("qformer.cross_k", layer=2)].transpose(1, 2)
    torch.testing.assert_close(pattern, torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1),
                               rtol=0, atol=1e-12)
    plain = blip2.logits(inputs)
    # Read without the patterns, whose eager attention rounds differently from the model's.
    unexposed = [site for site in sites if site.component != "qformer.cross_pattern"]
    values = blip2.cache(inputs, unexposed)
    for site in unexposed:
        edited = blip2.run(inputs, edits=[Set(site, values[site])]).logits
        assert torch.equal(edited, plain), site
    # Zeroing one head of the cross-attention is a hook on the input of its output projection.
    dense = blip2._module.qformer.encoder.layer[2].crossattention.output.dense
    expected = _reference(blip2, inputs, dense, slice(8, 16))
    out = blip2.run(inputs, edits=[Zero(Site("qformer.cross_head", layer=2, head=1))])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    # Without the image's keys at every position, the queries cannot see the image.
    blind = [Zero(Site("qformer.cross_attn", layer=layer)) for layer in (0, 2)]
    one, other = (blip2.run(_inputs(seed), edits=blind, cache=[Site("projector")])
                  for seed in (12, 13))
    assert torch.equal(one.cache[Site("projector")], other.cache[Site("projector")])
    with pytest.raises(SiteError, match="has no layer 1 in this model: only Q-Former layers "
                                        "whose index is a multiple of 2"):
        blip2.run(inputs, cache=[Site("qformer.cross_attn", layer=1)])


def test_the_qformer_reads_the_image_after_its_self_attention(blip2):
    """Layer 0 cross-attends to the image between resid_mid and the MLP; self-attention alone
    never sees the image."""
    sites = [Site("qformer.resid_mid", layer=0), Site("qformer.resid_post", layer=0)]
    one, other = (blip2.cache(_inputs(seed), sites) for seed in (6, 7))
    assert torch.equal(one[sites[0]], other[sites[0]])
    assert not torch.allclose(one[sites[1]], other[sites[1]])
    order = blip2.execution_order
    assert (order.index("vision_model.encoder.layers.1") < order.index("qformer.encoder.layer.0")
            < order.index("language_projection")
            < order.index("language_model.model.decoder.layers.0"))


def test_image_positions_hold_the_projected_queries(blip2):
    inputs = _inputs(8)
    positions = blip2.image_positions(inputs)
    assert positions == tuple(range(PREFIX, PREFIX + N_QUERY))
    cache = blip2.cache(inputs, [Site("projector"), Site("resid_pre", layer=0, pos=positions)])
    # OPT adds its learned position embedding, indexed by position + 2, to the input rows.
    table = blip2._module.language_model.model.decoder.embed_positions.weight
    torch.testing.assert_close(cache[Site("resid_pre", layer=0, pos=positions)],
                               cache[Site("projector")] + table[PREFIX + 2:PREFIX + 2 + N_QUERY],
                               rtol=0, atol=1e-12)
    # Patching one image token's query output moves the answer as patching its projector row.
    clean, corrupt = _inputs(8), _inputs(9)
    site = Site("projector", pos=1)
    value = blip2.cache(clean, [site])[site]
    patched = blip2.run(corrupt, edits=[Set(site, value)]).logits
    row = Site("resid_pre", layer=0, pos=positions[1])
    shifted = blip2.run(corrupt, edits=[Set(row, blip2.cache(clean, [row])[row])]).logits
    torch.testing.assert_close(patched, shifted, rtol=1e-10, atol=1e-10)


def test_left_padding_keeps_image_positions_and_sites(blip2):
    """Row 0 padded on the left, row 1 two tokens longer at the end: positions count from each
    row's first real token, so both rows' image tokens sit at the same positions."""
    inputs = _inputs(10)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    longer = torch.cat([ids[1], torch.tensor([10, 11])])
    padded = {"input_ids": torch.stack([torch.cat([torch.tensor([1, 1]), ids[0]]), longer]),
              "attention_mask": torch.tensor([[0, 0] + [1] * 9, [1] * 11]),
              "pixel_values": pixels}
    assert blip2.image_positions(padded) == blip2.image_positions(inputs)
    sites = [Site("resid_post", layer=1, pos=-1), Site("head", layer=0, pos=PREFIX + 1, head=2),
             Site("qformer.resid_post", layer=2)]
    batched = blip2.cache(padded, sites)
    first = blip2.cache({"input_ids": ids[:1], "pixel_values": pixels[:1]}, sites)
    second = blip2.cache({"input_ids": longer[None], "pixel_values": pixels[1:]}, sites)
    for site in sites:
        torch.testing.assert_close(batched[site][0], first[site][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(batched[site][1], second[site][0], rtol=1e-10, atol=1e-10)


def test_bad_inputs_are_named(blip2):
    inputs = _inputs(1)
    with pytest.raises(InputError, match="inputs must include pixel_values"):
        blip2.run(inputs["input_ids"])
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ShapeError, match=r"inputs\['pixel_values'\] must be a tensor with one row"):
        blip2.run(bad)
    with pytest.raises(SiteError, match=r"head for qformer.head.0\[head=3\] must lie in \[0, 3\)"):
        blip2.run(inputs, cache=[Site("qformer.head", layer=0, head=3)])
    with pytest.raises(SiteError, match=r"layer for qformer.resid_post.3 must lie in \[-3, 3\)"):
        blip2.run(inputs, cache=[Site("qformer.resid_post", layer=3)])
    mixed = dict(inputs, input_ids=inputs["input_ids"].clone())
    mixed["input_ids"][1, PREFIX] = 5
    with pytest.raises(InputError, match="same image-token positions"):
        blip2.image_positions(mixed)
    with pytest.raises(InputError, match="tower's attention patterns"):
        activation_patch(blip2, inputs, _inputs(2), select("qformer.pattern").layers(0),
                         LogitDiff(3, 4), progress=False)


def test_sweeps_patch_qformer_and_vision_sites(blip2):
    """Q-Former and vision-tower cells sweep like language-model cells: each equals patching
    that site by hand."""
    clean, corrupt = _inputs(1), _inputs(2)
    sites = [Site("qformer.resid_post", layer=0, pos=1), Site("qformer.cross_attn", layer=0),
             Site("vision.resid_post", layer=0, pos=2), Site("qformer.head", layer=1, head=0)]
    swept = activation_patch(blip2, clean, corrupt, sites, LogitDiff(3, 4), progress=False)
    assert_cells_equal_hand_patches(blip2, clean, corrupt, sites, swept)
    assert bool((swept.values != swept.corrupt[:, None]).any())


def test_models_without_a_site_table_are_refused_by_name():
    t5 = transformers.T5Config(d_model=32, d_ff=48, num_layers=1, num_heads=4, d_kv=8, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder language model 't5'"):
        mechinterp.load(transformers.Blip2ForConditionalGeneration(_config(t5)))
    with pytest.raises(UnsupportedModelError, match="image_token_index must be set"):
        mechinterp.load(transformers.Blip2ForConditionalGeneration(_config(image_token=None)))
    with pytest.raises(UnsupportedModelError, match="Blip2ForImageTextRetrieval, which has no "
                                                    "language_projection, language_model"):
        mechinterp.load(transformers.Blip2ForImageTextRetrieval(_config()))


def test_a_llama_language_model_works_the_same_way():
    llama = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = mechinterp.load(transformers.Blip2ForConditionalGeneration(_config(llama)).eval().double())
    assert model.table.blocks == "{base}language_model.model.layers"
    inputs = _inputs(11)
    positions = model.image_positions(inputs)
    cache = model.cache(inputs, [Site("projector"), Site("resid_pre", layer=0, pos=positions)])
    # Rotary positions add nothing to the residual stream: the rows are the projector's.
    assert torch.equal(cache[Site("resid_pre", layer=0, pos=positions)], cache[Site("projector")])
    site = Site("k", layer=1, head=1)
    value = model.cache(inputs, [site])[site]
    assert value.shape == (2, 9, 8)
    assert torch.equal(model.run(inputs, edits=[Set(site, value)]).logits, model.logits(inputs))


def test_a_saved_blip2_loads_from_its_directory(blip2, tmp_path):
    blip2._module.save_pretrained(tmp_path / "blip2")
    loaded = mechinterp.load(tmp_path / "blip2")
    assert type(loaded._module).__name__ == "Blip2ForConditionalGeneration"
    inputs = _inputs(12)
    loaded._module.to(torch.float64)
    torch.testing.assert_close(loaded.logits(inputs), blip2.logits(inputs), rtol=1e-12, atol=1e-12)


def test_image_tokens_are_the_queries_in_order(blip2):
    inputs = _inputs(13)
    tokens = blip2.image_tokens(inputs)
    assert tokens.positions == blip2.image_positions(inputs)
    assert tokens.feature == tuple(range(N_QUERY))
    assert set(tokens.row) == set(tokens.col) == {-1}  # queries are not patches
    assert tokens.at(rows=0) == ()


def test_token_games_mask_the_queries_before_opts_position_embeddings(blip2):
    """OPT adds learned position embeddings to its input: a masked token (a query's image
    token included) takes the baseline embedding plus its position's, as a hand-masked input."""
    from mechinterp.interactions.model_games import TokenGame
    from tests.test_multimodal_capabilities import _masked_by_hand

    prompt = {name: value[:1] for name, value in _inputs(14).items()}
    image = list(blip2.image_positions(prompt))
    players = [image[:2], image[2:], [0, 1]]
    game = TokenGame(blip2, prompt, players=players, baseline=7,
                     output=lambda logits: logits[:, 3] - logits[:, 4], progress=False)
    values = game.table()
    baseline = blip2._module.get_input_embeddings().weight[7]
    for mask in range(1 << len(players)):
        absent = [c for i, group in enumerate(players) if not mask >> i & 1 for c in group]
        logits = _masked_by_hand(blip2, prompt, absent, baseline)
        torch.testing.assert_close(values[mask], logits[3] - logits[4], rtol=0, atol=1e-10)
    assert len(set(values.tolist())) == len(values)
