"""The forward schedule of a patching sweep is the cheapest cut along layer boundaries."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from mechinterp.patching.schedule import depth, plan_chunks, split_forwards


def cost(layers, ranges, rows_per_cell, budget, n_layers, overhead, extra):
    total = 0.0
    for begin, end in ranges:
        rows = (end - begin) * rows_per_cell + (extra if begin == 0 else 0)
        forwards = math.ceil(rows / (max(1, budget // rows_per_cell) * rows_per_cell))
        total += forwards * overhead + rows * depth(layers[begin], n_layers)
    return total


@given(
    layers=st.lists(st.integers(-1, 5), min_size=1, max_size=9).map(sorted),
    rows_per_cell=st.integers(1, 3), budget=st.integers(1, 12),
    overhead=st.floats(0, 20), extra=st.integers(0, 4),
)
def test_plan_is_the_cheapest_cut(layers, rows_per_cell, budget, overhead, extra):
    n = len(layers)
    plan = plan_chunks(layers, rows_per_cell=rows_per_cell, budget=budget, n_layers=6,
                       overhead=overhead, first_extra_rows=extra)
    assert plan[0][0] == 0 and plan[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert all(layers[b - 1] != layers[b] for _, b in plan[:-1])  # cuts only between layers
    boundaries = [i for i in range(1, n) if layers[i] != layers[i - 1]]
    best = math.inf
    for k in range(len(boundaries) + 1):
        for chosen in itertools.combinations(boundaries, k):
            points = [0, *chosen, n]
            ranges = list(itertools.pairwise(points))
            best = min(best, cost(layers, ranges, rows_per_cell, budget, 6, overhead, extra))
    got = cost(layers, plan, rows_per_cell, budget, 6, overhead, extra)
    assert math.isclose(got, best, rel_tol=1e-9, abs_tol=1e-9)


def test_split_forwards_covers_the_range_in_the_fewest_forwards():
    assert split_forwards(3, 10, 3) == [(3, 6), (6, 9), (9, 10)]
    pieces = split_forwards(0, 10, 4)
    assert [b - a for a, b in pieces] == [4, 4, 2] and pieces[0][0] == 0 and pieces[-1][1] == 10
    assert split_forwards(5, 5, 2) == []
