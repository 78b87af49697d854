"""Feature interventions: ablate, clamp or steer SAE features at a site, keeping the error term.

An SAE rarely reconstructs its input exactly, so replacing an activation ``x`` by the edited
reconstruction ``x̂'`` would also delete the reconstruction error ``x - x̂`` and change the model
even when no feature is touched. :class:`SAEEdit` instead writes ``x + (x̂' - x̂)``: the error
term is kept implicitly, in one pass, and an edit that changes no feature leaves ``x`` untouched
bit for bit.

Because only the listed features change, ``x̂' - x̂`` is ``Σ_i (f'_i - f_i) · W_dec[i]`` over
the edited features (times the linear part of the SAE's input normalisation), so the decode costs
``O(len(edited) · d_in)`` per token rather than a full ``d_sae``-wide decode.

Examples:
    >>> import torch
    >>> from mechinterp import Site
    >>> from mechinterp.sae import SAE, SAEEdit
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2),
    ...           b_dec=torch.zeros(2))
    >>> x = torch.tensor([[[1.0, 2.0]]])
    >>> SAEEdit(Site("resid_post", layer=0), sae, ablate=[1]).write(x, None)
    >>> x
    tensor([[[1., 0.]]])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from numbers import Real

import torch

from mechinterp.errors import DeviceError, InputError, ShapeError
from mechinterp.interventions import TensorEdit
from mechinterp.sae.encode import encode_subset
from mechinterp.sae.sae import SAE
from mechinterp.sites import Site


class SAEEdit(TensorEdit):
    """Edit SAE features of the activation at ``site``, at every batch row and position.

    The activation ``x`` becomes ``x + (x̂' - x̂)``, where ``x̂`` is the SAE's reconstruction of
    ``x`` and ``x̂'`` the reconstruction after the feature edits. Features not listed keep their
    values; for TopK SAEs this means the top-k selection is not re-run after the edit.

    Args:
        site: a whole component at one layer whose last axis has ``sae.d_in`` entries, e.g.
            ``Site("resid_post", layer=1)`` or ``Site("mlp_out", layer=0)``.
        sae: the autoencoder (``d_out == d_in``; transcoders are not supported here).
        ablate: features set to 0.
        clamp: ``{feature: value}``; each feature is set to ``value``.
        steer: ``{feature: delta}``; ``delta`` is added to each feature's activation.

    Raises:
        InputError: ``sae`` is not an :class:`SAE`, is a transcoder, an edit kind is unknown,
            a feature index is not an int in ``[0, d_sae)``, a value is not a real number, an argument has the wrong type,
            or a feature is listed in more than one of ``ablate``, ``clamp`` and ``steer``.

    Examples:
        >>> import torch
        >>> from mechinterp import Site
        >>> from mechinterp.sae import SAE
        >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2),
        ...           b_dec=torch.zeros(2))
        >>> SAEEdit(Site("mlp_out", layer=0), sae, clamp={0: 3.0}, steer={1: -1.0})
        SAEEdit(Site('mlp_out', layer=0), clamp={0: 3.0}, steer={1: -1.0})
    """

    def __init__(
        self,
        site: Site,
        sae: SAE,
        *,
        ablate: Iterable[int] = (),
        clamp: Mapping[int, float] | None = None,
        steer: Mapping[int, float] | None = None,
        **unknown: object,
    ):
        super().__init__(site)
        if unknown:
            # Caught here rather than as a TypeError so a misspelt edit kind reads like the rest.
            msg = (
                f"unknown feature edit(s) {sorted(unknown)} for {site}; the kinds are ablate, "
                "clamp and steer"
            )
            raise InputError(msg)
        if not isinstance(sae, SAE):
            msg = f"sae for {site} must be an SAE; got {type(sae).__name__}"
            raise InputError(msg)
        if sae.d_out != sae.d_in:
            msg = (
                f"sae for {site} must reconstruct its input (d_out == d_in); got d_in={sae.d_in}, "
                f"d_out={sae.d_out} (a transcoder)"
            )
            raise InputError(msg)
        self.sae = sae
        self.ablate = feature_indices("ablate", ablate, sae.d_sae, site)
        self.clamp = _feature_map("clamp", clamp, sae.d_sae, site)
        self.steer = _feature_map("steer", steer, sae.d_sae, site)
        seen: dict[int, str] = {}
        for kind, features in (("ablate", self.ablate), ("clamp", self.clamp),
                               ("steer", self.steer)):
            for feature in features:
                if feature in seen:
                    # The order in which two edits of one feature compose would be a guess.
                    msg = (
                        f"feature {feature} for {site} is listed in both {seen[feature]} and "
                        f"{kind}; give each feature one edit"
                    )
                    raise InputError(msg)
                seen[feature] = kind

    def _detail(self) -> str:
        parts = []
        if self.ablate:
            parts.append(f"ablate={list(self.ablate)}")
        if self.clamp:
            parts.append(f"clamp={self.clamp}")
        if self.steer:
            parts.append(f"steer={self.steer}")
        return "".join(f", {part}" for part in parts)

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        """Add ``x̂' - x̂`` to ``tensor`` in place; ``x`` is ``current`` when given (a sum)."""
        x = tensor if current is None else current
        sae = self.sae
        if x.shape[-1] != sae.d_in:
            msg = (
                f"the SAE at {self.site} reads d_in={sae.d_in} features, but the activation "
                f"there has {x.shape[-1]} (shape {tuple(x.shape)})"
            )
            raise ShapeError(msg)
        if x.device != sae.device:
            msg = f"the SAE at {self.site} is on {sae.device} but the activation is on {x.device}"
            raise DeviceError(msg)
        if not (self.ablate or self.clamp or self.steer):
            # Nothing changes: leave the activation as the model made it, bit for bit.
            return
        tensor += self.delta(x).to(tensor.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂' - x̂`` ``[..., d_in]`` in the SAE's dtype for activations ``x [..., d_in]``."""
        sae = self.sae
        x = x.to(sae.dtype)
        features = [*self.ablate, *self.clamp, *self.steer]
        index = torch.tensor(features, dtype=torch.long, device=sae.device)
        # Steering adds a fixed amount whatever the feature's value, so only ablated and clamped
        # features need their current activations.
        n_read = len(self.ablate) + len(self.clamp)
        x_n, _ = sae._normalize(x)
        change = torch.empty((*x.shape[:-1], len(features)), dtype=sae.dtype, device=sae.device)
        if n_read:
            old = encode_subset(sae, x_n, index[:n_read], normalized=True)
            targets = [0.0] * len(self.ablate) + list(self.clamp.values())
            target = torch.tensor(targets, dtype=sae.dtype, device=sae.device)
            change[..., :n_read] = target - old
        if self.steer:
            change[..., n_read:] = torch.tensor(list(self.steer.values()), dtype=sae.dtype,
                                                device=sae.device)
        return decoded_change(sae, x, change, index)


def decoded_change(sae: SAE, x: torch.Tensor, change: torch.Tensor,
                   features: torch.Tensor) -> torch.Tensor:
    """``x̂' - x̂`` ``[..., d_in]``: how the SAE's reconstruction of activations ``x [..., d_in]``
    (its dtype) moves when the activations of ``features`` (int64 ``[F]``) change by ``change
    [..., F]``. ``change``'s leading dimensions broadcast against ``x``'s."""
    decoder = sae.W_dec[features]
    if sae.rescale_acts_by_decoder_norm:
        # decode() divides every activation by its decoder row's norm before the product.
        change = change / decoder.norm(dim=-1)
    out = change @ decoder  # b_dec cancels in the difference of two decodes
    # decode() works in the normalised space; the normalisation's inverse is affine, and only
    # its linear part survives the difference.
    if sae.normalize_activations == "constant_norm_rescale":
        out = out / (math.sqrt(sae.d_in) / x.norm(dim=-1, keepdim=True))
    elif sae.normalize_activations == "layer_norm":
        out = out * (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return out


def feature_activations(model, inputs, site: Site, sae: SAE) -> torch.Tensor:
    """Dense SAE feature activations ``[batch, pos, d_sae]`` of the activation at ``site``.

    Args:
        model: an :class:`mechinterp.model.InterpModel`.
        inputs: prompts, token ids ``[batch, pos]`` or ``Tokens``.
        site: a whole component at one layer whose last axis has ``sae.d_in`` entries.
        sae: the autoencoder.

    Raises:
        InputError: ``sae`` is not an :class:`SAE` or ``site`` is not a ``Site``.
        ShapeError: the activation at ``site`` does not have ``sae.d_in`` features.
    """
    if not isinstance(sae, SAE):
        msg = f"sae must be an SAE; got {type(sae).__name__}"
        raise InputError(msg)
    if not isinstance(site, Site):
        msg = f"site must be a Site; got {type(site).__name__}"
        raise InputError(msg)
    x = model.run(inputs, cache=[site]).cache[site]
    if x.shape[-1] != sae.d_in:
        msg = (
            f"the SAE reads d_in={sae.d_in} features, but the activation at {site} has "
            f"{x.shape[-1]} (shape {tuple(x.shape)})"
        )
        raise ShapeError(msg)
    return sae.encode(x.to(sae.device))


def _feature(name: str, value: object, d_sae: int, site: Site) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError  # True is an int to Python but never a meaningful feature index
        feature = operator.index(value)
    except TypeError:
        msg = f"{name} for {site} must hold int feature indices; got {value!r}"
        raise InputError(msg) from None
    if not 0 <= feature < d_sae:
        msg = f"{name} for {site}: feature {feature} is out of range [0, d_sae={d_sae})"
        raise InputError(msg)
    return feature


def feature_indices(name: str, features: object, d_sae: int, site: Site) -> tuple[int, ...]:
    """``features`` as distinct int latent indices in ``[0, d_sae)``; an :class:`InputError`
    naming ``name`` and ``site`` otherwise."""
    if isinstance(features, (str, bytes, Mapping)) or not isinstance(features, Iterable):
        msg = f"{name} for {site} must be a sequence of int feature indices; got {features!r}"
        raise InputError(msg)
    result = tuple(_feature(name, f, d_sae, site) for f in features)
    if len(set(result)) != len(result):
        msg = f"{name} for {site} lists a feature more than once: {list(result)}"
        raise InputError(msg)
    return result


def _feature_map(name: str, edits: object, d_sae: int, site: Site) -> dict[int, float]:
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        msg = f"{name} for {site} must be a mapping {{feature: value}}; got {edits!r}"
        raise InputError(msg)
    result = {}
    for feature, value in edits.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            msg = f"{name}[{feature!r}] for {site} must be a finite real number; got {value!r}"
            raise InputError(msg)
        result[_feature(name, feature, d_sae, site)] = float(value)
    return result
