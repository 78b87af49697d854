"""The errors mechinterp raises.

Every error derives from :class:`MechinterpError`, and each is also the builtin that callers
already catch (``ValueError``, ``LookupError``, ``RuntimeError``). Messages name the argument,
what was expected and what was received.
"""

from __future__ import annotations


class MechinterpError(Exception):
    """Base class of every error raised by mechinterp."""


class SiteError(MechinterpError, LookupError):
    """A site names a component, layer, head, position or neuron the model does not have."""


class ShapeError(MechinterpError, ValueError):
    """A tensor has the wrong shape for where it is used."""


class DTypeError(MechinterpError, ValueError):
    """A tensor has a dtype the operation does not accept."""


class DeviceError(MechinterpError, ValueError):
    """A tensor is on a device the operation cannot use."""


class UnsupportedModelError(MechinterpError, ValueError):
    """The model's architecture has no site table."""


class InputError(MechinterpError, ValueError):
    """An argument has a value outside what the function accepts."""


class BuildError(MechinterpError, RuntimeError):
    """The compiled core lacks what the call needs (for example CUDA kernels)."""
