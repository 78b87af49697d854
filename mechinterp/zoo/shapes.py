"""Synthetic images of coloured shapes, for the toy models of the zoo.

An image is a ``GRID x GRID`` grid of square cells (2 x 2 by default, 16 x 16 pixels each at
the default 32 x 32 size) on a black background. A scene puts a few shapes in distinct cells,
each shape inside its own cell (a small jitter moves it around the cell's centre but never out
of it), so a vision model that cuts the image into patches of half a cell sees every shape on
exactly the four patches of its cell. Shapes and colours in a scene are distinct, so "the
square" and "the red shape" each name one object.

Colours are the corners of the RGB cube other than black, drawn without anti-aliasing, so every
pixel is either background or exactly one palette colour; :func:`pixel_colours` classifies
pixels by the nearest palette colour, which also works on noisy images (a generative model's
output).

Everything random takes a ``torch.Generator``: the same seed gives the same scenes and images.

Examples:
    >>> import torch
    >>> from mechinterp.zoo.shapes import Shape, region_colour, render, sample_scene
    >>> image = render((Shape("square", "red", cell=0), Shape("circle", "blue", cell=3)))
    >>> image.shape, image.dtype
    (torch.Size([3, 32, 32]), torch.uint8)
    >>> region_colour(image, 0), region_colour(image, 3), region_colour(image, 1)
    ('red', 'blue', None)
    >>> scene = sample_scene(torch.Generator().manual_seed(0))
    >>> scene == sample_scene(torch.Generator().manual_seed(0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

# Shape kinds, in vocabulary order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Colour name -> RGB, in vocabulary order: the corners of the RGB cube except black.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

BACKGROUND: tuple[int, int, int] = (0, 0, 0)
_COLOUR_PLANES = {
    name: torch.tensor(rgb, dtype=torch.uint8)[:, None, None] for name, rgb in COLOURS.items()
}
IMAGE_SIZE = 32  # default side in pixels
GRID = 2  # cells per side
N_CELLS = GRID * GRID

# Geometry in units of the cell side, so that it does not depend on the image size. A shape's
# bounding box is 2 * HALF_EXTENT wide; its centre is the cell centre moved by up to
# MAX_JITTER in each direction, which keeps the box inside the cell with a margin and the
# shape over both halves of the cell in each direction.
HALF_EXTENT = 5.5 / 16
MAX_JITTER = 1 / 16
JITTER_STEPS = 3  # jitter is drawn from JITTER_STEPS evenly spaced offsets in [-MAX, MAX]


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: its kind, colour, cell and jitter.

    ``cell`` counts row-major over the grid (``cell = row * GRID + col``); ``dx`` and ``dy``
    move the centre right and down, in units of the cell side, each within
    ``[-MAX_JITTER, MAX_JITTER]``.
    """

    kind: str
    colour: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            msg = f"Shape kind must be one of {SHAPES}, got {self.kind!r}"
            raise ValueError(msg)
        if self.colour not in COLOURS:
            msg = f"Shape colour must be one of {COLOUR_NAMES}, got {self.colour!r}"
            raise ValueError(msg)
        if not 0 <= self.cell < N_CELLS:
            msg = f"Shape cell must be in [0, {N_CELLS}), got {self.cell}"
            raise ValueError(msg)
        if max(abs(self.dx), abs(self.dy)) > MAX_JITTER + 1e-9:
            msg = f"Shape jitter (dx, dy) must be within ±{MAX_JITTER}, got ({self.dx}, {self.dy})"
            raise ValueError(msg)


# A scene is a tuple of shapes in distinct cells (and, when sampled, of distinct kinds and
# colours); tuples keep scenes hashable and comparable.
Scene = tuple[Shape, ...]


# ----------------------------------------------------------------------------------------------
# Sampling and editing scenes


def sample_scene(
    generator: torch.Generator,
    *,
    n_shapes: tuple[int, int] = (2, 3),
    kinds: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOUR_NAMES,
    jitter: bool = True,
) -> Scene:
    """A random scene: ``n`` shapes with distinct kinds, colours and cells.

    ``n`` is uniform in the inclusive range ``n_shapes``; kinds, colours and cells are drawn
    without replacement, uniformly; with ``jitter`` each centre moves by one of
    ``JITTER_STEPS`` offsets per axis. Shapes are listed in the order drawn (not by cell).
    """
    low, high = n_shapes
    if not 1 <= low <= high <= min(N_CELLS, len(kinds), len(colours)):
        msg = (
            f"n_shapes must satisfy 1 <= low <= high <= {min(N_CELLS, len(kinds), len(colours))}"
            f" (cells, kinds and colours available), got {n_shapes}"
        )
        raise ValueError(msg)
    n = int(torch.randint(low, high + 1, (), generator=generator))
    kind_idx = torch.randperm(len(kinds), generator=generator)[:n].tolist()
    colour_idx = torch.randperm(len(colours), generator=generator)[:n].tolist()
    cells = torch.randperm(N_CELLS, generator=generator)[:n].tolist()
    offsets = torch.randint(0, JITTER_STEPS, (n, 2), generator=generator)
    if not jitter:
        offsets.fill_((JITTER_STEPS - 1) // 2)
    steps = torch.linspace(-MAX_JITTER, MAX_JITTER, JITTER_STEPS).tolist()
    return tuple(
        Shape(kinds[k], colours[c], cell, dx=steps[ox], dy=steps[oy])
        for k, c, cell, (ox, oy) in zip(kind_idx, colour_idx, cells, offsets.tolist())
    )


def find_shape(scene: Scene, *, kind: str | None = None, colour: str | None = None) -> Shape:
    """The one shape of ``scene`` with the given kind and/or colour; ``LookupError`` if not one."""
    found = [
        s
        for s in scene
        if (kind is None or s.kind == kind) and (colour is None or s.colour == colour)
    ]
    if len(found) != 1:
        msg = (
            f"expected one shape with kind={kind!r}, colour={colour!r} in {scene}, got {len(found)}"
        )
        raise LookupError(msg)
    return found[0]


def recolour(scene: Scene, kind: str, colour: str) -> Scene:
    """``scene`` with the shape of kind ``kind`` painted ``colour`` (everything else unchanged)."""
    target = find_shape(scene, kind=kind)
    return tuple(replace(s, colour=colour) if s is target else s for s in scene)


def reshape(scene: Scene, colour: str, kind: str) -> Scene:
    """``scene`` with the shape of colour ``colour`` turned into a ``kind`` (same cell, jitter)."""
    target = find_shape(scene, colour=colour)
    return tuple(replace(s, kind=kind) if s is target else s for s in scene)


def unused_colours(scene: Scene) -> tuple[str, ...]:
    """The palette colours that no shape of ``scene`` has, in palette order."""
    used = {s.colour for s in scene}
    return tuple(c for c in COLOUR_NAMES if c not in used)


def unused_kinds(scene: Scene) -> tuple[str, ...]:
    """The shape kinds that no shape of ``scene`` has, in vocabulary order."""
    used = {s.kind for s in scene}
    return tuple(k for k in SHAPES if k not in used)


# ----------------------------------------------------------------------------------------------
# Rendering


def _check_size(size: int) -> None:
    if size < GRID or size % GRID:
        msg = f"size must be a positive multiple of GRID={GRID}, got {size}"
        raise ValueError(msg)


@lru_cache(maxsize=4096)
def shape_mask(kind: str, cell: int, dx: float, dy: float, size: int) -> torch.Tensor:
    """Boolean ``[size, size]`` mask of the pixels that a shape covers (cached; do not modify).

    A pixel is covered when its centre lies inside the shape, so edges are hard.
    """
    _check_size(size)
    cell_px = size // GRID
    row, col = divmod(cell, GRID)
    centre = (torch.arange(size, dtype=torch.float64) + 0.5) / cell_px  # in cell units
    y = centre[:, None] - (row + 0.5 + dy)
    x = centre[None, :] - (col + 0.5 + dx)
    r = HALF_EXTENT
    if kind == "circle":
        mask = x**2 + y**2 <= r**2
    elif kind == "square":
        side = 0.85 * r  # about the circle's area
        mask = (x.abs() <= side) & (y.abs() <= side)
    elif kind == "triangle":  # apex up, base down
        mask = (y >= -r) & (y <= r) & (x.abs() <= (y + r) / 2)
    elif kind == "cross":  # a plus sign
        arm = r / 3
        mask = ((x.abs() <= arm) & (y.abs() <= r)) | ((y.abs() <= arm) & (x.abs() <= r))
    else:
        msg = f"kind must be one of {SHAPES}, got {kind!r}"
        raise ValueError(msg)
    return mask.expand(size, size).contiguous()


def render(
    scene: Scene, size: int = IMAGE_SIZE, *, background: tuple[int, int, int] = BACKGROUND
) -> torch.Tensor:
    """The ``uint8`` RGB image ``[3, size, size]`` of ``scene`` on ``background``.

    ``size`` must be a multiple of ``GRID``. Later shapes paint over earlier ones, which only
    matters for hand-made scenes that put two shapes in one cell.
    """
    _check_size(size)
    image = torch.tensor(background, dtype=torch.uint8)[:, None, None].repeat(1, size, size)
    for s in scene:
        mask = shape_mask(s.kind, s.cell, s.dx, s.dy, size)
        image = torch.where(mask, _COLOUR_PLANES[s.colour], image)
    return image


def render_batch(
    scenes: list[Scene] | tuple[Scene, ...],
    size: int = IMAGE_SIZE,
    *,
    background: tuple[int, int, int] = BACKGROUND,
) -> torch.Tensor:
    """``render`` of each scene, stacked into ``uint8 [batch, 3, size, size]``."""
    if not scenes:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack([render(s, size, background=background) for s in scenes])


# ----------------------------------------------------------------------------------------------
# Geometry


def cell_box(cell: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` pixel bounds of ``cell`` (bottom and right exclusive)."""
    _check_size(size)
    if not 0 <= cell < N_CELLS:
        msg = f"cell must be in [0, {N_CELLS}), got {cell}"
        raise ValueError(msg)
    cell_px = size // GRID
    row, col = divmod(cell, GRID)
    return row * cell_px, col * cell_px, (row + 1) * cell_px, (col + 1) * cell_px


def cell_patches(cell: int, *, patch_size: int, size: int = IMAGE_SIZE) -> list[int]:
    """Row-major indices of the ``patch_size`` patches that tile ``cell``, in increasing order.

    Patches are numbered row-major over the ``size // patch_size`` square grid, as a ViT's
    patch embedding (a strided convolution, flattened) orders them. ``patch_size`` must divide
    the cell side.

    Examples:
        >>> cell_patches(0, patch_size=8), cell_patches(3, patch_size=8)
        ([0, 1, 4, 5], [10, 11, 14, 15])
    """
    top, left, bottom, right = cell_box(cell, size)
    if (size // GRID) % patch_size:
        msg = f"patch_size must divide the cell side {size // GRID}, got {patch_size}"
        raise ValueError(msg)
    per_row = size // patch_size
    return [
        (y // patch_size) * per_row + x // patch_size
        for y in range(top, bottom, patch_size)
        for x in range(left, right, patch_size)
    ]


# ----------------------------------------------------------------------------------------------
# Reading colours back


def pixel_colours(
    image: torch.Tensor,
    *,
    background: tuple[int, int, int] = BACKGROUND,
) -> torch.Tensor:
    """Per pixel, the index in ``COLOUR_NAMES`` of the nearest palette colour, or -1 for background.

    ``image`` is ``uint8`` in ``[0, 255]`` or floating point in ``[0, 1]``; distances are
    Euclidean in RGB, and a pixel nearer to ``background`` than to every palette colour is -1.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        msg = f"image must have shape [3, height, width], got {tuple(image.shape)}"
        raise ValueError(msg)
    pixels = image.double() if image.is_floating_point() else image.double() / 255
    palette = torch.tensor([background, *COLOURS.values()], dtype=torch.float64) / 255  # [1+C, 3]
    dist = ((pixels[None] - palette[:, :, None, None]) ** 2).sum(1)  # [1+C, H, W]
    return dist.argmin(0) - 1


def region_colour(
    image: torch.Tensor,
    cell: int,
    *,
    min_fraction: float = 0.05,
    background: tuple[int, int, int] = BACKGROUND,
) -> str | None:
    """The majority non-background colour of ``cell``, or ``None`` when the cell is empty.

    The cell counts as empty when fewer than ``min_fraction`` of its pixels are non-background.
    """
    top, left, bottom, right = cell_box(cell, image.shape[-1])
    labels = pixel_colours(image[:, top:bottom, left:right], background=background)
    painted = labels[labels >= 0]
    if painted.numel() < min_fraction * labels.numel():
        return None
    return COLOUR_NAMES[int(painted.bincount(minlength=len(COLOURS)).argmax())]
