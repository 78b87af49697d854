"""The forward schedule of a patching sweep is the cheapest cut along layer and position bands."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from mechinterp.patching.schedule import depth, plan_forwards, split_forwards


def programme_cost(starts, layers, bands, cuts, *, seq_len, n_layers, rows_per_cell, budget,
                   overhead, extra):
    """The cost model of plan_forwards for bands of distinct starts and layer cuts per band."""
    per_forward = max(1, budget // rows_per_cell)
    total = 0.0
    for b, (low, high) in enumerate(bands):
        cells = [c for c in range(len(starts)) if low <= starts[c] < high]
        edges = [-math.inf, *cuts[b], math.inf]
        first_range = True
        for lo, hi in itertools.pairwise(edges):
            chosen = [c for c in cells if lo <= layers[c] < hi]
            if not chosen:
                continue
            full = extra and b == 0  # the first forward runs every position and layer
            rows = len(chosen) * rows_per_cell + (extra if full and first_range else 0)
            forwards = math.ceil(rows / (per_forward * rows_per_cell))
            width = 1.0 if full else (seq_len - min(starts[c] for c in cells)) / seq_len
            layer = -1 if full and first_range else min(layers[c] for c in chosen)
            first_range = False
            total += forwards * overhead + rows * depth(layer, n_layers) * width
    return total


def brute_force(starts, layers, **kwargs):
    distinct = sorted(set(starts))
    best = math.inf
    for k in range(len(distinct)):
        for chosen in itertools.combinations(distinct[1:], k):
            edges = [distinct[0], *chosen, math.inf]
            bands = list(itertools.pairwise(edges))
            options = []
            for low, high in bands:
                band_layers = sorted({layers[c] for c in range(len(starts)) if low <= starts[c] < high})
                options.append([list(sub) for r in range(len(band_layers))
                                for sub in itertools.combinations(band_layers[1:], r)])
            for cuts in itertools.product(*options):
                best = min(best, programme_cost(starts, layers, bands, cuts, **kwargs))
    return best


def forwards_cost(starts, layers, forwards, *, seq_len, n_layers, overhead, extra, **_):
    total = 0.0
    for i, cells in enumerate(forwards):
        if i == 0 and extra:  # the first forward runs every position and layer
            total += overhead + (len(cells) + extra) * depth(-1, n_layers)
            continue
        width = (seq_len - min(starts[c] for c in cells)) / seq_len
        total += overhead + len(cells) * depth(min(layers[c] for c in cells), n_layers) * width
    return total


@settings(max_examples=60, deadline=None)
@given(
    cells=st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 3)), min_size=1, max_size=8),
    budget=st.integers(1, 9), overhead=st.floats(0, 12), extra=st.integers(0, 3),
)
def test_plan_is_no_dearer_than_the_cheapest_cut(cells, budget, overhead, extra):
    starts, layers = [s for s, _ in cells], [layer for _, layer in cells]
    kwargs = {"seq_len": 5, "n_layers": 4, "rows_per_cell": 1, "budget": budget,
              "overhead": overhead, "extra": extra}
    forwards = plan_forwards(starts, layers, seq_len=5, n_layers=4, rows_per_cell=1,
                             budget=budget, overhead=overhead, first_extra_rows=extra)
    assert sorted(c for f in forwards for c in f) == list(range(len(cells)))
    assert all(0 < len(f) <= max(1, budget) for f in forwards[1 if extra else 0:])
    assert not extra or len(forwards[0]) + extra <= max(budget, extra + 1)
    best = brute_force(starts, layers, **kwargs)
    assert forwards_cost(starts, layers, forwards, **kwargs) <= best + 1e-9


def test_later_starts_get_their_own_forward_when_it_pays():
    starts, layers = [0] * 4 + [30] * 4, [0] * 8
    cheap = plan_forwards(starts, layers, seq_len=32, n_layers=4, rows_per_cell=2, budget=64,
                          overhead=1.0)
    assert sorted(map(sorted, cheap)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    dear = plan_forwards(starts, layers, seq_len=32, n_layers=4, rows_per_cell=2, budget=64,
                         overhead=100.0)
    assert len(dear) == 1


def test_split_forwards_covers_the_range_in_the_fewest_forwards():
    assert split_forwards(3, 10, 3) == [(3, 6), (6, 9), (9, 10)]
    pieces = split_forwards(0, 10, 4)
    assert [b - a for a, b in pieces] == [4, 4, 2] and pieces[0][0] == 0 and pieces[-1][1] == 10
    assert split_forwards(5, 5, 2) == []
