"""Per-family site tables and the lookup from a model to its table."""

from __future__ import annotations

from torch import nn

from mechinterp.errors import UnsupportedModelError
from mechinterp.models import bert, blip2, clip, gpt2, gpt_neox, llama, llava, opt, qwen2_vl, unet
from mechinterp.models.table import Dims, PatternTap, SiteTable, Sum, Tap

_FAMILIES = (gpt2, llama, gpt_neox, opt, bert, llava, blip2, qwen2_vl, clip)

#: model_type (as in ``config.model_type``) -> family module.
FAMILIES = {model_type: family for family in _FAMILIES for model_type in family.MODEL_TYPES}


def site_table(model: nn.Module) -> SiteTable:
    """Detect the family of a transformers model (or a diffusers U-Net) and build its site
    table."""
    if unet.is_unet(model):
        return unet.site_table(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        msg = (
            f"model must be a transformers model with a config.model_type; got "
            f"{type(model).__name__} without one"
        )
        raise UnsupportedModelError(msg)
    family = FAMILIES.get(model_type)
    if family is None:
        msg = (
            f"no site table for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(FAMILIES)}"
        )
        raise UnsupportedModelError(msg)
    return family.site_table(model)


__all__ = ["FAMILIES", "Dims", "PatternTap", "SiteTable", "Sum", "Tap", "site_table"]
