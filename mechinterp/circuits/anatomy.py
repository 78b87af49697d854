"""Where the residual stream is read and written in one family's blocks.

Edge patching gives every destination (each head's query, key and value input, each MLP, the
logits) its own copy of the residual stream. That needs, beyond the site table, the normalisation
module in front of each reader and whether a block's MLP reads its attention output (sequential)
or the block input (parallel residual). In pre-normalisation blocks the residual stream is the
sum of everything written to it, so a destination's input is the sum of its sources' outputs.
Post-LayerNorm blocks (BERT, RoBERTa) renormalise the sum itself after every sublayer; their
anatomy names those LayerNorms, through which :mod:`mechinterp.circuits.postnorm` carries each
source's contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mechinterp.errors import UnsupportedModelError
from mechinterp.models import bert, blip2, clip, gpt2, gpt_neox, llama, llava, opt, qwen2_vl
from mechinterp.models.table import Dims, SiteTable, Tap


@dataclass(frozen=True)
class Anatomy:
    """Module paths (with ``{base}`` and ``{layer}``) of where one family reads and renormalises
    its residual stream.

    Attributes:
        attn_norm: normalisation whose output feeds the query, key and value projections
            (``None``: they read the residual stream itself, as in post-LayerNorm blocks).
        mlp_norm: the module whose input is the MLP's read of the residual stream (its
            normalisation; in post-LayerNorm blocks the MLP's first module).
        final_norm: the module whose input is the unembedding's read (its normalisation; in
            post-LayerNorm models the language-model head).
        parallel: the MLP reads the block input, not the block input plus the attention output.
        post_norms: post-LayerNorm blocks only: the LayerNorm after the attention sublayer and
            the one after the MLP sublayer.
    """

    attn_norm: str | None
    mlp_norm: str
    final_norm: str
    parallel: bool
    post_norms: tuple[str, str] | None = None


def anatomy_of(model: nn.Module, table: SiteTable) -> Anatomy:
    """The anatomy of ``model``'s family; UnsupportedModelError for families without one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in clip.MODEL_TYPES and "logits" not in table.places:
        msg = (f"circuit discovery needs the language-model head, which the logits destination "
               f"reads; this {table.family} model has none ({table.unsupported.get('logits', '')}). "
               f"Load the model with its head (e.g. a ...ForCausalLM or ...ForMaskedLM)")
        raise UnsupportedModelError(msg)
    if model_type in (*llava.MODEL_TYPES, *qwen2_vl.MODEL_TYPES, *blip2.MODEL_TYPES):
        return _language_model_anatomy(config, table)
    if model_type in gpt2.MODEL_TYPES:
        return Anatomy("{base}h.{layer}.ln_1", "{base}h.{layer}.ln_2", "{base}ln_f", parallel=False)
    if model_type in (*llama.MODEL_TYPES, *_QWEN2_VL_TEXT):
        return Anatomy("{base}layers.{layer}.input_layernorm",
                       "{base}layers.{layer}.post_attention_layernorm", "{base}norm",
                       parallel=False)
    if model_type in gpt_neox.MODEL_TYPES:
        return Anatomy("{base}layers.{layer}.input_layernorm",
                       "{base}layers.{layer}.post_attention_layernorm",
                       "{base}final_layer_norm",
                       parallel=bool(getattr(model.config, "use_parallel_residual", True)))
    if model_type in opt.MODEL_TYPES:
        return _opt_anatomy(model, table)
    if model_type in clip.MODEL_TYPES:
        # The text tower's graph; the images are fixed candidates it is scored against.
        block = "{base}text_model.encoder.layers.{layer}"
        return Anatomy(f"{block}.layer_norm1", f"{block}.layer_norm2",
                       "{base}text_model.final_layer_norm", parallel=False)
    if model_type in bert.MODEL_TYPES:
        block = "{base}encoder.layer.{layer}"
        return Anatomy(None, f"{block}.intermediate", table.place("logits").path, parallel=False,
                       post_norms=(f"{block}.attention.output.LayerNorm", f"{block}.output.LayerNorm"))
    msg = (
        f"circuit discovery has no residual-stream anatomy for family {table.family!r}; "
        f"supported: gpt2, llama, mistral, qwen2, gpt_neox, bert, roberta, clip's text tower "
        f"and llava's language model"
    )
    raise UnsupportedModelError(msg)


# Qwen2-VL's language model is a Qwen2 decoder (with multimodal rotary positions, applied after
# the projections edge patching recomputes).
_QWEN2_VL_TEXT = ("qwen2_vl_text", "qwen2_5_vl_text")


class _TextModel:
    def __init__(self, config: object):
        self.config = config


def _language_model_anatomy(config: object, table: SiteTable) -> Anatomy:
    """A multimodal model's graph is its language model's; the vision tower and projector feed
    it through the image tokens' embeddings (the ``embed`` source). The language model's paths
    move under the prefix at which the table finds its blocks."""
    inner = anatomy_of(_TextModel(config.text_config), table)
    inner_blocks = inner.mlp_norm.split(".{layer}")[0][len("{base}"):]
    prefix = table.blocks[:len(table.blocks) - len(inner_blocks)]
    if not table.blocks.endswith(inner_blocks):
        msg = f"cannot place the language model's blocks {inner_blocks!r} under {table.blocks!r}"
        raise UnsupportedModelError(msg)

    def moved(path: str | None) -> str | None:
        return None if path is None else path.replace("{base}", prefix)

    return Anatomy(moved(inner.attn_norm), moved(inner.mlp_norm), moved(inner.final_norm),
                   inner.parallel, None if inner.post_norms is None
                   else tuple(moved(path) for path in inner.post_norms))


def _opt_anatomy(model: object, table: SiteTable) -> Anatomy:
    """OPT: pre-LayerNorm (most sizes) or post-LayerNorm (350m). Its MLP sees batch and
    position flattened into one axis, which the edge-patching forward unflattens."""
    config = model.config
    block = "{base}decoder.layers.{layer}"
    # The unembedding's read: the final LayerNorm, else the projection out, else the head.
    has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
    if has_final_norm:
        final = "{base}decoder.final_layer_norm"
    elif getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        final = "{base}decoder.project_out"
    else:
        final = table.place("logits").path
    if config.do_layer_norm_before:
        return Anatomy(f"{block}.self_attn_layer_norm", f"{block}.final_layer_norm", final,
                       parallel=False)
    return Anatomy(None, f"{block}.fc1", final, parallel=False,
                   post_norms=(f"{block}.self_attn_layer_norm", f"{block}.final_layer_norm"))


def in_out_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The weight of a projection laid out ``[in, out]`` (``nn.Linear`` stores ``[out, in]``,
    transformers' ``Conv1D`` stores ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight.t()
    if hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return module.weight  # transformers Conv1D
    msg = (
        f"{name} must be an nn.Linear or a transformers Conv1D projection for edge patching; "
        f"got {type(module).__name__}"
    )
    raise UnsupportedModelError(msg)


def per_head_projection(module: nn.Module, tap: Tap, dims: Dims, name: str
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[d_model, head, d_head]`` weight and ``[head, d_head]`` bias of the q, k or v part of
    a projection, by applying the site table's view of its output to the weight's output axis."""
    weight = in_out_weight(module, name)
    bias = getattr(module, "bias", None)
    view = tap.view
    if view is None:
        msg = f"the site table gives no head view for {name}"
        raise UnsupportedModelError(msg)
    return view(weight, dims), None if bias is None else view(bias, dims)
