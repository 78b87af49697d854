"""Site table of BERT-family encoders (BERT, RoBERTa).

Blocks are post-LayerNorm, so each sublayer's contribution is the output of its dense
projection, before the residual add and LayerNorm: ``attn_out`` is ``attention.output.dense``,
``mlp_out`` is ``output.dense``. ``resid_mid`` is the attention sublayer's normalised output.
Attention is bidirectional.
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.table import Dims, PatternTap, SiteTable, Tap, config_int, split_heads

MODEL_TYPES = ("bert", "roberta")

_HEADS = {"bert": "cls", "roberta": "lm_head"}


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    d_model = config_int(config, "hidden_size")
    n_heads = config_int(config, "num_attention_heads")
    dims = Dims(
        n_layers=config_int(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_mlp=config_int(config, "intermediate_size"),
        d_vocab=config_int(config, "vocab_size"),
    )
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
    unsupported = {}
    head = _HEADS.get(config.model_type, "cls")
    if hasattr(model, head):
        places["logits"] = Tap(head)
    else:
        unsupported["logits"] = f"{type(model).__name__} has no masked-language-model head"
    return SiteTable(config.model_type, dims, places, blocks="{base}encoder.layer", causal=False,
                     position_ids=False, unsupported=unsupported)
