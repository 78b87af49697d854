"""Attribution patching (AtP, AtP*): first-order estimates of activation patching from gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import transformers
from families import FAMILIES, VOCAB, Family, build, token_ids
from test_patching import mixed_cells

import mechinterp
from mechinterp import Add, Set, Site, select
from mechinterp.errors import InputError, UnsupportedModelError
from mechinterp.heads import induction_pairs
from mechinterp.model import InterpModel
from mechinterp.patching import (
    KL,
    LogitDiff,
    LogProb,
    activation_patch,
    agreement,
    attribution_patch,
)
from mechinterp.patching.attribution import METHODS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_estimate_is_the_directional_derivative(family: Family) -> None:
    """AtP's effect equals d/d(alpha) of the exactly patched metric at alpha = 0, which exact
    patching with alpha = +-h gives by central differences (float64 model)."""
    model = InterpModel(build(family).double())
    clean, corrupt = token_ids(3, 6, seed=11), token_ids(3, 6, seed=12)
    cells = mixed_cells(model)
    h = 1e-3
    for metric in (LogitDiff(5, 7), KL(), LogProb(4)):
        estimate = attribution_patch(model, clean, corrupt, cells, metric, progress=False)
        up = activation_patch(model, clean, corrupt, cells, metric, alpha=h, progress=False)
        down = activation_patch(model, clean, corrupt, cells, metric, alpha=-h, progress=False)
        derivative = (up.values - down.values) / (2 * h)
        effect = estimate.values - estimate.corrupt[:, None]
        scale = float(derivative.abs().max())
        torch.testing.assert_close(effect, derivative, rtol=1e-3, atol=1e-3 * scale + 1e-6)
        torch.testing.assert_close(estimate.corrupt, up.corrupt)
        torch.testing.assert_close(estimate.clean, up.clean)


@pytest.mark.parametrize("method", METHODS)
def test_pairs_in_several_passes_change_nothing(method: str) -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = token_ids(5, 6, seed=1), token_ids(5, 6, seed=2)
    cells = mixed_cells(model)
    whole = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), method=method,
                              progress=False)
    split = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), method=method,
                              batch_size=2, progress=False)
    torch.testing.assert_close(split.values, whole.values, rtol=1e-5, atol=1e-5)


def test_agrees_with_exact_patching_on_the_induction_model() -> None:
    model = mechinterp.load("induction-2l")
    data = induction_pairs(model, pairs=16, span=12, k=6, seed=5)
    metric = LogitDiff(data.answer, data.wrong)
    for selector in (select("resid_pre").layers().positions(), select("head").layers().heads()):
        exact = activation_patch(model, data.clean, data.corrupt, selector, metric, progress=False)
        estimate = attribution_patch(model, data.clean, data.corrupt, selector, metric,
                                     progress=False)
        scores = agreement(exact, estimate)
        # Most cells have no effect at all, so ranks among them are noise: Spearman is lower.
        assert scores["pearson"] > 0.95 and scores["spearman"] > 0.5, scores
        assert scores["top10_overlap"] >= 0.5, scores
    assert agreement(exact, exact)["spearman"] == pytest.approx(1.0)


def test_qk_fix_ranks_the_keys_of_the_induction_model_better() -> None:
    """The induction head's attention is sharp, so AtP misranks keys; the QK fix ranks them
    closer to exact patching, and AtP*'s unsigned-magnitude values still go through agreement."""
    model = mechinterp.load("induction-2l")
    data = induction_pairs(model, pairs=16, span=12, k=6, seed=5)
    metric = LogitDiff(data.answer, data.wrong)
    selector = select("k").layers().positions().heads()
    exact = activation_patch(model, data.clean, data.corrupt, selector, metric, progress=False)
    scores = {method: agreement(exact, attribution_patch(model, data.clean, data.corrupt, selector,
                                                         metric, method=method, progress=False))
              for method in METHODS}
    assert scores["atp+qkfix"]["spearman"] > scores["atp"]["spearman"] + 0.05, scores
    assert scores["atp+qkfix"]["pearson"] > scores["atp"]["pearson"], scores
    assert all(0.5 < value <= 1.0 for value in scores["atp*"].values()), scores


def test_bad_input_is_named() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = token_ids(2, 6, seed=1), token_ids(2, 6, seed=2)
    with pytest.raises(InputError, match="at least one site"):
        attribution_patch(model, clean, corrupt, [], LogitDiff(5, 7))
    exact = activation_patch(model, clean, corrupt, select("embed").positions(0), LogitDiff(5, 7),
                             progress=False)
    other = activation_patch(model, clean, corrupt, select("embed").positions(1), LogitDiff(5, 7),
                             progress=False)
    with pytest.raises(ValueError, match="same sites"):
        agreement(exact, other)


# -- AtP*: the QK fix and GradDrop against slow references -----------------------------------

QK_CELLS = [
    Site("q", layer=1, head=1, pos=-1),
    Site("q", layer=0, head=(0, 2), pos=(2, 4)),
    Site("q", layer=1),
    Site("k", layer=0, head=1, pos=2),
    Site("k", layer=1, pos=-2),
    Site("k", layer=1, head=0),
    Site("k", layer=0, head=(0, 1), pos=(1, 3)),
]

# The modules that open each layer's attention and MLP branches (their norms) in each family.
BRANCH_INPUTS = {
    "gpt2": ("transformer.h.{layer}.ln_1", "transformer.h.{layer}.ln_2"),
    "llama": ("model.layers.{layer}.input_layernorm",
              "model.layers.{layer}.post_attention_layernorm"),
    "gpt_neox": ("gpt_neox.layers.{layer}.input_layernorm",
                 "gpt_neox.layers.{layer}.post_attention_layernorm"),
}
BRANCH_COMPONENTS = ("attn_out", "mlp_out", "head", "q", "k", "v", "pattern", "neuron")


def by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def last_logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """LogitDiff(5, 7) at the last position, written out."""
    return logits[:, -1, 5] - logits[:, -1, 7]


@contextlib.contextmanager
def branches_detached(model: InterpModel, layer: int | None) -> Iterator[None]:
    """Layer ``layer``'s attention and MLP read a detached residual stream, so the backward pass
    reaches the stream below them through the skip connections alone."""
    if layer is None:
        yield
        return
    paths = BRANCH_INPUTS[model.family if model.family in BRANCH_INPUTS else "llama"]
    handles = [model._module.get_submodule(path.format(layer=layer)).register_forward_pre_hook(
        lambda _module, args: (args[0].detach(), *args[1:])) for path in paths]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pattern_gradients(model: InterpModel, ids: torch.Tensor, dropped: int | None = None
                      ) -> dict[int, torch.Tensor]:
    """dm/dp at every layer's attention probabilities on a run of ``ids``, through zero tensors
    added to them (with layer ``dropped``'s branches detached)."""
    batch, length = ids.shape
    shape = (batch, model.dims.n_heads, length, length)
    zeros = [torch.zeros(shape, dtype=torch.float64, requires_grad=True)
             for _ in range(model.dims.n_layers)]
    edits = [Add(Site("pattern", layer=layer), zero) for layer, zero in enumerate(zeros)]
    with branches_detached(model, dropped):
        logits = model.run(ids, edits=edits, grad=True).logits
    grads = torch.autograd.grad(last_logit_diff(logits).sum(), zeros)
    return dict(enumerate(grads))


def qk_reference(model: InterpModel, clean: torch.Tensor, corrupt: torch.Tensor, site: Site,
                 grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """[pair] the QK fix of one q/k site the slow way: run the corrupted prompts with the site
    set to its clean value, and dot the change of that layer's attention pattern with dm/dp."""
    whole = Site("pattern", layer=site.layer)
    value = model.run(clean, cache=[site]).cache[site]
    patched = model.run(corrupt, edits=[Set(site, value)], cache=[whole]).cache[whole]
    unpatched = model.run(corrupt, cache=[whole]).cache[whole]
    return ((patched - unpatched) * grads[site.layer]).sum((1, 2, 3))


def reference_estimates(model: InterpModel, clean: torch.Tensor, corrupt: torch.Tensor,
                        cells: list[Site], dropped: int | None = None) -> torch.Tensor:
    """[pair, cell] AtP with the QK fix, built from plain AtP (other components) and
    :func:`qk_reference` (q and k), with layer ``dropped``'s branches detached."""
    with branches_detached(model, dropped):
        plain = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), progress=False)
    out = (plain.values - plain.corrupt[:, None]).double()
    grads = pattern_gradients(model, corrupt, dropped)
    for c, site in enumerate(cells):
        if site.component in ("q", "k"):
            out[:, c] = qk_reference(model, clean, corrupt, site, grads)
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "bert"])
def test_qk_fix_equals_the_patched_softmax_dotted_with_dm_dp(name: str) -> None:
    """Every q/k cell's estimate is the exact change of its layer's attention pattern when the
    site is patched, times dm/dp on the corrupted run (float64). Llama has grouped-query
    attention (2 key heads for 4 query heads) and rotary queries and keys; whole-head and
    multi-position key cells move several columns of a softmax at once."""
    model = InterpModel(build(by_name(name)).double())
    clean, corrupt = token_ids(3, 6, seed=11), token_ids(3, 6, seed=12)
    cells = [*QK_CELLS, Site("v", layer=1, head=0), Site("attn_out", layer=0, pos=-2)]
    estimate = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7),
                                 method="atp+qkfix", progress=False)
    expected = reference_estimates(model, clean, corrupt, cells)
    effect = estimate.values - estimate.corrupt[:, None]
    scale = float(expected.abs().max())
    assert scale > 1e-4  # the cells do move the metric
    torch.testing.assert_close(effect, expected, rtol=1e-7, atol=1e-10 * scale)
    assert estimate.metric.startswith("AtP+QKfix estimate")


def three_layer_gpt2() -> InterpModel:
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return InterpModel(transformers.GPT2LMHeadModel(config).eval().double())


@pytest.mark.parametrize("name", ["gpt2-3l", "llama", "gpt_neox", "gpt_neox_sequential"])
def test_graddrop_equals_detached_branch_reference(name: str) -> None:
    """AtP*'s magnitude, rebuilt layer by layer: with layer l's norms fed a detached residual
    stream, plain AtP (and the slow QK fix) give each cell's estimate e_l, except cells inside
    layer l's branches, whose term is 0; the mean of |e_l| over the layers whose branches do
    not hold the cell, signed by the undropped estimate, is AtP*'s effect."""
    model = three_layer_gpt2() if name == "gpt2-3l" else InterpModel(build(by_name(name)).double())
    clean, corrupt = token_ids(3, 6, seed=21), token_ids(3, 6, seed=22)
    cells = mixed_cells(model) + [Site("q", layer=0, head=1, pos=-1), Site("k", layer=0, pos=3)]
    n_layers = model.dims.n_layers
    star = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), method="atp*",
                             progress=False)
    signed = reference_estimates(model, clean, corrupt, cells)
    total = torch.zeros_like(signed)
    for layer in range(n_layers):
        inside = torch.tensor([s.component in BRANCH_COMPONENTS and s.layer == layer
                               for s in cells])
        dropped = reference_estimates(model, clean, corrupt, cells, dropped=layer)
        total += torch.where(inside, 0.0, dropped.abs())
    layers = torch.tensor([n_layers - 1 if s.component in BRANCH_COMPONENTS else n_layers
                           for s in cells], dtype=torch.float64)
    expected = signed.sign() * total / layers
    effect = star.values - star.corrupt[:, None]
    scale = float(expected.abs().max())
    torch.testing.assert_close(effect, expected, rtol=1e-7, atol=1e-10 * scale)
    # Dropping a layer changes some cells: the check above is not AtP's own magnitudes again.
    assert not torch.allclose(effect.abs(), signed.abs(), rtol=1e-3)


# A hand-built GPT-2 whose last layer attends with logit margins of SATURATION / 2 = 20, so one
# position takes all but ~e^-20 of the attention. Token roles (ids):
SINK, KEY, DEAD_KEY, FILLER, QUERY, OTHER_QUERY, ANSWER, WRONG = range(2, 10)
D_MODEL, SATURATION, EMBED_NORM, VALUE_NORM, READOUT = 16, 40.0, 10.0, 1.0, 5.0


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def saturated_model() -> InterpModel:
    """Two layers, one head of d_head = D_MODEL; every weight and bias 0 except:

    - embeddings: EMBED_NORM * e_token for orthonormal, mean-zero directions e (Hadamard rows),
      so every norm sees sqrt(D_MODEL) * e_token;
    - layer 1 attention: QUERY's query matches KEY's key with score SATURATION and SINK's with
      SATURATION / 2; OTHER_QUERY's query matches only SINK's (SATURATION / 2); DEAD_KEY has a
      zero key. KEY and DEAD_KEY carry the value VALUE_NORM * e_value, the others none;
    - unembedding: ANSWER reads +READOUT * e_value, WRONG -READOUT * e_value.

    So the last position attends KEY (position 1) when its token is QUERY and position 1 holds
    KEY, and the sink otherwise; the metric is 2 * READOUT * e_value . ln_f(final state).
    """
    config = transformers.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=1, vocab_size=VOCAB,
                                     n_positions=8, tie_word_embeddings=False, bos_token_id=0,
                                     eos_token_id=0)
    module = transformers.GPT2LMHeadModel(config).eval().double()
    e = hadamard(D_MODEL)[1:] / D_MODEL ** 0.5  # orthonormal rows that sum to zero
    sink, key, dead, filler, query, other, value = e[:7]
    g1, g2, g3 = torch.eye(D_MODEL, dtype=torch.float64)[:3]  # head-space directions
    c = (4 * SATURATION) ** 0.5  # scores are q . k / sqrt(d_head) = c^2 / 4 = SATURATION
    normed = D_MODEL ** 0.5  # what a norm makes of EMBED_NORM * e
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()
        for name, parameter in module.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.fill_(1.0)
        wte = module.transformer.wte.weight
        for token, direction in ((SINK, sink), (KEY, key), (DEAD_KEY, dead), (FILLER, filler),
                                 (QUERY, query), (OTHER_QUERY, other)):
            wte[token] = EMBED_NORM * direction
        w_q, w_k, w_v = module.transformer.h[1].attn.c_attn.weight.split(D_MODEL, dim=1)
        w_q += c / normed * (torch.outer(query, g1) + torch.outer(other, g2))
        w_k += c / normed * (torch.outer(key, g1) + torch.outer(sink, (g1 + g2) / 2))
        w_v += 1 / normed * (torch.outer(key, g3) + torch.outer(dead, g3))
        module.transformer.h[1].attn.c_proj.weight += VALUE_NORM * torch.outer(g3, value)
        module.lm_head.weight[ANSWER] = READOUT * value
        module.lm_head.weight[WRONG] = -READOUT * value
    return InterpModel(module)


def test_saturated_attention_is_missed_by_atp_and_found_by_atp_star() -> None:
    """Pair 0 corrupts the query (QUERY -> OTHER_QUERY at the last position), pair 1 the key at
    position 1 (KEY -> DEAD_KEY). Either way the corrupted run attends the sink and the metric
    is 0, and patching the query (pair 0) or the key (pair 1) back moves all the attention to
    position 1: the metric becomes m_1 = 2 READOUT VALUE_NORM / sd(final state), with
    sd^2 = (EMBED_NORM^2 + VALUE_NORM^2) / D_MODEL + eps. The softmax's gradient there is
    ~e^-20, so AtP sees nothing. The QK fix moves p exactly, 0 -> 1, and multiplies by dm/dp at
    the corrupted run, the derivative of m in the attended value at 0:
    2 READOUT VALUE_NORM / sqrt(EMBED_NORM^2 / D_MODEL + eps). The two differ by ln_f's
    curvature alone, a factor sqrt(1 + (VALUE_NORM / EMBED_NORM)^2) ~ 1.005."""
    model = saturated_model()
    clean = torch.tensor([[SINK, KEY, FILLER, QUERY], [SINK, KEY, FILLER, QUERY]])
    corrupt = torch.tensor([[SINK, KEY, FILLER, OTHER_QUERY], [SINK, DEAD_KEY, FILLER, QUERY]])
    cells = [Site("q", layer=1, head=0, pos=-1), Site("k", layer=1, head=0, pos=1),
             Site("k", layer=1, head=0)]
    metric = LogitDiff(ANSWER, WRONG)
    eps = model._module.config.layer_norm_epsilon
    moved = 2 * READOUT * VALUE_NORM / ((EMBED_NORM ** 2 + VALUE_NORM ** 2) / D_MODEL + eps) ** 0.5
    slope = 2 * READOUT * VALUE_NORM / (EMBED_NORM ** 2 / D_MODEL + eps) ** 0.5
    # Which cell moves the attention in which pair: q in pair 0, both key cells in pair 1.
    moves = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)

    exact = activation_patch(model, clean, corrupt, cells, metric, progress=False)
    plain = attribution_patch(model, clean, corrupt, cells, metric, progress=False)
    star = attribution_patch(model, clean, corrupt, cells, metric, method="atp*", progress=False)

    torch.testing.assert_close(exact.corrupt, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(exact.values - exact.corrupt[:, None], moves * moved,
                               rtol=1e-6, atol=1e-6)
    assert (plain.values - plain.corrupt[:, None]).abs().max() < 1e-3 * moved
    torch.testing.assert_close(star.values - star.corrupt[:, None], moves * slope,
                               rtol=1e-6, atol=1e-6)
    relative = (star.values - exact.values).abs().max() / moved
    assert relative < 1.01 * ((1 + (VALUE_NORM / EMBED_NORM) ** 2) ** 0.5 - 1), relative


def test_method_and_graddrop_models_are_checked() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = token_ids(2, 6, seed=1), token_ids(2, 6, seed=2)
    with pytest.raises(InputError, match=r"method must be one of \['atp', 'atp\+qkfix', 'atp\*'\]; got 'AtP'"):
        attribution_patch(model, clean, corrupt, select("q").layers(), LogitDiff(5, 7),
                          method="AtP", progress=False)
    bert = InterpModel(build(by_name("bert")))
    with pytest.raises(UnsupportedModelError, match="pre-norm residual model.*got a 'bert' model"):
        attribution_patch(bert, clean, corrupt, select("q").layers(), LogitDiff(5, 7),
                          method="atp*", progress=False)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB,
                                     n_positions=32)
    one_layer = InterpModel(transformers.GPT2LMHeadModel(config).eval())
    with pytest.raises(InputError, match="at least 2 layers.*got 1"):
        attribution_patch(one_layer, clean, corrupt, select("q").layers(), LogitDiff(5, 7),
                          method="atp*", progress=False)
