"""``SAE``: the weights of one sparse autoencoder and its slow, exact reference forward pass.

The dense path here follows SAELens 6.x semantics term by term. It is the reference the compiled
kernels are held to, so it favours plainness over speed and materialises ``[N, d_sae]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from mechinterp.errors import DTypeError, InputError, ShapeError

ARCHITECTURES = ("relu", "jumprelu", "topk", "gated", "batchtopk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")

# The epsilon SAELens and OpenAI's sparse_autoencoder add to the standard deviation.
_LAYER_NORM_EPS = 1e-5


@dataclass
class SAE:
    """A sparse autoencoder (or transcoder) in SAELens's orientation.

    Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]``; ``d_out == d_in`` except for transcoders.

    Args:
        W_enc: encoder weight ``[d_in, d_sae]``.
        b_enc: encoder bias ``[d_sae]`` (unused by ``gated``, which has ``b_gate``).
        W_dec: decoder weight ``[d_sae, d_out]``.
        b_dec: decoder bias ``[d_out]``.
        architecture: one of ``"relu"``, ``"jumprelu"``, ``"topk"``, ``"gated"``, ``"batchtopk"``.
        threshold: ``[d_sae]`` (a scalar is broadcast) for ``jumprelu`` and ``batchtopk``.
        k: latents kept per token for ``topk``.
        b_gate: gate bias ``[d_sae]`` for ``gated``.
        b_mag: magnitude bias ``[d_sae]`` for ``gated``.
        r_mag: log magnitude scale ``[d_sae]`` for ``gated``.
        apply_b_dec_to_input: subtract ``b_dec`` from the (normalised) input before encoding.
        normalize_activations: ``"none"``, ``"constant_norm_rescale"`` or ``"layer_norm"``.
        rescale_acts_by_decoder_norm: ``topk`` only: rank ``h * ||W_dec[i]||`` and divide the
            decoder input by the same norms.
        W_skip: transcoder skip connection ``[d_out, d_in]``; ``forward`` adds ``x @ W_skip.T``.
        hook_name: where the SAE reads its input (metadata only).

    Examples:
        >>> import torch
        >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2),
        ...           b_dec=torch.zeros(2))
        >>> sae.forward(torch.tensor([[1.0, -1.0]]))
        tensor([[1., 0.]])
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: str = "relu"
    threshold: torch.Tensor | None = None
    k: int | None = None
    b_gate: torch.Tensor | None = None
    b_mag: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    W_skip: torch.Tensor | None = None
    hook_name: str | None = None

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                msg = f"{name} must be a torch.Tensor; got {type(value).__name__}"
                raise InputError(msg)
        if self.architecture not in ARCHITECTURES:
            msg = f"architecture must be one of {ARCHITECTURES}; got {self.architecture!r}"
            raise InputError(msg)
        if self.normalize_activations not in NORMALIZATIONS:
            msg = (
                f"normalize_activations must be one of {NORMALIZATIONS}; "
                f"got {self.normalize_activations!r}"
            )
            raise InputError(msg)
        _check_rank("W_enc", self.W_enc, 2, "[d_in, d_sae]")
        _check_rank("W_dec", self.W_dec, 2, "[d_sae, d_out]")
        d_in, d_sae = self.W_enc.shape
        if self.W_dec.shape[0] != d_sae:
            msg = (
                f"W_dec must be [d_sae={d_sae}, d_out] to match W_enc [d_in, d_sae]; "
                f"got {list(self.W_dec.shape)}"
            )
            raise ShapeError(msg)
        d_out = self.W_dec.shape[1]
        _check_shape("b_enc", self.b_enc, (d_sae,), "[d_sae]")
        _check_shape("b_dec", self.b_dec, (d_out,), "[d_out]")
        if self.apply_b_dec_to_input and d_out != d_in:
            msg = (
                f"apply_b_dec_to_input needs d_out == d_in (an autoencoder); got d_in={d_in}, "
                f"d_out={d_out}"
            )
            raise ShapeError(msg)
        if self.architecture in ("jumprelu", "batchtopk"):
            if self.threshold is None:
                msg = f"threshold is required for architecture {self.architecture!r}; got None"
                raise InputError(msg)
            if self.threshold.ndim == 0 or self.threshold.shape == (1,):
                # BatchTopK checkpoints store a single global threshold.
                self.threshold = self.threshold.reshape(()).expand(d_sae).clone()
            _check_shape("threshold", self.threshold, (d_sae,), "[d_sae] or a scalar")
        if self.architecture == "topk" and not _valid_k(self.k, d_sae):
            msg = f"k must be an int in [1, d_sae={d_sae}] for architecture 'topk'; got {self.k!r}"
            raise InputError(msg)
        if self.architecture == "gated":
            for name in ("b_gate", "b_mag", "r_mag"):
                if getattr(self, name) is None:
                    msg = f"{name} is required for architecture 'gated'; got None"
                    raise InputError(msg)
                _check_shape(name, getattr(self, name), (d_sae,), "[d_sae]")
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            msg = (
                "rescale_acts_by_decoder_norm is only defined for architecture 'topk'; "
                f"got architecture {self.architecture!r}"
            )
            raise InputError(msg)
        if self.W_skip is not None:
            _check_shape("W_skip", self.W_skip, (d_out, d_in), "[d_out, d_in]")
        dtype, device = self.W_enc.dtype, self.W_enc.device
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not value.is_floating_point() or value.dtype != dtype:
                msg = f"{name} must have the floating dtype of W_enc ({dtype}); got {value.dtype}"
                raise DTypeError(msg)
            if value.device != device:
                msg = f"{name} must be on W_enc's device ({device}); got {value.device}"
                raise InputError(msg)

    @property
    def d_in(self) -> int:
        """Width of the input activations."""
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (``d_in`` unless this is a transcoder)."""
        return self.W_dec.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype shared by every tensor."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """The device shared by every tensor."""
        return self.W_enc.device

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> SAE:
        """Return a copy with every tensor on ``device`` and cast to ``dtype``.

        Args:
            device: target device (default: unchanged).
            dtype: a floating-point dtype (default: unchanged).
        """
        if dtype is not None and not dtype.is_floating_point:
            msg = f"dtype must be a floating-point torch dtype; got {dtype}"
            raise DTypeError(msg)
        moved = {
            name: getattr(self, name).to(device=device, dtype=dtype)
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``[..., d_sae]`` of inputs ``x [..., d_in]``.

        Normalisation statistics are computed from ``x`` and not kept: ``decode`` works in the
        normalised space and ``forward`` undoes the normalisation.
        """
        x_n, _ = self._normalize(self._check_input(x))
        return self._encode_normalized(x_n)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_out]`` (in the normalised space) of features ``f``."""
        if f.ndim < 1 or f.shape[-1] != self.d_sae:
            msg = f"f must be [..., d_sae={self.d_sae}]; got {list(f.shape)}"
            raise ShapeError(msg)
        if self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_out]`` of ``x [..., d_in]`` in the input's own scale.

        Transcoders with ``W_skip`` add ``x @ W_skip.T`` of the raw input.
        """
        x = self._check_input(x)
        x_n, undo = self._normalize(x)
        out = undo(self.decode(self._encode_normalized(x_n)))
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    __call__ = forward

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``h = x_c @ W_enc + b_enc`` ``[..., d_sae]`` (gated: without any bias)."""
        x_n, _ = self._normalize(self._check_input(x))
        return self._pre(x_n)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            msg = f"x must be a torch.Tensor; got {type(x).__name__}"
            raise InputError(msg)
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            msg = f"x must be [..., d_in={self.d_in}]; got {list(x.shape)}"
            raise ShapeError(msg)
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def _normalize(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        if self.normalize_activations == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, lambda y: y / coeff
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            # Unbiased std, as SAELens and OpenAI's sparse_autoencoder use.
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + _LAYER_NORM_EPS), lambda y: y * std + mu
        return x, lambda y: y

    def _pre(self, x_n: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        h = x_n @ self.W_enc
        return h if self.architecture == "gated" else h + self.b_enc

    def _encode_normalized(self, x_n: torch.Tensor) -> torch.Tensor:
        h = self._pre(x_n)
        if self.architecture == "relu":
            return torch.relu(h)
        if self.architecture in ("jumprelu", "batchtopk"):
            # Strict inequality: a pre-activation equal to the threshold is off.
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        if self.architecture == "gated":
            # One GEMM: x_c @ (W_enc * exp(r_mag)) is (x_c @ W_enc) * exp(r_mag) column-wise.
            gate = (h + self.b_gate > 0).to(h.dtype)
            return gate * torch.relu(h * torch.exp(self.r_mag) + self.b_mag)
        # topk: ReLU of the top-k pre-activations. Taking ReLU first (sparsify) gives the same
        # dense result; only the index set of zero-valued entries can differ.
        if self.rescale_acts_by_decoder_norm:
            h = h * self.W_dec.norm(dim=-1)
        values, indices = h.topk(self.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, indices, torch.relu(values))


_TENSOR_FIELDS = (
    "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag", "W_skip",
)


def _valid_k(k: object, d_sae: int) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and 0 < k <= d_sae


def _check_rank(name: str, tensor: torch.Tensor, ndim: int, expected: str) -> None:
    if tensor.ndim != ndim:
        msg = f"{name} must be {expected}; got shape {list(tensor.shape)}"
        raise ShapeError(msg)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], expected: str) -> None:
    if tuple(tensor.shape) != shape:
        msg = f"{name} must be {expected} = {list(shape)}; got {list(tensor.shape)}"
        raise ShapeError(msg)
