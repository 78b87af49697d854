"""Every family through a tiny random config: sites read, write and ablate as specified."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, Family, build, token_ids

from mechinterp import COMPONENT_AXES, Add, Scale, Set, Site, Zero, select
from mechinterp.sites import UNET_COMPONENTS

# The vocabulary of language models and towers (U-Net components have their own tests).
LANGUAGE_COMPONENTS = [c for c in COMPONENT_AXES if c not in UNET_COMPONENTS]
from mechinterp.errors import SiteError
from mechinterp.model import InterpModel, Tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = [f.name for f in FAMILIES]


@pytest.fixture(params=FAMILIES, ids=IDS, scope="module")
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def model(family: Family) -> InterpModel:
    return InterpModel(build(family))


def _expected_shape(model: InterpModel, component: str, batch: int, pos: int) -> tuple[int, ...]:
    config = model._module.config
    d_model = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = d_model // n_heads
    d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
    sizes = {
        "batch": batch, "pos": pos, "key_pos": pos, "d_model": d_model, "d_head": d_head,
        "head": n_kv if component in ("k", "v") else n_heads, "neuron": d_mlp,
        "vocab": config.vocab_size,
    }
    return tuple(sizes[axis] for axis in COMPONENT_AXES[component])


def _supported(model: InterpModel) -> list[str]:
    return [c for c in COMPONENT_AXES if c in model.table.places]


def test_every_component_of_every_layer_caches_with_its_shape(model: InterpModel) -> None:
    ids = token_ids(batch=2, length=7)
    sites = model.sites(select(*_supported(model)))
    cache = model.cache(ids, sites)
    assert len(cache) == len(sites)
    for site in sites:
        assert tuple(cache[site].shape) == _expected_shape(model, site.component, 2, 7), site


def test_residual_sites_agree_with_hidden_states(model: InterpModel) -> None:
    ids = token_ids()
    cache = model.cache(ids, select("resid_pre"))
    hidden = model._module(ids, output_hidden_states=True).hidden_states
    for layer in range(model.dims.n_layers):
        torch.testing.assert_close(cache[Site("resid_pre", layer=layer)], hidden[layer])


@pytest.mark.parametrize("component", LANGUAGE_COMPONENTS)
def test_writing_a_sites_own_value_is_bit_identical(model: InterpModel, component: str) -> None:
    if component not in model.table.places:
        pytest.skip(f"{model.family} has no {component}")
    ids = token_ids()
    sites = model.sites(select(component))
    clean = model.run(ids, cache=sites)
    patched = model.run(ids, edits=[Set(s, clean.cache[s]) for s in sites], cache=sites)
    assert torch.equal(patched.logits, clean.logits)
    if component != "pattern":  # pattern reads switch to eager attention, others leave it be
        assert torch.equal(clean.logits, model._module(ids).logits)


def _ablated_reference(model: InterpModel, path: str, layer: int,
                       columns: slice, ids: torch.Tensor) -> torch.Tensor:
    """A forward with a plain torch pre-hook zeroing some input columns of one module."""
    target = model._module.get_submodule(path.format(layer=layer))

    def zero_columns(_module, args):
        x = args[0].clone()
        x[..., columns] = 0
        return (x,)

    handle = target.register_forward_pre_hook(zero_columns)
    try:
        with torch.no_grad():
            return model._module(ids).logits
    finally:
        handle.remove()


def test_zero_head_matches_hand_written_hook(model: InterpModel, family: Family) -> None:
    ids = token_ids()
    d_head = model.dims.d_head
    head, layer = 2, 1
    ours = model.logits(ids, edits=[Zero(Site("head", layer=layer, head=head))])
    reference = _ablated_reference(model, family.head_input, layer,
                                   slice(head * d_head, (head + 1) * d_head), ids)
    torch.testing.assert_close(ours, reference, rtol=1.3e-6, atol=1e-5)
    assert not torch.allclose(ours, model._module(ids).logits)


def test_zero_neuron_matches_hand_written_hook(model: InterpModel, family: Family) -> None:
    ids = token_ids()
    neuron, layer = 5, 0
    ours = model.logits(ids, edits=[Zero(Site("neuron", layer=layer, neuron=neuron))])
    reference = _ablated_reference(model, family.neuron_input, layer,
                                   slice(neuron, neuron + 1), ids)
    torch.testing.assert_close(ours, reference, rtol=1.3e-6, atol=1e-5)
    assert not torch.allclose(ours, model._module(ids).logits)


def test_left_padding_changes_no_real_position(model: InterpModel, family: Family) -> None:
    ids = token_ids(batch=2, length=6)
    short = ids[1, 2:]
    pad = 0 if family.name != "roberta" else 1
    mask = torch.ones_like(ids)
    padded = ids.clone()
    if family.causal:  # decoders pad on the left
        padded[1, :2] = pad
        mask[1, :2] = 0
        real = slice(2, None)
    else:
        padded[1] = torch.cat([short, torch.full((2,), pad)])
        mask[1, 4:] = 0
        real = slice(0, 4)
    sites = [Site("resid_post", layer=1, pos=-1), Site("resid_pre", layer=1, pos=0),
             Site("head", layer=0, pos=1, head=1)]
    batched = model.run(Tokens(padded, mask), cache=sites)
    alone = model.run(short[None], cache=sites)
    torch.testing.assert_close(batched.logits[1, real], alone.logits[0], rtol=1e-5, atol=1e-5)
    for site in sites:
        torch.testing.assert_close(batched.cache[site][1], alone.cache[site][0], rtol=1e-5, atol=1e-5)


def test_edits_apply_in_order_and_per_row(model: InterpModel) -> None:
    ids = token_ids(batch=3)
    site = Site("attn_out", layer=0, pos=-1)
    clean = model.cache(ids, [site])[site]
    out = model.run(ids, edits=[Add(site, 1.0, rows=[0, 2]), Scale(site, 2.0, rows=2)],
                    cache=[site]).cache[site]
    torch.testing.assert_close(out[0], clean[0] + 1)
    torch.testing.assert_close(out[1], clean[1])
    torch.testing.assert_close(out[2], (clean[2] + 1) * 2)


def test_resid_mid_write_moves_the_residual_stream(model: InterpModel) -> None:
    if "resid_mid" not in model.table.places:
        with pytest.raises(SiteError, match="resid_mid"):
            model.cache(token_ids(), [Site("resid_mid", layer=0)])
        return
    ids = token_ids()
    site = Site("resid_mid", layer=1, pos=2)
    target = torch.linspace(-1, 1, model.dims.d_model)
    out = model.run(ids, edits=[Set(site, target)], cache=[site, Site("resid_mid", layer=1)])
    torch.testing.assert_close(out.cache[site], target.expand(2, -1), rtol=1e-5, atol=1e-5)
    clean = model.cache(ids, [Site("resid_mid", layer=1)])[Site("resid_mid", layer=1)]
    others = [p for p in range(ids.shape[1]) if p != 2]
    torch.testing.assert_close(out.cache[Site("resid_mid", layer=1)][:, others], clean[:, others])


def test_nnsight_trace_sees_the_same_tensors(model: InterpModel) -> None:
    ids = token_ids()
    blocks = model  # walk the nnsight Envoy tree to the blocks
    for part in model.table.blocks.format(base=model.base).split("."):
        blocks = getattr(blocks, part)
    with model.trace(ids):
        saved = blocks[1].output.save()
    ours = model.cache(ids, [Site("resid_post", layer=1)])[Site("resid_post", layer=1)]
    torch.testing.assert_close(saved, ours)


def test_each_family_supports_the_whole_vocabulary(model: InterpModel, family: Family) -> None:
    # Text-only families have no multimodal projector.
    missing = {c for c in LANGUAGE_COMPONENTS if c not in model.table.places} - {"projector"}
    assert missing == ({"resid_mid"} if family.name == "gpt_neox" else set())


def test_execution_order_is_recorded_not_registration_order() -> None:
    family = next(f for f in FAMILIES if f.name == "llama")
    model = InterpModel(build(family))
    registered = [name for name, _ in model._module.named_modules()]
    order = model.execution_order
    # Llama registers its rotary embedding after the blocks but runs it before them.
    assert registered.index("model.rotary_emb") > registered.index("model.layers.0")
    assert order.index("model.rotary_emb") < order.index("model.layers.0")
    assert order.index("model.layers.0") < order.index("model.layers.1") < order.index("lm_head")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_sites_on_cuda_match_cpu(name: str) -> None:
    family = next(f for f in FAMILIES if f.name == name)
    cpu = InterpModel(build(family))
    gpu = InterpModel(build(family).to("cuda"))
    ids = token_ids()
    sites = cpu.sites(select("resid_pre", "resid_mid", "head", "pattern").layers(1))
    edits = [Zero(Site("head", layer=0, head=1)), Scale(Site("neuron", layer=1, neuron=3), 2.0)]
    ours = gpu.run(ids.cuda(), edits=edits, cache=sites)
    reference = cpu.run(ids, edits=edits, cache=sites)
    torch.testing.assert_close(ours.logits.cpu(), reference.logits, rtol=1e-4, atol=1e-4)
    for site in sites:
        assert ours.cache[site].device.type == "cuda"
        torch.testing.assert_close(ours.cache[site].cpu(), reference.cache[site], rtol=1e-4, atol=1e-4)


def test_resid_pre_read_sees_edits_of_either_name(model: InterpModel) -> None:
    ids = token_ids()
    pre, post = Site("resid_pre", layer=1, pos=0), Site("resid_post", layer=0, pos=0)
    for edited in (pre, post):
        out = model.run(ids, edits=[Set(edited, torch.ones(model.dims.d_model))], cache=[pre, post])
        torch.testing.assert_close(out.cache[pre], torch.ones(2, model.dims.d_model))
    # An edit of resid_pre itself happens after resid_post was read.
    out = model.run(ids, edits=[Set(pre, torch.ones(model.dims.d_model))], cache=[post])
    assert not torch.equal(out.cache[post], torch.ones(2, model.dims.d_model))


def test_a_read_survives_the_model_editing_that_tensor_in_place() -> None:
    model = InterpModel(build(FAMILIES[0]))
    site = Site("resid_post", layer=1)
    ids = token_ids()
    before = model.cache(ids, [site])[site].clone()
    final_norm = model._module.transformer.ln_f

    def bump_in_place(_module, args):
        args[0].add_(1.0)  # the block output, after mechinterp has read it

    handle = final_norm.register_forward_pre_hook(bump_in_place)
    try:
        after = model.cache(ids, [site])[site]
    finally:
        handle.remove()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
