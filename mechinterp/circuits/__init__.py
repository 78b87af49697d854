"""Circuit discovery: the edge graph of a model, edge patching, EAP / EAP-IG / ACDC, and
faithfulness evaluation."""

from __future__ import annotations

from mechinterp.circuits.attribute import METHODS, attribute_edges, attribute_nodes
from mechinterp.circuits.evaluate import MIB_FRACTIONS, FaithfulnessCurve, faithfulness, roc_auc
from mechinterp.circuits.graph import CircuitGraph
from mechinterp.circuits.pruning import acdc
from mechinterp.circuits.result import Circuit, EdgeScores
from mechinterp.circuits.task import ABLATIONS, CircuitTask

__all__ = [
    "ABLATIONS",
    "METHODS",
    "MIB_FRACTIONS",
    "Circuit",
    "CircuitGraph",
    "CircuitTask",
    "EdgeScores",
    "FaithfulnessCurve",
    "acdc",
    "attribute_edges",
    "attribute_nodes",
    "faithfulness",
    "roc_auc",
]
