"""Attribution patching: the first-order estimate of activation patching, from one backward."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, Family, build, token_ids
from test_patching import mixed_cells

import mechinterp
from mechinterp import select
from mechinterp.errors import InputError
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


def test_pairs_in_several_passes_change_nothing() -> None:
    model = InterpModel(build(FAMILIES[0]))
    clean, corrupt = token_ids(5, 6, seed=1), token_ids(5, 6, seed=2)
    cells = mixed_cells(model)
    whole = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), progress=False)
    split = attribution_patch(model, clean, corrupt, cells, LogitDiff(5, 7), batch_size=2,
                              progress=False)
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
