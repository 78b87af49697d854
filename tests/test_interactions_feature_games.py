"""Games over SAE features held to a golden reference: one plain forward per coalition with a hook
on GPT-2's block output that re-encodes the activation densely, ablates the absent features and
adds the difference of the two decodes (the error term kept), all written out by hand."""

from __future__ import annotations

import families
import pytest
import torch

import mechinterp
from mechinterp import Site
from mechinterp.errors import DeviceError, InputError, ShapeError
from mechinterp.interactions import FeatureGame, exact
from mechinterp.sae import SAE
from tests.test_interactions_model_games import (
    assert_game_values,
    every_coalition,
    last_logits,
    log_odds,
)

PROMPT = families.token_ids(1, 6, seed=3)
D_MODEL, D_SAE = 32, 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny forwards run on one thread (see conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def gpt2():
    hf = families.build(families.FAMILIES[0])
    return hf, mechinterp.load(hf)


def random_sae(architecture: str, normalize: str = "none", seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    fields = {"W_enc": torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL ** 0.5,
              "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
              "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) / 2,
              "b_dec": 0.1 * torch.randn(D_MODEL, generator=g),
              "architecture": architecture, "normalize_activations": normalize,
              "hook_name": "resid_post.0"}
    if architecture == "topk":
        fields["k"] = 6
    if architecture == "jumprelu":
        fields["threshold"] = 0.2 * torch.rand(D_SAE, generator=g)
    return SAE(**fields)


def hidden(out) -> torch.Tensor:
    """A GPT-2 block's hidden states (a tuple's first item in older transformers)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_output(hf, ids) -> torch.Tensor:
    """GPT-2's first block output (resid_post.0) ``[rows, pos, d_model]``."""
    seen = {}
    handle = hf.transformer.h[0].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("x", hidden(out).clone()))
    try:
        hf(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def reference_value(hf, sae, features, coalition, ablated, where, target) -> float:
    """log-odds with the absent features set to ``ablated [pos, F]`` at positions ``where``."""
    def hook(_module, _args, out):
        x = hidden(out)
        _, undo = sae._normalize(x)
        f = sae.encode(x)
        g = f.clone()
        for player, present in enumerate(coalition.tolist()):
            if not present:
                g[0, where, features[player]] = ablated[where, player]
        edited = x + undo(sae.decode(g)) - undo(sae.decode(f))
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    handle = hf.transformer.h[0].register_forward_hook(hook)
    try:
        return log_odds(last_logits(hf, input_ids=PROMPT), target)
    finally:
        handle.remove()


def check_against_reference(hf, game, sae, ablated, where):
    coalitions = every_coalition(game.n_players)
    theirs = [reference_value(hf, sae, game.features, c, ablated, where, game.target)
              for c in coalitions]
    # The full coalition edits nothing: the model's own output.
    assert_game_values(game, coalitions, theirs, hf, PROMPT)


def test_zero_ablation_matches_the_reference(gpt2):
    hf, model = gpt2
    sae = random_sae("relu")
    game = FeatureGame(model, PROMPT, sae, features=[0, 3, 5, 11, 40], progress=False)
    assert game.players[1] == "resid_post.0[feature=3]"
    every = torch.ones(6, dtype=torch.bool)
    check_against_reference(hf, game, sae, torch.zeros(6, 5), every)
    dense = sae.encode(block_output(hf, PROMPT))[0]
    torch.testing.assert_close(game.activations, dense[:, game.features])


def test_mean_ablation_at_some_positions_of_a_layer_norm_topk_sae(gpt2):
    hf, model = gpt2
    sae = random_sae("topk", normalize="layer_norm", seed=1)
    reference = families.token_ids(3, 5, seed=9)
    game = FeatureGame(model, PROMPT, sae, features=4, positions=[-1, 2], ablation="mean",
                       reference=reference, progress=False)
    # The four features with the largest summed activation at positions 2 and 5.
    x = block_output(hf, PROMPT)
    totals = sae.encode(x)[0, [2, 5]].sum(0)
    assert game.features == sorted(totals.topk(4).indices.tolist())
    means = sae.encode(block_output(hf, reference))[..., game.features].mean((0, 1))
    where = torch.tensor([False, False, True, False, False, True])
    check_against_reference(hf, game, sae, means.expand(6, -1), where)


def test_resample_ablation_of_a_rescaled_jumprelu_sae(gpt2):
    hf, model = gpt2
    sae = random_sae("jumprelu", normalize="constant_norm_rescale", seed=2)
    reference = families.token_ids(1, 6, seed=11)
    features = [1, 2, 8, 30]
    game = FeatureGame(model, PROMPT, sae, features=features, ablation="resample",
                       reference=reference, progress=False)
    resampled = sae.encode(block_output(hf, reference))[0][:, features]
    check_against_reference(hf, game, sae, resampled, torch.ones(6, dtype=torch.bool))


def test_shapley_values_are_efficient_on_the_shipped_model():
    from mechinterp.zoo import zoo_sae

    model = mechinterp.load("induction-2l")
    game = FeatureGame(model, "kete vetu fuba mabi kete vetu", zoo_sae("induction-2l-sae"),
                       features=5, progress=False)
    shapley = exact(game, index="SV")
    total = sum(float(shapley[(i,)]) for i in range(5))
    assert total == pytest.approx(game.full_value - game.empty_value, abs=1e-5)


def test_bad_input_is_named(gpt2):
    _, model = gpt2
    sae = random_sae("relu")
    with pytest.raises(InputError, match="sae must be an SAE"):
        FeatureGame(model, PROMPT, "sae", features=[0])
    transcoder = SAE(W_enc=torch.zeros(D_MODEL, 4), b_enc=torch.zeros(4),
                     W_dec=torch.zeros(4, 8), b_dec=torch.zeros(8), apply_b_dec_to_input=False)
    with pytest.raises(InputError, match="a transcoder"):
        FeatureGame(model, PROMPT, transcoder, features=[0], site=Site("resid_post", layer=0))
    for features, match in (([48], "out of range"), ([1, 1], "more than once"),
                            ([], "at least one latent"), (["a"], "int feature indices"),
                            ("0", "a sequence of int feature indices"), (0, r"\[1, d_sae=48\]")):
        with pytest.raises(InputError, match=match):
            FeatureGame(model, PROMPT, sae, features=features, progress=False)
    with pytest.raises(InputError, match="ablation must be one of"):
        FeatureGame(model, PROMPT, sae, features=[0], ablation="blur")
    with pytest.raises(InputError, match="needs reference"):
        FeatureGame(model, PROMPT, sae, features=[0], ablation="mean")
    with pytest.raises(InputError, match="reference must be None"):
        FeatureGame(model, PROMPT, sae, features=[0], reference=PROMPT)
    with pytest.raises(ShapeError, match="one unpadded prompt of 6 tokens"):
        FeatureGame(model, PROMPT, sae, features=[0], ablation="resample",
                    reference=families.token_ids(1, 5), progress=False)
    with pytest.raises(InputError, match=r"positions must be ints in \[-6, 6\)"):
        FeatureGame(model, PROMPT, sae, features=[0], positions=[6], progress=False)
    with pytest.raises(ShapeError, match="reads d_in=32 features, but the activation at neuron.0"):
        FeatureGame(model, PROMPT, sae, features=[0], site=Site("neuron", layer=0),
                    progress=False)
    nameless = SAE(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    with pytest.raises(InputError, match="hook_name is None"):
        FeatureGame(model, PROMPT, nameless, features=[0])
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="must be on the model's device"):
            FeatureGame(model, PROMPT, sae.to(device="cuda"), features=[0], progress=False)


@pytest.mark.cuda
def test_feature_game_on_cuda_matches_cpu():
    from kernels import CUDA_OK

    from mechinterp.zoo import zoo_sae

    if not CUDA_OK:
        pytest.skip("needs a CUDA build of mechinterp._C")

    prompt = "kete vetu fuba mabi kete vetu"
    values = []
    for device in ("cpu", "cuda"):
        model = mechinterp.load("induction-2l", device=device)
        game = FeatureGame(model, prompt, zoo_sae("induction-2l-sae", device=device), features=6,
                           ablation="mean", reference=["fuba mabi kete vetu", "mabi kete"],
                           progress=False)
        values.append(game(every_coalition(6)))
    torch.testing.assert_close(values[1].cpu(), values[0], rtol=0, atol=1e-4)
