"""Site table of GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``).

Blocks are pre-LayerNorm: ``resid_mid`` is ``resid_pre + attn_out``, first consumed by ``ln_2``.
Queries, keys and values come out of one fused ``c_attn`` projection ``[q | k | v]``.
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

MODEL_TYPES = ("gpt2",)


def _fused_qkv(part: int):
    def view(raw: torch.Tensor, dims: Dims) -> torch.Tensor:
        width = dims.n_heads * dims.d_head
        return raw[..., part * width:(part + 1) * width].unflatten(-1, (dims.n_heads, dims.d_head))

    return view


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    dims = dims_from_config(config)
    block = "{base}h.{layer}"
    places = {
        "embed": Tap("{base}wte"),
        "resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "attn_out": Tap(f"{block}.attn"),
        "resid_mid": Sum(read=Tap(f"{block}.ln_2", io="input"), base="resid_pre", shifted="attn_out"),
        "mlp_out": Tap(f"{block}.mlp"),
        "resid_post": Tap(block),
        "head": Tap(f"{block}.attn.c_proj", io="input", view=split_heads()),
        "q": Tap(f"{block}.attn.c_attn", view=_fused_qkv(0)),
        "k": Tap(f"{block}.attn.c_attn", view=_fused_qkv(1)),
        "v": Tap(f"{block}.attn.c_attn", view=_fused_qkv(2)),
        "pattern": PatternTap(f"{block}.attn"),
        "neuron": Tap(f"{block}.mlp.c_proj", io="input"),
    }
    unsupported: dict[str, str] = {}
    add_logits(model, ("lm_head",), places, unsupported)
    return SiteTable("gpt2", dims, places, blocks="{base}h", causal=True, position_ids=True,
                     unsupported=unsupported)
