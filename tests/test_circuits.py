"""Circuit discovery: the edge-patching forward against hand-written forwards, the graph, EAP and
EAP-IG against their definitions, ACDC, evaluation, exports, and the induction circuit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import mechinterp
from mechinterp import Set, Site
from mechinterp.circuits import (
    Circuit,
    CircuitGraph,
    CircuitTask,
    EdgeScores,
    acdc,
    attribute_edges,
    attribute_nodes,
    faithfulness,
    roc_auc,
)
from mechinterp.circuits.induction import induction_circuit, induction_task
from mechinterp.cli import main
from mechinterp.errors import InputError, ShapeError, SiteError, UnsupportedModelError
from mechinterp.patching import KL, LogitDiff
from tests import families

POST_NORM = [f for f in families.FAMILIES if f.name in ("bert", "roberta")]


def _model(family: families.Family, dtype=torch.float64):
    return mechinterp.load(families.build(family).to(dtype))


def _projection_metric(vocab: int, seed: int = 3):
    """A metric that sees every logit: a fixed random projection of the scored logits."""
    direction = torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def metric(logits, pairs):
        return logits.double() @ direction.to(logits.device)

    return metric


# -- hand-written forwards: each destination reads the sum of its sources ----------------------


def _read(sources, patched, weights, destination, constant):
    """A destination's input: every source written so far, patched where the weight says so."""
    total = constant.clone()
    for s, current in enumerate(sources):
        w = float(weights[s, destination])
        total = total + (patched[:, s] if w else current)
    return total


def _attention(q, k, v, scale):
    scores = q @ k.transpose(-1, -2) * scale
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _gpt2_forward(model, ids, weights, patched):
    """GPT-2 with per-destination residual inputs. Returns logits and the source outputs."""
    tr, config = model.transformer, model.config
    n_heads, d_model = config.n_head, config.n_embd
    d_head = d_model // n_heads
    x0 = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))
    sources, constant, destination = [x0], torch.zeros_like(x0), 0
    for block in tr.h:
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, out]
        inputs = {}
        for part_index, part in enumerate("qkv"):
            for h in range(n_heads):
                columns = slice(part_index * d_model + h * d_head, part_index * d_model + (h + 1) * d_head)
                x = block.ln_1(_read(sources, patched, weights, destination, constant))
                inputs[part, h] = x @ w[:, columns] + b[columns]
                destination += 1
        w_out = block.attn.c_proj.weight
        written = []
        for h in range(n_heads):
            z = _attention(inputs["q", h], inputs["k", h], inputs["v", h], d_head ** -0.5)
            written.append(z @ w_out[h * d_head:(h + 1) * d_head])
        sources += written
        constant = constant + block.attn.c_proj.bias
        mlp_in = _read(sources, patched, weights, destination, constant)
        destination += 1
        sources.append(block.mlp(block.ln_2(mlp_in)))
    final = _read(sources, patched, weights, destination, constant)
    return model.lm_head(tr.ln_f(final)), torch.stack(sources, dim=1)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _llama_forward(model, ids, weights, patched):
    """Llama (grouped-query attention, rotary) with per-destination residual inputs."""
    inner, config = model.model, model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = config.hidden_size // n_heads
    x0 = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = inner.rotary_emb(x0, positions)
    sources, constant, destination = [x0], torch.zeros_like(x0), 0
    for layer in inner.layers:
        attn = layer.self_attn
        per_part = {"q": (attn.q_proj, n_heads), "k": (attn.k_proj, n_kv), "v": (attn.v_proj, n_kv)}
        inputs = {}
        for part, (projection, count) in per_part.items():
            for h in range(count):
                rows = slice(h * d_head, (h + 1) * d_head)
                x = layer.input_layernorm(_read(sources, patched, weights, destination, constant))
                inputs[part, h] = x @ projection.weight[rows].T
                destination += 1
        written = []
        for h in range(n_heads):
            group = h // (n_heads // n_kv)
            q = _rotate(inputs["q", h], cos, sin)
            k = _rotate(inputs["k", group], cos, sin)
            z = _attention(q, k, inputs["v", group], d_head ** -0.5)
            written.append(z @ attn.o_proj.weight[:, h * d_head:(h + 1) * d_head].T)
        sources += written
        mlp_in = _read(sources, patched, weights, destination, constant)
        destination += 1
        sources.append(layer.mlp(layer.post_attention_layernorm(mlp_in)))
    final = _read(sources, patched, weights, destination, constant)
    return model.lm_head(inner.norm(final)), torch.stack(sources, dim=1)


def _bert_forward(model, ids, weights, patched):
    """BERT with per-destination residual inputs. Every read sums the sources' contributions:
    their outputs carried through the LayerNorms since, each linearised at this run's scale
    (the LayerNorm and attention-output biases count as the embeddings'). ``patched`` holds
    another run's contributions at each read point. Returns logits and this run's."""
    bert, config = model.bert, model.config
    n_heads, d_model = config.num_attention_heads, config.hidden_size
    d_head = d_model // n_heads
    emb = bert.embeddings
    positions = torch.arange(ids.shape[1])
    x0 = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions)
                       + emb.token_type_embeddings(torch.zeros_like(ids)))
    parts, reads, destination = [x0], [], 0

    def read(destination):
        point = len(reads) - 1
        total = torch.zeros_like(x0)
        for s, current in enumerate(parts):
            total = total + (patched[point][:, s] if float(weights[s, destination]) else current)
        return total

    def renormalise(norm):
        x = sum(parts)
        sigma = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        for s, part in enumerate(parts):
            parts[s] = norm.weight * (part - part.mean(-1, keepdim=True)) / sigma
        parts[0] = parts[0] + norm.bias
        # The contributions add up to the model's own LayerNorm output.
        torch.testing.assert_close(sum(parts), norm(x), rtol=1e-10, atol=1e-10)
        reads.append(torch.stack(parts, dim=1))

    reads.append(torch.stack(parts, dim=1))
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        inputs = {}
        for part, projection in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            for h in range(n_heads):
                rows = slice(h * d_head, (h + 1) * d_head)
                inputs[part, h] = read(destination) @ projection.weight[rows].T + projection.bias[rows]
                destination += 1
        dense = layer.attention.output.dense
        for h in range(n_heads):
            scores = inputs["q", h] @ inputs["k", h].transpose(-1, -2) * d_head ** -0.5
            z = scores.softmax(-1) @ inputs["v", h]
            parts.append(z @ dense.weight[:, h * d_head:(h + 1) * d_head].T)
        parts[0] = parts[0] + dense.bias
        renormalise(layer.attention.output.LayerNorm)
        mlp_in = read(destination)
        destination += 1
        parts.append(layer.output.dense(layer.intermediate(mlp_in)))
        renormalise(layer.output.LayerNorm)
    return model.cls(read(destination)), reads


HAND_WRITTEN = {"gpt2": _gpt2_forward, "llama": _llama_forward, "bert": _bert_forward}


def _assert_eap_is_the_derivative(task, eap, names):
    """Patching an edge with weight eps moves its destination's input by eps times the
    difference it carries, so EAP's score is the derivative of the metric in that weight at
    zero: compare it with a central finite difference."""
    graph = task.graph
    for name in names:
        edge = graph.edge_index(name)
        eps = 1e-6
        weights = torch.zeros(2, graph.n_sources, graph.n_destinations, dtype=torch.float64)
        weights[0][edge], weights[1][edge] = eps, -eps
        plus, minus = task.evaluate(weights, weights=True).mean(1)
        assert eap.scores[edge].item() == pytest.approx(((plus - minus) / (2 * eps)).item(),
                                                       rel=1e-5, abs=1e-9)


def _random_kept(graph: CircuitGraph, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, graph.n_sources, graph.n_destinations, generator=generator) < 0.5) & graph.valid


# -- the edge-patching forward -------------------------------------------------------------------


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_full_graph_is_the_clean_run_bit_for_bit(family):
    model = _model(family, torch.float32)
    clean, corrupt = families.token_ids(3, 6, seed=1), families.token_ids(3, 6, seed=2)
    metric = _projection_metric(families.VOCAB)
    task = CircuitTask(model, clean, corrupt, metric=metric, progress=False)
    with torch.no_grad():
        logits = model._module(**model._forward_inputs(task.clean)).logits[:, -1]
    assert torch.equal(task.evaluate(task.graph.valid)[0], metric(logits, None))


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_empty_graph_is_the_corrupted_run(family):
    model = _model(family)
    clean, corrupt = families.token_ids(3, 6, seed=1), families.token_ids(3, 6, seed=2)
    metric = _projection_metric(families.VOCAB)
    task = CircuitTask(model, clean, corrupt, metric=metric, progress=False)
    with torch.no_grad():
        logits = model._module(**model._forward_inputs(task.corrupt)).logits[:, -1]
    empty = task.evaluate(torch.zeros_like(task.graph.valid))[0]
    torch.testing.assert_close(empty, metric(logits, None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("ablation", ["corrupt", "zero", "mean"])
def test_random_edge_sets_equal_the_hand_written_forward(name, ablation):
    family = next(f for f in families.FAMILIES if f.name == name)
    model = _model(family)
    clean, corrupt = families.token_ids(3, 6, seed=1), families.token_ids(3, 6, seed=2)
    metric = _projection_metric(families.VOCAB)
    task = CircuitTask(model, clean, corrupt, metric=metric, ablation=ablation, batch_size=5,
                       progress=False)
    graph = task.graph
    kept = _random_kept(graph, 4, seed=7)
    forward = HAND_WRITTEN[name]
    no_patch = torch.zeros(graph.n_sources, graph.n_destinations)
    with torch.no_grad():
        clean_logits, clean_sources = forward(model._module, clean, no_patch, None)
        # The hand-written forward with nothing patched is the model itself.
        torch.testing.assert_close(clean_logits, model._module(clean).logits, rtol=1e-10, atol=1e-10)
        _, corrupt_sources = forward(model._module, corrupt, no_patch, None)
        if name == "bert":  # contributions at each read point
            patched = {"corrupt": corrupt_sources,
                       "zero": [torch.zeros_like(c) for c in clean_sources],
                       "mean": [c.mean(0, keepdim=True).expand_as(c) for c in corrupt_sources]}[ablation]
        else:
            patched = {"corrupt": corrupt_sources, "zero": torch.zeros_like(clean_sources),
                       "mean": corrupt_sources.mean(0, keepdim=True).expand_as(clean_sources)}[ablation]
        expected = torch.stack([metric(forward(model._module, clean, graph.valid & ~k, patched)[0][:, -1], None)
                                for k in kept])
    torch.testing.assert_close(task.evaluate(kept), expected, rtol=1e-10, atol=1e-10)


def test_batched_circuits_equal_one_at_a_time():
    model = _model(families.FAMILIES[0])
    clean, corrupt = families.token_ids(4, 6, seed=1), families.token_ids(4, 6, seed=2)
    task = CircuitTask(model, clean, corrupt, metric=_projection_metric(families.VOCAB),
                       batch_size=12, progress=False)
    kept = _random_kept(task.graph, 5, seed=3)
    together = task.evaluate(kept)
    alone = torch.cat([task.evaluate(k) for k in kept])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_resample_reads_another_prompt():
    model = _model(families.FAMILIES[0])
    clean = families.token_ids(4, 6, seed=1)
    metric = _projection_metric(families.VOCAB)
    task = CircuitTask(model, clean, metric=metric, ablation="resample", progress=False)
    empty = task.evaluate(torch.zeros_like(task.graph.valid))[0]
    # With every edge removed each prompt runs as another prompt: a derangement of the clean runs.
    full = task.evaluate(task.graph.valid)[0]
    assert sorted(empty.tolist()) == pytest.approx(sorted(full.tolist()), abs=1e-10)
    assert not torch.allclose(empty, full)


# -- the graph -------------------------------------------------------------------------------------


def test_graph_layout_and_names():
    gpt2 = CircuitGraph.of(_model(families.FAMILIES[0]))
    assert (gpt2.n_sources, gpt2.n_destinations) == (1 + 2 * 5, 2 * 13 + 1)
    # Layer 0's heads read embed; its MLP reads embed and its heads; logits read everything.
    assert gpt2.n_edges == 12 * 1 + 5 + 12 * 6 + 10 + 11
    assert gpt2.edge_name(gpt2.edge_index("a0.h1->a1.h3.k")) == "a0.h1->a1.h3.k"
    assert gpt2.edges(gpt2.mask_of(["m1->logits", "embed->m0"])) == ["embed->m0", "m1->logits"]
    llama = CircuitGraph.of(_model(next(f for f in families.FAMILIES if f.name == "llama")))
    assert "a1.g1.k" in llama.destination_names and llama.node_of_destination(
        llama.destination_index("a1.g1.v")) == "a1.h2"
    parallel = CircuitGraph.of(_model(next(f for f in families.FAMILIES if f.name == "gpt_neox")))
    # Parallel attention and MLP: an MLP does not read its own layer's heads.
    assert parallel.parallel and parallel.n_edges == gpt2.n_edges - 2 * 4
    with pytest.raises(SiteError, match="reads the residual stream before"):
        gpt2.edge_index("a1.h0->a0.h1.q")
    with pytest.raises(SiteError, match="no source named"):
        gpt2.edge_index("a9.h0->logits")
    with pytest.raises(InputError, match="must look like"):
        gpt2.edge_index("embed")


def _opt(pre_norm: bool, word_width: int = 32):
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=families.VOCAB,
                                    max_position_embeddings=64, word_embed_proj_dim=word_width,
                                    do_layer_norm_before=pre_norm, activation_function="gelu")
    torch.manual_seed(0)
    return mechinterp.load(transformers.OPTForCausalLM(config).double())


def _text_pairs():
    return families.token_ids(3, 6, seed=1), families.token_ids(3, 6, seed=2)


def _qwen2_vl_pairs():
    from tests import test_qwen2_vl

    return mechinterp.load(test_qwen2_vl._qwen2_vl()), test_qwen2_vl._inputs(1), test_qwen2_vl._inputs(2)


def _blip2_pairs():
    from tests import test_blip2

    return mechinterp.load(test_blip2._blip2()), test_blip2._inputs(1), test_blip2._inputs(2)


MORE_FAMILIES = {
    # OPT flattens batch and position in front of its MLP; 350m is post-LayerNorm with a
    # narrower word embedding projected in and out.
    "opt": lambda: (_opt(True), *_text_pairs()),
    "opt-post-norm": lambda: (_opt(False, word_width=16), *_text_pairs()),
    "qwen2-vl": _qwen2_vl_pairs,
    "blip-2": _blip2_pairs,
}


@pytest.mark.parametrize("name", list(MORE_FAMILIES))
def test_more_families_full_and_empty_graphs_and_eap(name):
    """The graph of OPT (both layouts) and of the Qwen2-VL and BLIP-2 language models: the full
    graph is the clean run, the empty graph the corrupted run (images differ), and EAP is the
    derivative in the edge weight."""
    model, clean, corrupt = MORE_FAMILIES[name]()
    task = CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), progress=False)

    def plain(inputs):
        with torch.no_grad():
            logits = model._module(**model._forward_inputs(model._as_tokens(inputs))).logits[:, -1]
        return logits[:, 3] - logits[:, 4]

    torch.testing.assert_close(task.reference.full, plain(clean), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(task.reference.empty, plain(corrupt), rtol=1e-10, atol=1e-10)
    if name != "qwen2-vl":  # its rotary tables are float32: finite differences drown in rounding
        _assert_eap_is_the_derivative(task, attribute_edges(task, method="eap"), [
            "embed->a0.h1.q", "a0.h1->m1", "m0->a1.h2.v", "m1->logits", "embed->logits"])


def test_an_encoder_without_its_head_is_refused():
    config = families.build(POST_NORM[0]).config
    with pytest.warns(UserWarning):
        encoder = mechinterp.load(transformers.BertModel(config))
    with pytest.raises(UnsupportedModelError, match="needs the language-model head"):
        CircuitGraph.of(encoder)


@pytest.mark.parametrize("family", POST_NORM, ids=lambda f: f.name)
def test_post_norm_gradient_scores_are_their_definitions(family):
    """In post-LayerNorm models too, EAP is the derivative in the edge weight (the difference
    of contributions at each read point times the gradient there) and one IG step is EAP.

    (The embeddings' IG scores do not add up to the change of the metric here, as they do in
    pre-normalisation models: an edge carries the embeddings' contribution at the run's
    LayerNorm scales, while the gradient along the embeddings also moves those scales.)"""
    model = _model(family)
    clean, corrupt = families.token_ids(4, 6, seed=1), families.token_ids(4, 6, seed=2)
    task = CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), progress=False)
    eap = attribute_edges(task, method="eap")
    _assert_eap_is_the_derivative(task, eap, [
        "embed->a0.h2.q", "a0.h2->a1.h3.k", "a0.h1->m0", "embed->m1", "m0->a1.h0.v",
        "m1->logits", "a1.h0->logits", "embed->logits"])
    torch.testing.assert_close(attribute_edges(task, method="eap-ig", steps=1).scores, eap.scores)
    # Activations variant at one step: every edge at weight 0, i.e. EAP.
    torch.testing.assert_close(attribute_edges(task, method="eap-ig-activations", steps=1).scores,
                               eap.scores)


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_post_norm_ablations_read_their_contributions(ablation):
    """The empty graph under each ablation: zero contributions make every reader see zero, the
    mean reads the same for every prompt, resampling runs each prompt as another."""
    model = _model(POST_NORM[0])
    clean = families.token_ids(4, 6, seed=1)
    metric = _projection_metric(families.VOCAB)
    task = CircuitTask(model, clean, metric=metric, ablation=ablation, progress=False)
    empty = task.reference.empty
    if ablation == "zero":
        with torch.no_grad():
            zero = torch.zeros(1, 1, model.table.dims.d_model, dtype=torch.float64)
            expected = metric(model._module.cls(zero)[:, -1], None)
        torch.testing.assert_close(empty, expected.expand_as(empty), rtol=1e-9, atol=1e-9)
    elif ablation == "mean":
        torch.testing.assert_close(empty, empty[:1].expand_as(empty), rtol=1e-10, atol=1e-10)
    else:
        assert sorted(empty.tolist()) == pytest.approx(sorted(task.clean_metric.tolist()), abs=1e-10)


# -- edge attribution ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_task():
    model = _model(families.FAMILIES[0])
    clean, corrupt = families.token_ids(5, 6, seed=1), families.token_ids(5, 6, seed=2)
    return CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), progress=False)


def test_eap_is_the_derivative_in_the_edge_weight(small_task):
    """Patching an edge with weight eps moves its destination's input by eps * delta, so EAP's
    score is the derivative of the metric in that weight at zero."""
    task = small_task
    eap = attribute_edges(task, method="eap")
    _assert_eap_is_the_derivative(task, eap, [
        "embed->a0.h2.q", "a0.h2->a1.h3.k", "a0.h1->m0", "m1->logits", "a1.h0->logits"])
    assert torch.all(eap.scores[~task.graph.valid] == 0)


def test_eap_ig_with_one_step_is_eap_and_with_many_is_complete(small_task):
    task = small_task
    eap = attribute_edges(task, method="eap")
    torch.testing.assert_close(attribute_edges(task, method="eap-ig", steps=1).scores, eap.scores)
    ig = attribute_edges(task, method="eap-ig", steps=64)
    # Integrated gradients along the embeddings: the embedding's edges add up to the change of
    # the metric from the clean to the corrupted run.
    change = (task.reference.empty.mean() - task.reference.full.mean()).item()
    assert ig.scores[0].sum().item() == pytest.approx(change, rel=0.03)


def test_exact_scores_remove_one_edge_each(small_task):
    task = small_task
    exact = attribute_edges(task, method="exact")
    graph = task.graph
    for name in ["embed->a1.h0.v", "a0.h3->logits"]:
        edge = graph.edge_index(name)
        kept = graph.valid.clone()
        kept[edge] = False
        expected = task.evaluate(kept).mean() - task.clean_metric.mean()
        assert exact.scores[edge].item() == pytest.approx(expected.item(), abs=1e-12)
    # Gradient methods track the exact effects on this small random model.
    for method in ("eap", "eap-ig", "eap-ig-activations"):
        estimate = attribute_edges(task, method=method).scores[graph.valid]
        assert torch.corrcoef(torch.stack([estimate, exact.scores[graph.valid]]))[0, 1] > 0.9


def test_eap_is_exact_where_the_metric_is_linear():
    """A linear toy: with the final LayerNorm made linear (an epsilon so large that it only
    subtracts the mean), the logit difference is linear in the logits' input, so EAP's scores
    of the edges into the logits are the exact effects of removing them."""
    model = _model(families.FAMILIES[0])
    final = model._module.transformer.ln_f
    final.eps = 1e12
    with torch.no_grad():
        final.weight.fill_(1e6)
        final.bias.zero_()
    clean, corrupt = families.token_ids(4, 6, seed=1), families.token_ids(4, 6, seed=2)
    task = CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), progress=False)
    logits = task.graph.logits_destination
    eap = attribute_edges(task, method="eap").scores[:, logits]
    exact = attribute_edges(task, method="exact").scores[:, logits]
    torch.testing.assert_close(eap, exact, rtol=1e-6, atol=1e-9)
    # Elsewhere (through attention and the MLPs) it is only a first-order estimate.
    inner = task.graph.mlp_destination(1)
    assert not torch.allclose(attribute_edges(task, method="eap").scores[:, inner],
                              attribute_edges(task, method="exact").scores[:, inner],
                              rtol=1e-6, atol=1e-9)


def test_node_scores(small_task):
    task = small_task
    model = task.model
    nodes = attribute_nodes(task, method="exact")
    assert list(nodes) == list(task.graph.source_names)
    # Removing every edge out of a head is patching the head's output everywhere: activation
    # patching of the head site from the corrupted run.
    for component, layer, head, name in (("head", 1, 2, "a1.h2"), ("mlp_out", 0, None, "m0")):
        site = Site(component, layer=layer, head=head)
        corrupt_value = model.run(task.corrupt, cache=[site]).cache[site]
        logits = model.run(task.clean, edits=[Set(site, corrupt_value)]).logits[:, -1]
        expected = (logits[:, 3] - logits[:, 4]).mean() - task.clean_metric.mean()
        assert nodes[name] == pytest.approx(expected.item(), abs=1e-10)
    # The gradient methods' node scores are their edges' sums.
    eap = attribute_edges(task, method="eap")
    summed = attribute_nodes(task, method="eap")
    assert summed["a0.h1"] == pytest.approx(eap.scores[task.graph.source_index("a0.h1")].sum().item())


def test_acdc_thresholds(small_task):
    model = small_task.model
    task = CircuitTask(model, small_task.clean, small_task.corrupt, metric=KL(), progress=False)
    everything = acdc(task, threshold=math.inf, speculate=16)
    assert everything.n_edges == 0 and everything.info["forwards"] == task.graph.n_edges
    assert everything.info["batches"] == math.ceil(task.graph.n_edges / 16)
    nothing = acdc(task, threshold=0.0)
    # At threshold 0 only edges whose removal lowers the KL (or leaves it unchanged) go.
    assert nothing.n_edges > 0.8 * task.graph.n_edges
    middle = acdc(task, threshold=1e-4, speculate=8)
    assert 0 < middle.n_edges < nothing.n_edges
    # Speculative batches make the sequential algorithm's decisions.
    sequential = acdc(task, threshold=1e-4, speculate=1)
    assert torch.equal(sequential.kept, middle.kept)
    assert sequential.info["forwards"] == task.graph.n_edges <= middle.info["forwards"]
    # The kept circuit's KL is the one ACDC reports.
    assert task.evaluate(middle.kept).mean().item() == pytest.approx(middle.info["final_metric"])


# -- evaluation and results ----------------------------------------------------------------------


def test_faithfulness_curve(small_task):
    task = small_task
    scores = attribute_edges(task, method="eap-ig")
    curve = faithfulness(task, scores, fractions=(0.0, 0.1, 0.5, 1.0), bootstrap=50)
    assert curve.faithfulness[0].item() == pytest.approx(0.0, abs=1e-12)
    assert curve.faithfulness[-1].item() == pytest.approx(1.0, abs=1e-12)
    sizes = [0, round(0.1 * task.graph.n_edges), round(0.5 * task.graph.n_edges), task.graph.n_edges]
    assert curve.n_edges == sizes
    middle = task.evaluate(scores.top(sizes[2]).kept).mean()
    expected = (middle - curve.empty) / (curve.full - curve.empty)
    assert curve.faithfulness[2].item() == pytest.approx(expected.item())
    x = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert curve.cpr == pytest.approx(torch.trapezoid(curve.faithfulness, x).item())
    assert curve.cmd == pytest.approx(torch.trapezoid((1 - curve.faithfulness).abs(), x).item())
    assert torch.all(curve.low <= curve.high)
    assert len(curve.to_frame()) == 4
    assert curve.plot() is not None


def test_roc_auc_counts_pairs():
    graph = CircuitGraph(2, 2, 2, False)
    scores = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
    edges = graph.valid.nonzero()
    scores[edges[:, 0], edges[:, 1]] = torch.arange(len(edges), dtype=torch.float64)
    truth = torch.zeros_like(graph.valid)
    truth[tuple(edges[-3:].T)] = True  # the three largest scores
    assert roc_auc(EdgeScores(graph, scores, "test"), truth) == 1.0
    # Edges rank by magnitude: negated scores rank the same.
    assert roc_auc(EdgeScores(graph, -scores, "test"), truth) == 1.0
    flat = EdgeScores(graph, graph.valid.double(), "test")
    assert roc_auc(flat, truth) == 0.5
    with pytest.raises(InputError, match="some but not all"):
        roc_auc(flat, torch.zeros_like(graph.valid))


def test_circuit_exports_round_trip(small_task, tmp_path):
    scores = attribute_edges(small_task, method="eap")
    circuit = scores.top(12)
    assert circuit.n_edges == 12 and len(circuit.edges) == 12
    again = Circuit.from_json(circuit.to_json())
    assert torch.equal(again.kept, circuit.kept) and again.graph == circuit.graph
    circuit.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["nodes"] == circuit.nodes
    network = circuit.to_networkx()
    assert network.number_of_edges() == 12
    assert set(network.nodes) == set(circuit.nodes)
    dot = circuit.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == 12
    assert circuit.plot() is not None
    scores.save(tmp_path / "scores.json")
    loaded = EdgeScores.load(tmp_path / "scores.json")
    torch.testing.assert_close(loaded.scores, scores.scores)
    assert loaded.ranked()[:3] == scores.ranked()[:3]


def test_pruning_drops_dangling_edges():
    graph = CircuitGraph(2, 2, 2, False)
    circuit = Circuit.from_edges(graph, ["embed->a0.h0.v", "a0.h0->a1.h1.k", "a1.h1->logits",
                                         "a0.h1->a1.h0.q", "embed->a1.h0.v"])
    # a0.h1 is fed by nothing kept, and a1.h0 feeds nothing kept.
    assert circuit.pruned().edges == ["embed->a0.h0.v", "a0.h0->a1.h1.k", "a1.h1->logits"]


# -- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_refused(small_task):
    model = small_task.model
    clean = families.token_ids(2, 6, seed=1)
    with pytest.raises(InputError, match="ablation must be one of"):
        CircuitTask(model, clean, clean, metric=LogitDiff(3, 4), ablation="noise")
    with pytest.raises(InputError, match="needs corrupt prompts"):
        CircuitTask(model, clean, metric=LogitDiff(3, 4))
    with pytest.raises(ShapeError, match="same shape"):
        CircuitTask(model, clean, families.token_ids(2, 5), metric=LogitDiff(3, 4))
    with pytest.raises(InputError, match="batch_size"):
        CircuitTask(model, clean, clean, metric=LogitDiff(3, 4), batch_size=0)
    with pytest.raises(InputError, match="method must be one of"):
        attribute_edges(small_task, method="ig")
    with pytest.raises(InputError, match="steps must be a positive int"):
        attribute_edges(small_task, method="eap-ig", steps=0)
    with pytest.raises(InputError, match="threshold"):
        acdc(small_task, threshold=-1)
    with pytest.raises(ShapeError, match="circuits must be"):
        small_task.evaluate(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match=r"n_edges must be an int in \[0, "):
        attribute_edges(small_task, method="eap").top(10**6)
    with pytest.raises(InputError, match="InterpModel"):
        CircuitGraph.of(transformers.GPT2Config())


def test_undefined_faithfulness_is_an_error():
    model = _model(families.FAMILIES[0])
    task = CircuitTask(model, families.token_ids(4, 6, seed=1), metric=LogitDiff(3, 4),
                       ablation="resample", progress=False)
    with pytest.raises(InputError, match="faithfulness is undefined"):
        faithfulness(task, attribute_edges(task, method="eap"), bootstrap=10)


# -- a known circuit ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def induction():
    return induction_task(mechinterp.load("induction-2l"), pairs=32, progress=False)


def test_induction_circuit_names_the_recorded_heads():
    edges = induction_circuit({"previous_token_head": {"layer": 0, "head": 2},
                               "induction_head": {"layer": 1, "head": 1}})
    assert "a0.h2->a1.h1.k" in edges and "a1.h1->logits" in edges
    # The shipped model's report names head 0 of layer 0 and head 3 of layer 1.
    assert "a0.h0->a1.h3.k" in induction_circuit()


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-activations", "exact"])
def test_induction_circuit_is_recovered(induction, method):
    truth = induction.graph.mask_of(induction_circuit())
    scores = attribute_edges(induction, method=method)
    assert roc_auc(scores, truth) >= 0.95
    curve = faithfulness(induction, scores, fractions=(0.0, 0.1, 1.0), bootstrap=0)
    # A tenth of the edges (11 of 110) already carries most of the behaviour.
    assert curve.faithfulness[1] > 0.6


def test_acdc_keeps_the_induction_circuit(induction):
    task = CircuitTask(induction.model, induction.clean, induction.corrupt, metric=KL(),
                       progress=False)
    found = acdc(task, threshold=0.1)
    assert set(induction_circuit()) <= set(found.edges)
    assert found.n_edges < 0.25 * task.graph.n_edges


def test_circuit_command(tmp_path, capsys):
    out = tmp_path / "circuit"
    assert main(["circuit", "--pairs", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ROC-AUC vs the known circuit" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["circuit_faithfulness"] >= 0.8 and summary["roc_auc_vs_known_circuit"] >= 0.95
    saved = Circuit.from_json(out / "circuit.json")
    assert saved.n_edges == summary["circuit_edges"]
    for name in ("scores.json", "circuit.dot", "circuit.png", "faithfulness.png"):
        assert (out / name).stat().st_size > 0
    assert main(["circuit", "--model", "toy-vlm", "--pairs", "8", "--out", str(out / "vlm")]) == 0
    assert json.loads((out / "vlm" / "summary.json").read_text())["circuit_faithfulness"] >= 0.8
    assert main(["circuit", "--edges", "100000", "--pairs", "4", "--out", str(out)]) == 2
    assert "--edges must lie in" in capsys.readouterr().err


def test_toy_vlm_circuit_reads_the_image_through_a_heads_value():
    from mechinterp.patching import LogitDiff as Diff
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_vlm import answer_ids, sample_mechanism_cases, vlm_inputs

    model = mechinterp.load("toy-vlm")
    cases = sample_mechanism_cases(torch.Generator().manual_seed(7), 32, ask="colour")

    def inputs(scenes):
        return vlm_inputs(model.tokenizer, shapes.render_batch(scenes), cases.questions)

    metric = Diff(answer_ids(model.tokenizer, cases.clean_answers),
                  answer_ids(model.tokenizer, cases.corrupt_answers))
    task = CircuitTask(model, inputs(cases.clean), inputs(cases.corrupted), metric=metric,
                       progress=False)
    scores = attribute_edges(task, method="eap-ig")
    exact = attribute_edges(task, method="exact")
    valid = task.graph.valid
    assert torch.corrcoef(torch.stack([scores.scores[valid], exact.scores[valid]]))[0, 1] > 0.95
    # The colour is copied from the image tokens by the value of a last-layer head.
    top = scores.ranked()[0][0]
    assert top.startswith("embed->a1.") and top.endswith(".v")
    curve = faithfulness(task, scores, fractions=(0.0, 0.05, 1.0), bootstrap=0)
    assert curve.faithfulness[1] > 0.9  # 6 of 110 edges


# -- tracr-compiled models: circuits known by construction ---------------------------------------


def _tracr_truth(graph: CircuitGraph, name: str) -> torch.Tensor:
    """The compiled circuit's edges, less those that carry only position or constant
    information (the same in every prompt of a length, so no patching can reveal them)."""
    from mechinterp.zoo import zoo_path

    truth = json.loads((zoo_path(name) / "ground_truth.json").read_text())
    hidden = set(truth["input_independent_edges"])
    return graph.mask_of([edge for edge in truth["edges"] if edge not in hidden])


def _tracr_induction_pairs(rows: int, seed: int):
    """``<bos> t1 t2 t3 t4 q``: four distinct letters (either case), q the letter of t_j, the
    answer t_{j+1}. A third of the pairs swap the answer's case (the value path), a third move
    the matching token (the previous-token / key path), a third change the query's letter."""
    import random

    vocab = {t: i for i, t in enumerate(["<bos>", "<pad>", "<unk>", "A", "B", "C", "D",
                                         "a", "b", "c", "d"])}
    rng = random.Random(seed)
    clean, corrupt, answer, wrong = [], [], [], []
    while len(clean) < rows:
        letters = rng.sample("abcd", 4)
        tokens = [t.upper() if rng.random() < 0.5 else t for t in letters]
        j = rng.randrange(3)
        query = letters[j].upper() if rng.random() < 0.5 else letters[j]
        sequence = [*tokens, query]
        other = list(sequence)
        kind = len(clean) % 3
        if kind == 0:
            other[j + 1] = other[j + 1].swapcase()
            new = other[j + 1]
        elif kind == 1:
            k = next((i for i in range(3) if i not in (j, j + 1)), None)
            if k is None:
                continue
            other[j], other[k] = other[k], other[j]
            new = other[k + 1]
        else:
            k = rng.choice([i for i in range(3) if i != j])
            other[4] = letters[k]
            new = sequence[k + 1]
        if new == sequence[j + 1]:
            continue
        clean.append([0] + [vocab[t] for t in sequence])
        corrupt.append([0] + [vocab[t] for t in other])
        answer.append(vocab[sequence[j + 1]])
        wrong.append(vocab[new])
    return torch.tensor(clean), torch.tensor(corrupt), answer, wrong


@pytest.mark.parametrize("method", ["eap-ig", "exact"])
def test_tracr_induction_circuit_is_recovered(method):
    model = mechinterp.load("tracr-induction")
    clean, corrupt, answer, wrong = _tracr_induction_pairs(36, seed=0)
    task = CircuitTask(model, clean, corrupt, metric=LogitDiff(answer, wrong), progress=False)
    scores = attribute_edges(task, method=method)
    assert roc_auc(scores, _tracr_truth(task.graph, "tracr-induction")) >= 0.95


def test_tracr_dyck_circuit_is_recovered():
    import random

    from tests.test_zoo_tracr import dyck, sample_dyck

    model = mechinterp.load("tracr-dyck")
    ids = {"(": 3, ")": 4, "{": 5, "}": 6}
    rng = random.Random(0)
    clean, corrupt, answer = [], [], []
    # Pairs of bracket strings with opposite answers ("balanced so far" or not).
    while len(clean) < 24:
        a, b = sample_dyck(rng, 8), sample_dyck(rng, 8)
        if dyck(a)[-1] != dyck(b)[-1]:
            clean.append([0] + [ids[t] for t in a])
            corrupt.append([0] + [ids[t] for t in b])
            answer.append(8 if dyck(a)[-1] else 7)  # True / False
    task = CircuitTask(model, torch.tensor(clean), torch.tensor(corrupt),
                       metric=LogitDiff(answer, [15 - a for a in answer]), progress=False)
    scores = attribute_edges(task, method="eap-ig")
    assert roc_auc(scores, _tracr_truth(task.graph, "tracr-dyck")) >= 0.95


@pytest.mark.cuda
def test_circuits_on_cuda_equal_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    clean, corrupt = families.token_ids(6, 7, seed=1), families.token_ids(6, 7, seed=2)
    results = {}
    for device in ("cpu", "cuda"):
        # GPT-2: Llama's rotary tables are float32 even in a float64 model, and CPU and CUDA
        # round them differently.
        model = mechinterp.load(families.build(families.FAMILIES[0]).double(), device=device)
        task = CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), progress=False)
        kept = _random_kept(task.graph, 3, seed=5)
        results[device] = (task.evaluate(kept), attribute_edges(task, method="eap-ig").scores,
                           acdc(task, threshold=1e-3).kept)
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-7, atol=1e-9)
    # Speculative batches on the GPU, one trial per forward on the CPU: the same circuit.
    assert torch.equal(results["cuda"][2], results["cpu"][2])


# -- CLIP: the text tower's graph, scored against candidate images -------------------------------


@pytest.fixture(scope="module")
def clip_task():
    from tests.test_multimodal import _clip

    model = mechinterp.load(_clip())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = torch.tensor([[1, 5, 6, 7, 63], [1, 9, 8, 7, 63], [1, 4, 4, 2, 63]])
    corrupt = torch.tensor([[1, 5, 2, 7, 63], [1, 9, 3, 7, 63], [1, 11, 4, 2, 63]])
    return CircuitTask(model, clean, corrupt, metric=LogitDiff(0, 2), images=images,
                       progress=False), images


def test_clip_full_and_empty_graphs_are_its_image_text_logits(clip_task):
    task, images = clip_task
    clip = task.model._module
    with torch.no_grad():
        clean = clip(input_ids=task.clean.input_ids, pixel_values=images).logits_per_text
        corrupt = clip(input_ids=task.corrupt.input_ids, pixel_values=images).logits_per_text
    torch.testing.assert_close(task.reference.full, clean[:, 0] - clean[:, 2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(task.reference.empty, corrupt[:, 0] - corrupt[:, 2], rtol=1e-10, atol=1e-10)
    assert task.graph.n_layers == 2 and task.graph.edge_index("a0.h1->a1.h3.k")


def test_clip_eap_is_the_derivative_in_the_edge_weight(clip_task):
    task, _ = clip_task
    _assert_eap_is_the_derivative(task, attribute_edges(task, method="eap"), [
        "embed->a0.h2.q", "a0.h2->a1.h3.k", "m0->logits", "a1.h0->logits"])


def test_clip_needs_candidate_images(clip_task):
    task, images = clip_task
    with pytest.raises(InputError, match="images="):
        CircuitTask(task.model, task.clean, task.corrupt, metric=LogitDiff(0, 1), progress=False)
    with pytest.raises(ShapeError, match=r"\[n, 3, height, width\]"):
        CircuitTask(task.model, task.clean, task.corrupt, metric=LogitDiff(0, 1), images=images[0])
    gpt2 = _model(families.FAMILIES[0])
    with pytest.raises(InputError, match="CLIP"):
        CircuitTask(gpt2, families.token_ids(2, 4, seed=1), families.token_ids(2, 4, seed=2),
                    metric=LogitDiff(3, 4), images=images)


@pytest.mark.cuda
def test_post_norm_circuits_on_cuda_equal_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    clean, corrupt = families.token_ids(6, 7, seed=1), families.token_ids(6, 7, seed=2)
    results = {}
    for device in ("cpu", "cuda"):
        model = mechinterp.load(families.build(POST_NORM[0]).double(), device=device)
        task = CircuitTask(model, clean, corrupt, metric=LogitDiff(3, 4), ablation="mean",
                           progress=False)
        kept = _random_kept(task.graph, 3, seed=5)
        results[device] = (task.evaluate(kept), attribute_edges(task, method="eap-ig").scores)
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-7, atol=1e-9)
