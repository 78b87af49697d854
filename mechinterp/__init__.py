"""mechinterp: causal interventions, attributions and circuits for PyTorch models.

Importing the package changes no global state: nnsight and transformers, which install hooks of
their own on import, are imported the first time a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechinterp.build import build_info
from mechinterp.errors import (
    BuildError,
    DeviceError,
    DTypeError,
    InputError,
    MechinterpError,
    ShapeError,
    SiteError,
    UnsupportedModelError,
)
from mechinterp.interventions import Add, Intervention, Scale, Set, Zero
from mechinterp.sites import COMPONENT_AXES, Site, SiteSelector, select

if TYPE_CHECKING:
    from mechinterp.loading import load
    from mechinterp.model import ActivationCache, InterpModel, RunResult, Tokens

__version__ = "0.1.0"

_LAZY = {
    "load": "mechinterp.loading",
    "InterpModel": "mechinterp.model",
    "ActivationCache": "mechinterp.model",
    "RunResult": "mechinterp.model",
    "Tokens": "mechinterp.model",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'mechinterp' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "COMPONENT_AXES",
    "ActivationCache",
    "Add",
    "BuildError",
    "DTypeError",
    "DeviceError",
    "InputError",
    "InterpModel",
    "Intervention",
    "MechinterpError",
    "RunResult",
    "Scale",
    "Set",
    "ShapeError",
    "Site",
    "SiteError",
    "SiteSelector",
    "Tokens",
    "UnsupportedModelError",
    "Zero",
    "build_info",
    "load",
    "select",
]
