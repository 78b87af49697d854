"""SAEEdit and feature_activations on tiny GPT-2 and Llama models, against dense references."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build, token_ids

from mechinterp import Add, Site
from mechinterp.errors import InputError, ShapeError
from mechinterp.model import InterpModel
from mechinterp.sae import SAE, SAEEdit, feature_activations

D_SAE = 64
FAMILY = {f.name: f for f in FAMILIES}
# The module whose output is each site's tensor, for the hand-written reference hooks.
MODULES = {
    ("gpt2", "resid_post"): "transformer.h.{layer}",
    ("gpt2", "mlp_out"): "transformer.h.{layer}.mlp",
    ("llama", "resid_post"): "model.layers.{layer}",
    ("llama", "mlp_out"): "model.layers.{layer}.mlp",
}
SITES = [Site("resid_post", layer=1), Site("mlp_out", layer=0)]


def _sae(architecture: str, d_in: int = 32, seed: int = 3, dtype=torch.float32,
         normalize: str = "none") -> SAE:
    g = torch.Generator().manual_seed(seed)
    # Encoder columns scaled so that the tiny models' activations give features of order one.
    w_enc = torch.randn(d_in, D_SAE, generator=g) * 4.0
    w_dec = torch.randn(D_SAE, d_in, generator=g) * 0.05
    b_dec = torch.randn(d_in, generator=g) * 0.01
    b_enc = torch.randn(D_SAE, generator=g) * 0.01
    k = 8 if architecture == "topk" else None
    sae = SAE(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec, b_dec=b_dec, architecture=architecture,
              k=k, normalize_activations=normalize)
    return sae.to(dtype=dtype)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    family = FAMILY[request.param]
    return request.param, InterpModel(build(family)), token_ids(batch=2, length=7)


def _dense_edit(sae: SAE, x: torch.Tensor, ablate=(), clamp=None, steer=None) -> torch.Tensor:
    """``x + decode(f') - decode(f)`` with full dense ops, in the SAE's dtype."""
    xs = x.to(sae.dtype)
    x_n, undo = sae._normalize(xs)
    f = sae._encode_normalized(x_n)
    edited = f.clone()
    for i in ablate:
        edited[..., i] = 0.0
    for i, v in (clamp or {}).items():
        edited[..., i] = v
    for i, v in (steer or {}).items():
        edited[..., i] += v
    return (xs + undo(sae.decode(edited)) - undo(sae.decode(f))).to(x.dtype)


def _hooked_logits(model: InterpModel, family: str, site: Site, ids: torch.Tensor, sae: SAE,
                   **edits) -> torch.Tensor:
    """Logits of ``model.run`` with the site's module output replaced by a forward hook."""
    path = MODULES[(family, site.component)].format(layer=site.layer)
    module = model._module.get_submodule(path)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (_dense_edit(sae, output[0], **edits), *output[1:])
        return _dense_edit(sae, output, **edits)

    handle = module.register_forward_hook(hook)
    try:
        return model.run(ids).logits
    finally:
        handle.remove()


def _active(model, ids, site, sae, count=3):
    """Features with the largest total activation, so that ablating them changes the output."""
    f = feature_activations(model, ids, site, sae)
    return f.sum(dim=(0, 1)).topk(count).indices.tolist()


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("site", SITES, ids=str)
def test_no_edit_is_bit_identical(setup, site, architecture):
    _, model, ids = setup
    sae = _sae(architecture)
    plain = model.run(ids).logits
    for edit in (SAEEdit(site, sae), SAEEdit(site, sae, ablate=[], clamp={}, steer={})):
        assert torch.equal(model.run(ids, edits=[edit]).logits, plain)
    # A zero steer changes every feature by exactly nothing.
    zero = SAEEdit(site, sae, steer={5: 0.0})
    assert torch.equal(model.run(ids, edits=[zero]).logits, plain)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("site", SITES, ids=str)
def test_ablate_matches_dense_hook(setup, site, architecture):
    family, model, ids = setup
    sae = _sae(architecture)
    features = _active(model, ids, site, sae)
    got = model.run(ids, edits=[SAEEdit(site, sae, ablate=features)]).logits
    want = _hooked_logits(model, family, site, ids, sae, ablate=features)
    assert not torch.allclose(got, model.run(ids).logits)  # the edit did something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("site", SITES, ids=str)
def test_clamp_and_steer_match_dense_hook(setup, site, architecture):
    family, model, ids = setup
    sae = _sae(architecture)
    a, b, c = _active(model, ids, site, sae)
    edits = {"ablate": [a], "clamp": {b: 2.5, 7: -1.0}, "steer": {c: 3.0, 11: 1.5}}
    got = model.run(ids, edits=[SAEEdit(site, sae, **edits)]).logits
    want = _hooked_logits(model, family, site, ids, sae, **edits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for kind in ("clamp", "steer"):
        one = {kind: edits[kind]}
        got = model.run(ids, edits=[SAEEdit(site, sae, **one)]).logits
        torch.testing.assert_close(got, _hooked_logits(model, family, site, ids, sae, **one),
                                   rtol=1e-5, atol=1e-5)


def test_resid_mid_writes_through_a_summand(setup):
    _, model, ids = setup
    site = Site("resid_mid", layer=1)
    sae = _sae("relu")
    plain = model.run(ids, cache=[site])
    assert torch.equal(model.run(ids, edits=[SAEEdit(site, sae)]).logits, plain.logits)
    x = plain.cache[site]
    features = _active(model, ids, site, sae, count=2)
    delta = _dense_edit(sae, x, ablate=features, steer={9: 1.0}) - x
    want = model.run(ids, edits=[Add(site, delta)]).logits
    got = model.run(ids, edits=[SAEEdit(site, sae, ablate=features, steer={9: 1.0})]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("site", SITES, ids=str)
def test_feature_activations_match_encode(setup, site, architecture):
    _, model, ids = setup
    sae = _sae(architecture)
    got = feature_activations(model, ids, site, sae)
    x = model.run(ids, cache=[site]).cache[site]
    assert got.shape == (2, 7, D_SAE)
    assert torch.equal(got, sae.encode(x))


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_delta_matches_dense_on_tensors(architecture, normalize):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=g) * 0.3
    base = _sae("relu", normalize=normalize)
    extra = {}
    if architecture == "jumprelu":
        extra["threshold"] = torch.full((D_SAE,), 0.5)
    if architecture == "gated":
        extra = {"b_gate": base.b_enc, "b_mag": base.b_enc * 2, "r_mag": base.b_enc * 3}
    sae = SAE(W_enc=base.W_enc, b_enc=base.b_enc, W_dec=base.W_dec, b_dec=base.b_dec,
              architecture=architecture, k=8 if architecture == "topk" else None,
              normalize_activations=normalize, **extra)
    f = sae.encode(x)
    live = f.sum(dim=(0, 1)).topk(2).indices.tolist()
    edits = {"ablate": live[:1], "clamp": {live[1]: 1.5}, "steer": {0: -2.0}}
    got = x.clone()
    SAEEdit(Site("resid_post", layer=0), sae, **edits).write(got, None)
    torch.testing.assert_close(got, _dense_edit(sae, x, **edits), rtol=1e-5, atol=1e-6)


def test_rescale_by_decoder_norm():
    base = _sae("topk")
    sae = SAE(W_enc=base.W_enc, b_enc=base.b_enc, W_dec=base.W_dec, b_dec=base.b_dec,
              architecture="topk", k=8, rescale_acts_by_decoder_norm=True)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.3
    live = sae.encode(x).sum(0).topk(1).indices.tolist()
    got = x.clone()
    SAEEdit(Site("mlp_out", layer=0), sae, ablate=live, steer={3: 1.0}).write(got, None)
    torch.testing.assert_close(got, _dense_edit(sae, x, ablate=live, steer={3: 1.0}),
                               rtol=1e-5, atol=1e-6)


def test_sae_dtype_is_used_and_result_cast_back(setup):
    family, model, ids = setup
    site = Site("resid_post", layer=1)
    sae = _sae("relu", dtype=torch.float64)
    features = _active(model, ids, site, sae, count=2)
    got = model.run(ids, edits=[SAEEdit(site, sae, ablate=features)]).logits
    assert got.dtype == torch.float32
    want = _hooked_logits(model, family, site, ids, sae, ablate=features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_d_in_names_site_and_sizes(setup):
    _, model, ids = setup
    site = Site("resid_post", layer=1)
    sae = _sae("relu", d_in=16)
    with pytest.raises(ShapeError, match=r"resid_post.*d_in=16.*32"):
        model.run(ids, edits=[SAEEdit(site, sae, ablate=[0])])
    with pytest.raises(ShapeError, match=r"d_in=16.*resid_post.*32"):
        feature_activations(model, ids, site, sae)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({"ablate": [D_SAE]}, "out of range"),
        ({"ablate": [-1]}, "out of range"),
        ({"clamp": {D_SAE + 3: 1.0}}, "out of range"),
        ({"steer": {1.5: 1.0}}, "int feature indices"),
        ({"ablate": [True]}, "int feature indices"),
        ({"ablate": "3"}, "sequence of int"),
        ({"ablate": 3}, "sequence of int"),
        ({"clamp": [1, 2]}, "mapping"),
        ({"steer": {1: "big"}}, "finite real number"),
        ({"clamp": {1: float("nan")}}, "finite real number"),
        ({"ablate": [1, 1]}, "more than once"),
        ({"ablate": [2], "clamp": {2: 1.0}}, "both ablate and clamp"),
    ],
)
def test_bad_feature_edits(edits, match):
    with pytest.raises(InputError, match=match):
        SAEEdit(Site("resid_post", layer=0), _sae("relu"), **edits)


def test_bad_sae_and_site():
    site = Site("resid_post", layer=0)
    with pytest.raises(InputError, match="must be an SAE"):
        SAEEdit(site, object(), ablate=[0])
    with pytest.raises(InputError, match="whole component"):
        SAEEdit(Site("resid_post", layer=0, pos=1), _sae("relu"), ablate=[0])
    base = _sae("relu")
    transcoder = SAE(W_enc=base.W_enc, b_enc=base.b_enc, W_dec=torch.zeros(D_SAE, 8),
                     b_dec=torch.zeros(8), apply_b_dec_to_input=False)
    with pytest.raises(InputError, match="transcoder"):
        SAEEdit(site, transcoder, ablate=[0])
    with pytest.raises(InputError, match=r"unknown feature edit.*'zero'"):
        SAEEdit(site, base, zero=[0])
