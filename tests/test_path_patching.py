"""path_patch against a two-pass reference of plain edited forwards, limits, and a known circuit."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, Family, build, token_ids

import mechinterp
from mechinterp import Set, Site, Tokens, select
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.heads import repeated_tokens
from mechinterp.model import InterpModel
from mechinterp.patching import KL, LogitDiff, Prob, activation_patch, path_patch
from mechinterp.patching.paths import _disjoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ANSWER, WRONG = 5, 7
LENGTHS = (4, 6, 5)  # one prompt pair per length: the batch is left-padded
CHOSEN = ("gpt2", "llama", "gpt_neox")  # llama's keys and values have 2 heads for 4 queries

SENDERS = [
    Site("embed"),
    Site("embed", pos=-2),
    Site("resid_pre", layer=0, pos=1),
    Site("head", layer=0, head=1),
    Site("head", layer=0, head=2, pos=-1),
    Site("attn_out", layer=0),
    Site("resid_mid", layer=0, pos=-1),
    Site("mlp_out", layer=0),
    Site("resid_post", layer=0, pos=(0, -1)),
    Site("resid_pre", layer=1),
    Site("head", layer=1, head=0),  # no receiver below lies after it
]

# Receiver sets whose reference is exact: no receiver lies after another receiver's own frozen
# site (the reference reads receivers as Set edits leave them, so it leaves them unfrozen).
RECEIVERS = {
    "qkv": [Site("q", layer=1, head=3, pos=-1), Site("k", layer=1, head=1),
            Site("v", layer=1, head=0, pos=(0, -2))],
    "head+resid": [Site("head", layer=1, head=2), Site("resid_pre", layer=1, pos=-1),
                   Site("k", layer=1, head=1), Site("k", layer=1, head=1, pos=-1)],  # overlap
    "mlp+pattern": [Site("mlp_out", layer=1, pos=-1), Site("resid_pre", layer=1, pos=-2),
                    Site("pattern", layer=1, head=2, pos=-1),
                    Site("neuron", layer=1, neuron=(3, 7))],
    "logits": "logits",
}
FREEZE = {"qkv": ("head",), "head+resid": ("head", "mlp_out"),
          "mlp+pattern": ("head", "mlp_out"), "logits": ("head", "mlp_out")}


@pytest.fixture(params=[f for f in FAMILIES if f.name in CHOSEN], ids=list(CHOSEN),
                scope="module")
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def model(family: Family) -> InterpModel:
    """Weight matrices 4x their initial scale: paths then move the logit difference by 0.02 to
    2 instead of 1e-4 to 0.2, far above the tolerance of the comparisons."""
    module = build(family)
    with torch.no_grad():
        for weight in module.parameters():
            if weight.dim() >= 2:
                weight.mul_(4.0)
    return InterpModel(module)


def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clean and corrupted token ids ``[1, length]`` of each pair."""
    return [(token_ids(1, length, seed=20 + p), token_ids(1, length, seed=40 + p))
            for p, length in enumerate(LENGTHS)]


def padded(rows: list[torch.Tensor]) -> Tokens:
    width = max(row.shape[1] for row in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - r.shape[1], dtype=torch.long), r[0]])
                       for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - r.shape[1], dtype=torch.long),
                                   torch.ones(r.shape[1], dtype=torch.long)]) for r in rows])
    return Tokens(ids, mask)


def batch() -> tuple[Tokens, Tokens]:
    both = pairs()
    return padded([c for c, _ in both]), padded([k for _, k in both])


def supported(model: InterpModel, sites: list[Site]) -> list[Site]:
    return [s for s in sites if s.component in model.table.places]


def frozen_sites(model: InterpModel, sender: Site, receivers: list[Site], freeze) -> list[Site]:
    """Every site of the frozen kinds but the sender's own and the receivers' (read unfrozen)."""
    d = model.dims
    kept = {(s.component, s.layer, s.head) for s in [sender, *receivers]}
    sites = []
    for layer in range(d.n_layers):
        if "head" in freeze:
            sites += [Site("head", layer=layer, head=h) for h in range(d.n_heads)
                      if ("head", layer, h) not in kept]
        if "mlp_out" in freeze and ("mlp_out", layer, None) not in kept:
            sites.append(Site("mlp_out", layer=layer))
    return sites


def reference(model: InterpModel, senders: list[Site], receivers, freeze) -> torch.Tensor:
    """``[pair, sender]`` logit differences: per sender and pair, pass 1 and pass 2 as plain
    forwards of one unpadded pair, with values from separate clean and corrupted runs."""
    out = torch.empty(len(LENGTHS), len(senders))
    for c, sender in enumerate(senders):
        # A site does not receive from itself (path_patch: receivers computed after the sender).
        targets = [] if receivers == "logits" else [
            r for r in receivers if (r.component, r.layer) != (sender.component, sender.layer)]
        for p, (clean, corrupt) in enumerate(pairs()):
            frozen = frozen_sites(model, sender, targets, freeze)
            clean_value = model.cache(clean, [sender])[sender]
            corrupt_values = model.cache(corrupt, frozen) if frozen else {}
            edits = [Set(sender, clean_value)] + [Set(s, corrupt_values[s]) for s in frozen]
            first = model.run(corrupt, edits=edits, cache=targets)
            if receivers != "logits":
                second = [Set(r, first.cache[r]) for r in targets]
                logits = model.run(corrupt, edits=second).logits[0, -1]
            else:
                logits = first.logits[0, -1]
            out[p, c] = logits[ANSWER] - logits[WRONG]
    return out


@pytest.mark.parametrize("kind", list(RECEIVERS))
def test_equals_two_pass_reference(model: InterpModel, kind: str) -> None:
    senders = supported(model, SENDERS)
    receivers = RECEIVERS[kind] if kind == "logits" else supported(model, RECEIVERS[kind])
    clean, corrupt = batch()
    expected = reference(model, senders, receivers, FREEZE[kind])
    for batch_size in (None, 7):  # every sender in one forward; two senders a forward
        result = path_patch(model, clean, corrupt, senders, receivers, LogitDiff(ANSWER, WRONG),
                            freeze=FREEZE[kind], batch_size=batch_size, progress=False)
        torch.testing.assert_close(result.values, expected, rtol=1e-5, atol=1e-5)
    assert result.sites == senders
    assert float((expected - result.corrupt[:, None]).abs().max()) > 0.1  # not a vacuous match
    alone = [model.run(k).logits[0, -1] for _, k in pairs()]
    torch.testing.assert_close(result.corrupt, torch.stack([z[ANSWER] - z[WRONG] for z in alone]))


def test_nothing_frozen_to_the_output_is_activation_patching(model: InterpModel) -> None:
    clean, corrupt = batch()
    senders = supported(model, SENDERS)
    for metric in (KL(), Prob(ANSWER)):
        paths = path_patch(model, clean, corrupt, senders, "logits", metric, freeze=(),
                           progress=False)
        patched = activation_patch(model, clean, corrupt, senders, metric, progress=False)
        torch.testing.assert_close(paths.values, patched.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(paths.clean, patched.clean)
        torch.testing.assert_close(paths.corrupt, patched.corrupt)
        # Freezing heads changes the answer: later heads no longer relay the senders' changes.
        frozen = path_patch(model, clean, corrupt, senders, "logits", metric, progress=False)
        effect = (patched.values - patched.corrupt[:, None]).abs().max()
        assert (frozen.values - patched.values).abs().max() > 0.1 * effect


def counting_metric(rows: list[int]):
    def metric(logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        rows.append(logits.shape[0])
        return logits[:, ANSWER] - logits[:, WRONG]

    return metric


def test_final_residual_stream_is_the_output() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = batch()
    senders = model.sites(select("head").layers().heads())
    rows: list[int] = []
    via_output = path_patch(model, clean, corrupt, senders, "logits", counting_metric(rows),
                            progress=False)
    n = len(LENGTHS)
    assert sum(rows) == 2 * n + len(senders) * n  # unpatched runs, then one pass, no second
    for receivers in ([Site("resid_post", layer=-1)], [Site("resid_post", layer=1)],
                      [Site("logits")]):
        rows.clear()
        other = path_patch(model, clean, corrupt, senders, receivers, counting_metric(rows),
                           progress=False)
        assert torch.equal(other.values, via_output.values)
        assert sum(rows) == 2 * n + len(senders) * n


def test_senders_no_receiver_lies_after_cost_no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = batch()
    senders = model.sites(select("head").layers().heads())
    rows: list[int] = []  # batch rows of every forward
    forward = InterpModel._forward

    def spy(self, tokens, plan, **kwargs):
        rows.append(tokens.shape[0])
        return forward(self, tokens, plan, **kwargs)

    monkeypatch.setattr(InterpModel, "_forward", spy)
    result = path_patch(model, clean, corrupt, senders, [Site("k", layer=1, head=2)],
                        LogitDiff(ANSWER, WRONG), progress=False)
    late = [i for i, s in enumerate(senders) if s.layer == 1]
    assert torch.equal(result.values[:, late], result.corrupt[:, None].expand(-1, len(late)))
    # The unpatched runs, then both passes over the 4 senders of layer 0 only.
    n = len(LENGTHS)
    assert rows == [2 * n, 4 * n, 4 * n]
    rows.clear()
    path_patch(model, clean, corrupt, senders[4:], [Site("q", layer=0)], LogitDiff(ANSWER, WRONG),
               progress=False)
    assert rows == [2 * n]


def test_out_of_memory_halves_the_batch_and_keeps_going() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = batch()
    senders = model.sites(select("head").layers(0).heads()) + [Site("mlp_out", layer=0)]
    receivers = [Site("k", layer=1, head=2), Site("v", layer=1, head=0)]
    n = len(LENGTHS)
    sizes = []

    def picky(logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        sizes.append(logits.shape[0])
        if logits.shape[0] > 2 * n:
            raise torch.OutOfMemoryError("simulated")
        return logits[:, ANSWER] - logits[:, WRONG]

    result = path_patch(model, clean, corrupt, senders, receivers, picky, batch_size=8 * n,
                        progress=False)
    expected = path_patch(model, clean, corrupt, senders, receivers, LogitDiff(ANSWER, WRONG),
                          progress=False)
    torch.testing.assert_close(result.values, expected.values, rtol=1e-5, atol=1e-5)
    assert max(sizes) > 2 * n  # out of memory struck, and the sweep went on in smaller forwards


def test_overlapping_rectangles_merge_into_disjoint_ones() -> None:
    rects = [(0, 4, 0, 8), (2, 3, 0, 16), (2, 3, 4, 12), (6, 7, 0, 8)]
    merged = _disjoint(rects)
    covered = torch.zeros(8, 16, dtype=torch.int64)
    for a0, a1, f0, f1 in merged:
        covered[a0:a1, f0:f1] += 1
    expected = torch.zeros(8, 16, dtype=torch.int64)
    for a0, a1, f0, f1 in rects:
        expected[a0:a1, f0:f1] = 1
    assert torch.equal(covered, expected)  # the same union, each cell once
    assert merged == [(0, 2, 0, 8), (2, 3, 0, 16), (3, 4, 0, 8), (6, 7, 0, 8)]


def induction_pairs(model: InterpModel, *, pairs: int = 16, span: int = 8, k: int = 4):
    """``[bos] + s + s[:k + 1]`` whose answer ``s[k + 1]`` an induction head copies, and the same
    prompt with the first ``s[k]`` replaced by a token absent from the row: the token after it
    then no longer follows ``s[k]``, which the induction head's key finds through the
    previous-token head."""
    data = repeated_tokens(model, batch=pairs, span=span, seed=3)
    clean = data.tokens.input_ids[:, :data.second + k + 1]
    column = data.second - span + k
    corrupt = clean.clone()
    generator = torch.Generator().manual_seed(4)
    for row in range(pairs):
        present = set(clean[row].tolist()) | set(model.tokenizer.all_special_ids)
        absent = [t for t in range(model.dims.d_vocab) if t not in present]
        corrupt[row, column] = absent[int(torch.randint(len(absent), (1,), generator=generator))]
    return clean, corrupt, LogitDiff(clean[:, column + 1], corrupt[:, column])


def test_previous_token_head_reaches_the_induction_head_through_its_keys() -> None:
    """In the shipped model, layer-0 head 0 writes each token's predecessor into the residual
    stream, and layer-1 head 3 matches its query against that in its keys. So patching L0H0
    restores the answer almost entirely through L1H3's keys; its queries, at the last position,
    whose predecessor both prompts share, carry nothing. Measured (mean over 16 pairs, logit
    differences above the corrupted run's -4.0; the clean run's is 13.4): through the keys 16.4
    (8.2 to 30.1 per pair), through the queries 0.0, the whole effect of patching L0H0 17.4."""
    model = mechinterp.load("induction-2l")
    clean, corrupt, metric = induction_pairs(model)
    sender = [Site("head", layer=0, head=0)]
    effects = {}
    for part in ("k", "q"):
        result = path_patch(model, clean, corrupt, sender, [Site(part, layer=1, head=3)], metric,
                            progress=False)
        effects[part] = float((result.values[:, 0] - result.corrupt).mean())
    total = activation_patch(model, clean, corrupt, sender, metric, progress=False)
    effects["total"] = float((total.values[:, 0] - total.corrupt).mean())
    assert effects["total"] > 5.0  # the previous-token head matters
    assert effects["k"] > 0.5 * effects["total"]
    assert abs(effects["k"]) > 3 * abs(effects["q"])
    assert abs(effects["q"]) < 0.05 * effects["total"]


def test_bad_input_is_named() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = token_ids(2, 5, seed=1), token_ids(2, 5, seed=2)
    metric = LogitDiff(ANSWER, WRONG)
    senders = [Site("head", layer=0, head=1)]
    keys = [Site("k", layer=1, head=0)]
    with pytest.raises(ShapeError, match="same shape and padding"):
        path_patch(model, clean, corrupt[:, :-1], senders, keys, metric)
    with pytest.raises(InputError, match="senders must name at least one site"):
        path_patch(model, clean, corrupt, [], keys, metric)
    with pytest.raises(InputError, match="receivers must name at least one site"):
        path_patch(model, clean, corrupt, senders, [], metric)
    with pytest.raises(InputError, match=r"senders must be sites of .*; got q.1\[head=0\]"):
        path_patch(model, clean, corrupt, [Site("q", layer=1, head=0)], keys, metric)
    with pytest.raises(InputError, match=r"freeze must name components of \['head', 'mlp_out'\]; "
                                         r"got 'attn_out'"):
        path_patch(model, clean, corrupt, senders, keys, metric, freeze=("head", "attn_out"))
    with pytest.raises(InputError, match="freeze must be a sequence"):
        path_patch(model, clean, corrupt, senders, keys, metric, freeze=None)
    with pytest.raises(InputError, match="receivers as a string must be 'logits'"):
        path_patch(model, clean, corrupt, senders, "output", metric)
    with pytest.raises(InputError, match="the logits are the model's output"):
        path_patch(model, clean, corrupt, senders, [Site("logits"), *keys], metric)
    with pytest.raises(InputError, match="attn_out.1 sums the heads of layer 1"):
        path_patch(model, clean, corrupt, senders, [Site("attn_out", layer=1)], metric)
    with pytest.raises(SiteError, match=r"receivers: k.1\[pos=5, head=0\]: pos must lie in"):
        path_patch(model, clean, corrupt, senders, [Site("k", layer=1, head=0, pos=5)], metric)
    with pytest.raises(SiteError, match=r"head for k.1\[head=4\] must lie in \[0, 4\)"):
        path_patch(model, clean, corrupt, senders, [Site("k", layer=1, head=4)], metric)
    with pytest.raises(SiteError, match=r"layer for head.2\[head=1\] must lie in \[-2, 2\)"):
        path_patch(model, clean, corrupt, [Site("head", layer=2, head=1)], keys, metric)
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        path_patch(model, clean, corrupt, senders, keys, metric, batch_size=0)
    with pytest.raises(InputError, match="model must be an InterpModel"):
        path_patch(model._module, clean, corrupt, senders, keys, metric)
    with pytest.raises(SiteError, match=r"position must lie in \[-5, 5\)"):
        path_patch(model, clean, corrupt, senders, keys, metric, position=5)
    # Without freezing heads, attn_out is an ordinary receiver.
    result = path_patch(model, clean, corrupt, senders, [Site("attn_out", layer=1)], metric,
                        freeze=(), progress=False)
    assert result.values.shape == (2, 1)
