"""The benchmarks' interleaved timing: each call comes right after every other equally often."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise, permutations

import pytest
import torch

from benchmarks._timing import balanced_orders, interleaved_medians


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_orders_balance_neighbours_and_first_places(n):
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    neighbours = Counter(pair for order in orders for pair in pairwise(order))
    if n > 1:
        assert set(neighbours) == set(permutations(range(n), 2))
        assert len(set(neighbours.values())) == 1, neighbours
    firsts = Counter(order[0] for order in orders)
    assert set(firsts) == set(range(n)) and len(set(firsts.values())) == 1


def test_interleaved_rounds_follow_the_orders():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    medians = interleaved_medians(torch.device("cpu"), fns, 10)
    assert set(medians) == set(fns) and all(t >= 0 for t in medians.values())
    assert calls[:5] == list("abcde")  # one warm-up call each, in order
    rounds = [calls[5 + 5 * r:10 + 5 * r] for r in range(10)]
    assert rounds == [["abcde"[i] for i in order] for order in balanced_orders(5)]
    # Within the rounds, each call comes right after each other one exactly twice.
    after = Counter(pair for row in rounds for pair in pairwise(row))
    assert set(after.values()) == {2} and len(after) == 20
