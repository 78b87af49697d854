"""Site table of BERT-family encoders (BERT, RoBERTa).

Blocks are post-LayerNorm, so each sublayer's contribution is the output of its dense
projection, before the residual add and LayerNorm: ``attn_out`` is ``attention.output.dense``,
``mlp_out`` is ``output.dense``. ``resid_mid`` is the attention sublayer's normalised output.
Attention is bidirectional.
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.table import (
    PatternTap,
    SiteTable,
    Tap,
    add_logits,
    dims_from_config,
    split_heads,
)

MODEL_TYPES = ("bert", "roberta")

_HEADS = {"bert": "cls", "roberta": "lm_head"}


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    dims = dims_from_config(config)
    block = "{base}encoder.layer.{layer}"
    places = {
        "embed": Tap("{base}embeddings.word_embeddings"),
        "resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "attn_out": Tap(f"{block}.attention.output.dense"),
        "resid_mid": Tap(f"{block}.attention"),
        "mlp_out": Tap(f"{block}.output.dense"),
        "resid_post": Tap(block),
        "head": Tap(f"{block}.attention.output.dense", io="input", view=split_heads()),
        "q": Tap(f"{block}.attention.self.query", view=split_heads()),
        "k": Tap(f"{block}.attention.self.key", view=split_heads()),
        "v": Tap(f"{block}.attention.self.value", view=split_heads()),
        "pattern": PatternTap(f"{block}.attention.self"),
        "neuron": Tap(f"{block}.output.dense", io="input"),
    }
    unsupported: dict[str, str] = {}
    add_logits(model, (_HEADS.get(config.model_type, "cls"),), places, unsupported)
    return SiteTable(config.model_type, dims, places, blocks="{base}encoder.layer", causal=False,
                     position_ids=False, unsupported=unsupported)
