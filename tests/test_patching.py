"""activation_patch against a one-forward-per-cell loop, on every family."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, Family, build, token_ids

import mechinterp
from mechinterp import Set, Site, select
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.model import InterpModel
from mechinterp.patching import KL, LogitDiff, LogProb, PatchingResult, Prob, activation_patch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PAIRS, LENGTH = 3, 6
ANSWER, WRONG = 5, 7


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES], scope="module")
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def model(family: Family) -> InterpModel:
    return InterpModel(build(family))


def mixed_cells(model: InterpModel) -> list[Site]:
    """One cell of every patchable component, with single and tuple indices and whole axes."""
    cells = [
        Site("embed", pos=1),
        Site("resid_pre", layer=0, pos=0),
        Site("resid_pre", layer=1, pos=-1),
        Site("resid_mid", layer=1, pos=2),
        Site("resid_post", layer=0, pos=(1, 3)),
        Site("attn_out", layer=1),
        Site("mlp_out", layer=0, pos=-1),
        Site("head", layer=1, head=2, pos=-1),
        Site("head", layer=0, head=(0, 3)),
        Site("q", layer=1, head=1, pos=3),
        Site("k", layer=0, head=1),
        Site("v", layer=1, head=0, pos=-2),
        Site("neuron", layer=0, neuron=(3, 7), pos=-1),
        Site("pattern", layer=1, head=2, pos=-1),
        Site("pattern", layer=0, head=(1, 2)),
    ]
    return [s for s in cells if s.component in model.table.places]


def final_logits(model: InterpModel, ids: torch.Tensor, edits=()) -> torch.Tensor:
    return model.run(ids, edits=edits).logits[:, -1]


def loop_reference(model, clean, corrupt, cells, score, *, value_of=None, alpha=1.0):
    """One forward per (cell, pair), patched with Set through the site engine."""
    out = torch.empty(clean.shape[0], len(cells))
    for c, site in enumerate(cells):
        for p in range(clean.shape[0]):
            value = (value_of(site, p) if value_of is not None
                     else model.cache(clean[p:p + 1], [site])[site])
            if alpha != 1.0:
                here = model.cache(corrupt[p:p + 1], [site])[site]
                value = here + alpha * (value - here)
            logits = final_logits(model, corrupt[p:p + 1], [Set(site, value)])
            out[p, c] = score(logits, p)
    return out


def logit_diff(logits: torch.Tensor, _pair: int) -> float:
    return float(logits[0, ANSWER] - logits[0, WRONG])


def pair_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return token_ids(PAIRS, LENGTH, seed=11), token_ids(PAIRS, LENGTH, seed=12)


def test_sweep_equals_one_forward_per_cell(model: InterpModel) -> None:
    clean, corrupt = pair_prompts()
    cells = mixed_cells(model)
    result = activation_patch(model, clean, corrupt, cells, LogitDiff(ANSWER, WRONG),
                              batch_size=7, progress=False)
    expected = loop_reference(model, clean, corrupt, cells, logit_diff)
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-4)
    clean_logits, corrupt_logits = final_logits(model, clean), final_logits(model, corrupt)
    torch.testing.assert_close(result.clean, clean_logits[:, ANSWER] - clean_logits[:, WRONG])
    torch.testing.assert_close(result.corrupt, corrupt_logits[:, ANSWER] - corrupt_logits[:, WRONG])


def test_reuse_and_batching_change_no_result(model: InterpModel, family: Family,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipping blocks below the first patched layer and, in causal models, positions before
    the first patched one gives the results of full forwards, on padded pairs, for every
    component (patterns, keys and values included)."""
    clean, corrupt = pair_prompts()
    cells = model.sites(select("resid_pre", "head").layers().positions(0, -1).heads(1))
    cells += mixed_cells(model)
    metric = LogitDiff(ANSWER, WRONG)
    base = activation_patch(model, clean, corrupt, cells, metric, reuse=False, batch_size=3,
                            progress=False)
    starts: list[int] = []
    forward = InterpModel._forward

    def spy(self, tokens, plan, **kwargs):
        starts.append(kwargs.get("start", 0))
        return forward(self, tokens, plan, **kwargs)

    monkeypatch.setattr(InterpModel, "_forward", spy)
    for reuse, batch_size in [(True, 3), (True, 64), (True, 1), (False, 64)]:
        other = activation_patch(model, clean, corrupt, cells, metric, reuse=reuse,
                                 batch_size=batch_size, progress=False)
        torch.testing.assert_close(other.values, base.values, rtol=1e-5, atol=1e-5)
    # Mistral's cache keeps a sliding window, which mechinterp does not extend: full positions.
    assert any(starts) == (model.table.causal and family.name != "mistral")


def test_sources_and_interpolation(model: InterpModel) -> None:
    clean, corrupt = pair_prompts()
    cells = [s for s in mixed_cells(model) if s.component in ("resid_mid", "head", "attn_out", "neuron")]
    metric = LogitDiff(ANSWER, WRONG)
    half = activation_patch(model, clean, corrupt, cells, metric, alpha=0.5, progress=False)
    torch.testing.assert_close(
        half.values, loop_reference(model, clean, corrupt, cells, logit_diff, alpha=0.5),
        rtol=1e-4, atol=1e-4)

    mean = activation_patch(model, clean, corrupt, cells, metric, source="mean", progress=False)
    expected = loop_reference(model, clean, corrupt, cells, logit_diff,
                              value_of=lambda site, _p: model.cache(clean, [site])[site].mean(0, keepdim=True))
    torch.testing.assert_close(mean.values, expected, rtol=1e-4, atol=1e-4)

    resampled = activation_patch(model, clean, corrupt, cells, metric, source="resample", seed=3,
                                 progress=False)
    # Each pair takes some other pair's clean value: match it against every candidate.
    by_source = {q: loop_reference(model, clean, corrupt, cells, logit_diff,
                                   value_of=lambda site, _p, q=q: model.cache(clean[q:q + 1], [site])[site])
                 for q in range(PAIRS)}
    for p in range(PAIRS):
        matches = [q for q in range(PAIRS)
                   if torch.allclose(resampled.values[p], by_source[q][p], rtol=1e-4, atol=1e-4)]
        assert matches and p not in matches, (p, matches)
    again = activation_patch(model, clean, corrupt, cells, metric, source="resample", seed=3,
                             progress=False)
    assert torch.equal(again.values, resampled.values)


def test_metrics_match_their_definitions() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = pair_prompts()
    cells = [Site("resid_pre", layer=1, pos=-1), Site("attn_out", layer=0)]
    patched = {c: torch.stack([final_logits(model, corrupt[p:p + 1], [
        Set(c, model.cache(clean[p:p + 1], [c])[c])])[0] for p in range(PAIRS)]) for c in cells}
    clean_logits = final_logits(model, clean)
    checks = {
        LogProb(ANSWER): lambda z: z.log_softmax(-1)[:, ANSWER],
        Prob([ANSWER, WRONG, 3]): lambda z: z.softmax(-1)[torch.arange(PAIRS), torch.tensor([ANSWER, WRONG, 3])],
        KL(): lambda z: torch.nn.functional.kl_div(z.log_softmax(-1), clean_logits.log_softmax(-1),
                                                  log_target=True, reduction="none").sum(-1),
    }
    for metric, definition in checks.items():
        result = activation_patch(model, clean, corrupt, cells, metric, progress=False)
        expected = torch.stack([definition(patched[c]) for c in cells], dim=1)
        torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
    custom = activation_patch(model, clean, corrupt, cells,
                              lambda logits, pairs: logits[:, ANSWER] * (pairs + 1), progress=False)
    expected = torch.stack([patched[c][:, ANSWER] * torch.arange(1, PAIRS + 1) for c in cells], dim=1)
    torch.testing.assert_close(custom.values, expected, rtol=1e-4, atol=1e-5)


def test_left_padding_and_relative_positions() -> None:
    model = InterpModel(build(FAMILIES[0]))
    short, long = token_ids(1, 4, seed=5)[0].tolist(), token_ids(1, 6, seed=6)[0].tolist()
    short_c, long_c = token_ids(1, 4, seed=7)[0].tolist(), token_ids(1, 6, seed=8)[0].tolist()

    def padded(rows):
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return mechinterp.Tokens(ids, mask)

    cells = model.sites(select("resid_pre", "head").layers(1).positions(0, -1, -2).heads(3))
    result = activation_patch(model, padded([short, long]), padded([short_c, long_c]), cells,
                              LogitDiff(ANSWER, WRONG), progress=False)
    for p, (c_ids, k_ids) in enumerate([(short, short_c), (long, long_c)]):
        alone = activation_patch(model, torch.tensor([c_ids]), torch.tensor([k_ids]), cells,
                                 LogitDiff(ANSWER, WRONG), progress=False)
        torch.testing.assert_close(result.values[p], alone.values[0], rtol=1e-4, atol=1e-4)


def test_grid_records_plot_and_file_round_trip(tmp_path) -> None:
    model = mechinterp.load("induction-2l")
    prompt = "fuba bu mabi fafi fuba bu mabi"
    result = activation_patch(model, prompt, prompt.replace("fafi", "bu"),
                              select("head").layers().heads().positions(-1, -2),
                              LogitDiff("fafi", "bu"), progress=False)
    values, axes, labels = result.grid()
    assert axes == ("layer", "pos", "head") and values.shape == (2, 2, 4)  # as TransformerLens
    assert labels["pos"] == [-1, -2]
    assert torch.equal(values.reshape(-1), result.mean())
    records = result.to_records()
    assert len(records) == 16 and records[0]["site"] == "head.0[pos=-1, head=0]"
    assert result.plot().axes
    path = tmp_path / "sweep.safetensors"
    result.save(path)
    loaded = PatchingResult.load(path)
    assert loaded.sites == result.sites and torch.equal(loaded.values, result.values)
    assert loaded.metric == result.metric == "LogitDiff(answer='fafi', wrong='bu')"
    mixed = PatchingResult([Site("embed"), Site("resid_pre", layer=0)], result.values[:, :2],
                           result.clean, result.corrupt, "m")
    assert mixed.grid()[1] == ("site",)


def test_resume_after_interruption_computes_only_what_is_missing(tmp_path) -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = pair_prompts()
    cells = model.sites(select("resid_pre", "mlp_out").layers().positions(), n_positions=LENGTH)
    calls = {"runs": 0, "fail_after": 3}

    def counting(logits, pairs):
        calls["runs"] += logits.shape[0]
        if calls["fail_after"] is not None and calls["runs"] > 2 * PAIRS + 3 * 4 * PAIRS:
            raise KeyboardInterrupt
        return logits[:, ANSWER] - logits[:, WRONG]

    path = tmp_path / "resume.safetensors"
    with pytest.raises(KeyboardInterrupt):
        activation_patch(model, clean, corrupt, cells, counting, batch_size=4 * PAIRS,
                         results=path, progress=False)
    partial = PatchingResult.load(path)
    finished = int(partial.done.sum())
    assert 0 < finished < len(cells)
    calls.update(runs=0, fail_after=None)
    resumed = activation_patch(model, clean, corrupt, cells, counting, batch_size=4 * PAIRS,
                               results=path, progress=False)
    assert calls["runs"] == 2 * PAIRS + (len(cells) - finished) * PAIRS  # clean + corrupt + rest
    full = activation_patch(model, clean, corrupt, cells, counting, progress=False)
    torch.testing.assert_close(resumed.values, full.values, rtol=1e-5, atol=1e-5)
    assert bool(resumed.done.all())
    with pytest.raises(InputError, match="holds a different sweep"):
        activation_patch(model, clean, corrupt, cells[:3], counting, results=path, progress=False)


def test_out_of_memory_halves_the_batch_and_keeps_going() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = pair_prompts()
    cells = model.sites(select("attn_out").layers().positions(), n_positions=LENGTH)
    sizes = []

    def picky(logits, pairs):
        sizes.append(logits.shape[0])
        if logits.shape[0] > 3 * PAIRS:  # the first forward scores its 2 x PAIRS unpatched rows too
            raise torch.OutOfMemoryError("simulated")
        return logits[:, ANSWER] - logits[:, WRONG]

    result = activation_patch(model, clean, corrupt, cells, picky, batch_size=8 * PAIRS, progress=False)
    reference = activation_patch(model, clean, corrupt, cells, LogitDiff(ANSWER, WRONG), progress=False)
    torch.testing.assert_close(result.values, reference.values, rtol=1e-5, atol=1e-5)
    assert max(sizes) > 3 * PAIRS  # out of memory struck, and the sweep went on in smaller forwards


def test_bad_input_is_named() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = pair_prompts()
    metric = LogitDiff(ANSWER, WRONG)
    cells = [Site("resid_pre", layer=0, pos=0)]
    with pytest.raises(ShapeError, match="same shape and padding"):
        activation_patch(model, clean, corrupt[:, :-1], cells, metric)
    with pytest.raises(SiteError, match=r"pos must lie in \[-6, 6\)"):
        activation_patch(model, clean, corrupt, [Site("resid_pre", layer=0, pos=9)], metric)
    with pytest.raises(SiteError, match=r"layer for .* must lie in \[-2, 2\)"):
        activation_patch(model, clean, corrupt, [Site("resid_pre", layer=5)], metric)
    with pytest.raises(InputError, match="at least one site"):
        activation_patch(model, clean, corrupt, [], metric)
    with pytest.raises(InputError, match="'logits' cannot be patched"):
        activation_patch(model, clean, corrupt, [Site("logits")], metric)
    with pytest.raises(ShapeError, match=r"must return a tensor \[rows\] = \[\d+\]"):
        activation_patch(model, clean, corrupt, cells, lambda logits, pairs: logits, progress=False)
    with pytest.raises(InputError, match="source must be one of"):
        activation_patch(model, clean, corrupt, cells, metric, source="zero")
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        activation_patch(model, clean, corrupt, cells, metric, batch_size=0)
    with pytest.raises(ShapeError, match=r"answer must be one token or one per prompt pair \(3\); got 2"):
        activation_patch(model, clean, corrupt, cells, LogitDiff([1, 2], WRONG))
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 61\)"):
        activation_patch(model, clean, corrupt, cells, LogitDiff(99, WRONG))
    with pytest.raises(InputError, match="metric must be a Metric"):
        activation_patch(model, clean, corrupt, cells, "logit_diff")
    with pytest.raises(SiteError, match=r"position must lie in \[-6, 6\)"):
        activation_patch(model, clean, corrupt, cells, metric, position=6)
    induction = mechinterp.load("induction-2l")
    with pytest.raises(InputError, match="must be a single token"):
        activation_patch(induction, "fuba bu", "mabi bu", cells, LogProb("fuba bu"))


def test_cells_before_the_first_difference_are_not_computed() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = pair_prompts()
    corrupt[:, :3] = clean[:, :3]  # a shared prefix: positions 0-2 are equal in both runs
    corrupt[1, 3] = clean[1, 3]  # pair 1 agrees one position longer
    cells = model.sites(select("resid_pre", "pattern").layers().positions(), n_positions=LENGTH)
    rows = []

    def counting(logits, pairs):
        rows.append(logits.shape[0])
        return logits[:, ANSWER] - logits[:, WRONG]

    result = activation_patch(model, clean, corrupt, cells, counting, progress=False)
    expected = loop_reference(model, clean, corrupt, cells, logit_diff)
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-4)
    inert = [i for i, s in enumerate(cells) if s.pos < 3]
    assert torch.equal(result.values[:, inert], result.corrupt[:, None].expand(PAIRS, len(inert)))
    assert sum(rows) == 2 * PAIRS + (len(cells) - len(inert)) * PAIRS  # inert cells never ran
    # Mean ablation writes values that differ from the corrupted run's: nothing is skipped.
    rows.clear()
    activation_patch(model, clean, corrupt, cells, counting, source="mean", progress=False)
    assert sum(rows) == 2 * PAIRS + len(cells) * PAIRS
