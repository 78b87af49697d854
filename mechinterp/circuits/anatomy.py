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
from mechinterp.models import bert, clip, gpt2, gpt_neox, llama, llava
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
    if model_type in llava.MODEL_TYPES:
        # The language model's graph; the vision tower and projector feed it through the
        # image tokens' embeddings (the ``embed`` source).
        inner = anatomy_of(_TextModel(config.text_config), table)
        prefix = "{base}language_model."
        return Anatomy(*(path.replace("{base}", prefix) for path in
                         (inner.attn_norm, inner.mlp_norm, inner.final_norm)), inner.parallel)
    if model_type in gpt2.MODEL_TYPES:
        return Anatomy("{base}h.{layer}.ln_1", "{base}h.{layer}.ln_2", "{base}ln_f", parallel=False)
    if model_type in llama.MODEL_TYPES:
        return Anatomy("{base}layers.{layer}.input_layernorm",
                       "{base}layers.{layer}.post_attention_layernorm", "{base}norm",
                       parallel=False)
    if model_type in gpt_neox.MODEL_TYPES:
        return Anatomy("{base}layers.{layer}.input_layernorm",
                       "{base}layers.{layer}.post_attention_layernorm",
                       "{base}final_layer_norm",
                       parallel=bool(getattr(model.config, "use_parallel_residual", True)))
    if model_type in clip.MODEL_TYPES:
        # The text tower's graph; the images are fixed candidates it is scored against.
        block = "{base}text_model.encoder.layers.{layer}"
        return Anatomy(f"{block}.layer_norm1", f"{block}.layer_norm2",
                       "{base}text_model.final_layer_norm", parallel=False)
    if model_type in bert.MODEL_TYPES:
        block = "{base}encoder.layer.{layer}"
        head = table.place("logits").path if "logits" in table.places else None
        if head is None:
            msg = (f"circuit discovery on {model_type} needs its language-model head (a "
                   f"{model_type.capitalize()}ForMaskedLM), which the logits destination reads")
            raise UnsupportedModelError(msg)
        return Anatomy(None, f"{block}.intermediate", head, parallel=False,
                       post_norms=(f"{block}.attention.output.LayerNorm", f"{block}.output.LayerNorm"))
    msg = (
        f"circuit discovery has no residual-stream anatomy for family {table.family!r}; "
        f"supported: gpt2, llama, mistral, qwen2, gpt_neox, bert, roberta, clip's text tower "
        f"and llava's language model"
    )
    raise UnsupportedModelError(msg)


class _TextModel:
    def __init__(self, config: object):
        self.config = config


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
