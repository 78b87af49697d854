"""What each image token of a multimodal prompt shows: its image, crop, grid cell and projector
row, so that positions can be chosen by what they cover (:meth:`InterpModel.image_tokens`).

A family that knows how its image features fill the image tokens gives a ``TokenLayout``
(``SiteTable.image_layout``): for each image token of one prompt, in order, its image, crop,
row, column and feature. The families differ:

- LLaVA: one view per image; token ``i`` is patch ``(i // w, i % w)`` of the tower's grid
  (after the class token when the model keeps it: that token has row and column -1).
- LLaVA-NeXT: the base crop (the whole image, downscaled) first, in its own grid, then the
  high-resolution crops side by side, row by row, with the grid's padding dropped and a newline
  token closing each row (crop -1, feature -1, its column one past the row's last).
- Qwen2-VL: each image's grid of merged patches, ``(height, width) / spatial_merge_size``.
- BLIP-2: the Q-Former's queries, which are not patches (row and column -1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mechinterp.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from mechinterp.model import Tokens


@dataclass(frozen=True)
class TokenLayout:
    """Per image token of one prompt, in sequence order (see the module docstring)."""

    image: list[int]
    crop: list[int]
    row: list[int]
    col: list[int]
    feature: list[int]


#: (the model's module, one prompt's tokens) -> its image tokens' layout.
LayoutOf = Callable[["nn.Module", "Tokens"], TokenLayout]


def _as_range(value: int | range | tuple[int, ...] | None, name: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, range, tuple, list)):
        msg = f"{name} must be an int, a range or a tuple of ints; got {type(value).__name__}"
        raise InputError(msg)
    return frozenset([value] if isinstance(value, int) else value)


@dataclass(frozen=True)
class ImageTokens:
    """The image tokens of a prompt and what each one shows.

    Attributes:
        positions: each image token's position, counted from the prompt's first real token
            (as :meth:`InterpModel.image_positions` gives them).
        image: which image of the prompt it belongs to (0 for the first).
        crop: 0 for the image's base view (the only one outside LLaVA-NeXT), ``c >= 1`` for
            LLaVA-NeXT's ``c``-th high-resolution crop, -1 for a newline token.
        row, col: its cell in the view's grid: the tower's patch grid for the base view,
            the whole high-resolution grid (crops side by side, padding dropped) for crops;
            -1 for tokens that are not patches (class token, Q-Former queries).
        feature: the ``projector`` row that fills it, counted over the prompt's projector rows
            (crop after crop for LLaVA-NeXT); -1 for newline tokens, which no row fills.

    Examples:
        >>> import mechinterp
        >>> from mechinterp.zoo import shapes
        >>> from mechinterp.zoo.train_toy_vlm import vlm_inputs
        >>> model = mechinterp.load("toy-vlm")
        >>> images = shapes.render_batch([(shapes.Shape("square", "red", cell=0),)])
        >>> tokens = model.image_tokens(vlm_inputs(model.tokenizer, images, ["what colour is the square ?"]))
        >>> tokens.grid, len(tokens.positions)
        ((4, 4), 16)
        >>> top_left = tokens.at(rows=range(2), cols=range(2))  # the patches of cell 0
        >>> [tokens.positions.index(p) for p in top_left]
        [0, 1, 4, 5]
    """

    positions: tuple[int, ...]
    image: tuple[int, ...]
    crop: tuple[int, ...]
    row: tuple[int, ...]
    col: tuple[int, ...]
    feature: tuple[int, ...]

    def at(self, *, rows: int | range | tuple[int, ...] | None = None,
           cols: int | range | tuple[int, ...] | None = None, crop: int | None = 0,
           image: int | None = 0) -> tuple[int, ...]:
        """Positions of the tokens of ``image``'s view ``crop`` (0: the base view; ``None``:
        the high-resolution crops together, whose rows and columns span all of them) in
        ``rows`` x ``cols`` of its grid (all of them when None)."""
        wanted_rows, wanted_cols = _as_range(rows, "rows"), _as_range(cols, "cols")
        return tuple(
            p for p, i, c, r, k in zip(self.positions, self.image, self.crop, self.row, self.col,
                                       strict=True)
            if (image is None or i == image)
            and (c == crop if crop is not None else c >= 1)
            and (wanted_rows is None or r in wanted_rows)
            and (wanted_cols is None or k in wanted_cols))

    @property
    def newlines(self) -> tuple[int, ...]:
        """Positions of LLaVA-NeXT's row-closing newline tokens (none elsewhere)."""
        return tuple(p for p, c in zip(self.positions, self.crop, strict=True) if c == -1)

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the first image's base view."""
        rows = [r for i, c, r in zip(self.image, self.crop, self.row, strict=True) if i == 0 and c == 0]
        cols = [k for i, c, k in zip(self.image, self.crop, self.col, strict=True) if i == 0 and c == 0]
        return (max(rows, default=-1) + 1, max(cols, default=-1) + 1)
