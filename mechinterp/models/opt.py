"""Site table of OPT decoders (``OPTForCausalLM``, ``OPTModel``).

Most OPT sizes are pre-LayerNorm (``do_layer_norm_before=True``): ``resid_mid`` is
``resid_pre + attn_out``, first consumed by ``final_layer_norm``. OPT-350m is post-LayerNorm:
as in BERT, each sublayer's contribution is its projection's output before the residual add, and
``resid_mid`` is the normalised output of ``self_attn_layer_norm``.

The block flattens batch and position into one axis before its MLP, so ``neuron``, ``mlp_out``
and the read of ``resid_mid`` are flat taps (:attr:`Tap.flat`); sites still see
``[batch, pos, ...]``. Queries are read at ``q_proj``'s output, before OPT scales them by
``d_head ** -0.5`` (its attention then runs with a scaling of one).

Positions: the learned position embedding is indexed by ``position + 2`` (an offset inherited
from fairseq), so ``embed_positions.weight[p + 2]`` is added at position ``p``. mechinterp passes
``position_ids`` counted from each row's first real token, as OPT itself would count them.
``embed`` is the token embedding alone, in ``d_model`` (after ``project_in`` where the word
embedding is narrower than the model, as in OPT-350m).
"""

from __future__ import annotations

from torch import nn

from mechinterp.models.table import (
    Dims,
    PatternTap,
    SiteTable,
    Sum,
    Tap,
    add_logits,
    config_int,
    split_heads,
)

MODEL_TYPES = ("opt",)


def opt_dims(config: object) -> Dims:
    """Sizes of an OPT config (its MLP width is ``ffn_dim``)."""
    d_model = config_int(config, "hidden_size")
    n_heads = config_int(config, "num_attention_heads")
    return Dims(n_layers=config_int(config, "num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
                d_mlp=config_int(config, "ffn_dim"), d_vocab=config_int(config, "vocab_size"))


def site_table(model: nn.Module) -> SiteTable:
    config = model.config
    dims = opt_dims(config)
    block = "{base}decoder.layers.{layer}"
    narrow_embedding = config_int(config, "word_embed_proj_dim", default=dims.d_model) != dims.d_model
    places = {
        "embed": Tap("{base}decoder.project_in" if narrow_embedding else "{base}decoder.embed_tokens"),
        "resid_pre": Tap(block, io="input", item=0, kwarg="hidden_states"),
        "attn_out": Tap(f"{block}.self_attn"),
        "mlp_out": Tap(f"{block}.fc2", flat=True),
        "resid_post": Tap(block),
        "head": Tap(f"{block}.self_attn.out_proj", io="input", view=split_heads()),
        "q": Tap(f"{block}.self_attn.q_proj", view=split_heads()),
        "k": Tap(f"{block}.self_attn.k_proj", view=split_heads()),
        "v": Tap(f"{block}.self_attn.v_proj", view=split_heads()),
        "pattern": PatternTap(f"{block}.self_attn"),
        "neuron": Tap(f"{block}.fc2", io="input", flat=True),
    }
    if getattr(config, "do_layer_norm_before", True):
        places["resid_mid"] = Sum(read=Tap(f"{block}.final_layer_norm", io="input", flat=True),
                                  base="resid_pre", shifted="attn_out")
    else:
        places["resid_mid"] = Tap(f"{block}.self_attn_layer_norm")
    unsupported: dict[str, str] = {}
    add_logits(model, ("lm_head",), places, unsupported)
    return SiteTable("opt", dims, places, blocks="{base}decoder.layers", causal=True,
                     position_ids=True, unsupported=unsupported)
