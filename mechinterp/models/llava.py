"""Site table of LLaVA (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``): a CLIP vision tower, a projector and a language model
of any supported decoder family.

The language model's components keep their usual names (``resid_pre``, ``head``...); its
positions count the prompt's tokens, image tokens included (:meth:`InterpModel.image_positions`
finds them, :meth:`InterpModel.image_tokens` says what each one shows). ``embed`` is the token
embedding before the image features replace the image tokens' rows; ``projector`` is those
features. The vision tower's components carry the ``vision.`` prefix (``vision.resid_post``),
with the tower's own sizes.

LLaVA-NeXT cuts each image into a downscaled view of the whole image (the base crop) and a grid
of high-resolution crops ("anyres"), and the tower runs on every crop separately. Its sites see
one prompt's crops side by side: ``vision.*`` and ``projector`` positions count the tokens of
crop 0, then crop 1..., so ``vision.resid_post[pos=c * t + i]`` is token ``i`` of crop ``c``
(``t`` tokens per crop, the class token first). The model then drops the padding of the
high-resolution grid and ends each of its rows with a learned newline token, so image tokens
are not the projector's rows in order: :meth:`InterpModel.image_tokens` maps each image token
to its projector row, crop and place in the grid. Every prompt of a batch read or written at a
tower or projector site must have the same number of crops (images whose sizes select the same
grid); ``vision.pattern`` is not available, since each crop attends only to itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechinterp.errors import InputError, ShapeError, SiteError, UnsupportedModelError
from mechinterp.image_tokens import TokenLayout
from mechinterp.models.clip_tower import clip_vision_places, vision_dims
from mechinterp.models.table import Dims, PatternTap, Place, SiteTable, Sum, Tap, View
from mechinterp.sites import Site, token_axis

if TYPE_CHECKING:
    from mechinterp.model import Tokens

MODEL_TYPES = ("llava", "llava_next")


class _TextModel:
    """What a decoder family's table builder reads: the text config and the head's name."""

    def __init__(self, config: object, lm_head: nn.Module | None):
        self.config = config
        if lm_head is not None:
            self.lm_head = lm_head


def _rebase(place: Place, prefix: str) -> Place:
    """Move a place of the language model under ``{base}language_model.``."""
    if isinstance(place, Sum):
        return replace(place, read=_rebase(place.read, prefix))
    if place.path.startswith("{base}"):
        return replace(place, path="{base}" + prefix + place.path[len("{base}"):])
    return place


def _crops_as_tokens(inner: View | None) -> View:
    """A view of ``[batch, crops, tokens, ...]`` (a tower tensor, after ``Tap.flat`` split its
    ``batch * crops`` rows) as ``[batch, crops * tokens, ...]``, then ``inner``."""

    def view(raw: torch.Tensor, dims: Dims) -> torch.Tensor:
        try:
            merged = raw.view(raw.shape[0], raw.shape[1] * raw.shape[2], *raw.shape[3:])
        except RuntimeError:
            # A copy would drop every write, so refuse instead.
            msg = (f"a tower tensor of shape {tuple(raw.shape)} and strides {raw.stride()} "
                   f"cannot be seen as one row of tokens per prompt without a copy")
            raise SiteError(msg) from None
        return merged if inner is None else inner(merged, dims)

    return view


def _over_crops(place: Place) -> Place:
    """A tower place that sees one prompt's crops as one row of tokens."""
    if isinstance(place, Sum):
        return replace(place, read=_over_crops(place.read))
    return replace(place, flat=True, view=_crops_as_tokens(place.view))


@functools.cache
def _crop_count(image_size: tuple[int, int], grid_pinpoints: tuple[tuple[int, int], ...],
                crop_size: int) -> int:
    # Asked per prompt of every forward with tower sites: the grid search runs once per size.
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(list(image_size), [list(p) for p in grid_pinpoints], crop_size)


@dataclass(frozen=True)
class CroppedImages:
    """LLaVA-NeXT's images: ``pixel_values`` ``[batch, crops, channels, height, width]`` (zero
    crops after a prompt's own) and ``image_sizes`` ``[batch, 2]``, already one row per prompt
    (an ``InputPacking`` that only checks them)."""

    grid_pinpoints: tuple[tuple[int, int], ...]
    crop_size: int

    def crops(self, image_size: Sequence[int]) -> int:
        """Crops of an image of ``image_size`` (height, width): the base view and its grid."""
        return _crop_count(tuple(int(v) for v in image_size), self.grid_pinpoints, self.crop_size)

    def to_rows(self, input_ids: torch.Tensor, extras: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        pixels, sizes = extras.get("pixel_values"), extras.get("image_sizes")
        if pixels is None:
            return extras
        if sizes is None:
            msg = "inputs with pixel_values must also hold image_sizes (each image's height and width)"
            raise ShapeError(msg)
        if pixels.dim() != 5 or torch.as_tensor(sizes).shape != (pixels.shape[0], 2):
            msg = (f"inputs must hold pixel_values as [images, crops, channels, height, width] and "
                   f"image_sizes as [images, 2]; got shapes {tuple(pixels.shape)} and "
                   f"{tuple(torch.as_tensor(sizes).shape)}")
            raise ShapeError(msg)
        return extras

    def to_model(self, inputs: dict[str, object]) -> dict[str, object]:
        return inputs

    def check_sites(self, tokens: Tokens, sites: Sequence[Site]) -> None:
        split = [str(s) for s in sites if token_axis(s.component) is not None]
        sizes = tokens.extras.get("image_sizes")
        if not split or sizes is None:
            return
        counts = [self.crops(size) for size in sizes.tolist()]
        if len(set(counts)) > 1:
            msg = (f"sites {split[:4]} see each prompt's image crops side by side, so every "
                   f"prompt must have the same number of crops (images whose sizes select the "
                   f"same grid); got {counts}")
            raise SiteError(msg)


def _patch_grid(config: object) -> tuple[int, int]:
    """Side of the tower's square patch grid, and how many features each view keeps (the class
    token first with ``vision_feature_select_strategy="full"``)."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    return side, side * side + (config.vision_feature_select_strategy == "full")


def _image_token_count(config: object, tokens: Tokens) -> int:
    return int((tokens.input_ids[0] == config.image_token_id).sum())


def llava_layout(module: nn.Module, tokens: Tokens) -> TokenLayout:
    """LLaVA: one image per prompt, its features in the tower's order (class token, if kept,
    then the patches row by row)."""
    config = module.config
    side, per_image = _patch_grid(config)
    count = _image_token_count(config, tokens)
    if count != per_image:
        msg = (f"inputs: a prompt holds {count} image tokens, but one image fills {per_image} "
               f"({side} x {side} patches{' and the class token' if per_image > side * side else ''})")
        raise InputError(msg)
    skip = per_image - side * side  # the class token, first when kept
    patch = [i - skip for i in range(per_image)]
    return TokenLayout(image=[0] * count, crop=[0] * count,
                       row=[p // side if p >= 0 else -1 for p in patch],
                       col=[p % side if p >= 0 else -1 for p in patch], feature=list(range(count)))


def llava_next_layout(module: nn.Module, tokens: Tokens) -> TokenLayout:
    """LLaVA-NeXT: the model's own packing run on the projector rows' indices, so the layout
    is what its ``pack_image_features`` does (base crop, unpadded grid, newlines)."""
    config = module.config
    if config.vision_feature_select_strategy != "default":
        msg = (f"image_tokens needs LLaVA-NeXT's vision_feature_select_strategy='default' (the "
               f"grid of crops has no class tokens); got {config.vision_feature_select_strategy!r}")
        raise InputError(msg)
    sizes = tokens.extras.get("image_sizes")
    if sizes is None:
        msg = "inputs must hold image_sizes for LLaVA-NeXT's image tokens; got none"
        raise InputError(msg)
    side, per_crop = _patch_grid(config)
    crops = _packing(config).crops(sizes[0].tolist())
    index = torch.arange(crops * per_crop, dtype=torch.float64).reshape(crops, per_crop, 1)
    packed, _ = module.pack_image_features([index], sizes[:1].cpu(), "default",
                                           image_newline=torch.tensor([-1.0], dtype=torch.float64))
    features = [int(f) for f in packed[0][:, 0].tolist()]
    count = _image_token_count(config, tokens)
    if count != len(features):
        msg = (f"inputs: a prompt holds {count} image tokens, but its image of size "
               f"{sizes[0].tolist()} fills {len(features)} ({crops} crops)")
        raise InputError(msg)
    layout = TokenLayout([0] * count, [], [], [], features)
    row = col = 0  # the cell in the high-resolution grid, past the padding the model dropped
    for feature in features:
        if 0 <= feature < per_crop:  # the base view
            layout.crop.append(0)
            layout.row.append(feature // side)
            layout.col.append(feature % side)
            continue
        layout.crop.append(feature // per_crop if feature >= 0 else -1)
        layout.row.append(row)
        layout.col.append(col)
        row, col = (row + 1, 0) if feature < 0 else (row, col + 1)
    return layout


def _packing(config: object) -> CroppedImages:
    return CroppedImages(tuple(tuple(p) for p in config.image_grid_pinpoints),
                         int(config.vision_config.image_size))


def site_table(model: nn.Module) -> SiteTable:
    from mechinterp.models import FAMILIES

    config = model.config
    text_config = config.text_config
    family = FAMILIES.get(getattr(text_config, "model_type", None))
    if family is None or family.__name__.endswith(".llava"):
        msg = (f"no site table for LLaVA's language model of model_type "
               f"{getattr(text_config, 'model_type', None)!r}; supported: decoders among "
               f"{sorted(FAMILIES)}")
        raise UnsupportedModelError(msg)
    vision_type = getattr(config.vision_config, "model_type", None)
    if vision_type not in ("clip_vision_model", "siglip_vision_model"):
        msg = f"no site table for LLaVA's vision tower of model_type {vision_type!r}"
        raise UnsupportedModelError(msg)
    text = family.site_table(_TextModel(text_config, getattr(model, "lm_head", None)))
    places = {name: place if name == "logits" else _rebase(place, "language_model.")
              for name, place in text.places.items()}
    dims = vision_dims(config.vision_config)
    vision = clip_vision_places("{base}vision_tower")
    projector: Place = Tap("{base}multi_modal_projector")
    unsupported = dict(text.unsupported)
    packing = None
    if config.model_type == "llava_next":
        del vision["vision.pattern"]
        unsupported["vision.pattern"] = (
            "LLaVA-NeXT's tower attends within each image crop separately, so a prompt has one "
            "pattern per crop; read vision.q and vision.k instead")
        vision = {name: _over_crops(place) for name, place in vision.items()}
        projector = _over_crops(projector)
        packing = _packing(config)
    places.update(vision)
    places["projector"] = projector
    assert all(isinstance(p, (Tap, Sum, PatternTap)) for p in places.values())
    return replace(text, family=config.model_type, places=places, unsupported=unsupported,
                   blocks="{base}language_model." + text.blocks[len("{base}"):],
                   towers={"vision": dims}, packing=packing,
                   image_token_id=int(config.image_token_id),
                   image_layout=llava_next_layout if packing is not None else llava_layout)
