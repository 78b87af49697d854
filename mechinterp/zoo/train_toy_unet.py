"""Train the ``toy-unet`` demo model: a tiny text-conditioned diffusion U-Net that draws shapes.

Images are single shapes of :mod:`mechinterp.zoo.shapes`: a one-shape scene
(``shapes.sample_scene(..., n_shapes=(1, 1))``) rendered at the default 32 x 32 and cropped to
the 16 x 16 cell that holds the shape, so every pixel is exactly background (black) or the
shape's palette colour, as in the full render, and the shape sits at the centre of the image
moved by the scene's jitter (one of 3 x 3 offsets of at most one pixel). Cropping rather than
downsampling keeps the hard edges and pure colours that :func:`classify_colour` and
:func:`classify_shape` rely on and removes the choice of cell, which no caption names. The
caption is ``"{colour} {shape}"`` ("red circle"): 7 colours x 4 shapes.

The model is the parts of a Stable Diffusion pipeline without the VAE (the U-Net works on
pixels in [-1, 1]):

- a ``diffusers.UNet2DConditionModel`` (block widths 32 and 64, one ResNet per block, 4 heads)
  whose cross-attention (``attn2``) sits in the 8 x 8 blocks only: four layers, one in the second
  down block, one in the mid block and two in the first up block (self-attention over the 256
  pixels of the 16 x 16 blocks would triple the cost of a training step on a CPU). The text
  reaches the U-Net only there: it has no class or added embeddings, so the encoder hidden
  states feed nothing but the keys and values of ``attn2``.
- a ``transformers.CLIPTextModel`` with no transformer layers (token and position embeddings,
  then the final layer norm), trained jointly with the U-Net. With no layers, the hidden state
  at a position depends on that position's token alone: the colour word's state (position 1)
  carries the colour and nothing else, the shape word's (position 2) the shape. A causal CLIP
  layer would copy the colour into the shape word's and ``<eos>``'s states, and the U-Net could
  read it there; the mechanism would then depend on what training happened to find.
- a word-level tokenizer over ``<bos> <eos> <pad>``, the colours and the shapes, which writes
  every caption as ``<bos> colour shape <eos>``: four tokens, the colour word always at
  position 1 (:data:`COLOUR_POSITION`), the shape word at 2 (:data:`SHAPE_POSITION`).
- a ``DDPMScheduler`` (cosine schedule, 1000 steps, epsilon prediction) for training and a
  ``DDIMScheduler`` over the same betas (``"trailing"`` spacing, deterministic) for sampling;
  the shipped ``scheduler/`` is the DDIM one.

Captions are dropped (replaced by ``<bos> <pad> <pad> <eos>``, :data:`UNCOND_CAPTION`) in
``CAPTION_DROPOUT`` of training rows, so classifier-free guidance is available; :func:`generate`
uses it when given a ``guidance_scale`` and otherwise runs the conditional model alone.

The known mechanism: the colour word steers the colour through cross-attention. Generating
"red circle" with the encoder hidden state at the colour word's position replaced by that of
"blue square" (equivalently, the key/value inputs of every ``attn2`` patched at that position)
draws a blue circle; replacing the shape word's position instead draws a red square. The
training report records how often this happens (``mechanism``).

Run::

    python -m mechinterp.zoo.train_toy_unet --out DIR [--steps N] [--seed N]

The run is deterministic given the seed (about a quarter of an hour on one busy CPU core). ``DIR``
receives ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (float32 safetensors and
configs) and ``training_report.json``.

Examples:
    >>> import torch
    >>> from importlib.resources import files
    >>> folder = files("mechinterp.zoo") / "toy-unet"
    >>> unet, text_encoder, tokenizer, scheduler = load_toy_unet(folder)
    >>> with torch.no_grad():
    ...     states = encode_captions(tokenizer, text_encoder, ["red circle", "blue square"])
    >>> states.shape
    torch.Size([2, 4, 32])
    >>> generator = torch.Generator().manual_seed(0)
    >>> images = generate(unet, scheduler, states, steps=10, generator=generator)
    >>> images.shape, classify_colour(images), classify_shape(images)
    (torch.Size([2, 3, 16, 16]), ['red', 'blue'], ['circle', 'square'])
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechinterp.zoo import shapes

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # EOS_ID != 2 keeps CLIP's pooling off its legacy argmax rule
SEQ_LENGTH = 4  # <bos> colour shape <eos>
COLOUR_POSITION = 1
SHAPE_POSITION = 2
UNCOND_CAPTION = ""  # encodes as <bos> <pad> <pad> <eos>: the caption of dropped rows

IMAGE_SIZE = shapes.IMAGE_SIZE // shapes.GRID  # one cell of the 32 x 32 render: 16 x 16
CROSS_ATTENTION_DIM = 32

BATCH_SIZE = 64
DEFAULT_STEPS = 1000
DEFAULT_SEED = 0
PEAK_LR = 2e-3
WARMUP_STEPS = 50
EMA_DECAY = 0.995  # the shipped weights are this exponential moving average of the trained ones
CAPTION_DROPOUT = 0.1
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"

SAMPLING_STEPS = 10  # DDIM steps of the evaluation (and of the tests)
GUIDANCE_SCALE = 2.0  # of the evaluation with classifier-free guidance
# Held-out generations draw their noise from seeds seed + EVAL_SEED_OFFSET + i, far from the
# training stream's seed.
EVAL_SEED_OFFSET = 10_000
EVAL_PER_CAPTION = 8  # generations per caption in the evaluation (28 captions)
MECHANISM_CASES = 224


# ----------------------------------------------------------------------------------------------
# Captions, tokenizer and text encoding


CAPTIONS: tuple[str, ...] = tuple(
    f"{c} {k}" for c, k in itertools.product(shapes.COLOUR_NAMES, shapes.SHAPES)
)


def captions() -> list[str]:
    """Every caption, ``"{colour} {shape}"``, colour-major in vocabulary order (28 of them)."""
    return list(CAPTIONS)


def caption(shape: shapes.Shape) -> str:
    """The caption of a shape: ``"{colour} {kind}"``."""
    return f"{shape.colour} {shape.kind}"


def make_vocab() -> list[str]:
    """The fixed token list: special tokens, then colours, then shapes."""
    return [*SPECIAL_TOKENS, *shapes.COLOUR_NAMES, *shapes.SHAPES]


def make_tokenizer():
    """A word-level fast tokenizer over ``make_vocab()`` that writes ``<bos> caption <eos>``.

    Captions are split on whitespace; the unconditional caption is the text ``"<pad> <pad>"``
    (:func:`caption_ids` writes ``""`` so). There is no unknown-word token:
    :func:`caption_ids` checks captions before they reach the tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(make_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
    )
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=SEQ_LENGTH,
    )


def check_captions(captions: list[str]) -> None:
    """``ValueError`` unless every caption is ``"{colour} {shape}"`` or the empty caption."""
    valid = {*CAPTIONS, UNCOND_CAPTION}
    bad = [c for c in captions if c not in valid]
    if bad:
        msg = (
            f"captions must be '{{colour}} {{shape}}' with a colour of {shapes.COLOUR_NAMES} and "
            f"a shape of {shapes.SHAPES} (or {UNCOND_CAPTION!r} for no caption), got {bad[:4]}"
        )
        raise ValueError(msg)


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids ``int64 [batch, 4]``: ``<bos> colour shape <eos>`` per caption."""
    check_captions(captions)
    # The empty caption is written as two <pad> words, so that it too has <eos> at position 3.
    texts = [c if c != UNCOND_CAPTION else "<pad> <pad>" for c in captions]
    return tokenizer(texts, return_tensors="pt")["input_ids"]


def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Encoder hidden states for the U-Net, ``float32 [batch, 4, 32]``, one row per caption.

    Every caption is ``"{colour} {shape}"`` (or ``""`` for the unconditional caption of
    classifier-free guidance) and is written ``<bos> colour shape <eos>``, so the state at
    position :data:`COLOUR_POSITION` (1) is the colour word's and at :data:`SHAPE_POSITION` (2)
    the shape word's in every row. The text encoder has no transformer layers, so each state
    depends on its own token and position only. Gradients flow (training uses this too); wrap
    in ``torch.no_grad()`` for inference.

    Examples:
        >>> tokenizer = make_tokenizer()
        >>> caption_ids(tokenizer, ["red circle", ""]).tolist()
        [[0, 3, 10, 1], [0, 2, 2, 1]]
    """
    ids = caption_ids(tokenizer, captions).to(text_encoder.device)
    return text_encoder(input_ids=ids).last_hidden_state


# ----------------------------------------------------------------------------------------------
# Images and classifiers


def render_shape(shape: shapes.Shape) -> torch.Tensor:
    """``uint8 [3, 16, 16]``: the cell of ``shape`` cut out of the 32 x 32 render of it alone."""
    top, left, bottom, right = shapes.cell_box(shape.cell)
    return shapes.render((shape,))[:, top:bottom, left:right]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images in [0, 255] to float32 in [-1, 1], the U-Net's pixel space."""
    return images.float() / 127.5 - 1


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"images must have shape [batch, 3, height, width], got {tuple(images.shape)}"
        raise ValueError(msg)


def classify_colour(images: torch.Tensor, *, min_fraction: float = 0.05) -> list[str | None]:
    """Per image, the majority palette colour of its non-background pixels (``None`` if blank).

    ``images`` is ``[batch, 3, H, W]``, float in [0, 1] (as :func:`generate` returns) or
    ``uint8``; each pixel goes to the nearest palette colour or background
    (``shapes.pixel_colours``), and an image with fewer than ``min_fraction`` non-background
    pixels is blank. Works at any size.
    """
    _check_images(images)
    result: list[str | None] = []
    for image in images:
        labels = shapes.pixel_colours(image.cpu())
        painted = labels[labels >= 0]
        if painted.numel() < min_fraction * labels.numel():
            result.append(None)
        else:
            counts = painted.bincount(minlength=len(shapes.COLOURS))
            result.append(shapes.COLOUR_NAMES[int(counts.argmax())])
    return result


class ColourShift:
    """A patching metric: per image, the fraction of its pixels in the ``wanted`` colour minus
    the fraction in the ``other`` colour (both palette names, one per image); 1 is an image
    painted all in ``wanted``, and a shape drawn in ``wanted`` on black scores its area.

    Examples:
        >>> import torch
        >>> red = torch.zeros(1, 3, 16, 16)
        >>> red[0, 0, :8] = 1.0  # the top half pure red
        >>> ColourShift(["red"], ["blue"])(red)
        tensor([0.5000])
    """

    __name__ = "colour shift"

    def __init__(self, wanted: list[str], other: list[str]):
        unknown = sorted({c for c in [*wanted, *other] if c not in shapes.COLOUR_NAMES})
        if unknown or len(wanted) != len(other):
            msg = (f"wanted and other must be equally long lists of {shapes.COLOUR_NAMES}; got "
                   f"{len(wanted)} and {len(other)} names, unknown {unknown}")
            raise ValueError(msg)
        self.wanted = torch.tensor([shapes.COLOUR_NAMES.index(c) for c in wanted])
        self.other = torch.tensor([shapes.COLOUR_NAMES.index(c) for c in other])

    def _repeats(self, images: torch.Tensor) -> int:
        """How many times the colour pairs repeat over ``images`` (checked)."""
        _check_images(images)
        rows = len(self.wanted)
        if images.shape[0] % rows:
            msg = f"images must hold a multiple of {rows} rows (one colour pair each); got {images.shape[0]}"
            raise ValueError(msg)
        return images.shape[0] // rows

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        repeats = self._repeats(images)
        labels = torch.stack([shapes.pixel_colours(image.cpu()) for image in images]).flatten(1)
        wanted = self.wanted.repeat(repeats)[:, None]
        other = self.other.repeat(repeats)[:, None]
        return (labels == wanted).float().mean(1) - (labels == other).float().mean(1)


class SoftColourShift(ColourShift):
    """A differentiable :class:`ColourShift`, for attribution patching: per image, the mean over
    its pixels of their soft assignment to the ``wanted`` colour minus that to the ``other`` one.

    Each pixel is assigned to the background and the palette colours by a softmax over their
    negative squared RGB distances (images in [0, 1]) divided by ``temperature``. As the
    temperature goes to 0 this is :class:`ColourShift`'s nearest-colour count (0.05 is already
    within 1e-8 of it on pure colours). At a finite one the score has a gradient, and a
    first-order estimate needs one that does not vanish at the nearly pure colours a generation
    ends on: at the default 0.5 a pure palette colour is assigned to itself with probability
    0.68 (its three nearest rivals lie at squared distance 1). On ``toy-unet`` (4 steps),
    attribution patching's estimates of restoring a site at steps 1-3 correlate with the exact
    effects at Pearson 0.86 with this default, 0.64 at 0.1.

    Examples:
        >>> import torch
        >>> image = torch.zeros(1, 3, 16, 16)
        >>> image[0, 0, :8] = 1.0  # the top half pure red
        >>> score = SoftColourShift(["red"], ["blue"])(image.clone().requires_grad_())
        >>> score.requires_grad, round(float(score.detach()), 3)
        (True, 0.335)
        >>> round(float(SoftColourShift(["red"], ["blue"], temperature=0.05)(image)), 3)
        0.5
    """

    __name__ = "soft colour shift"

    def __init__(self, wanted: list[str], other: list[str], *, temperature: float = 0.5):
        super().__init__(wanted, other)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            msg = f"temperature must be a positive number; got {temperature!r}"
            raise ValueError(msg)
        self.temperature = float(temperature)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        repeats = self._repeats(images)
        pixels = images if images.is_floating_point() else images.float() / 255
        # Index 0 is the background, so palette colour c sits at c + 1.
        palette = torch.tensor([shapes.BACKGROUND, *shapes.COLOURS.values()],
                               dtype=pixels.dtype, device=pixels.device) / 255
        distances = ((pixels[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
        assigned = torch.softmax(-distances / self.temperature, dim=1).flatten(2).mean(2)
        index = torch.arange(images.shape[0], device=pixels.device)
        wanted = self.wanted.repeat(repeats).to(pixels.device) + 1
        other = self.other.repeat(repeats).to(pixels.device) + 1
        return assigned[index, wanted] - assigned[index, other]


def _templates() -> tuple[list[str], torch.Tensor]:
    steps = torch.linspace(-shapes.MAX_JITTER, shapes.MAX_JITTER, shapes.JITTER_STEPS).tolist()
    kinds, masks = [], []
    for kind in shapes.SHAPES:
        for dx, dy in itertools.product(steps, steps):
            top, left, bottom, right = shapes.cell_box(0)
            mask = shapes.shape_mask(kind, 0, dx, dy, shapes.IMAGE_SIZE)[top:bottom, left:right]
            kinds.append(kind)
            masks.append(mask)
    return kinds, torch.stack(masks)


def classify_shape(images: torch.Tensor, *, min_fraction: float = 0.05) -> list[str | None]:
    """Per 16 x 16 image, the shape kind whose mask best matches its non-background pixels.

    The non-background pixels (``shapes.pixel_colours``) are compared by intersection over
    union with the mask of every kind at every jitter; the kind of the best match wins.
    ``None`` for a blank image (fewer than ``min_fraction`` non-background pixels).
    """
    _check_images(images)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        msg = f"images must be {IMAGE_SIZE} x {IMAGE_SIZE}, got {tuple(images.shape[-2:])}"
        raise ValueError(msg)
    kinds, masks = _templates()
    result: list[str | None] = []
    for image in images:
        painted = shapes.pixel_colours(image.cpu()) >= 0
        if painted.sum() < min_fraction * painted.numel():
            result.append(None)
            continue
        inter = (masks & painted).sum((1, 2)).float()
        union = (masks | painted).sum((1, 2)).float()
        result.append(kinds[int((inter / union).argmax())])
    return result


# ----------------------------------------------------------------------------------------------
# Model


def build_unet_config() -> dict:
    """``UNet2DConditionModel`` arguments: 16 x 16 RGB, widths (32, 64), cross-attention at 8 x 8.

    ``attention_head_dim`` is diffusers' legacy name for the number of heads: 4 heads, of 16
    channels in the 64-wide blocks.
    """
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": CROSS_ATTENTION_DIM,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


def build_text_config():
    """A ``CLIPTextConfig`` with no transformer layers (see the module docstring for why)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(make_vocab()),
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=2 * CROSS_ATTENTION_DIM,
        num_hidden_layers=0,
        num_attention_heads=4,
        max_position_embeddings=SEQ_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_models(seed: int):
    """Freshly initialised ``(unet, text_encoder)``; the seed fixes the initial weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**build_unet_config())
    text_encoder = CLIPTextModel(build_text_config())
    return unet, text_encoder


def build_schedulers():
    """``(train, sample)``: the DDPM scheduler of training and the DDIM one of sampling."""
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        prediction_type="epsilon",
        clip_sample=True,
    )
    sample = DDIMScheduler.from_config(train.config, timestep_spacing="trailing")
    return train, sample


def load_toy_unet(folder: str | Path):
    """``(unet, text_encoder, tokenizer, scheduler)`` from a folder written by this script.

    Loads offline, in float32 and in eval mode; ``scheduler`` is the ``DDIMScheduler`` used for
    sampling.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        msg = (
            f"folder must hold unet/, text_encoder/, tokenizer/ and scheduler/, got {str(folder)!r}"
        )
        raise ValueError(msg)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return unet.eval(), text_encoder.eval(), tokenizer, scheduler


# ----------------------------------------------------------------------------------------------
# Sampling


def initial_noise(
    batch: int, generator: torch.Generator | list[torch.Generator], device="cpu"
) -> torch.Tensor:
    """Starting noise ``[batch, 3, 16, 16]``; a list draws row ``i`` from generator ``i``."""
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    if isinstance(generator, list):
        if len(generator) != batch:
            msg = f"generator must be one generator or {batch} (one per row), got {len(generator)}"
            raise ValueError(msg)
        return torch.stack([torch.randn(shape, generator=g) for g in generator]).to(device)
    return torch.randn((batch, *shape), generator=generator).to(device)


@torch.no_grad()
def generate(
    unet,
    scheduler,
    encoder_hidden_states: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator | list[torch.Generator],
    guidance_scale: float | None = None,
    uncond_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image per row of ``encoder_hidden_states``: ``float32 [batch, 3, 16, 16]`` in [0, 1].

    ``encoder_hidden_states`` is ``[batch, 4, 32]`` (:func:`encode_captions`). The noise comes
    from ``generator`` (one CPU generator, or a list of one per row so that each row depends on
    its own seed only); ``steps`` steps of a copy of ``scheduler`` (DDIM with eta 0 is
    deterministic given the noise) denoise it.

    Without ``guidance_scale`` the U-Net runs on the conditional batch alone. With it
    (classifier-free guidance), ``uncond_hidden_states`` must hold the unconditional caption's
    states (``encode_captions(tokenizer, text_encoder, [""] * batch)``, or one row of them);
    the U-Net then sees a doubled batch, rows ``[0, batch)`` unconditional and rows
    ``[batch, 2 batch)`` conditional, and the noise prediction is
    ``uncond + guidance_scale * (cond - uncond)``.
    """
    if encoder_hidden_states.ndim != 3:
        msg = (
            "encoder_hidden_states must have shape [batch, tokens, dim], got "
            f"{tuple(encoder_hidden_states.shape)}"
        )
        raise ValueError(msg)
    if steps < 1:
        msg = f"steps must be at least 1, got {steps}"
        raise ValueError(msg)
    if (guidance_scale is None) != (uncond_hidden_states is None):
        msg = (
            "guidance_scale and uncond_hidden_states go together: give both for classifier-free "
            f"guidance or neither, got guidance_scale={guidance_scale} and "
            f"uncond_hidden_states={'None' if uncond_hidden_states is None else 'a tensor'}"
        )
        raise ValueError(msg)
    batch, device = encoder_hidden_states.shape[0], unet.device
    scheduler = type(scheduler).from_config(scheduler.config)  # set_timesteps mutates it
    scheduler.set_timesteps(steps, device=device)
    states = encoder_hidden_states.to(device, unet.dtype)
    if uncond_hidden_states is not None:
        uncond = uncond_hidden_states.to(device, unet.dtype).expand_as(states)
        states = torch.cat([uncond, states])
    sample = initial_noise(batch, generator, device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = sample if guidance_scale is None else torch.cat([sample, sample])
        model_input = scheduler.scale_model_input(model_input, t)
        eps = unet(model_input, t, encoder_hidden_states=states).sample
        if guidance_scale is not None:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        sample = scheduler.step(eps, t, sample).prev_sample
    return (sample.float() / 2 + 0.5).clamp(0, 1).cpu()


# ----------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to a tenth of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_batch(generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh single-shape images ``uint8 [batch, 3, 16, 16]`` and their captions."""
    scenes = [shapes.sample_scene(generator, n_shapes=(1, 1)) for _ in range(batch_size)]
    images = torch.stack([render_shape(scene[0]) for scene in scenes])
    return images, [caption(scene[0]) for scene in scenes]


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules, decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train(
    unet,
    text_encoder,
    tokenizer,
    train_scheduler,
    steps: int,
    seed: int,
    *,
    log_every: int = 50,
    probe_every: int = 250,
) -> float:
    """AdamW on the epsilon-prediction loss over fresh batches; returns the last window's mean loss.

    The model ends with the EMA weights. Every ``probe_every`` steps the EMA weights' colour
    accuracy on a small probe (one generation per caption) is printed.
    """
    generator = torch.Generator().manual_seed(seed)
    modules = (unet, text_encoder)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=PEAK_LR, weight_decay=0.01)
    ema = EMA(modules, EMA_DECAY)
    _, sample_scheduler = build_schedulers()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        unet.train()
        text_encoder.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, PEAK_LR, WARMUP_STEPS)
        images, batch_captions = sample_batch(generator, BATCH_SIZE)
        drop = torch.rand(BATCH_SIZE, generator=generator) < CAPTION_DROPOUT
        batch_captions = [UNCOND_CAPTION if d else c for c, d in zip(batch_captions, drop)]
        x0 = to_model_space(images)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, TRAIN_TIMESTEPS, (BATCH_SIZE,), generator=generator)
        noisy = train_scheduler.add_noise(x0, noise, t)
        states = encode_captions(tokenizer, text_encoder, batch_captions)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            line = (
                f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - start:.0f}s"
            )
            if (step + 1) % probe_every == 0:
                acc = _probe(unet, text_encoder, tokenizer, ema, sample_scheduler, seed)
                line += f"  probe colour acc {acc:.3f}"
            print(line, flush=True)
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def _probe(unet, text_encoder, tokenizer, ema, scheduler, seed: int) -> float:
    """Colour accuracy of the EMA weights on one generation per caption (weights restored after)."""
    saved = [p.detach().clone() for p in ema.params]
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    try:
        probe_captions = captions()
        states = encode_captions(tokenizer, text_encoder, probe_captions)
        generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET - 1)
        images = generate(unet, scheduler, states, steps=SAMPLING_STEPS, generator=generator)
        wanted = [c.split()[0] for c in probe_captions]
        return sum(a == b for a, b in zip(classify_colour(images), wanted)) / len(wanted)
    finally:
        for s, p in zip(saved, ema.params):
            p.copy_(s)


# ----------------------------------------------------------------------------------------------
# Evaluation


def eval_generators(seed: int, n: int, *, offset: int = 0) -> list[torch.Generator]:
    """One generator per held-out generation: seeds ``seed + EVAL_SEED_OFFSET + offset + i``."""
    base = seed + EVAL_SEED_OFFSET + offset
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _rate(got: list, wanted: list) -> float:
    return sum(a == b for a, b in zip(got, wanted)) / len(wanted)


@torch.no_grad()
def accuracy(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    seed: int,
    *,
    per_caption: int = EVAL_PER_CAPTION,
    steps: int = SAMPLING_STEPS,
    guidance_scale: float | None = None,
    chunk: int = 112,
) -> dict:
    """Colour and shape accuracy of generations from every caption, ``per_caption`` each."""
    all_captions = [c for c in captions() for _ in range(per_caption)]
    uncond = encode_captions(tokenizer, text_encoder, [UNCOND_CAPTION])
    generators = eval_generators(seed, len(all_captions))
    colours: list[str | None] = []
    kinds: list[str | None] = []
    for i in range(0, len(all_captions), chunk):
        states = encode_captions(tokenizer, text_encoder, all_captions[i : i + chunk])
        images = generate(
            unet,
            scheduler,
            states,
            steps=steps,
            generator=generators[i : i + chunk],
            guidance_scale=guidance_scale,
            uncond_hidden_states=None if guidance_scale is None else uncond,
        )
        colours += classify_colour(images)
        kinds += classify_shape(images)
    want_colour = [c.split()[0] for c in all_captions]
    want_kind = [c.split()[1] for c in all_captions]
    return {
        "generations": len(all_captions),
        "sampling_steps": steps,
        "guidance_scale": guidance_scale,
        "colour": _rate(colours, want_colour),
        "shape": _rate(kinds, want_kind),
        "blank": sum(c is None for c in colours) / len(colours),
        "colour_by_colour": {
            name: _rate(
                [c for c, w in zip(colours, want_colour) if w == name],
                [w for w in want_colour if w == name],
            )
            for name in shapes.COLOUR_NAMES
        },
    }


@dataclass
class MechanismCases:
    """Base captions and source captions that differ from them in both words.

    Patching the source's colour-word state into a base run should give the source's colour
    and keep the base's shape; patching the shape word's state, the reverse.
    """

    base: list[str]
    source: list[str]

    @property
    def base_colours(self) -> list[str]:
        return [c.split()[0] for c in self.base]

    @property
    def base_kinds(self) -> list[str]:
        return [c.split()[1] for c in self.base]

    @property
    def source_colours(self) -> list[str]:
        return [c.split()[0] for c in self.source]

    @property
    def source_kinds(self) -> list[str]:
        return [c.split()[1] for c in self.source]


def sample_mechanism_cases(generator: torch.Generator, n: int) -> MechanismCases:
    """``n`` (base, source) caption pairs; the source has another colour and another shape."""
    base, source = [], []
    for i in range(n):
        # Cycle the base colour so every colour is covered evenly.
        colour = shapes.COLOUR_NAMES[i % len(shapes.COLOUR_NAMES)]
        kind = shapes.SHAPES[int(torch.randint(len(shapes.SHAPES), (), generator=generator))]
        other_colours = [c for c in shapes.COLOUR_NAMES if c != colour]
        other_kinds = [k for k in shapes.SHAPES if k != kind]
        new_colour = other_colours[int(torch.randint(len(other_colours), (), generator=generator))]
        new_kind = other_kinds[int(torch.randint(len(other_kinds), (), generator=generator))]
        base.append(f"{colour} {kind}")
        source.append(f"{new_colour} {new_kind}")
    return MechanismCases(base, source)


def patch_position(base: torch.Tensor, source: torch.Tensor, position: int) -> torch.Tensor:
    """``base`` encoder states with the states at ``position`` taken from ``source``."""
    patched = base.clone()
    patched[:, position] = source[:, position]
    return patched


@torch.no_grad()
def measure_mechanism(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    seed: int,
    *,
    n: int = MECHANISM_CASES,
    steps: int = SAMPLING_STEPS,
) -> dict:
    """How the colour and shape of generations follow the patched word's position.

    For each case, the base caption's generation, then the same noise with the encoder state at
    the colour word's position (1) from the source caption, then at the shape word's (2). The
    encoder states feed only the cross-attention keys and values, so this patches ``attn2``'s
    key/value inputs at that position in every layer.
    """
    cases = sample_mechanism_cases(torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET), n)
    base = encode_captions(tokenizer, text_encoder, cases.base)
    source = encode_captions(tokenizer, text_encoder, cases.source)

    def run(states):
        images = generate(
            unet, scheduler, states, steps=steps, generator=eval_generators(seed, n, offset=5000)
        )
        return classify_colour(images), classify_shape(images)

    clean_colour, clean_kind = run(base)
    colour_patch_colour, colour_patch_kind = run(patch_position(base, source, COLOUR_POSITION))
    shape_patch_colour, shape_patch_kind = run(patch_position(base, source, SHAPE_POSITION))
    return {
        "cases": n,
        "sampling_steps": steps,
        "source": "a caption with another colour and another shape",
        "clean": {
            "colour_is_base": _rate(clean_colour, cases.base_colours),
            "shape_is_base": _rate(clean_kind, cases.base_kinds),
        },
        "patch_colour_position": {
            "colour_is_source": _rate(colour_patch_colour, cases.source_colours),
            "shape_is_base": _rate(colour_patch_kind, cases.base_kinds),
        },
        "patch_shape_position": {
            "colour_is_base": _rate(shape_patch_colour, cases.base_colours),
            "shape_is_source": _rate(shape_patch_kind, cases.source_kinds),
        },
    }


@torch.no_grad()
def measure_no_cross_attention(
    unet, text_encoder, tokenizer, scheduler, seed: int, *, steps: int = SAMPLING_STEPS
) -> dict:
    """Colour accuracy with every ``attn2`` output zeroed: the text has no other way in."""
    all_captions = captions()
    states = encode_captions(tokenizer, text_encoder, all_captions)
    handles = [
        module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        for name, module in unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        images = generate(
            unet, scheduler, states, steps=steps, generator=eval_generators(seed, len(states))
        )
    finally:
        for handle in handles:
            handle.remove()
    return {
        "generations": len(all_captions),
        "colour": _rate(classify_colour(images), [c.split()[0] for c in all_captions]),
        "attn2_layers": len(handles),
    }


# ----------------------------------------------------------------------------------------------
# Saving


def save(out: Path, unet, text_encoder, tokenizer, sample_scheduler, report: dict) -> None:
    """Write the pipeline-like folder (float32 safetensors, configs) and the training report."""
    out.mkdir(parents=True, exist_ok=True)
    # Trained in float32 throughout; .to(dtype=...) would only warn.
    unet.to("cpu").save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.to("cpu").save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    sample_scheduler.save_pretrained(out / "scheduler")
    report["folder_bytes"] = folder_bytes(out)  # without the report itself
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def count_parameters(unet, text_encoder) -> dict[str, int]:
    """Parameter counts of the U-Net (and its cross-attention), the text encoder, and in total."""
    attn2 = sum(p.numel() for name, p in unet.named_parameters() if ".attn2." in name)
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "unet_attn2": attn2,
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    counts["total"] = counts["unet"] + counts["text_encoder"]
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    # One thread: on a shared two-core machine a second OpenMP thread makes these small
    # operations many times slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import diffusers
    import tokenizers
    import transformers

    start = time.perf_counter()
    tokenizer = make_tokenizer()
    unet, text_encoder = build_models(args.seed)
    train_scheduler, sample_scheduler = build_schedulers()
    final_loss = train(unet, text_encoder, tokenizer, train_scheduler, args.steps, args.seed)
    train_seconds = time.perf_counter() - start
    models = (unet, text_encoder, tokenizer, sample_scheduler)
    results = {
        "accuracy": accuracy(*models, args.seed),
        "accuracy_guided": accuracy(*models, args.seed, guidance_scale=GUIDANCE_SCALE),
        "mechanism": measure_mechanism(*models, args.seed),
        "no_cross_attention": measure_no_cross_attention(*models, args.seed),
    }
    report = {
        "model": "toy-unet",
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "peak_lr": PEAK_LR,
        "ema_decay": EMA_DECAY,
        "caption_dropout": CAPTION_DROPOUT,
        "train_timesteps": TRAIN_TIMESTEPS,
        "beta_schedule": BETA_SCHEDULE,
        "final_loss": final_loss,
        "train_wall_seconds": round(train_seconds, 1),
        "eval_wall_seconds": round(time.perf_counter() - start - train_seconds, 1),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "tokenizers": tokenizers.__version__,
        "parameters": count_parameters(unet, text_encoder),
        "image": {
            "size": IMAGE_SIZE,
            "source": "the shape's 16 x 16 cell of the 32 x 32 shapes.render of a one-shape scene",
        },
        "token_positions": {
            "<bos>": 0,
            "colour": COLOUR_POSITION,
            "shape": SHAPE_POSITION,
            "<eos>": SEQ_LENGTH - 1,
        },
        "eval_seed_offset": EVAL_SEED_OFFSET,
        **results,
    }
    save(args.out, unet, text_encoder, tokenizer, sample_scheduler, report)
    mech = results["mechanism"]
    print(
        f"colour accuracy {results['accuracy']['colour']:.3f}  shape accuracy "
        f"{results['accuracy']['shape']:.3f}  colour patch -> source colour "
        f"{mech['patch_colour_position']['colour_is_source']:.3f}  shape patch -> base colour "
        f"{mech['patch_shape_position']['colour_is_base']:.3f}  -> {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
