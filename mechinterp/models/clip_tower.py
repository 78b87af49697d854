"""Site places of a CLIP transformer: the vision tower of a multimodal model, or either tower
of CLIP itself.

CLIP encoder layers are pre-LayerNorm: ``resid_mid`` is ``resid_pre + attn_out``, first consumed
by ``layer_norm2``. Positions index the tower's tokens: the class token, then the image patches
in row-major order.
"""

from __future__ import annotations

from mechinterp.models.table import Dims, PatternTap, Place, Sum, Tap, config_int, split_heads


def vision_dims(config: object) -> Dims:
    """Sizes of a tower's config (a CLIP or BLIP-2 vision config, a Q-Former config), which has
    no vocabulary: d_vocab is 0."""
    d_model = config_int(config, "hidden_size")
    n_heads = config_int(config, "num_attention_heads")
    return Dims(n_layers=config_int(config, "num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
                d_mlp=config_int(config, "intermediate_size"), d_vocab=0)


def clip_vision_places(root: str, tower: str | None = "vision") -> dict[str, Place]:
    """Places of a CLIP transformer (vision or text) at module path ``root`` (e.g.
    ``"{base}vision_tower"``), named ``"{tower}.<component>"`` (plain names for the main
    tower, ``tower=None``)."""
    block = f"{root}.encoder.layers.{{layer}}"
    heads = split_heads()
    name = (lambda component: component) if tower is None else f"{tower}.{{}}".format
    return {
        name("embed"): Tap(f"{root}.embeddings"),
        name("resid_pre"): Tap(block, io="input", item=0, kwarg="hidden_states"),
        name("attn_out"): Tap(f"{block}.self_attn"),
        name("resid_mid"): Sum(read=Tap(f"{block}.layer_norm2", io="input"),
                               base=name("resid_pre"), shifted=name("attn_out")),
        name("mlp_out"): Tap(f"{block}.mlp"),
        name("resid_post"): Tap(block),
        name("head"): Tap(f"{block}.self_attn.out_proj", io="input", view=heads),
        name("q"): Tap(f"{block}.self_attn.q_proj", view=heads),
        name("k"): Tap(f"{block}.self_attn.k_proj", view=heads),
        name("v"): Tap(f"{block}.self_attn.v_proj", view=heads),
        name("pattern"): PatternTap(f"{block}.self_attn"),
        name("neuron"): Tap(f"{block}.mlp.fc2", io="input"),
    }
