"""Small trained models shipped inside the package, for demos and tests.

``zoo_path(name)`` gives the folder of a model, which :func:`mechinterp.load` loads offline (or
transformers' ``from_pretrained``: ``AutoModelForCausalLM`` for the language models,
``AutoModelForImageTextToText`` for the LLaVA toy; the diffusion toy ``toy-unet`` is a diffusers
pipeline folder that ``train_toy_unet.load_toy_unet`` loads), or of a sparse autoencoder trained
on one of them, which :func:`zoo_sae` loads.
"""

from __future__ import annotations

import pathlib
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mechinterp.sae.sae import SAE

# Model name -> folder inside this package.
ZOO: dict[str, str] = {
    # 2-layer GPT-2 trained on repeated random spans: layer 0 has a previous-token head and
    # layer 1 an induction head (see train_induction.py and the folder's training_report.json).
    "induction-2l": "induction-2l",
    # Tiny LLaVA (2-layer CLIP vision tower, 8x8 patches -> 16 image tokens; 2-layer Llama)
    # trained on 32x32 scenes of coloured shapes (mechinterp.zoo.shapes) to answer "what colour
    # is the square ?" / "what shape is red ?": the answer flows from the image tokens of the
    # asked-about shape's cell (see train_toy_vlm.py and the folder's training_report.json).
    # Build its inputs with mechinterp.zoo.train_toy_vlm.vlm_inputs.
    "toy-vlm": "toy-vlm",
    # tracr-compiled RASP programs as GPT-2s whose circuits are known by construction; each
    # folder's ground_truth.json lists the circuit's nodes and edges (see compile_tracr.py).
    # Is the prefix a balanced shuffle-Dyck-2 word over () and {}: 6 layers, 6 heads, 6 MLPs.
    "tracr-dyck": "tracr-dyck",
    # Case-insensitive induction: a previous-token head, two MLPs, an induction head.
    "tracr-induction": "tracr-induction",
    # Tiny text-conditioned diffusion U-Net (diffusers UNet2DConditionModel on 16 x 16 RGB
    # pixels, no VAE) with a layer-free CLIPTextModel over "<bos> colour shape <eos>", trained
    # on single coloured shapes (the shape's cell of a mechinterp.zoo.shapes render): the colour
    # word (position 1) steers the colour through the cross-attention (attn2) keys and values
    # (see train_toy_unet.py and the folder's training_report.json). Not a transformers folder:
    # load it with mechinterp.zoo.train_toy_unet.load_toy_unet.
    "toy-unet": "toy-unet",
}

# SAE name -> folder inside this package (SAELens layout; the config's hook_name is the site).
ZOO_SAES: dict[str, str] = {
    # TopK SAE (512 latents, k = 8) on induction-2l's resid_post of layer 0, trained on the
    # model's training mix (see train_sae.py and the folder's training_report.json).
    "induction-2l-sae": "induction-2l-sae",
}


def zoo_path(name: str) -> pathlib.Path:
    """The folder of the shipped model or SAE ``name``; ``LookupError`` for an unknown name."""
    folder = ZOO.get(name, ZOO_SAES.get(name))
    if folder is None:
        raise LookupError(
            f"no zoo model or SAE named {name!r}; valid names: {', '.join(sorted(ZOO | ZOO_SAES))}"
        )
    return pathlib.Path(str(files("mechinterp.zoo") / folder))


def zoo_sae(name: str, *, device: str | torch.device = "cpu") -> SAE:
    """Load the shipped SAE ``name``; ``LookupError`` for a name not in ``ZOO_SAES``.

    Examples:
        >>> from mechinterp.zoo import zoo_sae
        >>> sae = zoo_sae("induction-2l-sae")
        >>> sae.architecture, sae.k, sae.d_in, sae.d_sae, sae.hook_name
        ('topk', 8, 64, 512, 'resid_post.0')
    """
    if name not in ZOO_SAES:
        raise LookupError(f"no zoo SAE named {name!r}; valid names: {', '.join(sorted(ZOO_SAES))}")
    # Imported here so that importing the zoo (which loading does) stays light.
    from mechinterp.sae.formats import load_sae

    return load_sae(zoo_path(name), format="saelens", device=device)
