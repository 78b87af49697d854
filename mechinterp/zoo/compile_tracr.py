"""Compile small RASP programs with tracr into GPT-2 checkpoints whose circuits are known.

Circuit-discovery methods need a transformer whose circuit is known by construction. tracr
(DeepMind's RASP compiler) gives one: every attention head and MLP of a compiled model computes
one named step of a RASP program, and reads and writes named subspaces of the residual stream.
This script compiles each program in ``PROGRAMS``, converts the compiled model into a plain
``transformers`` ``GPT2LMHeadModel`` (no jax needed to load it), checks that the conversion
reproduces tracr's computation, derives the circuit from the weights and writes
``tracr-<program>/`` with the model, a word-level tokenizer, ``ground_truth.json`` and
``compile_report.json``.

Run it with a separate virtualenv that has tracr (the package itself never imports tracr)::

    python3 -m venv /tmp/tracr-venv
    /tmp/tracr-venv/bin/pip install tracr-pypi dm-haiku jax jaxlib numpy \\
        torch==2.13.0 transformers safetensors
    /tmp/tracr-venv/bin/python mechinterp/zoo/compile_tracr.py [--out-root DIR] [--program NAME]

It runs as a file, not with ``-m``: importing the ``mechinterp`` package needs its compiled
extension, which that virtualenv does not have. Compilation and conversion are deterministic
(tracr's SOp ids, which depend on what was compiled before, are dropped from the labels).

Programs (both compiled with ``causal=True``, since GPT-2 attention is causal, and both
checked against tracr's causal RASP evaluator):

* ``dyck`` (6 layers): is the prefix ``tokens[:q+1]`` a balanced shuffle-Dyck-2 word over
  ``()`` and ``{}``? ``m0`` flags each bracket; the four heads of layer 1 average the flags
  over the prefix (fractions of ``(``, ``)``, ``{``, ``}``); ``m1`` subtracts them into a
  balance per pair; ``m2`` flags "balance < 0" and "balance == 0"; the two heads of layer 3
  average the negative flags over the prefix (did a balance ever go negative?); ``m3`` turns
  that into "never negative", ``m4`` and ``m5`` AND everything into ``True``/``False``. Heads
  in parallel, MLPs that matter, and a skip from ``m2`` to ``m4``.
* ``induction`` (3 layers): case-insensitive induction over ``a b c d A B C D``. ``a0.h0`` is
  a previous-token head; ``m0`` lowercases the current token and ``m1`` the previous one; the
  induction head ``a2.h0`` attends from the current token to the earlier positions whose
  previous letter is the current letter and copies the token there. It is ``induction-2l``'s
  circuit known exactly, with K-composition through an MLP. Where no earlier position matches,
  the output is empty (all output logits 0).

Conversion (the module's one subtle part):

* **LayerNorm.** tracr models have none; GPT-2 applies one before each attention layer, each
  MLP and the unembedding: ``LN(x) = (x - mean(x)) * gamma / sqrt(var(x) + eps) + beta``.
  - The scale goes with ``eps = 2**30`` and ``gamma = 2**15`` (bias 0). In float32, ``var +
    eps`` rounds to exactly ``eps`` while ``var < 2**30 * 2**-24 = 64``, ``1/sqrt(2**30) =
    2**-15`` is exact, so the scale is exactly 1. A tracr residual holds a few one-hot blocks
    and values in [-1, 1]; the build checks ``var < VAR_LIMIT`` (8) on every input it runs.
    In float64 the scale is ``(1 + var/eps)**-0.5``, off by less than ``var * 2**-31``
    (about 2e-9 here; dyck's MLPs amplify it to 1e-8 in the residual). A larger eps would
    shrink that (``2**100`` makes float64 exact too), but ``gamma = sqrt(eps)`` must fit
    float16 (at most 65504) for the checkpoint to run in half precision, which it does.
  - The mean goes in two ways, each one residual dimension. Every write into the residual
    (embeddings, attention output, MLP output and their biases) also writes minus its sum
    into a ``<minus-sum>`` dimension, so the residual sums to zero and ``mean(x)`` is 0 up to
    rounding: LayerNorm leaves it unchanged, and the residual's first ``D`` dimensions are
    tracr's residual exactly, under the same labels. And every matrix that reads the residual
    (query, key, value, MLP input, unembedding) has minus the sum of its rows in a ``<zero>``
    dimension that nothing writes, so each of its columns sums to zero and ``W.T @ (x - m) =
    W.T @ x`` for any ``m``: a read ignores the mean even after an intervention that breaks
    the zero sum (steering, noise). Either alone is exact in exact arithmetic. The first
    keeps float32 within 10x of tracr's own rounding: with the second alone, a mean of about
    0.1 is subtracted and added back through MLP weights in the hundreds, and dyck drifted
    3e-4 from tracr. The second makes reads robust. Mirroring the residual as ``[r, -r]``
    would do what the first does at the cost of ``D`` dimensions instead of one.
* **Shapes.** ``head_dim`` is tracr's ``key_size``, so GPT-2's ``1/sqrt(head_dim)`` score
  scale is tracr's ``1/sqrt(key_size)`` and query weights are copied unchanged. ``n_head`` is
  the smallest count that holds tracr's heads of a layer and has ``n_head * head_dim`` at
  least ``D + 2``; heads tracr does not use stay zero, so layers with fewer heads have heads
  outside the circuit. Attention and MLP biases are tracr's (zero). MLP hidden units with
  zero output weights are pruned, which is exact (tracr's discretising MLPs make a pair per
  input value, most of them unused by the function); hidden sizes are then padded to the
  largest. A layer that tracr leaves empty stays zero.
* **Tokens and positions.** Token ids are ``<bos> <pad> <unk>``, the input tokens, then output
  values that are not input tokens (``True``/``False``). tracr's BOS and PAD embeddings are
  kept; ``<unk>`` embeds to zero. ``wpe`` is tracr's position table, whose row 0 (the BOS
  position) is zero. A sequence must start with ``<bos>``, and batches pad on the right:
  GPT-2 numbers positions from the start of the row.
* **Output.** ``lm_head`` (untied) reads tracr's categorical output space: the logit of the
  token for value ``v`` is the residual's ``<output>:v`` coordinate, about 1 for the program's
  output and 0 for the others; every other token's logit is 0. Argmax over the output values
  is the program's output; where none is defined (no induction match) all are about 0.

Ground truth. For each nonzero component the script lists the residual labels it reads (per
input: ``q`` and ``k`` from the nonzero rows and columns of ``W_Q W_K^T``, ``v`` from the rows
of ``W_V W_O``, an MLP from the rows of its input weights) and writes (columns of ``W_V W_O``
and of the MLP output weights; ``embed`` writes the token and position tables). tracr writes
each label once, so ``u -> d`` is an edge exactly when ``d`` reads a label that ``u`` writes
and ``u`` comes first. Nodes are the nonzero components, ``embed`` and ``logits``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LN_EPS = 2.0**30  # see the module docstring: float32 scale is exactly 1 while var < 64
LN_GAMMA = 2.0**15  # sqrt(LN_EPS), exact, and below float16's maximum 65504
VAR_LIMIT = 8.0  # the build asserts every residual's variance stays below this (64 is the edge)
SPECIAL_TOKENS = ("<bos>", "<pad>", "<unk>")
BOS, PAD, UNK = SPECIAL_TOKENS
SUM_LABEL = "<minus-sum>"  # holds minus the sum of tracr's dims: the residual sums to zero
ZERO_LABEL = "<zero>"  # always 0; readers' rows there make their columns sum to zero
PAD_LABEL = "<pad-dim>"
ONE_HOT_TOLERANCE = 0.1  # outputs must be one-hot within this where the program is defined
N_CHECK_INPUTS = 400
CHECK_SEED = 0


# ----------------------------------------------------------------------------------------------
# Programs


@dataclass(frozen=True)
class Program:
    """A RASP program with what tracr needs to compile it."""

    name: str
    build: Callable[[], object]  # returns the output rasp.SOp
    vocab: tuple[str, ...]
    max_seq_len: int
    description: str
    sample: Callable[[random.Random, int], list[str]]  # random input of a given length
    mlp_exactness: int = 100  # tracr's default slope L of its discretising MLPs


def build_dyck():
    """``balanced[q]``: ``tokens[:q+1]`` is a balanced shuffle-Dyck-2 word over () and {}."""
    from tracr.rasp import rasp

    prefix = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prefix")

    def frac(flag):
        # tracr can only average 0/1 values, hence opens and closes in separate heads.
        return rasp.numerical(rasp.Aggregate(prefix, flag, default=0))

    pair_ok = []
    for pair in ("()", "{}"):
        open_, close = pair
        is_open = rasp.numerical(rasp.Map(lambda t, o=open_: int(t == o), rasp.tokens))
        is_close = rasp.numerical(rasp.Map(lambda t, c=close: int(t == c), rasp.tokens))
        opens = frac(is_open.named(f"is_{open_}")).named(f"frac_{open_}")
        closes = frac(is_close.named(f"is_{close}")).named(f"frac_{close}")
        # The balance divided by the prefix length: same sign, 0 at the same places.
        balance = rasp.numerical(rasp.LinearSequenceMap(opens, closes, 1, -1))
        balance = balance.named(f"balance_{pair}")
        negative = rasp.numerical(rasp.Map(lambda x: int(x < 0), balance))
        ever_negative = frac(negative.named(f"negative_{pair}")).named(f"ever_negative_{pair}")
        closed = rasp.Map(lambda x: x == 0, balance).named(f"closed_{pair}")
        never_negative = rasp.Map(lambda x: x == 0, ever_negative)
        never_negative = never_negative.named(f"never_negative_{pair}")
        ok = rasp.SequenceMap(lambda a, b: a and b, closed, never_negative)
        pair_ok.append(ok.named(f"ok_{pair}"))
    balanced = rasp.SequenceMap(lambda a, b: a and b, *pair_ok)
    return balanced.named("balanced")


def sample_dyck(rng: random.Random, length: int) -> list[str]:
    # Uniform tokens are almost never balanced; half the inputs are built from random
    # well-nested and interleaved pushes and pops so that True outputs are common.
    if rng.random() < 0.5:
        return [rng.choice("(){}") for _ in range(length)]
    tokens, open_counts = [], {"(": 0, "{": 0}
    closer = {"(": ")", "{": "}"}
    for _ in range(length):
        can_close = [o for o, n in open_counts.items() if n > 0]
        if can_close and rng.random() < 0.5:
            o = rng.choice(can_close)
            open_counts[o] -= 1
            tokens.append(closer[o])
        else:
            o = rng.choice("({")
            open_counts[o] += 1
            tokens.append(o)
    return tokens


def build_induction():
    """``induction[q]``: the token after an earlier occurrence of ``tokens[q]``'s letter."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    prev_token = lib.shift_by(1, rasp.tokens).named("prev_token")
    letter = rasp.Map(lambda t: t.lower(), rasp.tokens).named("letter")
    prev_letter = rasp.Map(lambda t: t.lower(), prev_token).named("prev_letter")
    # Causal masking restricts the keys to k <= q; RASP's causal evaluator does the same. Not
    # Comparison.EQ: RASP's evaluator refuses its None key at position 0 (no previous token).
    match = rasp.Select(prev_letter, letter, lambda k, q: k == q).named("match")
    return rasp.Aggregate(match, rasp.tokens).named("induction")


INDUCTION_VOCAB = ("a", "b", "c", "d", "A", "B", "C", "D")


def sample_induction(rng: random.Random, length: int) -> list[str]:
    # Half the inputs repeat a span of distinct letters, where most positions have exactly one
    # match; the others are uniform, where many have none or several.
    if rng.random() < 0.5 or length < 4:
        return [rng.choice(INDUCTION_VOCAB) for _ in range(length)]
    span = rng.sample(INDUCTION_VOCAB, k=min(4, length // 2))
    span = [t if rng.random() < 0.5 else t.swapcase() for t in span]
    out = span + [t if rng.random() < 0.7 else t.swapcase() for t in span]
    out += [rng.choice(INDUCTION_VOCAB) for _ in range(length - len(out))]
    return out[:length]


PROGRAMS: dict[str, Program] = {
    "dyck": Program(
        name="dyck",
        build=build_dyck,
        vocab=("(", ")", "{", "}"),
        max_seq_len=10,
        description=(
            "balanced[q] is True iff tokens[0..q] is a balanced shuffle-Dyck-2 word over () "
            "and {} (each pair balanced on its own, never closed before opened)"
        ),
        sample=sample_dyck,
        # tracr infers the averages of a 0/1 flag as {0, 1/n}, so the balance's value set holds
        # spurious differences such as 1/9 - 1/10 = 1/90, and the "balance == 0" MLP puts a
        # threshold at 1/180. Its ramp is 1/L wide below each threshold, so L = 100 leaves a
        # true balance of 0 on the ramp (output 0.56 instead of 1); L = 400 clears it.
        mlp_exactness=400,
    ),
    "induction": Program(
        name="induction",
        build=build_induction,
        vocab=INDUCTION_VOCAB,
        max_seq_len=10,
        description=(
            "induction[q] = tokens[k] for the positions 1 <= k <= q with "
            "lower(tokens[k-1]) == lower(tokens[q]); defined by RASP when there is exactly "
            "one such k (the model also answers when all of them hold the same token), no "
            "output (all output logits 0) when there is none"
        ),
        sample=sample_induction,
    ),
}


# ----------------------------------------------------------------------------------------------
# Compilation and tracr's forward


@dataclass
class Compiled:
    """A compiled tracr model as numpy arrays, in tracr's residual layout."""

    program: Program
    sop: object
    assembled: object  # tracr AssembledTransformerModel
    labels: list[str]  # residual basis labels, length D
    token_embed: np.ndarray  # (tracr vocab, D)
    pos_embed: np.ndarray  # (max_seq_len + 1, D)
    # Per layer: wq wk wv (D, H*K), wo (H*K, D), their biases bq bk bv bo, MLP w1 b1 w2 b2.
    layers: list[dict[str, np.ndarray]]
    n_heads: int
    key_size: int
    output_labels: list[str]  # residual labels of the output space, in tracr's order
    output_values: list  # the program's output value of each output label
    tracr_ids: dict  # token -> tracr input id


def compile_program(program: Program) -> Compiled:
    from tracr.compiler import compiling

    sop = program.build()
    assembled = compiling.compile_rasp_to_model(
        sop,
        vocab=set(program.vocab),
        max_seq_len=program.max_seq_len,
        causal=True,
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=program.mlp_exactness,
    )
    params = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}
              for k, v in assembled.params.items()}
    cfg = assembled.model_config
    layers = []
    for layer in range(cfg.num_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        layers.append({
            "wq": params[f"{attn}/query"]["w"], "bq": params[f"{attn}/query"]["b"],
            "wk": params[f"{attn}/key"]["w"], "bk": params[f"{attn}/key"]["b"],
            "wv": params[f"{attn}/value"]["w"], "bv": params[f"{attn}/value"]["b"],
            "wo": params[f"{attn}/linear"]["w"], "bo": params[f"{attn}/linear"]["b"],
            "w1": params[f"{mlp}/linear_1"]["w"], "b1": params[f"{mlp}/linear_1"]["b"],
            "w2": params[f"{mlp}/linear_2"]["w"], "b2": params[f"{mlp}/linear_2"]["b"],
        })
    rename = _readable_labels(sop)
    labels = [rename(label) for label in assembled.residual_labels]
    out_encoder = assembled.output_encoder
    if out_encoder is None or not hasattr(out_encoder, "encoding_map"):
        msg = f"program {program.name!r}: the output must be categorical to be read by argmax"
        raise ValueError(msg)
    output_values = sorted(out_encoder.encoding_map, key=out_encoder.encoding_map.get)
    output_labels = [rename(f"{sop.label}:{v}") for v in output_values]
    missing = [lab for lab in output_labels if lab not in labels]
    if missing:
        raise RuntimeError(f"output labels {missing} are not residual labels")
    return Compiled(
        program=program, sop=sop, assembled=assembled, labels=labels,
        token_embed=params["token_embed"]["embeddings"],
        pos_embed=params["pos_embed"]["embeddings"], layers=layers,
        n_heads=cfg.num_heads, key_size=cfg.key_size,
        output_labels=output_labels, output_values=output_values,
        tracr_ids=dict(assembled.input_encoder.encoding_map),
    )


def _readable_labels(sop) -> Callable[[str], str]:
    """Residual labels without tracr's ids: ``frac_(_12`` -> ``frac_(``.

    tracr labels an SOp ``{name}_{id}`` with ids from a process-wide counter, so they would
    depend on what else was compiled first. Every SOp of these programs has a unique name.
    """
    names: dict[str, str] = {}
    stack = [sop]
    while stack:
        expr = stack.pop()
        names[expr.label] = expr.name
        stack.extend(expr.children)
    if len(set(names.values())) != len(names):
        raise ValueError(f"program SOps need unique names; got {sorted(names.values())}")

    def rename(label: str) -> str:
        head, colon, value = label.partition(":")
        return names.get(head, head) + colon + value

    return rename


def tracr_forward(c: Compiled, tokens: list[str], dtype) -> list[np.ndarray]:
    """tracr's forward in numpy at ``dtype``: the residual before each half-layer and at the end.

    Mirrors ``tracr.transformer.model`` (no LayerNorm, scores over ``sqrt(key_size)``, causal
    mask, ReLU MLPs); ``check_against_jax`` compares it with tracr's own jax forward.
    """
    ids = [c.tracr_ids[t] for t in tokens]
    x = (c.token_embed[ids] + c.pos_embed[: len(ids)]).astype(dtype)
    seq, heads, k = len(ids), c.n_heads, c.key_size
    mask = np.tril(np.ones((seq, seq), bool))
    residuals = [x]
    for p in c.layers:
        p = {name: a.astype(dtype) for name, a in p.items()}
        q = (x @ p["wq"] + p["bq"]).reshape(seq, heads, k)
        kk = (x @ p["wk"] + p["bk"]).reshape(seq, heads, k)
        v = (x @ p["wv"] + p["bv"]).reshape(seq, heads, k)
        scores = np.einsum("thd,Thd->htT", q, kk) / np.sqrt(dtype(k))
        scores = np.where(mask, scores, dtype(-1e30))
        scores = scores - scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / weights.sum(-1, keepdims=True)
        attn = np.einsum("htT,Thd->thd", weights, v).reshape(seq, heads * k)
        x = x + attn @ p["wo"] + p["bo"]
        residuals.append(x)
        x = x + np.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
        residuals.append(x)
    return residuals


def check_against_jax(c: Compiled, inputs: list[list[str]]) -> float:
    """Largest difference between ``tracr_forward`` (float32) and tracr's jax forward."""
    worst = 0.0
    for tokens in inputs:
        out = c.assembled.apply([BOS, *tokens])
        ours = tracr_forward(c, [BOS, *tokens], np.float32)
        theirs = [np.asarray(out.input_embeddings[0])] + [np.asarray(r[0]) for r in out.residuals]
        for a, b in zip(ours, theirs, strict=True):
            worst = max(worst, float(np.abs(a - b).max()))
    return worst


def check_against_rasp(c: Compiled, inputs: list[list[str]]) -> dict:
    """tracr's compiled model against tracr's causal RASP evaluator, position by position.

    Position q's output depends on the prefix ``tokens[:q+1]`` only, so each prefix is
    evaluated on its own: a categorical Aggregate that selects several keys makes RASP raise,
    and that leaves only that position undefined.
    """
    from tracr.rasp import causal_eval

    evaluator = causal_eval.CausalEvaluator()
    out_dims = [c.labels.index(lab) for lab in c.output_labels]
    checked = wrong = undefined = 0
    worst_one_hot = 0.0
    for tokens in inputs:
        got = c.assembled.apply([BOS, *tokens]).decoded[1:]
        outputs = tracr_forward(c, [BOS, *tokens], np.float64)[-1][1:, out_dims]
        for q, g in enumerate(got):
            try:
                w = evaluator.evaluate(c.sop, tokens[: q + 1])[q]
            except ValueError:
                undefined += 1
                continue
            checked += 1
            if w is None:  # no output: tracr writes nothing into the output space
                worst_one_hot = max(worst_one_hot, float(np.abs(outputs[q]).max()))
                continue
            wrong += w != g
            one_hot = np.array([float(v == w) for v in c.output_values])
            worst_one_hot = max(worst_one_hot, float(np.abs(outputs[q] - one_hot).max()))
    if wrong:
        raise RuntimeError(f"{c.program.name}: tracr's model disagrees with RASP at {wrong} "
                           f"of {checked} positions")
    # Circuit-discovery metrics read logits, not argmax: outputs must be clean one-hots (or
    # zero where the program gives no output).
    if worst_one_hot > ONE_HOT_TOLERANCE:
        raise RuntimeError(f"{c.program.name}: tracr's outputs are {worst_one_hot} away from "
                           f"one-hot; raise the program's mlp_exactness")
    return {"positions_checked": checked, "positions_undefined_in_rasp": undefined,
            "max_abs_distance_from_one_hot": worst_one_hot}


# ----------------------------------------------------------------------------------------------
# Conversion to GPT-2


@dataclass
class Gpt2Layout:
    """Where tracr's pieces sit in the GPT-2 model."""

    d_tracr: int
    n_embd: int
    n_head: int
    head_dim: int
    n_inner: int
    tokens: list[str]  # GPT-2 token id -> token
    labels: list[str]  # GPT-2 residual dim -> label: tracr's, SUM_LABEL, ZERO_LABEL, padding

    @property
    def sum_dim(self) -> int:
        return self.d_tracr

    @property
    def zero_dim(self) -> int:
        return self.d_tracr + 1


def prune_mlp(p: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Drop hidden units that can't change the output: zero output weights, or never active."""
    live = (np.abs(p["w2"]).sum(1) > 0) & ((np.abs(p["w1"]).sum(0) > 0) | (p["b1"] > 0))
    return p["w1"][:, live], p["b1"][live], p["w2"][live], p["b2"]


def gpt2_layout(c: Compiled) -> Gpt2Layout:
    d = len(c.labels)
    head_dim = c.key_size
    n_head = max(c.n_heads, math.ceil((d + 2) / head_dim))
    n_inner = max(1, max(prune_mlp(p)[0].shape[1] for p in c.layers))
    inputs = [t for t in sorted(c.tracr_ids, key=str) if t not in (BOS, PAD)]
    outputs_only = [str(v) for v in c.output_values if str(v) not in inputs]
    tokens = [*SPECIAL_TOKENS, *inputs, *outputs_only]
    n_embd = n_head * head_dim
    labels = [*c.labels, SUM_LABEL, ZERO_LABEL] + [PAD_LABEL] * (n_embd - d - 2)
    return Gpt2Layout(d_tracr=d, n_embd=n_embd, n_head=n_head, head_dim=head_dim,
                      n_inner=n_inner, tokens=tokens, labels=labels)


def _writer(rows: np.ndarray, lay: Gpt2Layout) -> np.ndarray:
    """Writers: tracr's (n, D) rows in the first D residual dims, minus their sum next."""
    out = np.zeros((rows.shape[0], lay.n_embd))
    out[:, : lay.d_tracr] = rows
    out[:, lay.sum_dim] = -rows.sum(1)
    return out


def _reader(w: np.ndarray, lay: Gpt2Layout) -> np.ndarray:
    """Readers: tracr's (D, n) matrix, and a row in the zero dim making columns sum to zero."""
    out = np.zeros((lay.n_embd, w.shape[1]))
    out[: lay.d_tracr] = w
    out[lay.zero_dim] = -w.sum(0)
    return out


def _heads_to_gpt2(w: np.ndarray, c: Compiled, lay: Gpt2Layout, axis: int) -> np.ndarray:
    """Spread tracr's (.., H*K) head blocks over GPT-2's n_head * head_dim along ``axis``."""
    w = np.moveaxis(w, axis, -1)
    out = np.zeros((*w.shape[:-1], lay.n_head * lay.head_dim))
    for h in range(c.n_heads):
        out[..., h * lay.head_dim : h * lay.head_dim + c.key_size] = (
            w[..., h * c.key_size : (h + 1) * c.key_size])
    return np.moveaxis(out, -1, axis)


def gpt2_state(c: Compiled, lay: Gpt2Layout) -> dict[str, np.ndarray]:
    """The GPT-2 state dict, float64, per the module docstring."""
    # GPT-2 divides scores by sqrt(head_dim), tracr by sqrt(key_size): equal by construction.
    assert lay.head_dim == c.key_size
    state: dict[str, np.ndarray] = {}
    wte = np.zeros((len(lay.tokens), lay.n_embd))
    for i, tok in enumerate(lay.tokens):
        if tok in c.tracr_ids:
            wte[i] = _writer(c.token_embed[[c.tracr_ids[tok]]], lay)[0]
    state["transformer.wte.weight"] = wte
    state["transformer.wpe.weight"] = _writer(c.pos_embed, lay)
    ln = {"weight": np.full(lay.n_embd, LN_GAMMA), "bias": np.zeros(lay.n_embd)}
    for layer, p in enumerate(c.layers):
        pre = f"transformer.h.{layer}."
        for name in ("ln_1", "ln_2"):
            for key, value in ln.items():
                state[f"{pre}{name}.{key}"] = value
        qkv = [_heads_to_gpt2(_reader(p[w], lay), c, lay, axis=1) for w in ("wq", "wk", "wv")]
        state[f"{pre}attn.c_attn.weight"] = np.concatenate(qkv, axis=1)
        biases = [_heads_to_gpt2(p[b][None], c, lay, axis=1)[0] for b in ("bq", "bk", "bv")]
        state[f"{pre}attn.c_attn.bias"] = np.concatenate(biases)
        # Conv1D stores (in, out): rows are head dims, columns residual dims.
        state[f"{pre}attn.c_proj.weight"] = _heads_to_gpt2(_writer(p["wo"], lay), c, lay,
                                                           axis=0)
        state[f"{pre}attn.c_proj.bias"] = _writer(p["bo"][None], lay)[0]
        w1, b1, w2, b2 = prune_mlp(p)
        fc = np.zeros((lay.n_embd, lay.n_inner))
        fc[:, : w1.shape[1]] = _reader(w1, lay)
        fc_b = np.zeros(lay.n_inner)
        fc_b[: b1.shape[0]] = b1
        proj = np.zeros((lay.n_inner, lay.n_embd))
        proj[: w2.shape[0]] = _writer(w2, lay)
        state[f"{pre}mlp.c_fc.weight"] = fc
        state[f"{pre}mlp.c_fc.bias"] = fc_b
        state[f"{pre}mlp.c_proj.weight"] = proj
        state[f"{pre}mlp.c_proj.bias"] = _writer(b2[None], lay)[0]
    for key, value in ln.items():
        state[f"transformer.ln_f.{key}"] = value
    unembed = np.zeros((lay.d_tracr, len(lay.tokens)))
    for value, label in zip(c.output_values, c.output_labels, strict=True):
        unembed[c.labels.index(label), lay.tokens.index(str(value))] = 1.0
    state["lm_head.weight"] = _reader(unembed, lay).T
    return state


def gpt2_config(c: Compiled, lay: Gpt2Layout):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(lay.tokens),
        n_positions=c.program.max_seq_len + 1,
        n_embd=lay.n_embd,
        n_layer=len(c.layers),
        n_head=lay.n_head,
        n_inner=lay.n_inner,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=LN_EPS,
        scale_attn_weights=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def build_gpt2(c: Compiled, lay: Gpt2Layout):
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(c, lay)).eval()
    state = gpt2_state(c, lay)
    own = model.state_dict()
    extra = set(state) - set(own)
    if extra:
        raise RuntimeError(f"state keys GPT-2 lacks: {sorted(extra)}")
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                msg = f"{key}: GPT-2 has shape {tuple(own[key].shape)}, built {value.shape}"
                raise RuntimeError(msg)
            own[key].copy_(torch.from_numpy(value))
    # Buffers (attention masks) keep their defaults; every parameter must have been set.
    unset = {k for k, _ in model.named_parameters()} - set(state)
    if unset:
        raise RuntimeError(f"GPT-2 parameters left unset: {sorted(unset)}")
    return model


def make_tokenizer(lay: Gpt2Layout, max_len: int):
    """Word-level tokenizer over the GPT-2 ids; like induction-2l's, but padding on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(lay.tokens)},
                                      unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK,
        padding_side="right",  # positions count from the row start: left padding shifts them
        model_max_length=max_len,
    )


# ----------------------------------------------------------------------------------------------
# Checking the conversion


def gpt2_residuals(model, ids: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """The residual at every LayerNorm input (tracr's half-layer residuals) and the logits."""
    import torch

    seen: list[np.ndarray] = []
    lns = [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)] + [model.transformer.ln_f]
    hooks = [ln.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0].numpy().copy()))
             for ln in lns]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def compare(c: Compiled, lay: Gpt2Layout, model, inputs: list[list[str]], dtype) -> dict:
    """GPT-2 at ``dtype`` against ``tracr_forward`` at ``dtype`` on the same float32 weights."""
    import torch

    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    model = model.to(torch_dtype)
    out_dims = [c.labels.index(lab) for lab in c.output_labels]
    out_ids = [lay.tokens.index(str(v)) for v in c.output_values]
    worst_resid = worst_logit = max_var = outside = max_mean = 0.0
    argmax_mismatch = 0
    for tokens in inputs:
        ids = [lay.tokens.index(t) for t in [BOS, *tokens]]
        want = tracr_forward(c, [BOS, *tokens], dtype)
        got, logits = gpt2_residuals(model, ids)
        for w, g in zip(want, got, strict=True):
            worst_resid = max(worst_resid, float(np.abs(g[:, : lay.d_tracr] - w).max()))
            outside = max(outside, float(np.abs(g[:, lay.zero_dim :]).max()))
            max_mean = max(max_mean, float(np.abs(g.astype(np.float64).mean(-1)).max()))
            max_var = max(max_var, float(g.astype(np.float64).var(-1).max()))
        want_logits = want[-1][:, out_dims]
        worst_logit = max(worst_logit, float(np.abs(logits[:, out_ids] - want_logits).max()))
        others = np.delete(logits, out_ids, axis=1)
        worst_logit = max(worst_logit, float(np.abs(others).max()) if others.size else 0.0)
        # Where tracr's output is all about 0 (no induction match) argmax is noise.
        defined = want_logits[1:].max(-1) > 0.5
        argmax_mismatch += int((logits[1:, out_ids].argmax(-1)
                                != want_logits[1:].argmax(-1))[defined].sum())
    if outside != 0.0:
        raise RuntimeError(f"zero/padding dims of the residual are not zero (max {outside})")
    if max_var >= VAR_LIMIT:
        raise RuntimeError(f"residual variance {max_var} reaches {VAR_LIMIT}: LN not exact")
    return {"max_abs_residual_diff": worst_resid, "max_abs_logit_diff": worst_logit,
            "argmax_mismatches": argmax_mismatch, "max_abs_residual_mean": max_mean,
            "max_residual_variance": max_var}


def float32_rounding(c: Compiled, inputs: list[list[str]]) -> float:
    """Largest difference between ``tracr_forward`` in float32 and in float64."""
    worst = 0.0
    for tokens in inputs:
        f32 = tracr_forward(c, [BOS, *tokens], np.float32)
        f64 = tracr_forward(c, [BOS, *tokens], np.float64)
        worst = max(worst, max(float(np.abs(a - b).max()) for a, b in zip(f32, f64, strict=True)))
    return worst


def float16_check(c: Compiled, lay: Gpt2Layout, model, inputs: list[list[str]]) -> dict:
    """Does the checkpoint still give the program's outputs when run in float16?"""
    import torch

    model = model.to(torch.float16)
    out_ids = [lay.tokens.index(str(v)) for v in c.output_values]
    out_dims = [c.labels.index(lab) for lab in c.output_labels]
    mismatch = total = 0
    worst = 0.0
    for tokens in inputs:
        ids = [lay.tokens.index(t) for t in [BOS, *tokens]]
        want = tracr_forward(c, [BOS, *tokens], np.float64)[-1][1:, out_dims]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, 1:].double().numpy()[:, out_ids]
        defined = want.max(-1) > 0.5
        mismatch += int((logits.argmax(-1) != want.argmax(-1))[defined].sum())
        total += int(defined.sum())
        worst = max(worst, float(np.abs(logits - want).max()))
    return {"positions": total, "argmax_mismatches": mismatch, "max_abs_logit_diff": worst}


# ----------------------------------------------------------------------------------------------
# Ground truth


def _nonzero(a: np.ndarray, axis: int) -> set[int]:
    scale = np.abs(a).max() if a.size else 0.0
    if scale == 0:
        return set()
    return set(np.flatnonzero(np.abs(a).max(axis=axis) > 1e-9 * scale).tolist())


def component_spaces(c: Compiled) -> dict[str, dict[str, set[int]]]:
    """Per nonzero component: the tracr residual dims each of its inputs reads and it writes."""
    k = c.key_size
    comps: dict[str, dict[str, set[int]]] = {
        "embed": {"writes": _nonzero(c.token_embed, 0) | _nonzero(c.pos_embed, 0)}}
    for layer, p in enumerate(c.layers):
        for h in range(c.n_heads):
            cols = slice(h * k, (h + 1) * k)
            qk = p["wq"][:, cols] @ p["wk"][:, cols].T
            ov = p["wv"][:, cols] @ p["wo"][cols]
            if not _nonzero(ov, 0):
                continue
            comps[f"a{layer}.h{h}"] = {"q": _nonzero(qk, 1), "k": _nonzero(qk, 0),
                                       "v": _nonzero(ov, 1), "writes": _nonzero(ov, 0)}
        w1, _, w2, b2 = prune_mlp(p)
        writes = _nonzero(w2, 0) | _nonzero(b2[None], 0)
        if writes:
            comps[f"m{layer}"] = {"in": _nonzero(w1, 1), "writes": writes}
    comps["logits"] = {"in": {c.labels.index(lab) for lab in c.output_labels}}
    return comps


def _order(node: str) -> tuple[int, int]:
    """Position in GPT-2's computation: embed, then per layer its heads, then its MLP."""
    if node == "embed":
        return (-1, 0)
    if node == "logits":
        return (10**9, 0)
    if node.startswith("a"):
        return (int(node[1:].split(".")[0]), 0)
    return (int(node[1:]), 1)


def _node(dest_input: str) -> str:
    """The component of a destination input: ``a1.h0.k`` -> ``a1.h0``, ``m2`` -> ``m2``."""
    return ".".join(dest_input.split(".")[:2]) if dest_input.startswith("a") else dest_input


def _input_independent(label: str) -> bool:
    """Labels whose values never depend on the input tokens: the constant, positions, BOS."""
    return label in ("one", f"tokens:{BOS}") or label.startswith("indices:")


def ground_truth(c: Compiled, lay: Gpt2Layout) -> dict:
    comps = component_spaces(c)
    carried: dict[str, list[str]] = {}  # edge -> the labels it carries
    for dest, spaces in comps.items():
        for port, reads in spaces.items():
            if port == "writes":
                continue
            dest_input = dest if port == "in" else f"{dest}.{port}"
            for src, src_spaces in comps.items():
                shared = src_spaces.get("writes", set()) & reads
                if _order(src) < _order(dest) and shared:
                    carried[f"{src}->{dest_input}"] = sorted(c.labels[i] for i in shared)
    edges = sorted(carried, key=lambda e: (_order(e.split("->")[0]), e))
    nodes = sorted(comps, key=lambda n: (_order(n), n))
    # tracr compiles only what the output depends on: every node must reach the logits.
    reach, grew = {"logits"}, True
    while grew:
        before = len(reach)
        reach |= {e.split("->")[0] for e in edges if _node(e.split("->")[1]) in reach}
        grew = len(reach) > before
    if set(nodes) - reach:
        raise RuntimeError(f"components that do not reach the logits: {set(nodes) - reach}")
    components = {n: {port: sorted(c.labels[i] for i in dims) for port, dims in spaces.items()}
                  for n, spaces in comps.items()}
    return {
        "program": c.program.name,
        "description": c.program.description,
        "nodes": nodes,
        "edges": edges,
        "edge_labels": {e: carried[e] for e in edges},
        "input_independent_edges": [e for e in edges
                                    if all(_input_independent(lab) for lab in carried[e])],
        "components": components,
        "notes": (
            "Known by construction: tracr compiled the RASP program into these components "
            "and no others. 'components' lists, per component, the residual labels each "
            "input reads (q and k from W_Q W_K^T, v from W_V W_O, 'in' for MLPs and logits) "
            "and the labels it writes; u->d is an edge when d reads a label that u writes "
            "(tracr writes each label once). 'embed' writes tokens:*, indices:* and 'one', a "
            "constant 1 that tracr's MLPs use as a bias and its heads use to fall back on "
            "<bos>, so edges from embed include those constant reads. 'edge_labels' gives "
            "the labels each edge carries; 'input_independent_edges' are the edges that carry "
            "only 'one', 'indices:*' or 'tokens:<bos>', which are the same for every input of "
            "a given length, so patching one input's activations into another (resample or "
            "mean ablation) cannot reveal them. Heads and MLPs not "
            "listed are exactly zero. 'residual_labels' names each GPT-2 residual dim: "
            "tracr's, then '<minus-sum>' (minus the sum of tracr's dims, so that the residual "
            "sums to zero), '<zero>' (always 0; reading matrices put minus their column sums "
            "there) and padding; both make GPT-2's LayerNorm the identity. Sequences start "
            "with <bos>; pad on the right. Built by mechinterp/zoo/compile_tracr.py."
        ),
        "residual_labels": list(lay.labels),
    }


# ----------------------------------------------------------------------------------------------
# Main


def random_inputs(program: Program, n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [program.sample(rng, rng.randint(1, program.max_seq_len)) for _ in range(n)]


def build(program: Program, out: Path) -> dict:
    """Compile, convert, save, then check the saved checkpoint; returns the compile report."""
    import torch
    from transformers import AutoModelForCausalLM

    c = compile_program(program)
    inputs = random_inputs(program, N_CHECK_INPUTS, CHECK_SEED)
    rasp_check = check_against_rasp(c, inputs)
    jax_diff = check_against_jax(c, inputs[:50])
    lay = gpt2_layout(c)
    truth = ground_truth(c, lay)
    save(out, build_gpt2(c, lay), make_tokenizer(lay, program.max_seq_len + 1), truth)
    # The checkpoint holds float32 weights: give tracr's forward the same ones, so that the
    # comparisons measure the conversion and not float32 storage.
    round_to_float32(c)
    loaded = {dtype: AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
              for dtype in (torch.float32, torch.float64, torch.float16)}
    report = {
        "program": program.name,
        "description": program.description,
        "vocab": list(program.vocab),
        "max_seq_len": program.max_seq_len,
        "tracr": {"n_layers": len(c.layers), "heads_per_layer": c.n_heads,
                  "key_size": c.key_size, "residual_dims": len(c.labels),
                  "mlp_exactness": program.mlp_exactness},
        "gpt2": {"n_embd": lay.n_embd, "n_head": lay.n_head, "head_dim": lay.head_dim,
                 "n_inner": lay.n_inner, "vocab_size": len(lay.tokens),
                 "layer_norm_epsilon": LN_EPS, "layer_norm_weight": LN_GAMMA},
        "versions": _versions(),
        "check_inputs": {"count": len(inputs), "seed": CHECK_SEED},
        "tracr_vs_rasp": rasp_check,
        "numpy_vs_tracr_jax_float32_max_abs_diff": jax_diff,
        # tracr's own float32 rounding, the scale for the float32 comparison below.
        "tracr_float32_vs_float64_max_abs_diff": float32_rounding(c, inputs),
        "gpt2_vs_tracr_float32": compare(c, lay, loaded[torch.float32], inputs, np.float32),
        "gpt2_vs_tracr_float64": compare(c, lay, loaded[torch.float64], inputs, np.float64),
        "gpt2_float16_vs_program": float16_check(c, lay, loaded[torch.float16], inputs),
        "ground_truth": {"nodes": len(truth["nodes"]), "edges": len(truth["edges"])},
    }
    for key in ("gpt2_vs_tracr_float32", "gpt2_vs_tracr_float64"):
        if report[key]["argmax_mismatches"]:
            raise RuntimeError(f"{program.name}: {key} has argmax mismatches: {report[key]}")
    (out / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("tracr-pypi", "jax", "torch", "transformers")}


def round_to_float32(c: Compiled) -> None:
    """Replace tracr's weights by their float32 values, which the checkpoint holds."""

    def as32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).astype(np.float64)

    c.token_embed, c.pos_embed = as32(c.token_embed), as32(c.pos_embed)
    c.layers = [{name: as32(a) for name, a in p.items()} for p in c.layers]


def save(out: Path, model, tokenizer, truth: dict) -> None:
    """Write float32 safetensors, the tokenizer and the ground truth; check the tokenizer."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    reloaded = AutoTokenizer.from_pretrained(out)
    text = " ".join(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
        raise RuntimeError(f"tokenizer round-trip changed {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-root", type=Path, default=Path(__file__).resolve().parent,
                        help="folder that receives tracr-<program>/ (default: mechinterp/zoo)")
    parser.add_argument("--program", choices=sorted(PROGRAMS), action="append",
                        help="program to compile (repeatable; default: all)")
    args = parser.parse_args(argv)
    for name in args.program or sorted(PROGRAMS):
        report = build(PROGRAMS[name], args.out_root / f"tracr-{name}")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
