"""Train the ``toy-vlm`` demo model: a tiny LLaVA that answers questions about coloured shapes.

Images are scenes of :mod:`mechinterp.zoo.shapes`: 32 x 32 pixels, a 2 x 2 grid of 16 x 16
cells, two or three shapes of distinct kinds and colours, each in its own cell. The model is a
``transformers.LlavaForConditionalGeneration``: a 2-layer CLIP vision tower cuts the image into
8 x 8 patches (16 patches, 4 per cell), a 2-layer MLP projector maps each patch to one
embedding of a small Llama decoder, and the decoder reads a prompt of the form::

    <bos> <image> x 16 what colour is the square ?      -> red
    <bos> <image> x 16 what shape is red ?              -> square

and predicts the answer word at the last position. The loss is on that token only.

Trained on scenes of two or three shapes from the start, the model sits on a long plateau: it
learns which colours and shapes are present and guesses among them (loss about ln 2.5), because
nothing rewards shape features in the vision tower until the decoder can look them up, and
nothing rewards the lookup until the features exist. The first ``SINGLE_SHAPE_STEPS`` steps
therefore show one shape per scene, where "what shape is red ?" trains shape recognition
directly; after them scenes hold one to three shapes (``TRAIN_N_SHAPES``), and the lookup forms.
Held-out evaluation uses scenes of two or three shapes only.

Training length matters for the mechanism as well as for accuracy. With a 4000-step schedule
the model reached 97% but its patch tokens still carried some of the other cells' content
(restoring the asked-about cell recovered 88% of the logit difference for colour questions and
64% for shape questions); with the default 6000 steps it reaches 99.8% and the recovery is
essentially complete (see the report).

The answer can only come from the image tokens of the cell that holds the asked-about shape:
recolouring that shape changes the answer, and in such a corrupted run, restoring the
projector's outputs of that cell's four patches from the clean run brings the clean answer
back, while restoring another shape's cell does not. ``measure_mechanism`` measures this with a
forward hook on the projector; the report records the numbers.

Run::

    python -m mechinterp.zoo.train_toy_vlm --out DIR [--steps N] [--seed N] [--device cpu|cuda]

The run is deterministic given the seed and the device (about ten minutes on one busy CPU
core). ``DIR`` receives the model (float32 safetensors), the tokenizer, a ``LlavaProcessor`` and
``training_report.json``.

Image tokens: :func:`vlm_inputs` writes ``<bos>``, then ``N_IMAGE_TOKENS`` copies of
``<image>``, then the question, padding on the left. Image token ``p`` (the ``p``-th ``<image>``
of a row, at position ``pad + 1 + p``) receives row ``p`` of the projector's output, which is
patch ``p`` of the 4 x 4 patch grid in row-major order (``shapes.cell_patches`` lists the
patches of a cell). The CLS token of the vision tower is dropped (``"default"`` feature select
strategy) and the features are those of the last vision layer. Left padding shifts a row's
positions, which the decoder does not notice: Llama's rotary embeddings depend only on the
distance between positions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechinterp.zoo import shapes

SPECIAL_TOKENS = ("<bos>", "<pad>", "<unk>", "<image>")
BOS_ID, PAD_ID, UNK_ID, IMAGE_TOKEN_ID = 0, 1, 2, 3
IMAGE_TOKEN = "<image>"
QUESTION_WORDS = ("what", "colour", "shape", "is", "the", "?")
WORDS = QUESTION_WORDS + shapes.SHAPES + shapes.COLOUR_NAMES

# Question templates; the answer to the first is a colour, to the second a shape kind.
COLOUR_QUESTION = "what colour is the {kind} ?"
SHAPE_QUESTION = "what shape is {colour} ?"

IMAGE_SIZE = shapes.IMAGE_SIZE
PATCH_SIZE = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # one per patch; the CLS token is dropped
MAX_LENGTH = 32  # longest prompt: 1 + 16 + 6 tokens

# Pixels in [0, 1] are mapped to [-1, 1]: (x - mean) / std per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

BATCH_SIZE = 64
DEFAULT_STEPS = 6000
SINGLE_SHAPE_STEPS = 300  # curriculum: one shape per scene first (see the module docstring)
TRAIN_N_SHAPES = (1, 3)  # shapes per training scene after the curriculum
EVAL_N_SHAPES = (2, 3)  # shapes per held-out scene
DEFAULT_SEED = 0
COLOUR_QUESTION_FRACTION = 0.5  # share of questions that ask for a colour

# Held-out scenes come from seed + EVAL_SEED_OFFSET, far from the training stream's seed.
EVAL_SEED_OFFSET = 10_000
EVAL_SCENES = 512


# ----------------------------------------------------------------------------------------------
# Vocabulary, tokenizer and inputs


def make_vocab() -> list[str]:
    """The fixed token list: special tokens, then question words, shapes, colours."""
    return list(SPECIAL_TOKENS) + list(WORDS)


def make_tokenizer():
    """A word-level fast tokenizer over ``make_vocab()`` that splits on whitespace.

    It adds no special tokens itself (:func:`prompt` writes ``<bos>`` and the image tokens);
    ``<image>`` is a special token, so runs of it need no spaces between them. Batches pad on
    the left so that the last position is always the one that predicts the answer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(make_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Joins words with single spaces; no clean-up, so "square ?" decodes as written.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=MAX_LENGTH,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    return tokenizer


def prompt(question: str) -> str:
    """The text of one prompt: ``<bos>``, the image tokens, then ``question``."""
    return " ".join(["<bos>", *[IMAGE_TOKEN] * N_IMAGE_TOKENS, question])


def colour_question(kind: str) -> str:
    """``"what colour is the {kind} ?"``; the answer is a colour word."""
    return COLOUR_QUESTION.format(kind=kind)


def shape_question(colour: str) -> str:
    """``"what shape is {colour} ?"``; the answer is a shape word."""
    return SHAPE_QUESTION.format(colour=colour)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Normalise images as in training: ``uint8 [batch, 3, H, W]`` (or float in [0, 1]) to float32.

    Each channel maps through ``(x / 255 - IMAGE_MEAN) / IMAGE_STD``, so [0, 255] becomes [-1, 1].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"images must have shape [batch, 3, height, width], got {tuple(images.shape)}"
        raise ValueError(msg)
    x = images.float() if images.is_floating_point() else images.float() / 255
    mean = torch.tensor(IMAGE_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=images.device)[:, None, None]
    return (x - mean) / std


def vlm_inputs(tokenizer, images: torch.Tensor, questions: list[str]) -> dict[str, torch.Tensor]:
    """Model inputs for ``images`` and one question each: ``input_ids``, ``attention_mask``,
    ``pixel_values``, ready for ``model(**inputs)`` or ``model.generate(**inputs)``.

    ``images`` is ``uint8 [batch, 3, 32, 32]`` (``shapes.render_batch``) or float in [0, 1];
    ``questions`` holds ``batch`` strings in the vocabulary (e.g. :func:`colour_question`).
    Each row is :func:`prompt` of its question, left-padded to the longest row, so the last
    position predicts the answer. The ``p``-th ``<image>`` token of a row receives patch ``p``
    (row-major over the 4 x 4 patch grid).

    Examples:
        >>> from mechinterp.zoo import shapes
        >>> tokenizer = make_tokenizer()
        >>> images = shapes.render_batch([(shapes.Shape("square", "red", cell=0),)] * 2)
        >>> inputs = vlm_inputs(tokenizer, images, ["what colour is the square ?", "what shape is red ?"])
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape
        (torch.Size([2, 23]), torch.Size([2, 3, 32, 32]))
        >>> (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
        [16, 16]
        >>> inputs["attention_mask"][1, :2].tolist()  # the shorter question is padded on the left
        [0, 1]
    """
    if len(questions) != images.shape[0]:
        msg = f"questions must hold one string per image ({images.shape[0]}), got {len(questions)}"
        raise ValueError(msg)
    encoded = tokenizer(
        [prompt(q) for q in questions], padding=True, return_tensors="pt", add_special_tokens=False
    )
    n_image = (encoded["input_ids"] == IMAGE_TOKEN_ID).sum(1)
    if not bool((n_image == N_IMAGE_TOKENS).all()):
        msg = (
            f"questions must not contain {IMAGE_TOKEN!r}; image tokens per row: {n_image.tolist()}"
        )
        raise ValueError(msg)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values": pixel_values(images),
    }


def answer_ids(tokenizer, answers: list[str]) -> torch.Tensor:
    """Token id of each one-word answer, ``int64 [batch]``."""
    vocab = tokenizer.get_vocab()
    unknown = [a for a in answers if a not in vocab]
    if unknown:
        msg = f"answers must be words of the vocabulary, got {unknown}"
        raise ValueError(msg)
    return torch.tensor([vocab[a] for a in answers])


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class QABatch:
    """Scenes, one question about each, and the answers."""

    scenes: list[shapes.Scene]
    questions: list[str]
    answers: list[str]


def sample_qa(
    generator: torch.Generator, batch_size: int, *, n_shapes: tuple[int, int] = EVAL_N_SHAPES
) -> QABatch:
    """Fresh scenes of ``n_shapes`` shapes, each with a question about one of its shapes.

    The shape is chosen uniformly; the question asks for its colour with probability
    ``COLOUR_QUESTION_FRACTION``, otherwise for the kind of the shape of its colour.
    """
    scenes, questions, answers = [], [], []
    for _ in range(batch_size):
        scene = shapes.sample_scene(generator, n_shapes=n_shapes)
        target = scene[int(torch.randint(len(scene), (), generator=generator))]
        if float(torch.rand((), generator=generator)) < COLOUR_QUESTION_FRACTION:
            questions.append(colour_question(target.kind))
            answers.append(target.colour)
        else:
            questions.append(shape_question(target.colour))
            answers.append(target.kind)
        scenes.append(scene)
    return QABatch(scenes, questions, answers)


# ----------------------------------------------------------------------------------------------
# Model


def build_config():
    """LLaVA of a 2-layer CLIP vision tower (width 64) and a 2-layer Llama decoder (width 64).

    Features are the last vision layer's patch tokens (``vision_feature_layer=-1``, CLS
    dropped); no dropout, so training and evaluation compute alike.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(make_vocab()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_model(seed: int):
    """A freshly initialised model; the seed fixes the initial weights."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(build_config(), attn_implementation="eager")


def answer_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the last position (where the answer is predicted), ``[batch, vocab]``."""
    return model(**inputs, logits_to_keep=1).logits[:, -1]


# ----------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to a tenth of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model,
    tokenizer,
    steps: int,
    seed: int,
    device: str = "cpu",
    peak_lr: float = 2e-3,
    warmup_steps: int = 100,
    log_every: int = 100,
) -> float:
    """AdamW on fresh ``sample_qa`` batches, loss on the answer token; returns the last window's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    probe = sample_qa(torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET + 1), 256)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup_steps)
        n_shapes = (1, 1) if step < SINGLE_SHAPE_STEPS else TRAIN_N_SHAPES
        batch = sample_qa(generator, BATCH_SIZE, n_shapes=n_shapes)
        inputs = vlm_inputs(tokenizer, shapes.render_batch(batch.scenes), batch.questions)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        target = answer_ids(tokenizer, batch.answers).to(device)
        loss = F.cross_entropy(answer_logits(model, inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            line = (
                f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - start:.0f}s"
            )
            if (step + 1) % (5 * log_every) == 0:
                line += f"  probe acc {accuracy(model, tokenizer, probe, device)['all']:.3f}"
                model.train()
            print(line, flush=True)
    model.eval()
    return sum(recent) / len(recent)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def accuracy(model, tokenizer, batch: QABatch, device: str = "cpu") -> dict[str, float]:
    """Argmax answer accuracy over the batch, overall and per question kind."""
    model.eval()
    inputs = vlm_inputs(tokenizer, shapes.render_batch(batch.scenes), batch.questions)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    predicted = answer_logits(model, inputs).argmax(-1).cpu()
    correct = predicted == answer_ids(tokenizer, batch.answers)
    is_colour = torch.tensor([a in shapes.COLOURS for a in batch.answers])
    return {
        "all": correct.float().mean().item(),
        "colour_questions": correct[is_colour].float().mean().item(),
        "shape_questions": correct[~is_colour].float().mean().item(),
    }


@dataclass
class MechanismCases:
    """Clean and corrupted scenes with one question each, and the cells to restore.

    ``corrupted[i]`` changes only the asked-about shape of ``clean[i]`` (its colour for a
    colour question, its kind for a shape question), so the answer changes from
    ``clean_answers[i]`` to ``corrupt_answers[i]``. ``target_cells[i]`` is that shape's cell and
    ``other_cells[i]`` the cell of another shape of the scene.
    """

    clean: list[shapes.Scene]
    corrupted: list[shapes.Scene]
    questions: list[str]
    clean_answers: list[str]
    corrupt_answers: list[str]
    target_cells: list[int]
    other_cells: list[int]


def sample_mechanism_cases(generator: torch.Generator, n: int, *, ask: str) -> MechanismCases:
    """``n`` corruption cases; ``ask`` is ``"colour"`` (recolour the asked-about shape with an
    unused colour) or ``"shape"`` (turn the shape of the asked colour into an unused kind)."""
    if ask not in ("colour", "shape"):
        msg = f"ask must be 'colour' or 'shape', got {ask!r}"
        raise ValueError(msg)
    cases = MechanismCases([], [], [], [], [], [], [])
    for _ in range(n):
        scene = shapes.sample_scene(generator)
        order = torch.randperm(len(scene), generator=generator).tolist()
        target, other = scene[order[0]], scene[order[1]]
        if ask == "colour":
            options = shapes.unused_colours(scene)
            new = options[int(torch.randint(len(options), (), generator=generator))]
            corrupted = shapes.recolour(scene, target.kind, new)
            question, clean_answer = colour_question(target.kind), target.colour
        else:
            options = shapes.unused_kinds(scene)
            new = options[int(torch.randint(len(options), (), generator=generator))]
            corrupted = shapes.reshape(scene, target.colour, new)
            question, clean_answer = shape_question(target.colour), target.kind
        cases.clean.append(scene)
        cases.corrupted.append(corrupted)
        cases.questions.append(question)
        cases.clean_answers.append(clean_answer)
        cases.corrupt_answers.append(new)
        cases.target_cells.append(target.cell)
        cases.other_cells.append(other.cell)
    return cases


@torch.no_grad()
def patched_logits(
    model, inputs: dict[str, torch.Tensor], source: torch.Tensor, patches: torch.Tensor
) -> torch.Tensor:
    """Answer logits of ``inputs`` with some image-token embeddings replaced by ``source``'s.

    ``source`` is the projector output of another run, ``[batch, N_IMAGE_TOKENS, d_model]``;
    ``patches`` is a boolean ``[batch, N_IMAGE_TOKENS]`` mask of the image tokens to replace. A
    forward hook on ``multi_modal_projector`` does the replacement, so it happens before the
    image tokens are scattered into the decoder's input embeddings.
    """

    def restore(module, args, output):
        return torch.where(patches[:, :, None], source.to(output.dtype), output)

    handle = model.model.multi_modal_projector.register_forward_hook(restore)
    try:
        return answer_logits(model, inputs)
    finally:
        handle.remove()


@torch.no_grad()
def projector_output(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projector output (image-token embeddings) of a run, ``[batch, N_IMAGE_TOKENS, d_model]``."""
    saved = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: saved.append(output)
    )
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return saved[0]


def cells_mask(cells: list[int]) -> torch.Tensor:
    """Boolean ``[batch, N_IMAGE_TOKENS]``: the image tokens of each row's cell."""
    mask = torch.zeros(len(cells), N_IMAGE_TOKENS, dtype=torch.bool)
    for row, cell in enumerate(cells):
        mask[row, shapes.cell_patches(cell, patch_size=PATCH_SIZE)] = True
    return mask


def _share(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


@torch.no_grad()
def measure_mechanism(model, tokenizer, cases: MechanismCases, device: str = "cpu") -> dict:
    """How much restoring each cell's image tokens in the corrupted run recovers the clean answer.

    The metric is the logit difference ``logit[clean answer] - logit[corrupt answer]``;
    ``recovered = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)``, computed on the means
    over cases (and, as a check, the median of the per-case ratios).
    """
    model.eval()

    def inputs_for(scenes):
        inputs = vlm_inputs(tokenizer, shapes.render_batch(scenes), cases.questions)
        return {k: v.to(device) for k, v in inputs.items()}

    clean_inputs, corrupt_inputs = inputs_for(cases.clean), inputs_for(cases.corrupted)
    clean_ids = answer_ids(tokenizer, cases.clean_answers).to(device)
    corrupt_ids = answer_ids(tokenizer, cases.corrupt_answers).to(device)

    def logit_diff(logits):
        return (logits.gather(1, clean_ids[:, None]) - logits.gather(1, corrupt_ids[:, None]))[:, 0]

    clean_logits = answer_logits(model, clean_inputs)
    corrupt_logits = answer_logits(model, corrupt_inputs)
    clean_source = projector_output(model, clean_inputs)
    ld_clean, ld_corrupt = logit_diff(clean_logits), logit_diff(corrupt_logits)
    result = {
        "cases": len(cases.questions),
        "clean_accuracy": _share(clean_logits.argmax(-1) == clean_ids),
        "corrupted_predicts_new_answer": _share(corrupt_logits.argmax(-1) == corrupt_ids),
        "logit_diff_clean": ld_clean.mean().item(),
        "logit_diff_corrupt": ld_corrupt.mean().item(),
    }
    for name, cells in (("target_cell", cases.target_cells), ("other_cell", cases.other_cells)):
        logits = patched_logits(model, corrupt_inputs, clean_source, cells_mask(cells).to(device))
        ld = logit_diff(logits)
        per_case = (ld - ld_corrupt) / (ld_clean - ld_corrupt)
        result[f"restore_{name}"] = {
            "logit_diff": ld.mean().item(),
            "recovered": (
                (ld.mean() - ld_corrupt.mean()) / (ld_clean.mean() - ld_corrupt.mean())
            ).item(),
            "recovered_median": per_case.median().item(),
            "predicts_clean_answer": _share(logits.argmax(-1) == clean_ids),
        }
    return result


def evaluate(model, tokenizer, seed: int, device: str = "cpu") -> dict:
    """Held-out accuracy and the mechanism numbers, on scenes drawn from ``seed + EVAL_SEED_OFFSET``."""
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    batch = sample_qa(generator, EVAL_SCENES)
    return {
        "eval_seed": seed + EVAL_SEED_OFFSET,
        "eval_scenes": EVAL_SCENES,
        "accuracy": accuracy(model, tokenizer, batch, device),
        "mechanism": {
            ask: measure_mechanism(
                model, tokenizer, sample_mechanism_cases(generator, 256, ask=ask), device
            )
            for ask in ("colour", "shape")
        },
    }


# ----------------------------------------------------------------------------------------------
# Saving


def make_processor(tokenizer):
    """A ``LlavaProcessor`` that prepares images and prompts as :func:`vlm_inputs` does.

    The image processor only rescales and normalises (no resize or crop); the processor
    expands each ``<image>`` in a prompt to ``N_IMAGE_TOKENS`` image tokens. Prompts given to it
    are written with one ``<image>``: ``"<bos> <image> what colour is the square ?"``.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops again
        image_token=IMAGE_TOKEN,
    )


def check_saved(out: Path, tokenizer) -> bool:
    """Reload tokenizer and processor from ``out`` and check they encode as :func:`vlm_inputs`.

    Returns whether the processor matches (``vlm_inputs`` is the reference); raises if the
    tokenizer does not.
    """
    from transformers import AutoTokenizer

    scenes = [shapes.sample_scene(torch.Generator().manual_seed(i)) for i in range(2)]
    images = shapes.render_batch(scenes)
    questions = [colour_question(scenes[0][0].kind), shape_question(scenes[1][0].colour)]
    expected = vlm_inputs(tokenizer, images, questions)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = vlm_inputs(reloaded_tokenizer, images, questions)
    decoded = reloaded_tokenizer.decode(expected["input_ids"][0])
    if decoded != prompt(questions[0]):
        raise RuntimeError(f"tokenizer decode changed {prompt(questions[0])!r} to {decoded!r}")
    for key in ("input_ids", "attention_mask"):
        if not torch.equal(expected[key], reloaded[key]):
            raise RuntimeError(
                f"tokenizer round-trip changed {key}: {expected[key]} -> {reloaded[key]}"
            )
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    got = processor(
        images=list(images.permute(0, 2, 3, 1).numpy()),
        text=["<bos> <image> " + q for q in questions],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    return (
        torch.equal(got["input_ids"], expected["input_ids"])
        and torch.equal(got["attention_mask"], expected["attention_mask"])
        and torch.allclose(got["pixel_values"].float(), expected["pixel_values"], atol=1e-6)
    )


def save(out: Path, model, tokenizer, report: dict) -> None:
    """Write float32 weights as safetensors, tokenizer, processor and the training report."""
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_processor(tokenizer).save_pretrained(out)
    report["processor_matches_vlm_inputs"] = check_saved(out, tokenizer)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def count_parameters(model) -> dict[str, int]:
    """Parameter counts of the vision tower, projector, decoder with head, and in total."""
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    import transformers

    start = time.perf_counter()
    tokenizer = make_tokenizer()
    model = build_model(args.seed)
    final_loss = train(model, tokenizer, args.steps, args.seed, args.device)
    train_seconds = time.perf_counter() - start
    results = evaluate(model, tokenizer, args.seed, args.device)

    report = {
        "model": "toy-vlm",
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "colour_question_fraction": COLOUR_QUESTION_FRACTION,
        "single_shape_steps": SINGLE_SHAPE_STEPS,
        "train_n_shapes": list(TRAIN_N_SHAPES),
        "eval_n_shapes": list(EVAL_N_SHAPES),
        "final_loss": final_loss,
        "train_wall_seconds": round(train_seconds, 1),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": count_parameters(model),
        "image_tokens": {
            "count": N_IMAGE_TOKENS,
            "first_position_unpadded": 1,
            "patch_size": PATCH_SIZE,
            "order": "row-major over the 4 x 4 patch grid; CLS dropped",
        },
        **results,
    }
    save(args.out, model, tokenizer, report)
    colour, shape = results["mechanism"]["colour"], results["mechanism"]["shape"]
    print(
        f"accuracy {results['accuracy']['all']:.4f}  colour question: restore target cell "
        f"{colour['restore_target_cell']['recovered']:.3f}, other cell "
        f"{colour['restore_other_cell']['recovered']:.3f}  shape question: target "
        f"{shape['restore_target_cell']['recovered']:.3f}, other "
        f"{shape['restore_other_cell']['recovered']:.3f}  -> {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
