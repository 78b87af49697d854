"""Sparse autoencoders: the ``SAE`` weights with a reference forward pass, and their formats."""

from __future__ import annotations

from mechinterp.sae.encode import (
    SparseFeatures,
    decode_sparse,
    encode_sparse,
    encode_subset,
    reconstruct,
)
from mechinterp.sae.formats import load_sae, save_sae
from mechinterp.sae.interventions import SAEEdit, feature_activations
from mechinterp.sae.sae import SAE

__all__ = [
    "SAE",
    "SAEEdit",
    "SparseFeatures",
    "decode_sparse",
    "encode_sparse",
    "encode_subset",
    "feature_activations",
    "load_sae",
    "reconstruct",
    "save_sae",
]
