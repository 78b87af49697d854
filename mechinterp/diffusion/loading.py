"""Diffusion pipeline folders (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
optionally ``vae/``) -> :class:`DiffusionModel`, offline, weights from safetensors only."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mechinterp.errors import InputError, UnsupportedModelError


def is_pipeline_folder(path: Path) -> bool:
    """Whether ``path`` holds a diffusers pipeline's U-Net."""
    return (path / "unet" / "config.json").is_file()


def load_pipeline(path: Path, name: str):
    """The pipeline in ``path`` as a DiffusionModel (``name`` is its display name)."""
    try:
        import diffusers
    except ImportError:
        msg = (f"{name!r} is a diffusion pipeline, which needs diffusers: pip install "
               f"'mechinterp[diffusion]'")
        raise UnsupportedModelError(msg) from None
    import transformers

    from mechinterp.diffusion.model import DiffusionModel

    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True,
                                                          use_safetensors=True)
    text_encoder = tokenizer = scheduler = vae = tokenize = None
    if (path / "text_encoder" / "config.json").is_file():
        text_encoder = transformers.AutoModel.from_pretrained(
            path / "text_encoder", local_files_only=True, use_safetensors=True)
    if (path / "tokenizer").is_dir():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer",
                                                               local_files_only=True)
    config_file = path / "scheduler" / "scheduler_config.json"
    if config_file.is_file():
        class_name = json.loads(config_file.read_text())["_class_name"]
        scheduler_class = getattr(diffusers, class_name, None)
        if scheduler_class is None:
            msg = f"scheduler class {class_name!r} in {str(config_file)!r} is not in diffusers"
            raise InputError(msg)
        scheduler = scheduler_class.from_pretrained(path / "scheduler", local_files_only=True)
    if (path / "vae" / "config.json").is_file():
        vae = diffusers.AutoencoderKL.from_pretrained(path / "vae", local_files_only=True,
                                                      use_safetensors=True).eval()
    if name == "toy-unet" and tokenizer is not None:
        # The toy's captions have a fixed format: <bos> colour shape <eos>.
        from mechinterp.zoo.train_toy_unet import caption_ids

        tokenize = functools.partial(caption_ids, tokenizer)
    return DiffusionModel(unet, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=scheduler, vae=vae, tokenize=tokenize, name=name)
