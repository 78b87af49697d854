"""Games whose players are SAE features: which learned features a prediction rests on, together.

A coalition runs the prompt with its features as the SAE encodes them and every other chosen
feature ablated at the SAE's site: its activation set to zero, to its mean over reference
prompts, or to its value on a reference prompt (resampling). The edit goes through the decoder
with the SAE's error term kept (as :class:`~mechinterp.sae.SAEEdit` writes it): the site's
activation ``x`` becomes ``x + Σ_absent (a'_i - a_i) · W_dec[i]``, so the full coalition runs
the model untouched.

Only the site is edited, so its activation, and every feature's, is the same in every
coalition: the features are encoded once, and a batch of coalitions costs one product of their
absence matrix with the features' changes, then one forward of the model.

Examples:
    >>> import mechinterp
    >>> from mechinterp.interactions import exact
    >>> from mechinterp.interactions.feature_games import FeatureGame
    >>> from mechinterp.zoo import zoo_sae
    >>> model = mechinterp.load("induction-2l")
    >>> sae = zoo_sae("induction-2l-sae")  # TopK, k = 8, at resid_post.0
    >>> game = FeatureGame(model, "kete vetu fuba mabi kete vetu", sae, features=6,
    ...                    progress=False)
    >>> game.n_players, game.players[0].startswith("resid_post.0[feature=")
    (6, True)
    >>> shapley = exact(game, index="SV")  # 64 coalitions, one forward
    >>> total = sum(float(shapley[(i,)]) for i in range(6))  # efficiency: v(N) - v(empty)
    >>> bool(abs(total - (game.full_value - game.empty_value)) < 1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechinterp.errors import DeviceError, InputError, ShapeError
from mechinterp.interactions.model_games import ABLATIONS, ModelGame, Output
from mechinterp.interventions import Add
from mechinterp.model import Inputs, InterpModel
from mechinterp.sae.encode import encode_subset
from mechinterp.sae.interventions import decoded_change, feature_indices
from mechinterp.sae.sae import SAE
from mechinterp.sites import Site

__all__ = ["FeatureGame"]


class FeatureGame(ModelGame):
    """A game whose players are features of an SAE at one site of the model.

    Args:
        model: a model from :func:`mechinterp.load`.
        prompt: one prompt: text, token ids, or one row of :class:`~mechinterp.model.Tokens`.
        sae: the autoencoder (``d_out == d_in``), on the model's device.
        features: the players: latent indices in ``[0, d_sae)``, or a count ``n``: the ``n``
            features with the largest summed activation on the prompt (over ``positions``).
        site: where the SAE reads and writes, a whole component at one layer (default: the
            site its ``hook_name`` names, such as ``"resid_post.0"``).
        positions: the row's positions where absent features are ablated (counted like
            ``Site.pos``; default: every one).
        ablation: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference: for ``"mean"``, prompts over whose real tokens each feature's activation is
            averaged; for ``"resample"``, one unpadded prompt as long as the game's row.
        output, target, position, subtract_empty, batch_size, progress: as for
            :class:`~mechinterp.interactions.model_games.ModelGame`.

    Attributes:
        sae, site: as given (the site resolved).
        features: the players' latent indices.
        activations: the players' activations on the prompt, ``[pos, n_players]``.

    Raises:
        InputError: an argument of the wrong kind, a feature out of range or repeated, a
            transcoder, or ``reference`` missing for ``"mean"`` / ``"resample"``.
        ShapeError: the site's activation is not ``d_in`` wide, or a resampling reference is
            not one unpadded prompt of the row's length.
        DeviceError: the SAE is not on the model's device.
    """

    def __init__(self, model: InterpModel, prompt: Inputs, sae: SAE, *,
                 features: Sequence[int] | int, site: Site | None = None,
                 positions: Sequence[int] | None = None, ablation: str = "zero",
                 reference: Inputs | None = None, output: Output = "log-odds",
                 target: object = None, position: int = -1, subtract_empty: bool = False,
                 batch_size: int | None = None, progress: bool = True) -> None:
        if not isinstance(sae, SAE):
            msg = f"sae must be an SAE; got {type(sae).__name__}"
            raise InputError(msg)
        if sae.d_out != sae.d_in:
            msg = (f"sae must reconstruct its input (d_out == d_in); got d_in={sae.d_in}, "
                   f"d_out={sae.d_out} (a transcoder)")
            raise InputError(msg)
        if ablation not in ABLATIONS:
            msg = f"ablation must be one of {list(ABLATIONS)}; got {ablation!r}"
            raise InputError(msg)
        if (ablation == "zero") != (reference is None):
            msg = ("reference must be None with ablation='zero'" if ablation == "zero" else
                   f"ablation={ablation!r} needs reference= prompts to take values from; got None")
            raise InputError(msg)
        self.sae, self.ablation = sae, ablation
        self.site = _site_of(sae, site)
        self._features_arg, self._positions_arg, self._reference_arg = (features, positions,
                                                                        reference)
        super().__init__(model, prompt, output=output, target=target, position=position,
                         subtract_empty=subtract_empty, batch_size=batch_size, progress=progress)

    def _setup(self) -> list[str]:
        if self.sae.device != self.model.device:
            msg = f"sae must be on the model's device {self.model.device}; got {self.sae.device}"
            raise DeviceError(msg)
        self._x = self._activation(self.tokens)  # [1, pos, d_in], the SAE's dtype
        self._model_dtype = next(self.model._module.parameters()).dtype  # what the delta adds to
        seq_len = self._x.shape[1]
        where = _positions(self._positions_arg, seq_len)
        features = self._choose(where)
        self.features = features
        index = torch.tensor(features, dtype=torch.long, device=self.sae.device)
        self._index = index
        current = encode_subset(self.sae, self._x, index)  # [1, pos, F]
        self.activations = current[0]
        ablated = self._ablated_values(index, seq_len)
        change = torch.zeros_like(current)
        where = where.to(change.device)
        change[:, where] = (ablated - current)[:, where]
        self._change = change  # [1, pos, F]: what each feature's absence changes
        return [f"{self.site}[feature={f}]" for f in features]

    def _activation(self, tokens) -> torch.Tensor:
        """The site's activation on ``tokens`` ``[rows, pos, d_in]``, in the SAE's dtype."""
        with torch.no_grad():
            x = self.model.cache(tokens, [self.site])[self.site]
        if x.ndim != 3 or x.shape[-1] != self.sae.d_in:
            msg = (f"the SAE reads d_in={self.sae.d_in} features, but the activation at "
                   f"{self.site} has shape {tuple(x.shape)}")
            raise ShapeError(msg)
        return x.to(self.sae.dtype)

    def _choose(self, where: torch.Tensor) -> list[int]:
        chosen, d_sae = self._features_arg, self.sae.d_sae
        if isinstance(chosen, int) and not isinstance(chosen, bool):
            if not 1 <= chosen <= d_sae:
                msg = f"features as a count must lie in [1, d_sae={d_sae}]; got {chosen}"
                raise InputError(msg)
            totals = self.sae.encode(self._x)[0, where].sum(0)  # [d_sae]
            # Largest first, ties to the lower index.
            order = torch.sort(-totals.float(), stable=True).indices
            return sorted(order[:chosen].tolist())
        found = feature_indices("features", chosen, d_sae, self.site)
        if not found:
            msg = "features must name at least one latent; got none"
            raise InputError(msg)
        return list(found)

    def _ablated_values(self, index: torch.Tensor, seq_len: int) -> torch.Tensor:
        """What absent features are set to, ``[1, pos, F]``."""
        if self.ablation == "zero":
            return torch.zeros(1, seq_len, index.numel(), dtype=self.sae.dtype,
                               device=self.sae.device)
        reference = self.model._as_tokens(self._reference_arg)
        unpadded = bool(reference.attention_mask.all())
        if self.ablation == "resample" and (reference.shape[0] != 1 or not unpadded
                                            or reference.shape[1] != seq_len):
            msg = (f"reference for ablation='resample' must be one unpadded prompt of {seq_len} "
                   f"tokens (the game's row); got shape {tuple(reference.shape)}")
            raise ShapeError(msg)
        values = encode_subset(self.sae, self._activation(reference), index)  # [rows, pos, F]
        if self.ablation == "resample":
            return values
        # Every real token of every reference row: one value per feature, at every position.
        mask = reference.attention_mask.to(values.device, values.dtype)[..., None]
        mean = (values * mask).sum((0, 1)) / mask.sum()
        return mean.expand(1, seq_len, -1)

    def _logits(self, coalitions: torch.Tensor) -> torch.Tensor:
        rows = coalitions.shape[0]
        absent = (~coalitions).to(self._change.dtype)  # [rows, F]
        change = absent[:, None, :] * self._change  # [rows, pos, F]
        delta = decoded_change(self.sae, self._x, change, self._index).to(self._model_dtype)
        return self._forward(self.tokens.repeat(rows), [Add(self.site, delta)])


def _site_of(sae: SAE, site: Site | None) -> Site:
    if site is None:
        if not sae.hook_name:
            msg = "site is needed: the SAE names no hook (hook_name is None)"
            raise InputError(msg)
        return Site.parse(sae.hook_name)
    if not isinstance(site, Site):
        msg = f"site must be a Site; got {type(site).__name__}"
        raise InputError(msg)
    return site


def _positions(positions: Sequence[int] | None, seq_len: int) -> torch.Tensor:
    """The chosen positions as a bool mask ``[seq_len]``."""
    where = torch.zeros(seq_len, dtype=torch.bool)
    if positions is None:
        where[:] = True
        return where
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or \
            not positions:
        msg = f"positions must be a non-empty sequence of ints or None; got {positions!r}"
        raise InputError(msg)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -seq_len <= p < seq_len:
            msg = f"positions must be ints in [-{seq_len}, {seq_len}); got {p!r}"
            raise InputError(msg)
        where[p] = True
    return where
