"""Site table of diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x and the shipped
``toy-unet``).

A U-Net has three kinds of layer, each numbered on its own in forward order (down blocks, the
mid block, up blocks):

- transformer layers (each ``BasicTransformerBlock`` of each ``Transformer2DModel``): the
  language vocabulary applies to them, ``resid_pre``/``resid_post`` around the block,
  ``attn_out``/``head``/``q``/``k``/``v``/``pattern`` of the self-attention ``attn1``, ``cross_*``
  of the cross-attention ``attn2`` (its keys and values index the text tokens), ``mlp_out`` and
  ``neuron`` of the feed-forward;
- ``resnet``: each ``ResnetBlock2D``'s output;
- ``block``: each down, mid and up block's output (for a down block, the hidden state it passes
  down, which is also its last skip connection: a write reaches both).

Positions are spatial locations, row-major (``h * width + w``) at the layer's own resolution;
feature maps ``[batch, channel, height, width]`` are viewed as ``[batch, h * w, channel]``, the
same order the transformer layers see. Positions are never padded. ``embed`` is the output of
``conv_in``. Per-head sites split the input of each attention's ``to_out[0]``.

Examples:
    >>> from mechinterp.zoo import zoo_path
    >>> from mechinterp.zoo.train_toy_unet import load_toy_unet
    >>> unet = load_toy_unet(zoo_path("toy-unet"))[0]
    >>> table = site_table(unet)
    >>> [table.dims_for(c).n_layers for c in ("resid_post", "resnet", "block")]
    [4, 8, 5]
    >>> table.module_path("cross_attn", table.places["cross_attn"].path, "", 1)
    'mid_block.attentions.0.transformer_blocks.0.attn2'
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mechinterp.errors import UnsupportedModelError
from mechinterp.models.table import Dims, PatternTap, Place, SiteTable, Tap, Units, split_heads

CLASS_NAMES = ("UNet2DConditionModel",)


def is_unet(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers U-Net this table covers (checked by class name, so that
    diffusers is imported only by those who use it)."""
    return type(model).__name__ in CLASS_NAMES


def spatial(raw: torch.Tensor, _dims: Dims) -> torch.Tensor:
    """``[batch, channel, height, width]`` viewed as ``[batch, height * width, channel]``."""
    return raw.flatten(2).transpose(1, 2)


def site_table(unet: nn.Module) -> SiteTable:
    """The site table of a ``UNet2DConditionModel``."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]

    resnets: list[tuple[str, nn.Module]] = []
    layers: list[tuple[str, nn.Module]] = []
    for name, block in blocks:
        for kind, path, module in _forward_order(name, block):
            if kind == "resnet":
                resnets.append((path, module))
            else:
                layers += [(f"{path}.transformer_blocks.{k}", t)
                           for k, t in enumerate(module.transformer_blocks)]
    if not layers:
        msg = f"{type(unet).__name__} has no transformer layers; mechinterp needs cross-attention U-Nets"
        raise UnsupportedModelError(msg)

    layer_units = Units(tuple(p for p, _ in layers), tuple(_layer_dims(m) for _, m in layers))
    resnet_units = Units(tuple(p for p, _ in resnets),
                         tuple(_channel_dims(m.out_channels) for _, m in resnets))
    block_units = Units(tuple(p for p, _ in blocks),
                        tuple(_channel_dims(_block_channels(b)) for _, b in blocks))
    neuron = _ff_output_index(layers)
    heads = split_heads()
    places: dict[str, Place] = {
        "embed": Tap("conv_in", view=spatial),
        "resid_pre": Tap("{unit}", io="input", item=0, kwarg="hidden_states"),
        "resid_post": Tap("{unit}"),
        "attn_out": Tap("{unit}.attn1"),
        "head": Tap("{unit}.attn1.to_out.0", io="input", view=heads),
        "q": Tap("{unit}.attn1.to_q", view=heads),
        "k": Tap("{unit}.attn1.to_k", view=heads),
        "v": Tap("{unit}.attn1.to_v", view=heads),
        "pattern": PatternTap("{unit}.attn1"),
        "mlp_out": Tap("{unit}.ff"),
        "neuron": Tap(f"{{unit}}.ff.net.{neuron}", io="input"),
        "resnet": Tap("{unit}", view=spatial),
        "block": Tap("{unit}", item=0, view=spatial),
    }
    unsupported = {
        "resid_mid": "a U-Net transformer layer has two attention sublayers before its MLP; "
                     "read resid_pre, attn_out, cross_attn and mlp_out instead",
        "logits": "a U-Net predicts noise, not logits; the denoising loop steps with its output",
        "projector": "a U-Net has no multimodal projector",
    }
    if all(getattr(m, "attn2", None) is not None for _, m in layers):
        places.update({
            "cross_attn": Tap("{unit}.attn2"),
            "cross_head": Tap("{unit}.attn2.to_out.0", io="input", view=heads),
            "cross_q": Tap("{unit}.attn2.to_q", view=heads),
            "cross_k": Tap("{unit}.attn2.to_k", view=heads),
            "cross_v": Tap("{unit}.attn2.to_v", view=heads),
            "cross_pattern": PatternTap("{unit}.attn2"),
        })
    else:
        for component in ("cross_attn", "cross_head", "cross_q", "cross_k", "cross_v",
                          "cross_pattern"):
            unsupported[component] = "its transformer layers have no cross-attention (attn2)"
    per_layer = ("resid_pre", "resid_post", "attn_out", "head", "q", "k", "v", "pattern",
                 "mlp_out", "neuron", "cross_attn", "cross_head", "cross_q", "cross_k", "cross_v",
                 "cross_pattern")
    units = {component: layer_units for component in per_layer}
    units["resnet"] = resnet_units
    units["block"] = block_units
    dims = replace(layer_units.dims[0], n_layers=len(layers))
    return SiteTable(
        family="unet",
        dims=dims,
        places=places,
        blocks="down_blocks",
        causal=False,
        position_ids=False,
        unsupported=unsupported,
        sequential=False,
        units=units,
        padded=False,
    )


def _forward_order(name: str, block: nn.Module):
    """``(kind, path, module)`` of a block's ResNets and transformers, in forward order."""
    resnets = list(getattr(block, "resnets", []))
    attentions = [a for a in (getattr(block, "attentions", None) or [])
                  if hasattr(a, "transformer_blocks")]
    if name == "mid_block":
        # The mid block starts with a ResNet, then alternates attention and ResNet.
        order = [("resnet", f"{name}.resnets.0", resnets[0])]
        for j, (attention, resnet) in enumerate(zip(attentions, resnets[1:])):
            order += [("attention", f"{name}.attentions.{j}", attention),
                      ("resnet", f"{name}.resnets.{j + 1}", resnet)]
        return order
    order = []
    for j, resnet in enumerate(resnets):
        order.append(("resnet", f"{name}.resnets.{j}", resnet))
        if j < len(attentions):
            order.append(("attention", f"{name}.attentions.{j}", attentions[j]))
    return order


def _layer_dims(layer: nn.Module) -> Dims:
    attention = layer.attn1
    inner = attention.to_q.out_features
    return Dims(n_layers=1, n_heads=attention.heads, n_kv_heads=attention.heads,
                d_model=attention.to_q.in_features, d_head=inner // attention.heads,
                d_mlp=_ff_output(layer).in_features, d_vocab=0)


def _channel_dims(channels: int) -> Dims:
    return Dims(n_layers=1, n_heads=0, n_kv_heads=0, d_model=channels, d_head=0, d_mlp=0,
                d_vocab=0)


def _block_channels(block: nn.Module) -> int:
    return block.resnets[-1].out_channels


def _ff_output(layer: nn.Module) -> nn.Linear:
    return layer.ff.net[_ff_output_index([("", layer)])]


def _ff_output_index(layers: list[tuple[str, nn.Module]]) -> int:
    """The index in ``ff.net`` of the feed-forward's output projection (its input is the
    neurons), the same in every layer."""
    found = {max(i for i, m in enumerate(layer.ff.net) if isinstance(m, nn.Linear))
             for _, layer in layers}
    if len(found) != 1:
        msg = f"the U-Net's feed-forward layers differ in layout (output projections at {found})"
        raise UnsupportedModelError(msg)
    return found.pop()
