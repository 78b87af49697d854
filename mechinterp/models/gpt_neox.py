"""Site table of GPT-NeoX (Pythia).

The fused ``query_key_value`` projection is laid out per head as ``[q_h | k_h | v_h]``. With
``use_parallel_residual`` (the default) attention and MLP both read ``resid_pre``, so there is
no ``resid_mid``.
"""

from __future__ import annotations

import torch
from torch import nn

from mechinterp.models.table import (
    Dims,
    PatternTap,
    SiteTable,
    Sum,
    Tap,
    add_logits,
    dims_from_config,
    split_heads,
)

MODEL_TYPES = ("gpt_neox",)


def _fused_qkv(part: int):
    def view(raw: torch.Tensor, dims: Dims) -> torch.Tensor:
        per_head = raw.unflatten(-1, (dims.n_heads, 3 * dims.d_head))
        return per_head[..., part * dims.d_head:(part + 1) * dims.d_head]

    return view


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    dims = dims_from_config(config)
    block = "{base}layers.{layer}"
    places = {
        "embed": Tap("{base}embed_in"),
        "resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "attn_out": Tap(f"{block}.attention"),
        "mlp_out": Tap(f"{block}.mlp"),
        "resid_post": Tap(block),
        "head": Tap(f"{block}.attention.dense", io="input", view=split_heads()),
        "q": Tap(f"{block}.attention.query_key_value", view=_fused_qkv(0)),
        "k": Tap(f"{block}.attention.query_key_value", view=_fused_qkv(1)),
        "v": Tap(f"{block}.attention.query_key_value", view=_fused_qkv(2)),
        "pattern": PatternTap(f"{block}.attention"),
        "neuron": Tap(f"{block}.mlp.dense_4h_to_h", io="input"),
    }
    unsupported: dict[str, str] = {}
    if getattr(config, "use_parallel_residual", True):
        unsupported["resid_mid"] = (
            "with use_parallel_residual=True attention and MLP both read resid_pre, so no "
            "residual state lies between them"
        )
    else:
        places["resid_mid"] = Sum(read=Tap(f"{block}.post_attention_layernorm", io="input"),
                                  base="resid_pre", shifted="attn_out")
    # transformers 5 calls the unembedding lm_head; earlier releases called it embed_out.
    add_logits(model, ("lm_head", "embed_out"), places, unsupported)
    return SiteTable("gpt_neox", dims, places, blocks="{base}layers", causal=True,
                     position_ids=True, unsupported=unsupported)
