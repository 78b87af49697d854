"""OPT through tiny random configs: the checks every family passes, then what is OPT's own (the
MLP's flattened batch, the MLP width ``ffn_dim``, the position offset of 2, the post-LayerNorm
variant of OPT-350m)."""

from __future__ import annotations

import pytest
import test_attribution
import torch
import transformers
from families import OPT, VOCAB, Family, build, token_ids

# The per-family checks, collected here again with this module's OPT fixtures.
from test_families import (  # noqa: F401
    test_each_family_supports_the_whole_vocabulary,
    test_edits_apply_in_order_and_per_row,
    test_every_component_of_every_layer_caches_with_its_shape,
    test_left_padding_changes_no_real_position,
    test_nnsight_trace_sees_the_same_tensors,
    test_resid_mid_write_moves_the_residual_stream,
    test_resid_pre_read_sees_edits_of_either_name,
    test_residual_sites_agree_with_hidden_states,
    test_writing_a_sites_own_value_is_bit_identical,
    test_zero_head_matches_hand_written_hook,
    test_zero_neuron_matches_hand_written_hook,
)
from test_patching import (  # noqa: F401
    test_reuse_and_batching_change_no_result,
    test_sweep_equals_one_forward_per_cell,
)

from mechinterp import COMPONENT_AXES, Set, Site, Zero, select
from mechinterp.errors import SiteError, UnsupportedModelError
from mechinterp.model import InterpModel, Tokens
from mechinterp.sites import UNET_COMPONENTS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def family() -> Family:
    return OPT


@pytest.fixture(scope="module")
def model(family: Family) -> InterpModel:
    return InterpModel(build(family))


def test_attribution_patching_differentiates_through_the_flattened_mlp() -> None:
    # Parametrised over FAMILIES where it is defined (importing it would run those here too),
    # so called with OPT.
    test_attribution.test_estimate_is_the_directional_derivative(OPT)


def _opt(*, pre_norm: bool = True, word_width: int = 32, head: bool = True) -> InterpModel:
    """A float64 OPT whose MLP width (48) is not 4 * d_model, so sizes must come from ffn_dim."""
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=VOCAB,
                                    max_position_embeddings=64, word_embed_proj_dim=word_width,
                                    do_layer_norm_before=pre_norm)
    torch.manual_seed(0)
    module = transformers.OPTForCausalLM(config) if head else transformers.OPTModel(config)
    return InterpModel(module.eval().double())


@pytest.fixture(scope="module")
def opt64() -> InterpModel:
    return _opt()


@pytest.fixture(scope="module")
def post_norm() -> InterpModel:
    # OPT-350m's layout: LayerNorm after each residual add, and a narrower word embedding
    # projected in and out of d_model.
    return _opt(pre_norm=False, word_width=16)


def _left_padded() -> Tokens:
    ids = token_ids(batch=2, length=6, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return Tokens(ids, mask)


def test_neuron_edit_on_the_flattened_mlp_equals_a_hand_written_hook(opt64):
    """The MLP sees ``[batch * pos, d_mlp]``: a per-row edit at a relative position of a
    left-padded batch lands on the right flat row."""
    tokens = _left_padded()
    assert opt64.dims.d_mlp == 48
    first = Site("neuron", layer=0, pos=0)
    clean = opt64.cache(tokens, [first])[first]
    neuron = int(clean[1].argmax())  # an active ReLU, so that zeroing it changes something
    site = first.at(neuron=neuron)
    fc2 = opt64._module.model.decoder.layers[0].fc2

    def zero_one_cell(_module, args):
        x = args[0].clone()
        assert x.dim() == 2
        x[1 * 6 + 2, neuron] = 0  # row 1, its first real token (column 2)
        return (x,)

    handle = fc2.register_forward_pre_hook(zero_one_cell)
    try:
        with torch.no_grad():
            expected = opt64._module(**opt64._forward_inputs(tokens)).logits
    finally:
        handle.remove()
    out = opt64.run(tokens, edits=[Zero(site, rows=[1])], cache=[site, Site("neuron", layer=0)])
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits, opt64.logits(tokens))
    assert out.cache[site].tolist() == [clean[0, neuron].item(), 0.0]
    assert tuple(out.cache[Site("neuron", layer=0)].shape) == (2, 6, 48)


def test_learned_positions_are_offset_by_two(opt64):
    tokens = _left_padded()
    cache = opt64.cache(tokens, [Site("embed"), Site("resid_pre", layer=0)])
    table = opt64._module.model.decoder.embed_positions.weight
    added = cache[Site("resid_pre", layer=0)] - cache[Site("embed")]
    torch.testing.assert_close(added[0], table[2:8], rtol=0, atol=1e-12)
    # The left-padded row's real tokens count from 0 as well.
    torch.testing.assert_close(added[1, 2:], table[2:6], rtol=0, atol=1e-12)


def test_post_layernorm_opt_supports_every_component(post_norm):
    ids = token_ids()
    components = [c for c in COMPONENT_AXES if c != "projector" and c not in UNET_COMPONENTS]
    assert sorted(post_norm.table.places) == sorted(components)
    for component in components:
        sites = post_norm.sites(select(component))
        clean = post_norm.run(ids, cache=sites)
        patched = post_norm.run(ids, edits=[Set(s, clean.cache[s]) for s in sites])
        assert torch.equal(patched.logits, clean.logits), component
    # embed is the token embedding projected into d_model.
    assert post_norm.cache(ids, [Site("embed")])[Site("embed")].shape == (2, 7, 32)


def test_post_layernorm_resid_mid_is_the_normalised_attention_sum(post_norm):
    ids = token_ids()
    block = post_norm._module.model.decoder.layers[1]
    seen = {}
    handle = block.self_attn_layer_norm.register_forward_hook(
        lambda _m, _a, out: seen.setdefault("normed", out))
    try:
        cache = post_norm.cache(ids, select("resid_pre", "attn_out", "resid_mid").layers(1))
    finally:
        handle.remove()
    mid = cache[Site("resid_mid", layer=1)]
    assert torch.equal(mid, seen["normed"])
    summed = cache[Site("resid_pre", layer=1)] + cache[Site("attn_out", layer=1)]
    torch.testing.assert_close(mid, block.self_attn_layer_norm(summed))


def test_post_layernorm_head_ablation_equals_a_hand_written_hook(post_norm):
    ids = token_ids()
    out_proj = post_norm._module.model.decoder.layers[0].self_attn.out_proj

    def zero_head(_module, args):
        x = args[0].clone()
        x[..., 3 * 8:4 * 8] = 0  # head 3 of 4, d_head 8
        return (x,)

    handle = out_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = post_norm._module(ids).logits
    finally:
        handle.remove()
    ours = post_norm.logits(ids, edits=[Zero(Site("head", layer=0, head=3))])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours, post_norm._module(ids).logits)


def test_opt_without_a_head_has_sites_but_no_logits():
    base = _opt(head=False)
    assert base.table.blocks == "{base}decoder.layers" and base.base == ""
    site = Site("resid_pre", layer=1)
    ids = token_ids()
    torch.testing.assert_close(base.cache(ids, [site])[site],
                               base._module(ids, output_hidden_states=True).hidden_states[1])
    with pytest.raises(SiteError, match="OPTModel has no language-model head"):
        base.cache(ids, [Site("logits")])


def test_bad_sites_and_circuits_are_refused_by_name(opt64):
    ids = token_ids()
    with pytest.raises(SiteError, match=r"neuron for neuron.0\[neuron=48\] must lie in \[0, 48\)"):
        opt64.cache(ids, [Site("neuron", layer=0, neuron=48)])
    with pytest.raises(SiteError, match=r"head for head.1\[head=4\] must lie in \[0, 4\)"):
        opt64.run(ids, edits=[Zero(Site("head", layer=1, head=4))])
    with pytest.raises(SiteError, match="no vision tower"):
        opt64.cache(ids, [Site("vision.resid_post", layer=0)])
    from mechinterp.circuits import CircuitTask

    with pytest.raises(UnsupportedModelError, match="needs the language-model head"):
        CircuitTask(_opt(head=False), ids, token_ids(seed=2),
                    metric=lambda logits, pairs: logits[:, 3], progress=False)
