"""From sites to rectangles: where each patched run writes, as boxes for ``_ops.patch_boxes``.

Every component's tensor is seen as ``[rows, a, f]``: ``a`` is the position axis and ``f`` the
flattened features (``head x d_head`` for per-head components), except for attention patterns
``[batch, head, query, key]``, seen as ``[rows, head, query * key]``. A site then covers a set of
rectangles in its row: one per (position, head) it names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechinterp import _ops
from mechinterp.errors import InputError
from mechinterp.interventions import TensorEdit
from mechinterp.positions import RowSpans
from mechinterp.sites import Site, base_component

if TYPE_CHECKING:
    from mechinterp.model import InterpModel, Tokens

Rect = tuple[int, int, int, int]  # a_begin, a_end, f_begin, f_end


def component_extent(dims: object, component: str, seq_len: int) -> tuple[int, int]:
    """``(a, f)`` of a component's tensor seen as ``[rows, a, f]`` in a model of ``dims``."""
    t = seq_len
    if component == "pattern":
        return dims.n_heads, t * t
    if component in ("head", "q"):
        return t, dims.n_heads * dims.d_head
    if component in ("k", "v"):
        return t, dims.n_kv_heads * dims.d_head
    if component == "neuron":
        return t, dims.d_mlp
    return t, dims.d_model


def own_token_count(model: InterpModel, tokens: Tokens, axis: str) -> int:
    """How many tokens one prompt's ``axis`` holds (see :func:`~mechinterp.sites.token_axis`):
    a tower's patches or queries, or the projector's rows. It depends on the image and the
    model, not on the prompt, so it is read once from the first prompt of ``tokens``."""
    site = Site("projector") if axis == "projector" else Site(f"{axis}.resid_post", layer=0)
    with torch.no_grad():
        value = model.run(tokens.rows(slice(0, 1)), cache=[site]).cache[site]
    if value.dim() != 3 or value.shape[0] != 1:
        name = "projector" if axis == "projector" else f"{axis} tower"
        msg = (f"sites: the {name} of this {model.family} model does not hold one row per "
               f"prompt (one prompt's tensor has shape {tuple(value.shape)}: packed patches or "
               f"image crops), so each run cannot take its own patch there; edit it with "
               f"model.run(edits=...)")
        raise InputError(msg)
    return int(value.shape[1])


def _as_list(index: int | tuple[int, ...] | None) -> list[int] | None:
    if index is None:
        return None
    return [index] if isinstance(index, int) else list(index)


def _columns(site: Site, spans: RowSpans, n_pairs: int, memo: dict | None = None
             ) -> list[list[int]] | None:
    """Sequence columns the site names in each pair's row; None for every position.

    ``memo`` keeps the answer per position across the sites of one sweep."""
    if site.pos is None:
        return None
    if memo is not None and site.pos in memo:
        return memo[site.pos]
    columns = spans.columns(site.pos)
    if isinstance(columns, int):
        result = [[columns]] * n_pairs
    else:
        result = [row.tolist() for row in columns.reshape(n_pairs, -1)]
    if memo is not None:
        memo[site.pos] = result
    return result


def site_rects(site: Site, spans: RowSpans, n_pairs: int, shape: tuple[int, int],
               n_heads: int, memo: dict | None = None) -> list[list[Rect]]:
    """Rectangles of ``site`` in each pair's row of a ``[rows, a, f]`` component tensor.

    ``n_heads`` is the number of heads the component's features hold (key/value heads for ``k``
    and ``v``); it splits ``f`` into per-head slices. ``memo`` shares position lookups.
    """
    extent_a, extent_f = shape
    columns = _columns(site, spans, n_pairs, memo)
    heads = _as_list(site.head)
    component = base_component(site.component)  # a tower's components have the same layout
    out: list[list[Rect]] = []
    for pair in range(n_pairs):
        rects: list[Rect] = []
        cols = None if columns is None else columns[pair]
        if component == "pattern":
            keys = extent_f // spans.seq_len
            head_ranges = [(0, extent_a)] if heads is None else [(h, h + 1) for h in heads]
            query_ranges = [(0, extent_f)] if cols is None else [(c * keys, (c + 1) * keys) for c in cols]
            rects = [(a0, a1, f0, f1) for a0, a1 in head_ranges for f0, f1 in query_ranges]
        else:
            pos_ranges = [(0, extent_a)] if cols is None else [(c, c + 1) for c in cols]
            if component in ("head", "q", "k", "v") and heads is not None:
                width = extent_f // n_heads
                feature_ranges = [(h * width, (h + 1) * width) for h in heads]
            elif component == "neuron" and site.neuron is not None:
                feature_ranges = [(n, n + 1) for n in _as_list(site.neuron) or []]
            else:
                feature_ranges = [(0, extent_f)]
            rects = [(a0, a1, f0, f1) for a0, a1 in pos_ranges for f0, f1 in feature_ranges]
        out.append(rects)
    return out


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``[rows, a, f]`` for reading: a view where one exists, else a copy."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def flat_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` as ``[rows, a, f]`` sharing its memory, or None when no such view exists."""
    if tensor.dim() == 3:
        return tensor
    try:
        return tensor.view(tensor.shape[0], tensor.shape[1], -1)
    except RuntimeError:
        return None


class BoxPatch(TensorEdit):
    """Write rectangles of ``src`` into the whole tensor of ``site`` (one component, one layer).

    ``boxes`` is ``[m, 6]`` int64 ``(row, source, a_begin, a_end, f_begin, f_end)`` over the
    ``[rows, a, f]`` view of the component; ``alpha`` interpolates (1 replaces). Boxes already
    staged on the device (:func:`mechinterp._ops.stage_boxes`) carry their own weights.
    """

    def __init__(self, site: Site, src: torch.Tensor, boxes: torch.Tensor | _ops.StagedBoxes,
                 alpha: float = 1.0):
        super().__init__(site)
        self.src, self.boxes, self.alpha = src, boxes, alpha

    def _detail(self) -> str:
        return f", {len(self.boxes)} boxes from source {tuple(self.src.shape)}"

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        flat = flat_view(tensor)
        target = flat if flat is not None else as_rows(tensor)
        cur = None if current is None else current.reshape(target.shape)
        if isinstance(self.boxes, _ops.StagedBoxes):
            _ops.patch_boxes(target, self.src, self.boxes, cur=cur)
        else:
            _ops.patch_boxes(target, self.src, self.boxes, alpha=self.alpha, cur=cur)
        if flat is None:  # the component had no flat view: copy the patched values back
            tensor.copy_(target.view(tensor.shape))
