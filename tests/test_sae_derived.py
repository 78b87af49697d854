"""Values derived from SAE parameters follow every change that can be seen, and forget() the
ones that cannot."""

import gc

import pytest
import torch

from mechinterp.errors import InputError
from mechinterp.sae.derived import derived, forget


def counting(fn):
    calls = []

    def make():
        calls.append(1)
        return fn()

    return make, calls


def test_kept_while_the_sources_stand():
    t, u = torch.ones(3), torch.zeros(3)
    make, calls = counting(lambda: (t + u).sum().item())
    assert [derived("sum", (t, u), make) for _ in range(3)] == [3.0] * 3
    assert len(calls) == 1


def test_follows_in_place_changes_and_new_memory():
    t = torch.ones(3)
    make, calls = counting(lambda: t.sum().item())
    assert derived("sum", (t,), make) == 3.0
    t.mul_(2)  # in place: the version moves
    assert derived("sum", (t,), make) == 6.0
    t.data = torch.zeros(3)  # other memory, the same version
    assert derived("sum", (t,), make) == 0.0
    assert len(calls) == 3


def test_forget_drops_what_any_source_derived():
    t, u = torch.ones(3), torch.ones(3)
    make, calls = counting(lambda: (t * u).sum().item())
    other, other_calls = counting(lambda: 7)
    assert derived("dot", (t, u), make) == 3.0
    assert derived("seven", (t,), other) == 7
    u.data.fill_(2)  # through .data: unseen
    assert derived("dot", (t, u), make) == 3.0
    forget(u)  # u is the second source of "dot", no source of "seven"
    assert derived("dot", (t, u), make) == 6.0
    assert derived("seven", (t,), other) == 7
    assert len(calls) == 2 and len(other_calls) == 1


def test_forget_names_bad_input():
    with pytest.raises(InputError, match="forget takes tensors; got list"):
        forget([torch.ones(1)])


def test_values_go_with_their_first_source():
    t = torch.ones(3)
    derived("sum", (t,), lambda: 1)
    from mechinterp.sae import derived as module

    key = id(t)
    assert key in module._KEPT
    del t
    gc.collect()
    assert key not in module._KEPT
