"""``load_sae`` / ``save_sae``: read the SAE weight formats people publish; write SAELens's.

Formats (``format=`` names, detected from the files when not given):

- ``"saelens"``: ``cfg.json`` + ``sae_weights.safetensors``; 6.x configs and pre-6.0 ones
  (``hook_point``, ``activation_fn_str``/``activation_fn_kwargs``).
- ``"sparsify"``: EleutherAI sparsify, one hookpoint directory with ``cfg.json`` +
  ``sae.safetensors``. sparsify subtracts ``b_dec`` from the input (unless ``transcode``), applies
  ReLU and keeps the top ``k``; ``W_dec`` is stored ``[d_sae, d_in]`` and is *not* transposed.
- ``"gemma_scope"``: ``params.npz`` (JumpReLU, ``b_dec`` not subtracted from the input).
- ``"llama_scope"``: ``hyperparams.json`` + ``checkpoints/final.safetensors`` (or
  ``final.safetensors``). Assumptions: ``act_fn`` is ``relu``, ``jumprelu`` (scalar
  ``jump_relu_threshold``) or ``topk`` (``top_k``); ``norm_activation == "dataset-wise"`` with
  ``dataset_average_activation_norm {in, out}`` is folded into the weights so the SAE reads raw
  activations; ``"token-wise"`` maps to ``constant_norm_rescale``;
  ``sparsity_include_decoder_norm`` is folded into a per-latent threshold (JumpReLU) or becomes
  ``rescale_acts_by_decoder_norm`` (TopK); ``apply_decoder_bias_to_pre_encoder`` maps to
  ``apply_b_dec_to_input``.
- ``"pt"``: OpenAI ``sparse_autoencoder`` and ``dictionary_learning`` state dicts (``.pt`` /
  ``.pth``), read with ``torch.load(weights_only=True)`` only, so no pickled code ever runs.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mechinterp.errors import InputError, ShapeError
from mechinterp.sae.sae import SAE

FORMATS = ("saelens", "sparsify", "gemma_scope", "llama_scope", "pt")

# SAELens 6.x architecture names -> (our architecture, reads a skip connection).
_SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "gated": "gated",
    "batchtopk": "batchtopk",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}


def load_sae(
    path: str | Path,
    *,
    format: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SAE:
    """Load an SAE from a published checkpoint.

    Args:
        path: the checkpoint directory (or the ``.npz`` / ``.pt`` / ``.pth`` file itself).
        format: one of ``FORMATS``; detected from the files when None.
        device: where to put the tensors.
        dtype: cast to this floating dtype (default: as stored).

    Returns:
        The SAE, validated.

    Raises:
        InputError: missing files or tensors, an unknown format or architecture, or a pickle
            that would need code execution.
        ShapeError: tensors whose shapes disagree.
    """
    path = Path(path).expanduser()
    if not path.exists():
        msg = f"path must be an existing SAE file or directory; got {str(path)!r}"
        raise InputError(msg)
    if format is None:
        format = _detect(path)
    loaders = {
        "saelens": _load_saelens,
        "sparsify": _load_sparsify,
        "gemma_scope": _load_gemma_scope,
        "llama_scope": _load_llama_scope,
        "pt": _load_pt,
    }
    if format not in loaders:
        msg = f"format must be one of {FORMATS} or None; got {format!r}"
        raise InputError(msg)
    sae = loaders[format](path)
    return sae.to(device=device, dtype=dtype)


def save_sae(sae: SAE, path: str | Path) -> None:
    """Write ``sae`` in SAELens 6.x layout (``cfg.json`` + ``sae_weights.safetensors``).

    Args:
        sae: the SAE to save.
        path: a directory, created if missing.
    """
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    # SAELens stores trained BatchTopK SAEs as JumpReLU with one threshold: the same inference.
    architecture = {"relu": "standard", "batchtopk": "jumprelu"}.get(sae.architecture,
                                                                     sae.architecture)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.architecture == "gated":
        del tensors["b_enc"]  # gated SAEs have b_gate and b_mag instead
    if sae.d_out != sae.d_in or sae.W_skip is not None:
        architecture = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}.get(
            architecture
        )
        if architecture is None:
            msg = f"sae must be relu or jumprelu to save as a transcoder; got {sae.architecture!r}"
            raise InputError(msg)
        if sae.W_skip is not None:
            architecture = architecture.replace("transcoder", "skip_transcoder")
            tensors["W_skip"] = sae.W_skip
    for name in ("threshold", "b_gate", "b_mag", "r_mag"):
        if getattr(sae, name) is not None:
            tensors[name] = getattr(sae, name)
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        # The version marks a 6.x config: SAELens converts versionless ones as pre-6.0 files
        # and drops the nested hook name on the way.
        "metadata": {"hook_name": sae.hook_name, "sae_lens_version": "6.0.0"},
    }
    if sae.d_out != sae.d_in or sae.W_skip is not None:
        cfg["d_out"] = sae.d_out
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2))


def _detect(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.suffix in (".pt", ".pth"):
            return "pt"
    elif (path / "sae_weights.safetensors").is_file():
        return "saelens"
    elif (path / "sae.safetensors").is_file():
        return "sparsify"
    elif (path / "params.npz").is_file():
        return "gemma_scope"
    elif (path / "hyperparams.json").is_file():
        return "llama_scope"
    else:
        pts = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth"))
        if len(pts) == 1:
            return "pt"
        hookpoints = sorted(p.name for p in path.iterdir() if (p / "sae.safetensors").is_file())
        if hookpoints:
            msg = (
                f"path must be one sparsify hookpoint directory; {str(path)!r} holds several: "
                f"{hookpoints}"
            )
            raise InputError(msg)
    msg = (
        f"path must hold a known SAE format {FORMATS} (sae_weights.safetensors, sae.safetensors, "
        f"params.npz, hyperparams.json or one .pt/.pth file); got {str(path)!r}"
    )
    raise InputError(msg)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        msg = f"SAE config {str(file)!r} must exist; it is missing"
        raise InputError(msg)
    return json.loads(file.read_text())


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        msg = f"SAE weights {str(file)!r} must exist; it is missing"
        raise InputError(msg)
    return load_file(str(file))


def _take(tensors: dict[str, Any], name: str, source: Path) -> torch.Tensor:
    if name not in tensors:
        msg = f"tensor {name!r} must be in {str(source)!r}; found {sorted(tensors)}"
        raise InputError(msg)
    return tensors[name]


def _check_d_in(cfg_d_in: object, sae: SAE, source: Path) -> SAE:
    if cfg_d_in is not None and int(cfg_d_in) != sae.d_in:
        msg = f"d_in in the config of {str(source)!r} is {cfg_d_in}; the weights have {sae.d_in}"
        raise ShapeError(msg)
    return sae


def _load_saelens(path: Path) -> SAE:
    cfg = _read_json(path / "cfg.json")
    weights_file = path / "sae_weights.safetensors"
    tensors = _read_safetensors(weights_file)
    cfg = _convert_saelens_config(cfg)
    name = cfg.get("architecture", "standard")
    if name not in _SAELENS_ARCHITECTURES:
        msg = (
            f"architecture in {str(path / 'cfg.json')!r} must be one of "
            f"{sorted(_SAELENS_ARCHITECTURES)}; got {name!r}"
        )
        raise InputError(msg)
    architecture = _SAELENS_ARCHITECTURES[name]
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", "constant_norm_rescale", "layer_norm"):
        msg = (
            f"normalize_activations in {str(path / 'cfg.json')!r} must be 'none', "
            f"'constant_norm_rescale' or 'layer_norm' (others are not supported yet); "
            f"got {normalize!r}"
        )
        raise InputError(msg)
    if "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all()):
        msg = (
            f"tensor 'scaling_factor' in {str(weights_file)!r} must be all ones (finetuning "
            f"scaling is not supported); got values other than 1"
        )
        raise InputError(msg)
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    gated = architecture == "gated"
    sae = SAE(
        W_enc=_take(tensors, "W_enc", weights_file),
        b_enc=tensors["b_enc"] if gated and "b_enc" in tensors else (
            torch.zeros_like(_take(tensors, "b_gate", weights_file)) if gated
            else _take(tensors, "b_enc", weights_file)
        ),
        W_dec=_take(tensors, "W_dec", weights_file),
        b_dec=_take(tensors, "b_dec", weights_file),
        architecture=architecture,
        threshold=threshold,
        k=cfg.get("k"),
        b_gate=_take(tensors, "b_gate", weights_file) if gated else None,
        b_mag=_take(tensors, "b_mag", weights_file) if gated else None,
        r_mag=_take(tensors, "r_mag", weights_file) if gated else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        W_skip=_take(tensors, "W_skip", weights_file) if "skip" in name else None,
        hook_name=(cfg.get("metadata") or {}).get("hook_name"),
    )
    return _check_d_in(cfg.get("d_in"), sae, path / "cfg.json")


def _convert_saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring a pre-6.0 SAELens config to the 6.x keys (other configs pass through)."""
    if "metadata" in cfg and "activation_fn_str" not in cfg:
        return cfg
    cfg = dict(cfg)
    metadata = dict(cfg.get("metadata") or {})
    metadata.setdefault("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    cfg["metadata"] = metadata
    activation = cfg.get("activation_fn_str", "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    architecture = cfg.get("architecture", "standard")
    if architecture == "standard" and activation == "topk":
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs.get("k", cfg.get("k"))
        cfg.setdefault(
            "rescale_acts_by_decoder_norm", bool(kwargs.get("rescale_acts_by_decoder_norm", False))
        )
    elif architecture == "standard" and activation != "relu":
        msg = (
            f"activation_fn_str of a pre-6.0 SAELens config must be 'relu' or 'topk'; "
            f"got {activation!r}"
        )
        raise InputError(msg)
    if cfg.get("normalize_activations") in (None, False):
        cfg["normalize_activations"] = "none"
    return cfg


def _load_sparsify(path: Path) -> SAE:
    cfg = _read_json(path / "cfg.json")
    weights_file = path / "sae.safetensors"
    tensors = _read_safetensors(weights_file)
    encoder = _take(tensors, "encoder.weight", weights_file)
    transcode = bool(cfg.get("transcode", False))
    sae = SAE(
        W_enc=encoder.T.contiguous(),
        b_enc=_take(tensors, "encoder.bias", weights_file),
        # sparsify stores W_dec as [d_sae, d_in] already (SAELens's loader transposes it wrongly).
        W_dec=_take(tensors, "W_dec", weights_file),
        b_dec=_take(tensors, "b_dec", weights_file),
        architecture="topk",
        k=cfg.get("k"),
        apply_b_dec_to_input=not transcode,
        W_skip=tensors.get("W_skip"),
        hook_name=path.name,
    )
    return _check_d_in(cfg.get("d_in"), sae, path / "cfg.json")


def _load_gemma_scope(path: Path) -> SAE:
    file = path if path.is_file() else path / "params.npz"
    if not file.is_file():
        msg = f"Gemma Scope weights {str(file)!r} must exist; it is missing"
        raise InputError(msg)
    # allow_pickle=False: an .npz can smuggle object arrays, which unpickle on access.
    with np.load(file, allow_pickle=False) as arrays:
        tensors = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    return _jumprelu_named(tensors, file)


def _load_llama_scope(path: Path) -> SAE:
    hyper_file = path / "hyperparams.json"
    hp = _read_json(hyper_file)
    weights_file = path / "checkpoints" / "final.safetensors"
    if not weights_file.is_file():
        weights_file = path / "final.safetensors"
    tensors = _read_safetensors(weights_file)
    W_enc = _take(tensors, "encoder.weight", weights_file).T.contiguous()
    b_enc = _take(tensors, "encoder.bias", weights_file)
    W_dec = _take(tensors, "decoder.weight", weights_file).T.contiguous()
    b_dec = _take(tensors, "decoder.bias", weights_file)
    apply_b_dec = bool(hp.get("apply_decoder_bias_to_pre_encoder", False))
    normalize = "none"
    norm_mode = hp.get("norm_activation", "inference")
    averages = hp.get("dataset_average_activation_norm")
    if norm_mode == "dataset-wise" and averages:
        # The SAE saw x * sqrt(d)/avg_in and produced y * sqrt(d)/avg_out; fold both scales.
        scale_in = math.sqrt(W_enc.shape[0]) / float(averages["in"])
        scale_out = math.sqrt(W_dec.shape[1]) / float(averages["out"])
        if apply_b_dec and not math.isclose(scale_in, scale_out):
            msg = (
                f"hyperparams in {str(hyper_file)!r}: apply_decoder_bias_to_pre_encoder with "
                f"different in/out dataset norms cannot be folded; got {averages}"
            )
            raise InputError(msg)
        W_enc = W_enc * scale_in
        W_dec = W_dec / scale_out
        b_dec = b_dec / scale_out
    elif norm_mode == "token-wise":
        normalize = "constant_norm_rescale"
    elif norm_mode not in ("inference", "dataset-wise"):
        msg = (
            f"norm_activation in {str(hyper_file)!r} must be 'inference', 'dataset-wise' or "
            f"'token-wise'; got {norm_mode!r}"
        )
        raise InputError(msg)
    act_fn = hp.get("act_fn", "relu")
    include_decoder_norm = bool(hp.get("sparsity_include_decoder_norm", False))
    threshold = None
    k = None
    if act_fn == "jumprelu":
        theta = torch.full((W_enc.shape[1],), float(hp["jump_relu_threshold"]), dtype=W_enc.dtype)
        # h * ||W_dec[i]|| > theta  <=>  h > theta / ||W_dec[i]|| (norms are positive).
        threshold = theta / W_dec.norm(dim=-1) if include_decoder_norm else theta
    elif act_fn == "topk":
        k = int(hp["top_k"])
    elif act_fn != "relu":
        msg = f"act_fn in {str(hyper_file)!r} must be 'relu', 'jumprelu' or 'topk'; got {act_fn!r}"
        raise InputError(msg)
    sae = SAE(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        architecture=act_fn,
        threshold=threshold,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalize,
        rescale_acts_by_decoder_norm=include_decoder_norm and act_fn == "topk",
        hook_name=hp.get("hook_point_in"),
    )
    return _check_d_in(hp.get("d_model"), sae, hyper_file)


def _load_pt(path: Path) -> SAE:
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.suffix in (".pt", ".pth"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        msg = (
            f"checkpoint {str(path)!r} must be loadable with torch.load(weights_only=True) "
            f"(plain tensors and containers); it needs code execution to unpickle, so it was not "
            f"loaded ({first_line})"
        )
        raise InputError(msg) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        msg = f"checkpoint {str(path)!r} must hold a state dict; got {type(state).__name__}"
        raise InputError(msg)
    if "pre_bias" in state and "latent_bias" in state:
        return _from_openai(state, path)
    return _from_dictionary_learning(state, path)


def _from_openai(state: dict[str, Any], path: Path) -> SAE:
    activation = state.get("activation", "ReLU")
    kwargs = state.get("activation_state_dict") or {}
    if activation not in ("ReLU", "TopK"):
        msg = f"activation in {str(path)!r} must be 'ReLU' or 'TopK'; got {activation!r}"
        raise InputError(msg)
    return SAE(
        W_enc=_take(state, "encoder.weight", path).T.contiguous(),
        b_enc=_take(state, "latent_bias", path),
        W_dec=_take(state, "decoder.weight", path).T.contiguous(),
        b_dec=_take(state, "pre_bias", path),
        architecture="topk" if activation == "TopK" else "relu",
        k=int(kwargs["k"]) if activation == "TopK" else None,
        apply_b_dec_to_input=True,
        normalize_activations="layer_norm" if state.get("normalize", False) else "none",
    )


def _jumprelu_named(tensors: dict[str, Any], path: Path) -> SAE:
    """A JumpReLU SAE whose tensors carry SAELens's names (Gemma Scope, dictionary_learning's
    JumpReluAutoEncoder); both leave b_dec out of the input."""
    return SAE(
        W_enc=_take(tensors, "W_enc", path),
        b_enc=_take(tensors, "b_enc", path),
        W_dec=_take(tensors, "W_dec", path),
        b_dec=_take(tensors, "b_dec", path),
        architecture="jumprelu",
        threshold=_take(tensors, "threshold", path),
        apply_b_dec_to_input=False,
    )


def _from_dictionary_learning(state: dict[str, Any], path: Path) -> SAE:
    dict_class = _dictionary_learning_class(path)
    if "W_enc" in state:  # JumpReluAutoEncoder; its apply_b_dec_to_input defaults to False.
        return _jumprelu_named(state, path)
    W_enc = _take(state, "encoder.weight", path).T.contiguous()
    W_dec = _take(state, "decoder.weight", path).T.contiguous()
    if "r_mag" in state:  # GatedAutoEncoder: bias-free encoder, gate and magnitude biases.
        b_gate = _take(state, "gate_bias", path)
        return SAE(
            W_enc=W_enc, b_enc=torch.zeros_like(b_gate), W_dec=W_dec,
            b_dec=_take(state, "decoder_bias", path), architecture="gated", b_gate=b_gate,
            b_mag=_take(state, "mag_bias", path), r_mag=state["r_mag"],
        )
    b_enc = _take(state, "encoder.bias", path)
    if "k" in state:  # AutoEncoderTopK or BatchTopKSAE: ReLU, then top-k or the threshold.
        if dict_class is not None and "BatchTopK" in dict_class:
            return SAE(
                W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=_take(state, "b_dec", path),
                architecture="batchtopk", threshold=_take(state, "threshold", path),
            )
        return SAE(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=_take(state, "b_dec", path),
            architecture="topk", k=int(state["k"]),
        )
    # AutoEncoder: relu(encoder(x - bias)), decoder(f) + bias.
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=_take(state, "bias", path))


def _dictionary_learning_class(path: Path) -> str | None:
    """dictionary_learning writes the trainer config beside ae.pt; it names the class."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    trainer = json.loads(config.read_text()).get("trainer", {})
    return trainer.get("dict_class")
