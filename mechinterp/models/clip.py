"""Site table of CLIP (``CLIPModel``): the text transformer is the main tower, the vision
transformer the ``vision.`` tower (it runs first).

Text positions count the prompt's tokens (CLIP's text encoder is causally masked and pools at
the end-of-text token); vision positions are the class token and then the patches in row-major
order. CLIP has no language-model head, so there is no ``logits`` site: read ``resid_post`` of
the last layer, or the model's own ``text_embeds``/``image_embeds`` outputs.
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.clip_tower import clip_vision_places, vision_dims
from mechinterp.models.table import Dims, SiteTable, Tap, config_int

MODEL_TYPES = ("clip",)


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    text = config.text_config
    n_heads = config_int(text, "num_attention_heads")
    d_model = config_int(text, "hidden_size")
    dims = Dims(n_layers=config_int(text, "num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
                d_mlp=config_int(text, "intermediate_size"), d_vocab=config_int(text, "vocab_size"))
    places = clip_vision_places("{base}text_model", tower=None)
    # The token embedding alone (the embeddings module adds the position embedding).
    places["embed"] = Tap("{base}text_model.embeddings.token_embedding")
    vision = vision_dims(config.vision_config)
    places.update(clip_vision_places("{base}vision_model"))
    unsupported = {"logits": "CLIP has no language-model head (it scores image-text pairs)"}
    return SiteTable("clip", dims, places, blocks="{base}text_model.encoder.layers", causal=True,
                     position_ids=True, unsupported=unsupported, towers={"vision": vision})
