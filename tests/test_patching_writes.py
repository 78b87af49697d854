"""The sweep's write table (array form) against the per-site rectangles it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, build
from test_patching import mixed_cells

from mechinterp import Site, select
from mechinterp.errors import SiteError
from mechinterp.model import InterpModel, Tokens
from mechinterp.patching.metrics import LogitDiff, as_metric
from mechinterp.patching.sweep import _Sweep

GPT2 = next(f for f in FAMILIES if f.name == "gpt2")


@pytest.fixture(scope="module")
def model() -> InterpModel:
    return InterpModel(build(GPT2))


def padded_pair(length: int = 6) -> tuple[Tokens, Tokens]:
    """Two pairs, the second left-padded by two tokens, so columns differ per pair."""
    ids = torch.arange(2 * length).reshape(2, length) % 50 + 3
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :2] = 0
    corrupt = ids.clone()
    corrupt[:, -2] += 1
    return Tokens(ids, mask), Tokens(corrupt, mask)


def sweep_of(model: InterpModel, cells, parts=None) -> _Sweep:
    clean, corrupt = padded_pair()
    return _Sweep(model, clean, corrupt, cells, as_metric(LogitDiff(1, 2)), "clean", 1.0, -1, 0,
                  parts=parts)


def reference_rows(sweep: _Sweep) -> list[list[tuple[int, ...]]]:
    """Per cell, the sorted rows that the per-site rectangles give."""
    index = {group: i for i, group in enumerate(sweep.groups)}
    return [sorted((pair, index[group], int(origin != "clean"), *rect)
                   for pair, writes in enumerate(per_pair) for group, origin, rect in writes)
            for per_pair in sweep._rects()]


def table_rows(sweep: _Sweep) -> list[list[tuple[int, ...]]]:
    table = sweep.table
    return [sorted(map(tuple, table.writes[a:b].tolist()))
            for a, b in zip(table.offsets[:-1], table.offsets[1:])]


def test_every_component_and_index_kind(model):
    sweep = sweep_of(model, mixed_cells(model))
    assert table_rows(sweep) == reference_rows(sweep)


def test_compound_cells_with_frozen_parts(model):
    cells = [Site("resid_pre", layer=0, pos=1), Site("resid_pre", layer=1, pos=-1)]
    parts = [[(cells[0], "clean"), (Site("mlp_out", layer=1, pos=(0, 2)), "corrupt")],
             [(cells[1], "clean"), (Site("attn_out", layer=0), "corrupt"),
              (Site("head", layer=1, head=1, pos=2), "clean")]]
    sweep = sweep_of(model, cells, parts)
    assert table_rows(sweep) == reference_rows(sweep)


def test_grid_positions_starts_and_layers(model):
    sweep = sweep_of(model, select("head").layers().heads().positions(range(-4, 4)))
    assert table_rows(sweep) == reference_rows(sweep)
    table = sweep.table
    # First positions: the column of each cell's position in each pair.
    spans = sweep.spans
    expected = [min(spans.columns(site.pos).tolist()) for site in sweep.cells]
    assert table.starts(last_start=sweep.seq_len).tolist() == expected
    assert sweep.layer_of == [site.layer for site in sweep.cells]


def test_inert_cells_are_those_outside_the_difference(model):
    sweep = sweep_of(model, select("resid_pre").layers(0).positions(range(4)))
    table = sweep.table
    first, scored = [2, 3], [5, 5]
    inert = table.inert(first, scored).tolist()
    firsts = np.asarray([[int(c) for c in sweep.spans.columns(s.pos)] for s in sweep.cells])
    assert inert == [c for c in range(len(sweep.cells))
                     if all(firsts[c, p] < first[p] or firsts[c, p] > scored[p] for p in range(2))]


def test_positions_outside_the_prompt_are_refused(model):
    with pytest.raises(SiteError, match="pos must lie in"):
        sweep_of(model, [Site("resid_pre", layer=0, pos=5)])
    with pytest.raises(SiteError, match="pos must lie in"):
        sweep_of(model, [Site("resid_pre", layer=0, pos=(0, -5))])


def test_a_selector_layout_is_reused_for_prompts_of_the_same_shape(model):
    grid = select("resid_pre").layers().positions(range(4))
    first, again = sweep_of(model, grid), sweep_of(model, grid)
    assert again.table is first.table and again.cells == first.cells
    assert again.cells is not first.cells  # each sweep owns its list of cells
    clean, corrupt = padded_pair()
    unpadded = _Sweep(model, clean.input_ids, corrupt.input_ids, grid,
                      as_metric(LogitDiff(1, 2)), "clean", 1.0, -1, 0)
    assert unpadded.table is not first.table  # other padding, other columns
    assert table_rows(unpadded) == reference_rows(unpadded)
