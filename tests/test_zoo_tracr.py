"""The shipped tracr-compiled models: plain GPT-2 checkpoints that compute their RASP programs.

``mechinterp/zoo/compile_tracr.py`` builds them with tracr, which these tests do not need: each
program is re-implemented here in plain Python, and the ground-truth circuit is checked against
the weights and by ablation.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from mechinterp.zoo import ZOO, zoo_path

transformers = pytest.importorskip("transformers")

PROGRAMS = ("dyck", "induction")
TEST_SEED = 20_250_102
N_INPUTS = 300
MAX_FOLDER_BYTES = 512 * 1024
# The output logits are tracr's categorical output, one-hot up to its MLPs' approximation.
ON, OFF = 0.9, 0.1
AMBIGUOUS = "<ambiguous>"  # several earlier matches with different tokens: RASP is undefined

# ----------------------------------------------------------------------------------------------
# The programs, in plain Python (see compile_tracr.PROGRAMS for the RASP versions)


def dyck(tokens: list[str]) -> list[bool]:
    """Is each prefix balanced for () and for {}, never closing a pair before opening it?"""
    depth = {"(": 0, "{": 0}
    opener = {")": "(", "}": "{"}
    went_negative, out = False, []
    for token in tokens:
        if token in depth:
            depth[token] += 1
        else:
            depth[opener[token]] -= 1
            went_negative |= depth[opener[token]] < 0
        out.append(not went_negative and all(d == 0 for d in depth.values()))
    return out


def induction(tokens: list[str]) -> list[str | None]:
    """The token after the earlier occurrences of the current letter (in either case)."""
    out: list[str | None] = []
    for q, token in enumerate(tokens):
        found = {tokens[k] for k in range(1, q + 1) if tokens[k - 1].lower() == token.lower()}
        out.append(None if not found else found.pop() if len(found) == 1 else AMBIGUOUS)
    return out


LETTERS = ("a", "b", "c", "d", "A", "B", "C", "D")


def sample_dyck(rng: random.Random, length: int) -> list[str]:
    if rng.random() < 0.5:
        return [rng.choice("(){}") for _ in range(length)]
    # Random pushes and pops keep many prefixes balanced.
    tokens: list[str] = []
    stack_open = {"(": 0, "{": 0}
    for _ in range(length):
        open_now = [o for o, n in stack_open.items() if n]
        if open_now and rng.random() < 0.5:
            o = rng.choice(open_now)
            stack_open[o] -= 1
            tokens.append({"(": ")", "{": "}"}[o])
        else:
            o = rng.choice("({")
            stack_open[o] += 1
            tokens.append(o)
    return tokens


def sample_induction(rng: random.Random, length: int) -> list[str]:
    if rng.random() < 0.5 or length < 4:
        return [rng.choice(LETTERS) for _ in range(length)]
    letters = rng.sample("abcd", k=min(4, length // 2))
    span = [t if rng.random() < 0.5 else t.upper() for t in letters]
    repeat = [t.swapcase() if rng.random() < 0.3 else t for t in span]
    return (span + repeat + [rng.choice(LETTERS)])[:length]


REFERENCE = {"dyck": dyck, "induction": induction}
SAMPLE = {"dyck": sample_dyck, "induction": sample_induction}
OUTPUT_TOKENS = {"dyck": ("True", "False"), "induction": LETTERS}


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


def folder_of(name: str) -> Path:
    return Path(str(files("mechinterp.zoo") / f"tracr-{name}"))


@pytest.fixture(scope="module", params=PROGRAMS)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(name):
    return transformers.AutoModelForCausalLM.from_pretrained(folder_of(name)).eval()


@pytest.fixture(scope="module")
def tokenizer(name):
    return transformers.AutoTokenizer.from_pretrained(folder_of(name))


@pytest.fixture(scope="module")
def truth(name) -> dict:
    return json.loads((folder_of(name) / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def inputs(name, model) -> list[list[str]]:
    rng = random.Random(TEST_SEED)
    max_len = model.config.n_positions - 1  # position 0 holds <bos>
    return [SAMPLE[name](rng, rng.randint(1, max_len)) for _ in range(N_INPUTS)]


def output_logits(model, tokenizer, name, inputs) -> list[torch.Tensor]:
    """Per input, the logits of the output tokens at its real positions: (len, n_outputs)."""
    out_ids = tokenizer.convert_tokens_to_ids(list(OUTPUT_TOKENS[name]))
    by_len: dict[int, list[int]] = {}
    for i, tokens in enumerate(inputs):
        by_len.setdefault(len(tokens), []).append(i)
    result: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    with torch.no_grad():
        for indices in by_len.values():
            text = [" ".join(["<bos>", *inputs[i]]) for i in indices]
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logits = model(ids).logits[:, 1:, out_ids].double()
            for row, i in enumerate(indices):
                result[i] = logits[row]
    return result


@contextlib.contextmanager
def zeroed(model, component: str):
    """Zero the output of ``a{l}.h{h}`` or ``m{l}`` while inside; restore the weights after."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    if match := re.fullmatch(r"a(\d+)\.h(\d+)", component):
        layer, head = map(int, match.groups())
        weight = model.transformer.h[layer].attn.c_proj.weight
        rows = slice(head * head_dim, (head + 1) * head_dim)
        params = [(weight, rows)]
    else:
        mlp = model.transformer.h[int(component[1:])].mlp
        params = [(mlp.c_proj.weight, slice(None)), (mlp.c_proj.bias, slice(None))]
    saved = [p[s].clone() for p, s in params]
    with torch.no_grad():
        for p, s in params:
            p[s] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, s), old in zip(params, saved, strict=True):
                p[s] = old


def all_components(model) -> list[str]:
    cfg = model.config
    return [f"a{layer}.h{head}" for layer in range(cfg.n_layer) for head in range(cfg.n_head)] + [
        f"m{layer}" for layer in range(cfg.n_layer)
    ]


# ----------------------------------------------------------------------------------------------
# The circuit as the weights show it (the build script does the same on tracr's weights)


def _nonzero(a: torch.Tensor, dim: int) -> set[int]:
    a = a.detach().double().abs()
    scale = float(a.max()) if a.numel() else 0.0
    if scale == 0.0:
        return set()
    return set(torch.nonzero(a.amax(dim=dim) > 1e-6 * scale).flatten().tolist())


def weight_spaces(model, d: int) -> dict[str, dict[str, set[int]]]:
    """Per nonzero component, the residual dims (of tracr's ``d``) each input reads and it writes.

    Only the first ``d`` dims carry tracr's residual; the ``<minus-sum>`` and ``<zero>`` dims
    after them exist for LayerNorm and are left out.
    """
    cfg = model.config
    e, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    t = model.transformer
    embed = _nonzero(t.wte.weight[:, :d], 0) | _nonzero(t.wpe.weight[:, :d], 0)
    comps: dict[str, dict[str, set[int]]] = {"embed": {"writes": embed}}
    for layer, block in enumerate(t.h):
        w = block.attn.c_attn.weight
        wo = block.attn.c_proj.weight
        for h in range(cfg.n_head):
            cols = slice(h * hd, (h + 1) * hd)
            wq, wk, wv = (w[:, i * e : (i + 1) * e][:, cols] for i in range(3))
            qk = (wq @ wk.T)[:d, :d]
            ov = (wv @ wo[cols])[:d, :d]
            if _nonzero(ov, 0):
                comps[f"a{layer}.h{h}"] = {"q": _nonzero(qk, 1), "k": _nonzero(qk, 0),
                                           "v": _nonzero(ov, 1), "writes": _nonzero(ov, 0)}
        fc, proj, bias = block.mlp.c_fc.weight, block.mlp.c_proj.weight, block.mlp.c_proj.bias
        live = proj[:, :d].abs().amax(dim=1) > 0
        writes = _nonzero(proj[live][:, :d], 0) | _nonzero(bias[None, :d], 0)
        if writes:
            comps[f"m{layer}"] = {"in": _nonzero(fc[:d][:, live], 1), "writes": writes}
    comps["logits"] = {"in": _nonzero(model.lm_head.weight[:, :d], 0)}
    return comps


def order(node: str) -> tuple[int, int]:
    if node == "embed":
        return (-1, 0)
    if node == "logits":
        return (10**9, 0)
    layer = int(re.match(r"[am](\d+)", node).group(1))
    return (layer, 0 if node.startswith("a") else 1)


def node_of(dest_input: str) -> str:
    return ".".join(dest_input.split(".")[:2]) if dest_input.startswith("a") else dest_input


def edges_of(comps: dict[str, dict[str, set[int]]]) -> set[str]:
    edges = set()
    for dest, spaces in comps.items():
        for port, reads in spaces.items():
            if port == "writes":
                continue
            dest_input = dest if port == "in" else f"{dest}.{port}"
            for src, src_spaces in comps.items():
                if order(src) < order(dest) and src_spaces.get("writes", set()) & reads:
                    edges.add(f"{src}->{dest_input}")
    return edges


# ----------------------------------------------------------------------------------------------
# The models compute their programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_equal_the_program(name, tokenizer, inputs, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder_of(name), dtype=dtype)
    values = OUTPUT_TOKENS[name]
    counts: dict[str | None, int] = {}
    for tokens, logits in zip(inputs, output_logits(model.eval(), tokenizer, name, inputs),
                              strict=True):
        for q, want in enumerate(REFERENCE[name](tokens)):
            row = logits[q]
            if want == AMBIGUOUS:
                continue
            key = None if want is None else str(want)
            counts[key] = counts.get(key, 0) + 1
            if want is None:  # no earlier match: tracr writes nothing into the output space
                assert row.abs().max() < OFF, (tokens, q, row)
                continue
            want_index = values.index(str(want))
            assert row[want_index] > ON, (tokens, q, want, row)
            others = torch.cat([row[:want_index], row[want_index + 1 :]])
            assert others.abs().max() < OFF, (tokens, q, want, row)
    # The samplers reach every output value, and (induction) positions with no match.
    expected = [*values, None] if name == "induction" else values
    assert all(counts.get(v, 0) >= 20 for v in expected), counts
    assert sum(counts.values()) > 1000


def test_layernorm_is_the_identity(model, tokenizer, inputs):
    """Every LayerNorm passes the residual through: the scale is 1 and the mean is 0."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    lns = [m for block in model.transformer.h for m in (block.ln_1, block.ln_2)]
    hooks = [ln.register_forward_hook(lambda _m, a, out: seen.append((a[0], out)))
             for ln in [*lns, model.transformer.ln_f]]
    try:
        ids = tokenizer([" ".join(["<bos>", *inputs[0]])], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 2 * model.config.n_layer + 1
    for x, y in seen:
        assert x.mean(-1).abs().max() < 1e-6
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_tokenizer_matches_the_model(model, tokenizer, name):
    assert tokenizer.bos_token_id == model.config.bos_token_id == 0
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert tokenizer.padding_side == "right"  # positions count from the start of the row
    assert len(tokenizer) == model.config.vocab_size
    text = " ".join(["<bos>", *OUTPUT_TOKENS[name]])
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_right_padding_keeps_outputs(model, tokenizer, name, inputs):
    """A padded batch gives each row the outputs it gets alone."""
    batch = [" ".join(["<bos>", *tokens]) for tokens in inputs[:16]]
    enc = tokenizer(batch, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = model(**enc).logits
    for row, tokens in enumerate(inputs[:16]):
        alone = output_logits(model, tokenizer, name, [tokens])[0]
        out_ids = tokenizer.convert_tokens_to_ids(list(OUTPUT_TOKENS[name]))
        torch.testing.assert_close(padded[row, 1 : len(tokens) + 1, out_ids].double(), alone,
                                   rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The ground truth


def test_ground_truth_format(truth, name, model):
    assert truth["program"] == name
    assert isinstance(truth["notes"], str) and truth["notes"]
    nodes = truth["nodes"]
    assert nodes[0] == "embed" and nodes[-1] == "logits"
    for node in nodes[1:-1]:
        assert re.fullmatch(r"a\d+\.h\d+|m\d+", node), node
    edge_re = re.compile(r"(embed|a\d+\.h\d+|m\d+)->(a\d+\.h\d+\.[qkv]|m\d+|logits)")
    for edge in truth["edges"]:
        assert edge_re.fullmatch(edge), edge
        src, dest = edge.split("->")
        assert src in nodes and node_of(dest) in nodes, edge
        assert order(src) < order(node_of(dest)), edge
    assert len(set(truth["edges"])) == len(truth["edges"])
    # Every node lies on a path to the logits, and every component feeds something.
    reach, grew = {"logits"}, True
    while grew:
        before = len(reach)
        reach |= {e.split("->")[0] for e in truth["edges"] if node_of(e.split("->")[1]) in reach}
        grew = len(reach) > before
    assert reach == set(nodes)
    # Each circuit has at least two attention layers, an MLP, and heads outside the circuit.
    heads = [n for n in nodes if n.startswith("a")]
    assert len({n.split(".")[0] for n in heads}) >= 2
    assert any(n.startswith("m") for n in nodes)
    assert len(heads) < model.config.n_layer * model.config.n_head


def tracr_dims(truth: dict) -> int:
    """How many leading residual dims hold tracr's residual (then come LayerNorm's helpers)."""
    labels = truth["residual_labels"]
    d = labels.index("<minus-sum>")
    assert labels[d + 1] == "<zero>" and set(labels[d + 2 :]) <= {"<pad-dim>"}
    return d


def test_nodes_are_the_nonzero_components(model, truth):
    assert len(truth["residual_labels"]) == model.config.n_embd
    comps = weight_spaces(model, tracr_dims(truth))
    assert set(comps) == set(truth["nodes"])


def test_edges_follow_from_the_weights(model, truth):
    labels = truth["residual_labels"]
    comps = weight_spaces(model, tracr_dims(truth))
    assert edges_of(comps) == set(truth["edges"])
    named = {n: {port: sorted(labels[i] for i in dims) for port, dims in spaces.items()}
             for n, spaces in comps.items()}
    assert named == truth["components"]
    assert list(truth["edge_labels"]) == truth["edges"]
    for edge, carried in truth["edge_labels"].items():
        src, dest = edge.split("->")
        port = dest.split(".")[2] if dest.startswith("a") else "in"
        assert carried == sorted(set(named[src]["writes"]) & set(named[node_of(dest)][port]))
    constant = {"one", "tokens:<bos>"}
    assert truth["input_independent_edges"] == [
        e for e in truth["edges"]
        if all(lab in constant or lab.startswith("indices:") for lab in truth["edge_labels"][e])
    ]


def test_ablations_match_the_circuit(model, tokenizer, name, inputs, truth):
    """Zeroing a component outside the circuit changes nothing; inside, it changes outputs."""
    base = output_logits(model, tokenizer, name, inputs)
    nodes = set(truth["nodes"])
    for component in all_components(model):
        with zeroed(model, component):
            ablated = output_logits(model, tokenizer, name, inputs)
        change = max(float((a - b).abs().max()) for a, b in zip(ablated, base, strict=True))
        if component in nodes:
            assert change > 0.5, f"zeroing {component} (in the circuit) changed nothing"
        else:
            assert change == 0.0, f"zeroing {component} (outside the circuit) changed outputs"
    # zeroed() restored the weights.
    again = output_logits(model, tokenizer, name, inputs)
    assert all(torch.equal(a, b) for a, b in zip(again, base, strict=True))


# ----------------------------------------------------------------------------------------------
# The folders


def test_folder_is_small(name):
    size = sum(f.stat().st_size for f in folder_of(name).iterdir())
    assert size < MAX_FOLDER_BYTES


def test_loads_offline_without_jax(name):
    config = json.loads((folder_of(name) / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "relu"
    assert config["tie_word_embeddings"] is False
    assert "jax" not in json.dumps(config)


def test_mechinterp_loads_it(name, model):
    import mechinterp

    loaded = mechinterp.load(folder_of(name))
    assert loaded.family == "gpt2"
    assert loaded.dims.n_layers == model.config.n_layer


def test_registered_in_the_zoo(name):
    if f"tracr-{name}" not in ZOO:
        pytest.skip(f"tracr-{name} is not in mechinterp.zoo.ZOO yet")
    assert zoo_path(f"tracr-{name}") == folder_of(name)
