"""``load``: a transformers model, a local directory or a shipped model name -> InterpModel."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechinterp.diffusion.loading import is_pipeline_folder, load_pipeline
from mechinterp.errors import InputError, UnsupportedModelError
from mechinterp.model import InterpModel
from mechinterp.models import FAMILIES, bert, blip2, clip, llava
from mechinterp.models.unet import is_unet
from mechinterp.zoo import ZOO, zoo_path

if TYPE_CHECKING:
    from mechinterp.diffusion.model import DiffusionModel


def load(
    model_or_path: nn.Module | str | Path,
    *,
    tokenizer: object | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> InterpModel | DiffusionModel:
    """Wrap a model with nnsight and attach its family's site table.

    Args:
        model_or_path: a transformers model object, a local directory saved with
            ``save_pretrained``, or the name of a model shipped with mechinterp
            (``"induction-2l"``). Nothing is downloaded. A diffusers pipeline folder (``unet/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``), such as the shipped
            ``"toy-unet"``, or a ``UNet2DConditionModel`` loads as a
            :class:`~mechinterp.diffusion.DiffusionModel`.
        tokenizer: a tokenizer for a model object (directories and shipped models bring theirs).
        device: where to put the model (default: leave it where it is; CPU for loaded files).
        dtype: cast the model's floating-point weights (default: as stored).

    Examples:
        >>> import mechinterp
        >>> model = mechinterp.load("induction-2l")
        >>> model.family, model.dims.n_layers
        ('gpt2', 2)
    """
    name = None
    if isinstance(model_or_path, nn.Module):
        module = model_or_path
    elif isinstance(model_or_path, (str, Path)):
        path, name = _locate(model_or_path)
        if is_pipeline_folder(path):
            return _placed(load_pipeline(path, name), device, dtype)
        module, found_tokenizer = _from_directory(path)
        tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    else:
        msg = (
            f"model_or_path must be a transformers model, a directory or one of {sorted(ZOO)}; "
            f"got {type(model_or_path).__name__}"
        )
        raise InputError(msg)
    if is_unet(module):
        from mechinterp.diffusion.model import DiffusionModel

        return _placed(DiffusionModel(module, tokenizer=tokenizer, name=name), device, dtype)
    _check_dtype(dtype)
    if dtype is not None:
        module = module.to(dtype)
    if device is not None:
        module = module.to(device)
    return InterpModel(module, tokenizer, name=name)


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        msg = f"dtype must be a floating-point torch dtype; got {dtype}"
        raise InputError(msg)


def _placed(model, device: str | torch.device | None, dtype: torch.dtype | None):
    """A DiffusionModel with its networks moved to ``device`` and ``dtype``."""
    _check_dtype(dtype)
    for network in (model._module, model.text_encoder, model.vae):
        if network is not None and device is not None:
            network.to(device)
        if network is not None and dtype is not None:
            network.to(dtype)
    return model


def _locate(spec: str | Path) -> tuple[Path, str]:
    if isinstance(spec, str) and spec in ZOO:
        return zoo_path(spec), spec
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file() and not is_pipeline_folder(path):
        msg = (
            f"model_or_path must be a directory holding config.json (or a diffusion pipeline's "
            f"unet/config.json) or a shipped model {sorted(ZOO)}; got {str(spec)!r}"
        )
        raise InputError(msg)
    return path, path.name


def _from_directory(path: Path) -> tuple[nn.Module, object | None]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in FAMILIES:
        msg = (
            f"no site table for model_type {config.model_type!r} in {str(path)!r}; "
            f"supported: {sorted(FAMILIES)}"
        )
        raise UnsupportedModelError(msg)
    # Encoders load with their masked-LM head so that `logits` is a site; LLaVA and BLIP-2 with
    # their language-model head; CLIP as the pair of towers.
    auto = (transformers.AutoModelForMaskedLM if config.model_type in bert.MODEL_TYPES
            else transformers.AutoModelForImageTextToText
            if config.model_type in (*llava.MODEL_TYPES, *blip2.MODEL_TYPES)
            else transformers.AutoModel if config.model_type in clip.MODEL_TYPES
            else transformers.AutoModelForCausalLM)
    module = auto.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return module, tokenizer
