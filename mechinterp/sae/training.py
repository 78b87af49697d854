"""Train sparse autoencoders on activations: TopK and JumpReLU.

- TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the ``k`` largest
  pre-activations ``(x - b_dec) @ W_enc + b_enc`` of each token are kept and ReLU'd, so the L0
  is fixed and the loss is the reconstruction error alone. An auxiliary loss (AuxK) lets latents
  that have not fired for a while reconstruct what the live ones miss, which revives them.
- JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
  JumpReLU Sparse Autoencoders"): a latent passes its pre-activation only above a learned
  per-latent threshold, and the loss adds ``l0_coefficient`` times the L0. The threshold's
  gradient comes from straight-through pseudo-derivatives with a rectangle kernel of width
  ``bandwidth``.

Both keep every decoder row at unit norm (the gradient component along each row is removed
before the optimiser step and the rows are renormalised after it), start the encoder as the
decoder's transpose and ``b_dec`` at the geometric median (or the mean) of the data, and use
Adam. Training happens on activations rescaled so that their mean squared norm is 1, which
makes ``lr``, ``l0_coefficient``, ``bandwidth`` and ``initial_threshold`` mean the same for
any model; the returned :class:`SAE` reads and writes the activations in their own scale.

On the CPU a run is deterministic given ``seed``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mechinterp.errors import DTypeError, InputError, ShapeError
from mechinterp.sae.sae import SAE
from mechinterp.sites import Site

if TYPE_CHECKING:
    from mechinterp.model import Inputs, InterpModel

TRAINABLE_ARCHITECTURES = ("topk", "jumprelu")
B_DEC_INITS = ("geometric_median", "mean")

# Rows used to initialise b_dec and the scale, and, for a stream, to measure the final stats.
_SAMPLE_ROWS = 16_384
# Rows per chunk when the final statistics are measured (bounds the dense [rows, d_sae] tensor).
_EVAL_CHUNK = 4096
# The loss curve is averaged over windows of steps so it never has more points than this.
_MAX_CURVE_POINTS = 200
# The last fraction of the run decays the learning rate linearly to zero, which settles the
# weights; until then it is constant.
_DECAY_FRACTION = 0.2
# JumpReLU's L0 penalty ramps up from zero over this first fraction of the run, so latents
# find directions before the penalty starts closing them.
_L0_WARMUP_FRACTION = 0.1


@dataclass
class TrainingStats:
    """How a training run ended, measured with the returned SAE.

    Attributes:
        fvu: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
        mean_l0: mean number of nonzero latents per token.
        dead_fraction: fraction of latents that are zero on every measured token.
        loss_curve: the training loss (reconstruction error in units where the mean squared
            norm of the activations is 1, plus the auxiliary or L0 term), averaged over windows
            of steps; at most 200 points.
        steps: optimiser steps taken.
        tokens: activation rows seen in training (with repeats).
        wall_seconds: time the training loop took.

    The statistics are measured on every row of a tensor input, or on the first 16,384 rows of
    a stream.
    """

    fvu: float
    mean_l0: float
    dead_fraction: float
    loss_curve: list[float]
    steps: int
    tokens: int
    wall_seconds: float


def train_sae(
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    d_sae: int,
    architecture: str = "topk",
    k: int | None = None,
    l0_coefficient: float | None = None,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    aux_k: int | None = None,
    aux_coefficient: float = 1 / 32,
    dead_after_tokens: int = 1_000_000,
    bandwidth: float | None = None,
    initial_threshold: float | None = None,
    b_dec_init: str = "geometric_median",
    hook_name: str | None = None,
) -> tuple[SAE, TrainingStats]:
    """Train a TopK or JumpReLU sparse autoencoder on ``activations``.

    Args:
        activations: a float tensor ``[N, d_in]``, sampled in shuffled passes, or an iterable of
            float tensors ``[rows, d_in]`` consumed once, in order, and cut into batches of
            ``batch_size`` rows; a stream that ends early ends training early.
        d_sae: number of latents.
        architecture: ``"topk"`` or ``"jumprelu"``.
        k: latents kept per token; required for ``"topk"``, refused for ``"jumprelu"``.
        l0_coefficient: weight of the L0 penalty; required for ``"jumprelu"``, refused for
            ``"topk"``.
        steps: optimiser steps.
        batch_size: activation rows per step.
        lr: Adam's learning rate, constant and then decaying linearly to zero over the last 20%
            of the steps.
        seed: fixes the initial weights and the order of the rows.
        device: where to train; the SAE is returned there.
        progress: show a progress bar.
        aux_k: TopK only: how many dead latents the AuxK loss uses per token (default
            ``min(d_in // 2, d_sae)``, as Gao et al.); 0 turns AuxK off.
        aux_coefficient: TopK only: weight of the AuxK loss.
        dead_after_tokens: a latent that has not fired for this many training rows is dead.
        bandwidth: JumpReLU only: width of the rectangle kernel of the threshold's
            pseudo-derivative, in the rescaled units (default: half the initial threshold).
        initial_threshold: JumpReLU only: every latent's threshold at the start, in the rescaled
            units (default ``0.5 / sqrt(d_in)``, half the typical size of the rescaled data's
            projection on a random direction, so about a third of the latents fire at first).
            The paper's 0.001 suits long runs: Adam moves the log-threshold by about ``lr`` a
            step, and a threshold far below the activations needs many steps to climb.
        b_dec_init: ``"geometric_median"`` or ``"mean"`` of the first rows.
        hook_name: stored on the SAE, e.g. ``str(Site("resid_post", layer=0))``.

    Returns:
        The trained :class:`SAE` (float32, ``apply_b_dec_to_input=True``) and its
        :class:`TrainingStats`.

    Raises:
        InputError: an option out of range, ``k`` or ``l0_coefficient`` missing or given for the
            other architecture, non-finite or all-zero activations, or an empty stream.
        ShapeError: activations that are not ``[N, d_in]``, or batches whose ``d_in`` differ.
        DTypeError: activations that are not floating point.

    Examples:
        >>> import torch
        >>> x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
        >>> sae, stats = train_sae(x, d_sae=16, k=4, steps=20, batch_size=128, progress=False)
        >>> sae.architecture, sae.k, tuple(sae.W_dec.shape), stats.steps, stats.mean_l0 <= 4
        ('topk', 4, (16, 8), 20, True)
    """
    _check_options(
        d_sae=d_sae,
        architecture=architecture,
        k=k,
        l0_coefficient=l0_coefficient,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        aux_k=aux_k,
        aux_coefficient=aux_coefficient,
        dead_after_tokens=dead_after_tokens,
        bandwidth=bandwidth,
        initial_threshold=initial_threshold,
        b_dec_init=b_dec_init,
    )
    device = torch.device(device)
    source = _batches(activations, batch_size, seed)
    d_in = source.sample.shape[1]
    scale = _unit_power_scale(source.sample)
    centre = _initial_b_dec(source.sample, b_dec_init) * scale
    generator = torch.Generator().manual_seed(seed)
    if architecture == "topk":
        trainer: _Trainer = _TopKTrainer(
            d_in,
            d_sae,
            k=k,
            aux_k=min(d_in // 2, d_sae) if aux_k is None else aux_k,
            aux_coefficient=aux_coefficient,
            b_dec=centre,
            generator=generator,
            dead_after_tokens=dead_after_tokens,
        )
    else:
        if initial_threshold is None:
            initial_threshold = 0.5 / math.sqrt(d_in)
        trainer = _JumpReLUTrainer(
            d_in,
            d_sae,
            l0_coefficient=l0_coefficient,
            bandwidth=initial_threshold / 2 if bandwidth is None else bandwidth,
            initial_threshold=initial_threshold,
            b_dec=centre,
            generator=generator,
            dead_after_tokens=dead_after_tokens,
        )
    trainer.to(device)
    start = time.perf_counter()
    losses = _optimise(
        trainer, source.stream, steps=steps, lr=lr, scale=scale, device=device, progress=progress
    )
    wall_seconds = time.perf_counter() - start
    if not losses:
        msg = f"activations must yield at least one full batch of {batch_size} rows; got fewer"
        raise InputError(msg)
    sae = trainer.export(scale, hook_name)
    fvu, mean_l0, dead = _measure(sae, source.evaluation_rows())
    stats = TrainingStats(
        fvu=fvu,
        mean_l0=mean_l0,
        dead_fraction=dead,
        loss_curve=_curve(losses),
        steps=len(losses),
        tokens=len(losses) * batch_size,
        wall_seconds=wall_seconds,
    )
    return sae, stats


def collect_activations(
    model: InterpModel,
    inputs: Inputs | Iterable[Inputs],
    site: Site,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """The activation at ``site`` of every real (non-padding) token, one row each: ``[N, d]``.

    Args:
        model: an :class:`mechinterp.model.InterpModel`.
        inputs: prompts or token ids ``[batch, pos]`` (run ``batch_size`` rows per forward), or
            an iterable of batches (prompt lists, id tensors or ``Tokens``), each one forward.
        site: a site that holds one vector per token: a whole ``[batch, pos, d]`` component at one
            layer (``resid_post``, ``mlp_out``, one head's output...), or ``[batch, d]`` with a
            single position.
        batch_size: rows per forward for prompt lists and id tensors.
        progress: show a progress bar over the forwards.

    Returns:
        float tensor ``[N, d]`` on the CPU, rows in batch order, then position order.

    Raises:
        InputError: ``site`` is not a Site, or ``batch_size`` is not a positive int.
        ShapeError: the site does not hold one vector per token.

    Examples:
        >>> import mechinterp
        >>> from mechinterp import Site
        >>> model = mechinterp.load("induction-2l")
        >>> x = collect_activations(model, ["fuba bu", "bu fuba mabi"], Site("resid_post", layer=0))
        >>> tuple(x.shape)  # 3 + 4 tokens, <bos> included; the padding is left out
        (7, 64)
    """
    if not isinstance(site, Site):
        msg = f"site must be a Site; got {type(site).__name__}"
        raise InputError(msg)
    axes = site.axes
    if axes[:1] != ("batch",) or len(axes) not in (2, 3) or (len(axes) == 3 and axes[1] != "pos"):
        msg = (
            f"site must hold one vector per token ([batch, pos, d] or [batch, d]); {site} has "
            f"axes {axes}"
        )
        raise ShapeError(msg)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive int; got {batch_size!r}"
        raise InputError(msg)
    rows = []
    for batch in tqdm(
        _forward_batches(inputs, batch_size),
        desc="collecting activations",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        result = model.run(batch, cache=[site])
        x = result.cache[site]
        if x.ndim == 3:
            x = x[result.tokens.attention_mask.bool()]
        rows.append(x.detach().cpu())
    if not rows:
        msg = "inputs must hold at least one batch; got an empty iterable"
        raise InputError(msg)
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------
# Checks


def _check_options(
    *,
    d_sae,
    architecture,
    k,
    l0_coefficient,
    steps,
    batch_size,
    lr,
    seed,
    aux_k,
    aux_coefficient,
    dead_after_tokens,
    bandwidth,
    initial_threshold,
    b_dec_init,
) -> None:
    if architecture not in TRAINABLE_ARCHITECTURES:
        msg = f"architecture must be one of {TRAINABLE_ARCHITECTURES}; got {architecture!r}"
        raise InputError(msg)
    for name, value in (
        ("d_sae", d_sae),
        ("steps", steps),
        ("batch_size", batch_size),
        ("dead_after_tokens", dead_after_tokens),
    ):
        if not _is_int(value) or value < 1:
            msg = f"{name} must be a positive int; got {value!r}"
            raise InputError(msg)
    if not _is_int(seed):
        msg = f"seed must be an int; got {seed!r}"
        raise InputError(msg)
    if b_dec_init not in B_DEC_INITS:
        msg = f"b_dec_init must be one of {B_DEC_INITS}; got {b_dec_init!r}"
        raise InputError(msg)
    _check_positive("lr", lr)
    if architecture == "topk":
        if not _is_int(k) or not 1 <= k <= d_sae:
            msg = f"k must be an int in [1, d_sae={d_sae}] for architecture 'topk'; got {k!r}"
            raise InputError(msg)
        if l0_coefficient is not None:
            msg = (
                "l0_coefficient is for architecture 'jumprelu' (TopK fixes the L0 with k); "
                f"got l0_coefficient={l0_coefficient!r} with 'topk'"
            )
            raise InputError(msg)
        if aux_k is not None and (not _is_int(aux_k) or not 0 <= aux_k <= d_sae):
            msg = f"aux_k must be None or an int in [0, d_sae={d_sae}]; got {aux_k!r}"
            raise InputError(msg)
        if (
            not _is_real(aux_coefficient)
            or not math.isfinite(aux_coefficient)
            or (aux_coefficient < 0)
        ):
            msg = f"aux_coefficient must be a finite number >= 0; got {aux_coefficient!r}"
            raise InputError(msg)
    else:
        if k is not None:
            msg = (
                "k is for architecture 'topk' (JumpReLU sets its L0 with l0_coefficient); "
                f"got k={k!r} with 'jumprelu'"
            )
            raise InputError(msg)
        if l0_coefficient is None:
            msg = "l0_coefficient is required for architecture 'jumprelu'; got None"
            raise InputError(msg)
        _check_positive("l0_coefficient", l0_coefficient)
        for name, value in (("bandwidth", bandwidth), ("initial_threshold", initial_threshold)):
            if value is not None:
                _check_positive(name, value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        msg = f"{name} must be a finite number > 0; got {value!r}"
        raise InputError(msg)


def _check_rows(x: object, name: str, d_in: int | None = None) -> torch.Tensor:
    """``x`` as a float32 ``[rows, d_in]`` tensor, after checking what the trainer relies on."""
    if not isinstance(x, torch.Tensor):
        msg = f"{name} must be a torch.Tensor [rows, d_in]; got {type(x).__name__}"
        raise InputError(msg)
    if not x.is_floating_point():
        msg = f"{name} must be a floating-point tensor; got {x.dtype}"
        raise DTypeError(msg)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        msg = f"{name} must be [rows, d_in] with rows, d_in >= 1; got shape {list(x.shape)}"
        raise ShapeError(msg)
    if d_in is not None and x.shape[1] != d_in:
        msg = f"{name} must have d_in={d_in} columns like the first batch; got {list(x.shape)}"
        raise ShapeError(msg)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        msg = f"{name} must be finite; got {bad} row(s) holding NaN or infinity"
        raise InputError(msg)
    return x.float()


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class _Source:
    """Training batches, the first rows (for initialisation) and the rows the stats are taken on."""

    sample: torch.Tensor
    stream: Iterator[torch.Tensor]
    evaluation: torch.Tensor

    def evaluation_rows(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.evaluation.shape[0], _EVAL_CHUNK):
            yield self.evaluation[start : start + _EVAL_CHUNK].float()


def _batches(activations: object, batch_size: int, seed: int) -> _Source:
    if isinstance(activations, torch.Tensor):
        data = activations
        _check_rows(data, "activations")
        if batch_size > data.shape[0]:
            msg = (
                f"batch_size must be at most the number of activation rows ({data.shape[0]}); "
                f"got {batch_size}"
            )
            raise InputError(msg)
        order = torch.Generator().manual_seed(seed)
        first = torch.randperm(data.shape[0], generator=order)[:_SAMPLE_ROWS]
        sample = data[first.to(data.device)].float().cpu()
        return _Source(sample, _shuffled_passes(data, batch_size, order), data)
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable):
        msg = (
            f"activations must be a float tensor [N, d_in] or an iterable of such batches; got "
            f"{type(activations).__name__}"
        )
        raise InputError(msg)
    chunks = _checked_chunks(iter(activations))
    head: list[torch.Tensor] = []
    n_head = 0
    for chunk in chunks:
        head.append(chunk)
        n_head += chunk.shape[0]
        if n_head >= _SAMPLE_ROWS:
            break
    if not head:
        msg = "activations must yield at least one batch; got an empty iterable"
        raise InputError(msg)
    sample = torch.cat(head).cpu()[:_SAMPLE_ROWS]
    stream = _rebatched(itertools.chain(head, chunks), batch_size)
    return _Source(sample, stream, sample)


def _checked_chunks(chunks: Iterator[object]) -> Iterator[torch.Tensor]:
    d_in = None
    for number, chunk in enumerate(chunks):
        checked = _check_rows(chunk, f"activations batch {number}", d_in)
        d_in = checked.shape[1]
        yield checked


def _rebatched(chunks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut a stream of row blocks of any size into ``batch_size`` rows (a short tail is dropped,
    so every step weighs alike)."""
    pending: list[torch.Tensor] = []
    n_pending = 0
    for chunk in chunks:
        pending.append(chunk)
        n_pending += chunk.shape[0]
        while n_pending >= batch_size:
            rows = torch.cat(pending)
            yield rows[:batch_size]
            pending, n_pending = [rows[batch_size:]], n_pending - batch_size


def _shuffled_passes(
    data: torch.Tensor, batch_size: int, order: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless shuffled passes over the rows; a pass's tail shorter than a batch is skipped."""
    n = data.shape[0]
    while True:
        permutation = torch.randperm(n, generator=order).to(data.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield data[permutation[start : start + batch_size]].float()


def _unit_power_scale(sample: torch.Tensor) -> float:
    """The factor that gives the rows a mean squared norm of 1."""
    power = float(sample.double().pow(2).sum(dim=1).mean())
    if power == 0.0:
        msg = "activations must not all be zero; got only zero rows"
        raise InputError(msg)
    return 1.0 / math.sqrt(power)


def _initial_b_dec(sample: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return sample.mean(dim=0)
    return geometric_median(sample)


def geometric_median(
    points: torch.Tensor, *, iterations: int = 100, tolerance: float = 1e-6
) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of ``points`` ``[n, d]``.

    Weiszfeld's algorithm from the mean: each step is the mean of the points weighted by the
    inverse of their distance to the current estimate. Unlike the mean, a few far-out rows cannot
    pull it far, which makes it the better starting ``b_dec``.

    Examples:
        >>> import torch
        >>> points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
        >>> geometric_median(points), points.mean(dim=0)  # where the diagonals cross; the mean
        (tensor([0.5000, 0.5000]), tensor([25.2500, 25.2500]))
    """
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        # The floor keeps a point that coincides with the estimate from dividing by zero.
        weights = 1.0 / (points - median).norm(dim=1).clamp(min=1e-12)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = float((updated - median).norm())
        median = updated
        if moved <= tolerance * max(1.0, float(median.norm())):
            break
    return median.float()


# ----------------------------------------------------------------------------------------------
# Models being trained


class _Trainer(torch.nn.Module):
    """Parameters shared by both architectures, in the rescaled units, and dead-latent tracking."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        b_dec: torch.Tensor,
        generator: torch.Generator,
        dead_after_tokens: int,
    ):
        super().__init__()
        directions = torch.randn(d_sae, d_in, generator=generator)
        directions = directions / directions.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(directions)
        # Tied at the start: each latent initially reads the direction it writes.
        self.W_enc = torch.nn.Parameter(directions.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.dead_after_tokens = dead_after_tokens

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def dead(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    @torch.no_grad()
    def record_firing(self, acts: torch.Tensor) -> None:
        self.tokens_since_fired += acts.shape[0]
        self.tokens_since_fired[(acts > 0).any(dim=0)] = 0

    def loss(self, x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of a batch and its latent activations; ``progress`` is in [0, 1)."""
        raise NotImplementedError

    def export(self, scale: float, hook_name: str | None) -> SAE:
        raise NotImplementedError

    @torch.no_grad()
    def remove_radial_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would change the row's norm."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        # Adam's per-coordinate step leaves the rows slightly off the sphere; put them back.
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def _unscaled(self, scale: float) -> dict[str, torch.Tensor]:
        """Weights for raw activations: ``x * scale`` in, ``x_hat * scale`` out.

        Encoding and decoding are positively homogeneous once the biases scale with the data, so
        dividing the biases by ``scale`` and keeping both matrices gives latents divided by
        ``scale`` and a reconstruction in the input's own units, with unit-norm decoder rows.
        """
        return {
            "W_enc": self.W_enc.detach().clone(),
            "b_enc": self.b_enc.detach() / scale,
            "W_dec": self.W_dec.detach().clone(),
            "b_dec": self.b_dec.detach() / scale,
        }


class _TopKTrainer(_Trainer):
    def __init__(
        self, d_in: int, d_sae: int, *, k: int, aux_k: int, aux_coefficient: float, **common
    ):
        super().__init__(d_in, d_sae, **common)
        self.k = k
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient

    def loss(self, x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        acts = _keep_top(pre, self.k)
        reconstruction = acts @ self.W_dec + self.b_dec
        loss = (reconstruction - x).pow(2).sum(dim=1).mean()
        dead = self.dead()
        n_aux = min(self.aux_k, int(dead.sum()))
        if n_aux and self.aux_coefficient:
            loss = loss + self.aux_coefficient * self._aux_loss(
                pre, dead, n_aux, x - reconstruction.detach()
            )
        return loss, acts

    def _aux_loss(
        self, pre: torch.Tensor, dead: torch.Tensor, n_aux: int, residual: torch.Tensor
    ) -> torch.Tensor:
        """How well the ``n_aux`` strongest dead latents reconstruct what the live ones missed,
        relative to the size of that residual (so it stays comparable as the residual shrinks)."""
        acts = _keep_top(pre.masked_fill(~dead, -math.inf), n_aux)
        error = (acts @ self.W_dec - residual).pow(2).sum(dim=1).mean()
        return error / residual.pow(2).sum(dim=1).mean().clamp(min=1e-12)

    def export(self, scale: float, hook_name: str | None) -> SAE:
        return SAE(**self._unscaled(scale), architecture="topk", k=self.k, hook_name=hook_name)


class _JumpReLUTrainer(_Trainer):
    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0_coefficient: float,
        bandwidth: float,
        initial_threshold: float,
        **common,
    ):
        super().__init__(d_in, d_sae, **common)
        # The log keeps every threshold positive whatever step Adam takes.
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(initial_threshold)))
        self.l0_coefficient = l0_coefficient
        self.bandwidth = bandwidth

    def loss(self, x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        threshold = self.log_threshold.exp()
        acts = _JumpReLU.apply(pre, threshold, self.bandwidth)
        reconstruction = acts @ self.W_dec + self.b_dec
        mse = (reconstruction - x).pow(2).sum(dim=1).mean()
        l0 = _Step.apply(pre, threshold, self.bandwidth).sum(dim=1).mean()
        ramp = min(1.0, progress / _L0_WARMUP_FRACTION)
        return mse + ramp * self.l0_coefficient * l0, acts

    def export(self, scale: float, hook_name: str | None) -> SAE:
        return SAE(
            **self._unscaled(scale),
            architecture="jumprelu",
            threshold=self.log_threshold.detach().exp() / scale,
            hook_name=hook_name,
        )


def _keep_top(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the ``k`` largest entries of each row, zeros elsewhere (as ``SAE.encode``)."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _rectangle(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``K((z - theta) / epsilon)`` for the rectangle kernel ``K(u) = 1[|u| < 1/2]``."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z * 1[z > theta]``; the gradient reaches ``z`` where the latent is on and ``theta``
    through the pseudo-derivative ``-(theta / epsilon) K((z - theta) / epsilon)``."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = (-(threshold / ctx.bandwidth) * kernel * grad).sum(dim=0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """``1[z > theta]``: no gradient to ``z``; ``-(1 / epsilon) K((z - theta) / epsilon)`` to
    ``theta``, so the L0 penalty trains the thresholds only."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = (-(1.0 / ctx.bandwidth) * kernel * grad).sum(dim=0)
        return None, grad_threshold, None


# ----------------------------------------------------------------------------------------------
# The loop and the final measurement


def _optimise(
    trainer: _Trainer,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    scale: float,
    device: torch.device,
    progress: bool,
) -> list[float]:
    optimizer = torch.optim.Adam(trainer.parameters(), lr=lr)
    losses: list[float] = []
    bar = tqdm(total=steps, desc="training SAE", unit="step", disable=not progress, leave=False)
    for step, batch in zip(range(steps), batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        x = batch.to(device) * scale
        loss, acts = trainer.loss(x, step / steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.remove_radial_gradient()
        optimizer.step()
        trainer.normalise_decoder()
        trainer.record_firing(acts)
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return losses


def _lr_at(step: int, steps: int, lr: float) -> float:
    decay_start = int(steps * (1 - _DECAY_FRACTION))
    if step < decay_start:
        return lr
    return lr * (steps - step) / (steps - decay_start)


def _curve(losses: list[float]) -> list[float]:
    window = math.ceil(len(losses) / _MAX_CURVE_POINTS)
    return [
        sum(losses[i : i + window]) / len(losses[i : i + window])
        for i in range(0, len(losses), window)
    ]


@torch.no_grad()
def _measure(sae: SAE, chunks: Iterable[torch.Tensor]) -> tuple[float, float, float]:
    """FVU, mean L0 and dead fraction of ``sae`` over the rows of ``chunks``."""
    error = torch.zeros((), dtype=torch.float64)
    n = 0
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    active = torch.zeros(sae.d_sae, dtype=torch.long)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for chunk in chunks:
        x = chunk.to(sae.device)
        acts = sae.encode(x)
        reconstruction = sae.decode(acts)
        error += (reconstruction - x).double().pow(2).sum().cpu()
        total += x.double().sum(dim=0).cpu()
        total_sq += x.double().pow(2).sum().cpu()
        nonzero = (acts != 0).cpu()
        active += nonzero.sum(dim=0)
        fired |= nonzero.any(dim=0)
        n += x.shape[0]
    # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
    variance = float(total_sq - total.pow(2).sum() / n)
    fvu = float(error) / variance if variance > 0 else float("nan")
    return fvu, float(active.sum()) / n, 1.0 - float(fired.float().mean())


def _forward_batches(inputs: object, batch_size: int) -> Iterator[object]:
    if isinstance(inputs, str):
        yield inputs
    elif isinstance(inputs, torch.Tensor):
        ids = inputs[None] if inputs.ndim == 1 else inputs
        for start in range(0, ids.shape[0], batch_size):
            yield ids[start : start + batch_size]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, str) for p in inputs):
        for start in range(0, len(inputs), batch_size):
            yield list(inputs[start : start + batch_size])
    elif isinstance(inputs, Iterable) and not isinstance(inputs, bytes):
        yield from inputs
    else:
        yield inputs  # Tokens, or something model.run will name in its own error
