"""Site table of Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): a vision transformer, a patch merger (the projector)
and a Qwen2 language model.

Language model: the components of Llama-family decoders (:mod:`mechinterp.models.llama`) under
``model.language_model``, with positions counting each prompt's tokens, image tokens included
(:meth:`InterpModel.image_positions` finds them). ``embed`` is the token embedding before the
image features replace the image tokens' rows. The rotary embedding is multimodal (M-RoPE): for
prompts with images mechinterp leaves the position ids to the model, which derives them from
the ids, the image grids and the attention mask (so left padding is honoured); text-only
batches get the ids counted from each row's first real token, as in every decoder.

Packed inputs: the model takes all images of a batch as one sequence of patches,
``pixel_values`` ``[patches, channels * temporal_patch * patch * patch]``, with each image's
grid in ``image_grid_thw`` ``[images, 3]``. :class:`PackedImages` carries them per prompt
instead, so that batches can be cut, repeated and concatenated like any other input; an image
belongs to the prompt whose image tokens it fills, images and prompts taken in order.

Vision tower and projector: the tower also runs on the packed sequence, without a batch axis.
Its sites (``vision.resid_post``...) and ``projector`` split that sequence into one equal share
per prompt (:attr:`Tap.flat`), so they need every prompt to hold the same number of image tokens
(images of the same sizes, as in clean and corrupted pairs); other batches raise a SiteError.
A ``vision.`` position indexes the patches of one prompt's images in the order the tower holds
them: image after image, each image's patches grouped into merge windows of
``spatial_merge_size ** 2`` neighbours (Qwen2.5-VL's blocks further regroup them into attention
windows; its ``vision.embed`` keeps the processor's order). A ``projector`` position indexes the
prompt's image tokens, ``projector[p]`` feeding the ``p``-th image token. ``vision.pattern``
needs a forward of one image: the tower runs attention image by image (and, in Qwen2.5-VL's
windowed layers, window by window), so there is no single pattern otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechinterp.errors import InputError, ShapeError, SiteError, UnsupportedModelError
from mechinterp.image_tokens import TokenLayout
from mechinterp.models import llama
from mechinterp.models.llava import _rebase, _TextModel
from mechinterp.models.table import (
    Dims,
    PatternTap,
    Place,
    SiteTable,
    Sum,
    Tap,
    View,
    config_int,
    split_heads,
)
from mechinterp.sites import Site, token_axis

if TYPE_CHECKING:
    from mechinterp.model import Tokens

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

#: Inputs of videos, which these tables do not cover.
_VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class PackedImages:
    """Qwen2-VL's packed image inputs, carried per prompt (an ``InputPacking``).

    Per prompt, ``pixel_values`` is ``[batch, patches, features]`` (zero rows after a prompt's
    own patches) and ``image_grid_thw`` ``[batch, images, 3]`` (empty grids ``0 0 0`` after a
    prompt's own images); a prompt without images has only padding.

    Args:
        image_token_id: the id of the tokens the image features replace.
        merge: ``spatial_merge_size``; one image token stands for ``merge ** 2`` patches.
    """

    image_token_id: int
    merge: int

    def to_rows(self, input_ids: torch.Tensor, extras: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        videos = [name for name in _VIDEO_INPUTS if name in extras]
        if videos:
            msg = f"inputs {videos} are videos, which are not supported; pass images only"
            raise InputError(msg)
        pixels, grids = extras.get("pixel_values"), extras.get("image_grid_thw")
        if pixels is None and grids is None:
            return extras
        _check_pair(pixels, grids)
        grids = torch.as_tensor(grids)
        if grids.dim() != 2 or grids.shape[1] != 3:
            msg = f"inputs['image_grid_thw'] must be [images, 3]; got shape {tuple(grids.shape)}"
            raise ShapeError(msg)
        patches = grids.prod(-1).tolist()
        if pixels.dim() != 2 or pixels.shape[0] != sum(patches):
            msg = (f"inputs['pixel_values'] must be [patches, features] with the {sum(patches)} "
                   f"patches of image_grid_thw; got shape {tuple(pixels.shape)}")
            raise ShapeError(msg)
        owners = self._owners(input_ids, [p // self.merge**2 for p in patches])
        batch = input_ids.shape[0]
        images = [[i for i, owner in enumerate(owners) if owner == row] for row in range(batch)]
        ends = torch.tensor(patches).cumsum(0).tolist()
        grid_rows = grids.new_zeros(batch, max(map(len, images)), 3)
        pixel_rows = pixels.new_zeros(batch, max(sum(patches[i] for i in own) for own in images),
                                      pixels.shape[1])
        for row, own in enumerate(images):
            if own:
                grid_rows[row, :len(own)] = grids[own]
                # A prompt's images are consecutive, so its patches are one slice.
                first, last = ends[own[0]] - patches[own[0]], ends[own[-1]]
                pixel_rows[row, :last - first] = pixels[first:last]
        return {**extras, "pixel_values": pixel_rows, "image_grid_thw": grid_rows}

    def _owners(self, input_ids: torch.Tensor, image_tokens: list[int]) -> list[int]:
        """The prompt of each image: images fill the prompts' image tokens in order."""
        wanted = (input_ids == self.image_token_id).sum(dim=1).tolist()
        owners: list[int] = []
        for row, count in enumerate(wanted):
            filled = 0
            while filled < count and len(owners) < len(image_tokens):
                filled += image_tokens[len(owners)]
                owners.append(row)
            if filled != count:
                msg = (f"inputs: row {row} of input_ids holds {count} image tokens, but the "
                       f"images of image_grid_thw fill {filled} there (images hold "
                       f"{image_tokens} tokens, in order)")
                raise InputError(msg)
        if len(owners) != len(image_tokens):
            msg = (f"inputs: image_grid_thw holds {len(image_tokens)} images, but the image "
                   f"tokens of input_ids take only the first {len(owners)}")
            raise InputError(msg)
        return owners

    def to_model(self, inputs: dict[str, object]) -> dict[str, object]:
        pixels, grids = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is None and grids is None:
            return inputs
        _check_pair(pixels, grids)
        if grids.dim() != 3 or grids.shape[-1] != 3 or pixels.dim() != 3:
            msg = (f"Tokens.extras must hold image_grid_thw as [batch, images, 3] and "
                   f"pixel_values as [batch, patches, features], one row per prompt; got shapes "
                   f"{tuple(grids.shape)} and {tuple(pixels.shape)}")
            raise ShapeError(msg)
        patches = grids.prod(-1)
        inputs = dict(inputs)
        owned = torch.arange(pixels.shape[1], device=pixels.device) < patches.sum(-1, keepdim=True)
        inputs["pixel_values"] = pixels[owned]
        inputs["image_grid_thw"] = grids[patches > 0]
        if inputs["image_grid_thw"].shape[0] == 0:  # no prompt of this batch has an image
            del inputs["pixel_values"], inputs["image_grid_thw"]
            return inputs
        if "mm_token_type_ids" not in inputs:  # the model's M-RoPE needs to know image tokens
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        # Position ids with images are three-dimensional; the model derives them.
        inputs.pop("position_ids", None)
        return inputs

    def check_sites(self, tokens: Tokens, sites: Sequence[Site]) -> None:
        split = [str(s) for s in sites if token_axis(s.component) is not None]
        if not split:
            return
        counts = (tokens.input_ids == self.image_token_id).sum(dim=1).tolist()
        if len(set(counts)) > 1:
            msg = (f"sites {split[:4]} split the images of the batch into one equal share per "
                   f"prompt, so every prompt must hold the same number of image tokens; got "
                   f"{counts}")
            raise SiteError(msg)


def _check_pair(pixels: object, grids: object) -> None:
    """Images come as pixel values and the grid of each image, never one without the other."""
    if grids is None:
        msg = "inputs with pixel_values must also hold image_grid_thw (each image's grid); got none"
        raise InputError(msg)
    if pixels is None:
        msg = "inputs with image_grid_thw must also hold pixel_values; got none"
        raise InputError(msg)


def vision_dims(config: object, model_type: str) -> Dims:
    """Sizes of the vision tower (no vocabulary: d_vocab is 0)."""
    if model_type == "qwen2_vl":
        d_model = config_int(config, "embed_dim")
        d_mlp = int(d_model * config.mlp_ratio)
    else:  # Qwen2.5-VL names the tower's width hidden_size and has a gated MLP
        d_model = config_int(config, "hidden_size")
        d_mlp = config_int(config, "intermediate_size")
    n_heads = config_int(config, "num_heads")
    return Dims(n_layers=config_int(config, "depth"), n_heads=n_heads, n_kv_heads=n_heads,
                d_model=d_model, d_head=d_model // n_heads, d_mlp=d_mlp, d_vocab=0)


def _qkv(third: int) -> View:
    """One third of the fused projection, laid out ``[..., 3, head, d_head]`` by the model."""
    return lambda raw, dims: raw.unflatten(-1, (3, dims.n_heads, dims.d_head)).select(-3, third)


def vision_places(mlp_in: str) -> dict[str, Place]:
    """Places of the vision tower; every tensor is packed (see the module's docstring).

    ``q`` and ``k`` are read at the fused projection, before the rotary embedding.
    """
    root = "{base}visual"
    block = f"{root}.blocks.{{layer}}"
    return {
        "vision.embed": Tap(f"{root}.patch_embed", flat=True),
        "vision.resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states", flat=True),
        "vision.attn_out": Tap(f"{block}.attn", flat=True),
        "vision.resid_mid": Sum(read=Tap(f"{block}.norm2", io="input", flat=True),
                                base="vision.resid_pre", shifted="vision.attn_out"),
        "vision.mlp_out": Tap(f"{block}.mlp", flat=True),
        "vision.resid_post": Tap(block, flat=True),
        "vision.head": Tap(f"{block}.attn.proj", io="input", view=split_heads(), flat=True),
        "vision.q": Tap(f"{block}.attn.qkv", view=_qkv(0), flat=True),
        "vision.k": Tap(f"{block}.attn.qkv", view=_qkv(1), flat=True),
        "vision.v": Tap(f"{block}.attn.qkv", view=_qkv(2), flat=True),
        "vision.pattern": PatternTap(f"{block}.attn"),
        "vision.neuron": Tap(f"{block}.mlp.{mlp_in}", io="input", flat=True),
    }


def merged_grid_layout(module: nn.Module, tokens: Tokens) -> TokenLayout:
    """Qwen2-VL: each image's tokens are its merged patches, row by row over
    ``(height, width) / spatial_merge_size`` (the model restores Qwen2.5-VL's window order)."""
    grids = tokens.extras.get("image_grid_thw")
    merge = config_int(module.config.vision_config, "spatial_merge_size")
    layout = TokenLayout([], [], [], [], [])
    for image, (frames, height, width) in enumerate([] if grids is None else grids[0].tolist()):
        cells = [(r, c) for _ in range(frames) for r in range(height // merge)
                 for c in range(width // merge)]
        layout.image.extend([image] * len(cells))
        layout.crop.extend([0] * len(cells))
        layout.row.extend(r for r, _ in cells)
        layout.col.extend(c for _, c in cells)
    layout.feature.extend(range(len(layout.image)))
    return layout


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    model_type = config.model_type
    if model_type not in MODEL_TYPES:
        msg = f"model must be Qwen2-VL or Qwen2.5-VL (model_type in {MODEL_TYPES}); got {model_type!r}"
        raise UnsupportedModelError(msg)
    text = llama.site_table(_TextModel(config.text_config, getattr(model, "lm_head", None)))
    places = {name: place if name == "logits" else _rebase(place, "language_model.")
              for name, place in text.places.items()}
    dims = vision_dims(config.vision_config, model_type)
    places.update(vision_places("fc2" if model_type == "qwen2_vl" else "down_proj"))
    unsupported = dict(text.unsupported)
    if model_type == "qwen2_vl":
        places["projector"] = Tap("{base}visual.merger", flat=True)
    else:
        unsupported["projector"] = (
            "the merger returns the image tokens in the order of the tower's attention windows "
            "and the model restores their order with no module boundary after it; read "
            "resid_pre of layer 0 at the image positions instead")
    return replace(text, family=model_type, places=places, unsupported=unsupported,
                   blocks="{base}language_model." + text.blocks[len("{base}"):],
                   towers={"vision": dims}, image_token_id=int(config.image_token_id),
                   image_layout=merged_grid_layout,
                   packing=PackedImages(int(config.image_token_id),
                                        config_int(config.vision_config, "spatial_merge_size")))
