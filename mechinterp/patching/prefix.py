"""The corrupted run's prefix, reused by patched runs of a causal model.

In a causal model, a patched run computes exactly what the corrupted run computed at every
position before its first patched position. A forward whose runs all start at position ``s``
therefore runs only positions ``s`` on: the blocks' keys and values for the first ``s``
positions come from the corrupted run, through a transformers key/value cache, and the blocks
skipped below the first patched layer return the corrupted run's outputs from ``s`` on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mechinterp.model import InterpModel

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - transformers without the layered cache
    DynamicCache = DynamicLayer = None

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


def keys_values(cache: object, rows: int, seq_len: int) -> KeysValues | None:
    """Every layer's keys and values ``[rows, heads, pos, d_head]`` in a cache that
    :func:`keeping_rows` cut to ``rows`` rows, or None when the cache is not a plain
    full-length one (a sliding window, say), so that positions cannot be reused."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers:
        return None
    out = []
    for layer in layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4 \
                or layer.keys.shape[-2] != seq_len or layer.keys.shape[0] != rows:
            return None
        out.append((layer.keys, layer.values))
    return out


def new_cache(model: InterpModel) -> object | None:
    """An empty key/value cache laid out for ``model`` (None without transformers' layered
    cache)."""
    if DynamicCache is None:
        return None
    try:
        return DynamicCache(config=model._module.config)
    except (TypeError, AttributeError, ValueError):  # older signatures, configs without layers
        return DynamicCache()


@contextlib.contextmanager
def keeping_rows(model: InterpModel, cache: object, begin: int, end: int) -> Iterator[None]:
    """In the enclosed forward, cut every layer of ``cache`` to rows ``[begin, end)`` (the
    corrupted runs) as soon as its block has run: the forward then holds one layer's keys and
    values for all its rows at a time, not every layer's."""
    blocks = model.table.blocks.format(base=model.base)

    def trim(layer: int):
        def hook(_module, _args, _output) -> None:
            layers = getattr(cache, "layers", None)
            if layers is None or layer >= len(layers):
                return
            kept = layers[layer]
            if type(kept) is DynamicLayer and kept.keys is not None and kept.keys.dim() == 4 \
                    and kept.keys.shape[0] > end - begin:
                kept.keys = kept.keys[begin:end].clone()
                kept.values = kept.values[begin:end].clone()

        return hook

    module = model._module
    handles = [module.get_submodule(f"{blocks}.{layer}").register_forward_hook(trim(layer))
               for layer in range(model.dims.n_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefix_cache(kv: KeysValues, start: int, times: int, live_from: int) -> object:
    """A cache holding the first ``start`` positions of ``kv`` for ``times`` repeats of its rows
    (row ``c * pairs + p`` is pair ``p``), ready for the positions from ``start`` on.

    The prefix is never repeated in memory: each live layer joins its one copy of the prefix to
    the new positions when its attention asks for them, and keeps nothing, so that a forward
    holds one layer's joined keys and values at a time rather than every layer's. Layers below
    ``live_from`` are skipped by the forward (their blocks are stubbed): only their length is
    ever read.
    """
    cache = DynamicCache()
    for index, (keys, values) in enumerate(kv):
        keys, values = keys[:, :, :start], values[:, :, :start]
        layer = DynamicLayer() if index < live_from else _PrefixLayer()
        layer.lazy_initialization(keys, values)
        # Set directly rather than through update(), which would copy.
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


class _PrefixLayer(DynamicLayer if DynamicLayer is not None else object):
    """A cache layer whose ``update`` returns the shared prefix joined to the new positions
    without storing the result: a forward of a suffix reads each layer's cache once."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return _joined(self.keys, key_states), _joined(self.values, value_states)


def _joined(prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``[rows, heads, start + n, d]``: the prefix ``[pairs, heads, start, d]`` repeated over
    the rows (row ``c * pairs + p`` takes pair ``p``'s), then ``new`` ``[rows, heads, n, d]``."""
    rows, heads, length, width = new.shape
    pairs, _, start, _ = prefix.shape
    out = new.new_empty(rows, heads, start + length, width)
    out[:, :, :start].view(rows // pairs, pairs, heads, start, width).copy_(prefix)
    out[:, :, start:].copy_(new)
    return out


def from_position(output: object, start: int) -> object:
    """A block output (a tensor, or a tuple holding tensors) from position ``start`` on."""
    if isinstance(output, torch.Tensor):
        return output[:, start:] if output.dim() >= 3 else output
    if isinstance(output, tuple):
        return tuple(from_position(item, start) for item in output)
    return output


def rows_of(output: object, begin: int, end: int) -> object:
    """Rows ``[begin, end)`` of a block output (a tensor, or a tuple holding tensors), copied."""
    if isinstance(output, torch.Tensor):
        return output[begin:end].clone()
    if isinstance(output, tuple):
        return tuple(rows_of(item, begin, end) for item in output)
    return output


def repeat_rows(output: object, times: int) -> object:
    """Repeat the batch of a block output (a tensor, or a tuple holding tensors) ``times`` times."""
    if isinstance(output, torch.Tensor):
        return output.repeat(times, *([1] * (output.dim() - 1)))
    if isinstance(output, tuple):
        return tuple(repeat_rows(item, times) for item in output)
    return output


class CorruptedBlocks:
    """The corrupted run's block outputs, kept from one forward and returned by the blocks that
    later forwards skip."""

    def __init__(self, model: InterpModel):
        self.model = model
        self.blocks = model.table.blocks.format(base=model.base)
        self.outputs: dict[int, object] = {}

    @contextlib.contextmanager
    def keeping(self, begin: int, end: int) -> Iterator[None]:
        """Keep rows ``[begin, end)`` (the corrupted runs) of every block's output in the
        enclosed forward."""

        def keep(layer: int):
            def hook(_module, _args, output) -> None:
                self.outputs[layer] = rows_of(output, begin, end)

            return hook

        module = self.model._module
        handles = [module.get_submodule(f"{self.blocks}.{layer}").register_forward_hook(keep(layer))
                   for layer in range(self.model.dims.n_layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def stubs(self, first_layer: int, times: int, start: int = 0) -> dict[str, object] | None:
        """Blocks below ``first_layer`` return the corrupted run's output of block
        ``first_layer - 1`` from position ``start`` on, repeated ``times`` times: only that
        output feeds the blocks that run."""
        if first_layer <= 0:
            return None
        output = repeat_rows(from_position(self.outputs[first_layer - 1], start), times)
        return {f"{self.blocks}.{layer}": output for layer in range(first_layer)}
