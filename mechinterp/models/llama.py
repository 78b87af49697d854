"""Site table of Llama-family decoders (Llama, Mistral, Qwen2).

Pre-RMSNorm blocks; separate q/k/v projections, read before the rotary embedding. With
grouped-query attention ``k`` and ``v`` have ``n_kv_heads`` heads, each shared by
``n_heads / n_kv_heads`` query heads; ``head`` and ``q`` always have ``n_heads``.
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.table import (
    PatternTap,
    SiteTable,
    Sum,
    Tap,
    add_logits,
    dims_from_config,
    kv_heads,
    split_heads,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    dims = dims_from_config(config)
    block = "{base}layers.{layer}"
    places = {
        "embed": Tap("{base}embed_tokens"),
        "resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "attn_out": Tap(f"{block}.self_attn"),
        "resid_mid": Sum(read=Tap(f"{block}.post_attention_layernorm", io="input"),
                         base="resid_pre", shifted="attn_out"),
        "mlp_out": Tap(f"{block}.mlp"),
        "resid_post": Tap(block),
        "head": Tap(f"{block}.self_attn.o_proj", io="input", view=split_heads()),
        "q": Tap(f"{block}.self_attn.q_proj", view=split_heads()),
        "k": Tap(f"{block}.self_attn.k_proj", view=split_heads(kv_heads)),
        "v": Tap(f"{block}.self_attn.v_proj", view=split_heads(kv_heads)),
        "pattern": PatternTap(f"{block}.self_attn"),
        "neuron": Tap(f"{block}.mlp.down_proj", io="input"),
    }
    unsupported: dict[str, str] = {}
    add_logits(model, ("lm_head",), places, unsupported)
    return SiteTable(config.model_type, dims, places, blocks="{base}layers", causal=True,
                     position_ids=True, unsupported=unsupported)
