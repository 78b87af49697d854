"""SAE weight formats: tiny synthetic checkpoints in each published layout, checked against
independent implementations of each format's own semantics."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechinterp.errors import InputError, ShapeError
from mechinterp.sae import SAE, load_sae, save_sae

D_IN, D_SAE, K, N = 6, 16, 3, 5
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _x(seed: int = 1) -> torch.Tensor:
    return _randn(N, D_IN, g=_gen(seed))


def _base(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "W_enc": _randn(D_IN, D_SAE, g=g), "b_enc": _randn(D_SAE, g=g) * 0.1,
        "W_dec": _randn(D_SAE, D_IN, g=g), "b_dec": _randn(D_IN, g=g) * 0.1,
    }


def _write_saelens(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "topk", "gated", "batchtopk"])
def test_save_load_round_trip(tmp_path, architecture):
    g = _gen()
    extra = {
        "relu": {},
        "jumprelu": {"threshold": _randn(D_SAE, g=g).abs()},
        "batchtopk": {"threshold": torch.tensor(0.2, dtype=F64)},
        "topk": {"k": K, "rescale_acts_by_decoder_norm": True},
        "gated": {"b_gate": _randn(D_SAE, g=g), "b_mag": _randn(D_SAE, g=g),
                  "r_mag": _randn(D_SAE, g=g) * 0.1},
    }[architecture]
    sae = SAE(**_base(g), architecture=architecture, hook_name="blocks.0.hook_resid_pre",
              normalize_activations="layer_norm", **extra)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    # Gated SAEs have no encoder bias (SAELens stores none; it loads as zeros, unused).
    names = ("W_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag")
    for name in names if architecture == "gated" else ("b_enc", *names):
        a, b = getattr(sae, name), getattr(loaded, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A BatchTopK SAE at inference is a JumpReLU with one threshold, and is stored as one.
    expected = "jumprelu" if architecture == "batchtopk" else architecture
    assert (loaded.architecture, loaded.k, loaded.hook_name) == (expected, sae.k, sae.hook_name)
    assert loaded.normalize_activations == "layer_norm"
    x = _x()
    torch.testing.assert_close(loaded.forward(x), sae.forward(x), rtol=0, atol=0)


def test_reference_semantics_by_hand():
    g = _gen()
    p = _base(g)
    x = _x()
    theta = _randn(D_SAE, g=g).abs() * 0.5
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    # JumpReLU: strict >, so a pre-activation exactly at the threshold is off.
    jump = SAE(**p, architecture="jumprelu", threshold=theta)
    torch.testing.assert_close(jump.encode(x), torch.where(h > theta, h, 0.0).clamp_min(0))
    at = SAE(**p, architecture="jumprelu", threshold=h[0].clone())
    assert (at.encode(x)[0] == 0).all()
    # TopK: keep the k largest pre-activations per row, then ReLU.
    topk = SAE(**p, architecture="topk", k=K)
    f = topk.encode(x)
    for row, hrow in zip(f, h, strict=True):
        kept = set(hrow.argsort(descending=True)[:K].tolist())
        for i in range(D_SAE):
            assert row[i] == (max(hrow[i].item(), 0.0) if i in kept else 0.0)
    torch.testing.assert_close(topk.decode(f), f @ p["W_dec"] + p["b_dec"])
    # Gated: gate on the raw projection + b_gate, magnitude with exp(r_mag)-scaled weights.
    b_gate, b_mag, r_mag = _randn(D_SAE, g=g), _randn(D_SAE, g=g), _randn(D_SAE, g=g) * 0.1
    gated = SAE(**p, architecture="gated", b_gate=b_gate, b_mag=b_mag, r_mag=r_mag)
    xc = x - p["b_dec"]
    expected = (xc @ p["W_enc"] + b_gate > 0) * torch.relu(
        xc @ (p["W_enc"] * r_mag.exp()) + b_mag
    )
    torch.testing.assert_close(gated.encode(x), expected.to(F64))


def test_pre_6_config_is_converted(tmp_path):
    p = _base(_gen())
    cfg = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float64",
        "hook_point": "blocks.3.hook_resid_post", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
        "normalize_activations": "none",
    }
    _write_saelens(tmp_path / "old", cfg, p)
    sae = load_sae(tmp_path / "old")
    assert (sae.architecture, sae.k, sae.hook_name) == ("topk", K, "blocks.3.hook_resid_post")
    assert sae.apply_b_dec_to_input is False
    cfg.update(activation_fn_str="relu", activation_fn_kwargs={}, hook_name="h", hook_point=None)
    _write_saelens(tmp_path / "old_relu", cfg, p)
    sae = load_sae(tmp_path / "old_relu")
    assert (sae.architecture, sae.hook_name) == ("relu", "h")


def test_sparsify_follows_sparsify_semantics(tmp_path):
    g = _gen(2)
    enc_w, enc_b = _randn(D_SAE, D_IN, g=g), _randn(D_SAE, g=g)
    w_dec, b_dec = _randn(D_SAE, D_IN, g=g), _randn(D_IN, g=g)
    hook = tmp_path / "run" / "layers.2"
    hook.mkdir(parents=True)
    cfg = {"expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "d_in": D_IN}
    (hook / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(hook / "sae.safetensors"))
    sae = load_sae(hook)
    assert sae.hook_name == "layers.2" and sae.k == K and sae.apply_b_dec_to_input
    x = _x()
    # sparsify: ReLU(linear(x - b_dec)), top-k of that; decode gathers rows of W_dec.
    acts = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top_acts, top_idx = acts.topk(K, dim=-1)
    recon = torch.stack([top_acts[i] @ w_dec[top_idx[i]] for i in range(N)]) + b_dec
    dense = torch.zeros(N, D_SAE, dtype=F64).scatter(1, top_idx, top_acts)
    torch.testing.assert_close(sae.encode(x), dense)
    torch.testing.assert_close(sae.forward(x), recon)
    with pytest.raises(InputError, match="several"):
        load_sae(tmp_path / "run")


def test_gemma_scope_npz(tmp_path):
    g = _gen(3)
    p = {k: v.numpy() for k, v in _base(g).items()}
    p["threshold"] = (_randn(D_SAE, g=g).abs() * 0.5).numpy()
    np.savez(tmp_path / "params.npz", **p)
    sae = load_sae(tmp_path, dtype=torch.float32)
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    assert sae.dtype == torch.float32
    sae = load_sae(tmp_path / "params.npz")
    x = _x()
    # Gemma Scope: the input is not centred by b_dec.
    pre = x.numpy() @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    torch.testing.assert_close(sae.encode(x), torch.from_numpy(acts))
    torch.testing.assert_close(sae.forward(x), torch.from_numpy(acts @ p["W_dec"] + p["b_dec"]))


@pytest.mark.parametrize("nested", [True, False])
def test_llama_scope_jumprelu_with_dataset_norm(tmp_path, nested):
    g = _gen(4)
    enc_w, enc_b = _randn(D_SAE, D_IN, g=g), _randn(D_SAE, g=g)
    dec_w, dec_b = _randn(D_IN, D_SAE, g=g), _randn(D_IN, g=g)
    hp = {"d_model": D_IN, "act_fn": "jumprelu", "jump_relu_threshold": 0.3,
          "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 3.0, "out": 5.0},
          "sparsity_include_decoder_norm": True, "apply_decoder_bias_to_pre_encoder": False,
          "hook_point_in": "blocks.1.hook_resid_post", "hook_point_out": "blocks.1.hook_resid_post"}
    (tmp_path / "hyperparams.json").write_text(json.dumps(hp))
    weights = (tmp_path / "checkpoints" if nested else tmp_path) / "final.safetensors"
    weights.parent.mkdir(exist_ok=True)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
               "decoder.bias": dec_b}, str(weights))
    sae = load_sae(tmp_path)
    assert sae.hook_name == "blocks.1.hook_resid_post"
    x = _x()
    # lm-saes: x scaled to norm sqrt(d) on average, mask on h * ||decoder column|| > theta,
    # output rescaled back by the output average norm.
    s_in, s_out = D_IN**0.5 / 3.0, D_IN**0.5 / 5.0
    h = (x * s_in) @ enc_w.T + enc_b
    f = h * (h * dec_w.norm(dim=0) > 0.3)
    expected = (f @ dec_w.T + dec_b) / s_out
    torch.testing.assert_close(sae.forward(x), expected)


def test_openai_topk_checkpoint(tmp_path):
    g = _gen(5)
    state = {"pre_bias": _randn(D_IN, g=g), "latent_bias": _randn(D_SAE, g=g),
             "encoder.weight": _randn(D_SAE, D_IN, g=g), "decoder.weight": _randn(D_IN, D_SAE, g=g),
             "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
             "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"},
             "normalize": True}
    torch.save(state, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    assert sae.architecture == "topk" and sae.normalize_activations == "layer_norm"
    x = _x()
    mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    vals, idx = pre.topk(K, dim=-1)
    lat = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    recon = (lat @ state["decoder.weight"].T + state["pre_bias"]) * std + mu
    torch.testing.assert_close(sae.forward(x), recon)


def test_dictionary_learning_autoencoder(tmp_path):
    g = _gen(6)
    state = {"bias": _randn(D_IN, g=g), "encoder.weight": _randn(D_SAE, D_IN, g=g),
             "encoder.bias": _randn(D_SAE, g=g), "decoder.weight": _randn(D_IN, D_SAE, g=g)}
    torch.save(state, tmp_path / "ae.pt")
    sae = load_sae(tmp_path)
    x = _x()
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    torch.testing.assert_close(sae.forward(x), f @ state["decoder.weight"].T + state["bias"])


_CALLED: list[str] = []


def _payload(arg: str) -> None:
    _CALLED.append(arg)


class _Evil:
    def __reduce__(self):
        return (_payload, ("executed",))


def test_pickle_needing_code_is_refused(tmp_path):
    file = tmp_path / "evil.pt"
    with open(file, "wb") as fh:
        pickle.dump({"encoder.weight": _Evil()}, fh, protocol=2)
    # Sanity: an ordinary unpickle would call the payload.
    with open(file, "rb") as fh:
        pickle.load(fh)
    assert _CALLED == ["executed"]
    _CALLED.clear()
    torch.save({"W": torch.zeros(1), "x": _Evil()}, tmp_path / "evil_zip.pt")
    _CALLED.clear()
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(InputError, match=name):
            load_sae(tmp_path / name)
    assert _CALLED == []


def test_bad_inputs(tmp_path):
    p = _base(_gen())
    cfg = {"architecture": "standard", "d_in": D_IN + 1, "d_sae": D_SAE,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": {}}
    _write_saelens(tmp_path / "d_in", cfg, p)
    with pytest.raises(ShapeError, match="d_in"):
        load_sae(tmp_path / "d_in")
    _write_saelens(tmp_path / "missing", {**cfg, "d_in": D_IN},
                   {k: v for k, v in p.items() if k != "b_dec"})
    with pytest.raises(InputError, match="'b_dec'"):
        load_sae(tmp_path / "missing")
    _write_saelens(tmp_path / "arch", {**cfg, "d_in": D_IN, "architecture": "mystery"}, p)
    with pytest.raises(InputError, match="mystery"):
        load_sae(tmp_path / "arch")
    _write_saelens(tmp_path / "shape", {**cfg, "d_in": D_IN},
                   {**p, "W_dec": p["W_dec"][:, :-1].contiguous()})
    with pytest.raises(ShapeError, match="apply_b_dec_to_input|b_dec"):
        load_sae(tmp_path / "shape")
    with pytest.raises(InputError, match="format"):
        load_sae(tmp_path / "d_in", format="nope")
    with pytest.raises(InputError, match="known SAE format"):
        load_sae(tmp_path)
    with pytest.raises(ShapeError, match="d_in=6"):
        SAE(**p).encode(torch.zeros(2, D_IN + 1, dtype=F64))
    with pytest.raises(InputError, match="k must be"):
        SAE(**p, architecture="topk", k=D_SAE + 1)
