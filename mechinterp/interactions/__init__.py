"""Harsanyi interactions and Shapley values: exact transforms, estimators and model games."""

from __future__ import annotations

from mechinterp.interactions.subsets import (
    count_up_to,
    mask_of,
    subset_masks,
    subset_of,
    subsets_up_to,
)

__all__ = ["count_up_to", "mask_of", "subset_masks", "subset_of", "subsets_up_to"]
