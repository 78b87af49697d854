"""Site table of Llama-family decoders (Llama, Mistral, Qwen2).

Pre-RMSNorm blocks; separate q/k/v projections, read before the rotary embedding. With
grouped-query attention ``k`` and ``v`` have ``n_kv_heads`` heads, each shared by
``n_heads / n_kv_heads`` query heads; ``head`` and ``q`` always have ``n_heads``.
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.table import (
    Dims,
    PatternTap,
    SiteTable,
    Sum,
    Tap,
    config_int,
    kv_heads,
    split_heads,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    d_model = config_int(config, "hidden_size")
    n_heads = config_int(config, "num_attention_heads")
    dims = Dims(
        n_layers=config_int(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config_int(config, "num_key_value_heads", default=n_heads),
        d_model=d_model,
        d_head=config_int(config, "head_dim", default=d_model // n_heads),
        d_mlp=config_int(config, "intermediate_size"),
        d_vocab=config_int(config, "vocab_size"),
    )
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
    unsupported = {}
    if hasattr(model, "lm_head"):
        places["logits"] = Tap("lm_head")
    else:
        unsupported["logits"] = f"{type(model).__name__} has no language-model head"
    return SiteTable(config.model_type, dims, places, blocks="{base}layers", causal=True,
                     position_ids=True, unsupported=unsupported)
