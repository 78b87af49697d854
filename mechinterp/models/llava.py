"""Site table of LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a projector and
a language model of any supported decoder family.

The language model's components keep their usual names (``resid_pre``, ``head``...); its
positions count the prompt's tokens, image tokens included (:meth:`InterpModel.image_positions`
finds them). ``embed`` is the token embedding before the image features replace the image
tokens' rows; ``projector`` is those features, one row per image token. The vision tower's
components carry the ``vision.`` prefix (``vision.resid_post``), with the tower's own sizes.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from mechinterp.errors import UnsupportedModelError
from mechinterp.models.clip_tower import clip_vision_places, vision_dims
from mechinterp.models.table import PatternTap, Place, SiteTable, Sum, Tap

MODEL_TYPES = ("llava",)


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
    places.update(clip_vision_places("{base}vision_tower"))
    places["projector"] = Tap("{base}multi_modal_projector")
    assert all(isinstance(p, (Tap, Sum, PatternTap)) for p in places.values())
    return replace(text, family="llava", places=places,
                   blocks="{base}language_model." + text.blocks[len("{base}"):],
                   towers={"vision": dims},
                   image_token_id=int(config.image_token_id))
