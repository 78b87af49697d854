"""Sparse autoencoders: the ``SAE`` weights with a reference forward pass, their formats, sparse
encoding, feature edits, training, and features streamed over a dataset to disk."""

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
from mechinterp.sae.stream import FeatureStore, stream_features
from mechinterp.sae.training import collect_activations, train_sae

__all__ = [
    "SAE",
    "FeatureStore",
    "SAEEdit",
    "SparseFeatures",
    "collect_activations",
    "decode_sparse",
    "encode_sparse",
    "encode_subset",
    "feature_activations",
    "load_sae",
    "reconstruct",
    "save_sae",
    "stream_features",
    "train_sae",
]
