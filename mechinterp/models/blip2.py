"""Site table of BLIP-2 (``Blip2ForConditionalGeneration``, ``Blip2Model``): a ViT vision tower,
a Q-Former that reads the image through cross-attention, a projection, and a language model of
any supported decoder family (OPT in the released checkpoints).

Three towers, run in this order:

- ``vision.`` components: the vision transformer, pre-LayerNorm like CLIP's (``resid_mid`` is
  ``resid_pre + attn_out``, first consumed by ``layer_norm2``). Queries, keys and values come out
  of one fused ``qkv`` projection ``[q | k | v]``; ``head`` is the input of ``projection``.
  Positions are the class token, then the patches in row-major order.
- ``qformer.`` components: the Q-Former, post-LayerNorm like BERT (``attn_out`` and ``mlp_out``
  are the dense projections before the residual add and LayerNorm; ``resid_mid`` is the
  self-attention sublayer's normalised output). Positions are the learned query tokens;
  ``embed`` is those tokens, before the Q-Former's input LayerNorm. Every
  ``cross_attention_frequency``-th layer (from layer 0) then attends to the vision tower's
  output, after ``resid_mid`` and before the MLP: ``qformer.cross_attn`` (its dense projection,
  before the residual add and LayerNorm), ``qformer.cross_head``, ``qformer.cross_q`` and
  ``qformer.cross_k``/``qformer.cross_v``, whose positions are the vision tower's tokens, and
  ``qformer.cross_pattern``. Layers are the Q-Former's; one without cross-attention is refused
  by name.
- The language model's components keep their usual names. ``projector`` is the language
  projection's output, one row per query token; the forward writes those rows over the
  embeddings of the prompt's image tokens.

Image tokens: transformers 5 expects the prompt to hold ``num_query_tokens`` placeholder tokens
(``config.image_token_index``) per image, as ``Blip2Processor`` inserts them, and replaces their
embeddings with the projected query outputs; :meth:`InterpModel.image_positions` finds them.
Older releases prepended the query embeddings to the prompt instead, when a config had no
``image_token_index``; such configs are refused, since this transformers ignores their image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechinterp.errors import UnsupportedModelError
from mechinterp.image_tokens import TokenLayout
from mechinterp.models.clip_tower import vision_dims
from mechinterp.models.table import (
    Dims,
    PatternTap,
    Place,
    SiteTable,
    Sum,
    Tap,
    Units,
    View,
    split_heads,
)

if TYPE_CHECKING:
    from mechinterp.model import Tokens

MODEL_TYPES = ("blip-2",)


def _fused_qkv(part: int) -> View:
    """Part ``part`` (0 q, 1 k, 2 v) of a ``[q | k | v]`` projection, split into heads."""

    def view(raw: torch.Tensor, dims: Dims) -> torch.Tensor:
        width = dims.n_heads * dims.d_head
        return raw[..., part * width:(part + 1) * width].unflatten(-1, (dims.n_heads, dims.d_head))

    return view


def vision_places(root: str) -> dict[str, Place]:
    """``vision.`` places of a BLIP-2 vision transformer at module path ``root``."""
    block = f"{root}.encoder.layers.{{layer}}"
    heads = split_heads()
    return {
        "vision.embed": Tap(f"{root}.embeddings"),
        "vision.resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "vision.attn_out": Tap(f"{block}.self_attn"),
        "vision.resid_mid": Sum(read=Tap(f"{block}.layer_norm2", io="input"),
                                base="vision.resid_pre", shifted="vision.attn_out"),
        "vision.mlp_out": Tap(f"{block}.mlp"),
        "vision.resid_post": Tap(block),
        "vision.head": Tap(f"{block}.self_attn.projection", io="input", view=heads),
        "vision.q": Tap(f"{block}.self_attn.qkv", view=_fused_qkv(0)),
        "vision.k": Tap(f"{block}.self_attn.qkv", view=_fused_qkv(1)),
        "vision.v": Tap(f"{block}.self_attn.qkv", view=_fused_qkv(2)),
        "vision.pattern": PatternTap(f"{block}.self_attn"),
        "vision.neuron": Tap(f"{block}.mlp.fc2", io="input"),
    }


def qformer_places(root: str) -> dict[str, Place]:
    """``qformer.`` places of a Q-Former at module path ``root``: its self-attention and the
    query tokens' MLP (``*_query`` modules; the text MLP never runs in BLIP-2's forward)."""
    block = f"{root}.encoder.layer.{{layer}}"
    heads = split_heads()
    return {
        "qformer.embed": Tap(f"{root}.layernorm", io="input"),
        "qformer.resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "qformer.attn_out": Tap(f"{block}.attention.output.dense"),
        "qformer.resid_mid": Tap(f"{block}.attention"),
        "qformer.mlp_out": Tap(f"{block}.output_query.dense"),
        "qformer.resid_post": Tap(block),
        "qformer.head": Tap(f"{block}.attention.output.dense", io="input", view=heads),
        "qformer.q": Tap(f"{block}.attention.attention.query", view=heads),
        "qformer.k": Tap(f"{block}.attention.attention.key", view=heads),
        "qformer.v": Tap(f"{block}.attention.attention.value", view=heads),
        "qformer.pattern": PatternTap(f"{block}.attention.attention"),
        "qformer.neuron": Tap(f"{block}.output_query.dense", io="input"),
    }


def qformer_cross_places(root: str, dims: Dims, frequency: int) -> tuple[dict[str, Place],
                                                                        dict[str, Units]]:
    """``qformer.cross_*`` places of the Q-Former's cross-attention at ``root``, and their units:
    the Q-Former's layers, of which every ``frequency``-th (from 0) has the sublayer."""
    heads = split_heads()
    attention = "{unit}.crossattention"
    places: dict[str, Place] = {
        "qformer.cross_attn": Tap(f"{attention}.output.dense"),
        "qformer.cross_head": Tap(f"{attention}.output.dense", io="input", view=heads),
        "qformer.cross_q": Tap(f"{attention}.attention.query", view=heads),
        "qformer.cross_k": Tap(f"{attention}.attention.key", view=heads),
        "qformer.cross_v": Tap(f"{attention}.attention.value", view=heads),
        "qformer.cross_pattern": PatternTap(f"{attention}.attention"),
    }
    layers = Units(
        tuple(f"{root}.encoder.layer.{layer}" if layer % frequency == 0 else None
              for layer in range(dims.n_layers)),
        (dims,) * dims.n_layers,
        missing=f"only Q-Former layers whose index is a multiple of {frequency} "
                f"(cross_attention_frequency) cross-attend to the image")
    return places, dict.fromkeys(places, layers)


def _moved(place: Place, base: str, root: str) -> Place:
    """A place of the language model's own table at its path inside BLIP-2: ``{base}`` paths
    under the language model's base model, others (its head) under the language model."""
    if isinstance(place, Sum):
        return replace(place, read=_moved(place.read, base, root))
    if place.path.startswith("{base}"):
        return replace(place, path=base + place.path[len("{base}"):])
    return replace(place, path=root + place.path)


def _language_table(model: nn.Module) -> tuple[SiteTable, str]:
    """The language model's site table and the path prefix of its base model."""
    from mechinterp.models import FAMILIES

    config = model.config
    text_type = getattr(config.text_config, "model_type", None)
    if not getattr(config, "use_decoder_only_language_model", True):
        msg = (f"no site table for BLIP-2 with the encoder-decoder language model {text_type!r}: "
               f"its prompt and answer run through different stacks; supported: BLIP-2 with a "
               f"decoder-only language model (OPT, Llama...)")
        raise UnsupportedModelError(msg)
    family = FAMILIES.get(text_type)
    language = getattr(model, "language_model", None)
    if family is None or family.__name__ == __name__:
        msg = (f"no site table for BLIP-2's language model of model_type {text_type!r}; "
               f"supported: decoders among {sorted(FAMILIES)}")
        raise UnsupportedModelError(msg)
    table = family.site_table(language)
    if not table.causal or table.towers:
        msg = (f"BLIP-2's language model must be a text decoder; got model_type {text_type!r}, "
               f"whose site table is {'multimodal' if table.towers else 'bidirectional'}")
        raise UnsupportedModelError(msg)
    prefix = getattr(language, "base_model_prefix", "")
    inner = f"{prefix}." if prefix and hasattr(language, prefix) else ""
    return table, "{base}language_model." + inner


def query_layout(module: nn.Module, tokens: Tokens) -> TokenLayout:
    """BLIP-2: the image tokens take the Q-Former's query outputs in order; queries are not
    patches, so they have no grid cell."""
    count = int((tokens.input_ids[0] == module.config.image_token_index).sum())
    return TokenLayout(image=[0] * count, crop=[0] * count, row=[-1] * count, col=[-1] * count,
                       feature=list(range(count)))


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    missing = [part for part in ("vision_model", "qformer", "language_projection", "language_model")
               if not hasattr(model, part)]
    if missing:
        msg = (f"model must be a BLIP-2 with a language model (Blip2ForConditionalGeneration or "
               f"Blip2Model); got {type(model).__name__}, which has no {', '.join(missing)}")
        raise UnsupportedModelError(msg)
    image_token = getattr(config, "image_token_index", None)
    if image_token is None:
        msg = ("BLIP-2 config.image_token_index must be set: this transformers writes the image's "
               "query outputs over that token's positions in the prompt; got None (a config "
               "from before image tokens, whose image the forward would ignore)")
        raise UnsupportedModelError(msg)
    text, base = _language_table(model)
    root = "{base}language_model."
    places = {name: _moved(place, base, root) for name, place in text.places.items()}
    vision = vision_dims(config.vision_config)
    qformer = vision_dims(config.qformer_config)
    places.update(vision_places("{base}vision_model"))
    places.update(qformer_places("{base}qformer"))
    cross, units = qformer_cross_places("{base}qformer", qformer,
                                        config.qformer_config.cross_attention_frequency)
    places.update(cross)
    places["projector"] = Tap("{base}language_projection")
    return replace(text, family="blip-2", places=places, units={**text.units, **units},
                   blocks=base + text.blocks[len("{base}"):],
                   towers={"vision": vision, "qformer": qformer},
                   image_token_id=int(image_token), image_layout=query_layout)
