"""Checks of sweeps against patches written by hand."""

from __future__ import annotations

import torch

from mechinterp import Set


def assert_cells_equal_hand_patches(model, clean, corrupt, sites, swept, *, answer: int = 3,
                                    wrong: int = 4, atol: float = 1e-12) -> None:
    """Each cell of ``swept`` (a ``LogitDiff(answer, wrong)`` sweep over ``sites``) equals the
    corrupted run with its site set to the clean run's value."""
    for cell, site in enumerate(sites):
        value = model.run(clean, cache=[site]).cache[site]
        logits = model.run(corrupt, edits=[Set(site, value)]).logits[:, -1]
        torch.testing.assert_close(swept.values[:, cell], logits[:, answer] - logits[:, wrong],
                                   rtol=0, atol=atol)
