"""The shipped ``toy-vlm`` model and the shape renderer it is trained on.

The model loads offline, answers held-out questions, and its answer flows from the image tokens
of the asked-about shape's cell: a plain forward hook on the projector shows it.
"""

from __future__ import annotations

import json
import pathlib
from importlib.resources import files

import pytest
import torch

from mechinterp.zoo import ZOO, shapes
from mechinterp.zoo.train_toy_vlm import (
    BOS_ID,
    EVAL_SEED_OFFSET,
    IMAGE_TOKEN_ID,
    N_IMAGE_TOKENS,
    PAD_ID,
    PATCH_SIZE,
    UNK_ID,
    answer_ids,
    colour_question,
    make_vocab,
    sample_mechanism_cases,
    sample_qa,
    shape_question,
    vlm_inputs,
)

# Held-out data for these tests: not the training stream nor training's evaluation.
TEST_SEED = 20_250_102
MAX_FOLDER_BYTES = 10 * 1024 * 1024
FOLDER = pathlib.Path(str(files("mechinterp.zoo") / "toy-vlm"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        FOLDER, local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)


@pytest.fixture(scope="module")
def report():
    return json.loads((FOLDER / "training_report.json").read_text())


def last_logits(model, inputs):
    return model(**inputs, logits_to_keep=1).logits[:, -1]


# ----------------------------------------------------------------------------------------------
# The renderer


def test_same_seed_same_scenes_and_images():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [shapes.sample_scene(generator) for _ in range(16)]

    first, again, other = draw(7), draw(7), draw(8)
    assert first == again
    assert torch.equal(shapes.render_batch(first), shapes.render_batch(again))
    assert first != other
    assert not torch.equal(shapes.render_batch(first), shapes.render_batch(other))


def test_scenes_have_distinct_kinds_colours_and_cells():
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(200):
        scene = shapes.sample_scene(generator)
        sizes.add(len(scene))
        for field in ("kind", "colour", "cell"):
            values = [getattr(s, field) for s in scene]
            assert len(set(values)) == len(values)
    assert sizes == {2, 3}


@pytest.mark.parametrize("kind", shapes.SHAPES)
def test_each_shape_covers_exactly_its_cells_patches(kind):
    steps = torch.linspace(-shapes.MAX_JITTER, shapes.MAX_JITTER, shapes.JITTER_STEPS).tolist()
    per_row = shapes.IMAGE_SIZE // PATCH_SIZE
    for cell in range(shapes.N_CELLS):
        for dx in steps:
            for dy in steps:
                mask = shapes.shape_mask(kind, cell, dx, dy, shapes.IMAGE_SIZE)
                per_patch = mask.reshape(per_row, PATCH_SIZE, per_row, PATCH_SIZE).sum((1, 3))
                covered = per_patch.flatten().nonzero().flatten().tolist()
                assert covered == shapes.cell_patches(cell, patch_size=PATCH_SIZE)


@pytest.mark.parametrize("colour", shapes.COLOUR_NAMES)
def test_pixel_classifier_recognises_each_colour(colour):
    image = shapes.render((shapes.Shape("square", colour, cell=1),))
    labels = shapes.pixel_colours(image)
    mask = shapes.shape_mask("square", 1, 0.0, 0.0, shapes.IMAGE_SIZE)
    assert (labels[mask] == shapes.COLOUR_NAMES.index(colour)).all()
    assert (labels[~mask] == -1).all()
    assert shapes.region_colour(image, 1) == colour
    assert [shapes.region_colour(image, c) for c in (0, 2, 3)] == [None, None, None]
    # A noisy float image (a generator's output) still reads as the same colour.
    noisy = image.float() / 255 + 0.15 * torch.randn(
        image.shape, generator=torch.Generator().manual_seed(0)
    )
    assert shapes.region_colour(noisy.clamp(0, 1), 1) == colour


# ----------------------------------------------------------------------------------------------
# The shipped folder


def test_zoo_name():
    if "toy-vlm" not in ZOO:
        pytest.skip("toy-vlm is not registered in mechinterp.zoo.ZOO yet")
    from mechinterp.zoo import zoo_path

    assert zoo_path("toy-vlm") == FOLDER


def test_folder_contents_and_size():
    names = {p.name for p in FOLDER.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "training_report.json"):
        assert required in names
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{FOLDER} holds {size} bytes"


def test_config(model):
    config = model.config
    assert config.model_type == "llava"
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "llama"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (32, PATCH_SIZE)
    assert config.image_token_id == IMAGE_TOKEN_ID
    assert config.image_seq_length == N_IMAGE_TOKENS
    assert config.vision_feature_select_strategy == "default"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_roundtrip(tokenizer):
    vocab = make_vocab()
    assert tokenizer.get_vocab() == {word: i for i, word in enumerate(vocab)}
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        BOS_ID,
        PAD_ID,
        UNK_ID,
    )
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    question = colour_question("square")
    ids = tokenizer(question)["input_ids"]
    assert ids == [vocab.index(w) for w in question.split()]  # no special tokens added
    assert tokenizer.decode(ids) == question
    assert tokenizer("<image><image> what")["input_ids"] == [3, 3, vocab.index("what")]


def test_vlm_inputs_layout(tokenizer):
    images = shapes.render_batch([(shapes.Shape("circle", "red", cell=2),)] * 2)
    inputs = vlm_inputs(tokenizer, images, [colour_question("circle"), shape_question("red")])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # The colour question is one word longer; the shape question is padded on the left.
    assert ids[0, 0] == BOS_ID and ids[1, 0] == PAD_ID and ids[1, 1] == BOS_ID
    assert mask[1].tolist() == [0] + [1] * (ids.shape[1] - 1)
    assert (ids[0, 1 : 1 + N_IMAGE_TOKENS] == IMAGE_TOKEN_ID).all()
    assert (ids[1, 2 : 2 + N_IMAGE_TOKENS] == IMAGE_TOKEN_ID).all()
    assert ((ids == IMAGE_TOKEN_ID).sum(1) == N_IMAGE_TOKENS).all()
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["pixel_values"].min() == -1 and inputs["pixel_values"].max() == 1


def test_image_tokens_receive_projector_rows_in_order(model, tokenizer):
    """Image token ``p`` of the decoder's input is row ``p`` of the projector's output."""
    batch = sample_qa(torch.Generator().manual_seed(TEST_SEED + 1), 3)
    inputs = vlm_inputs(tokenizer, shapes.render_batch(batch.scenes), batch.questions)
    seen = {}
    hooks = [
        model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, out: seen.__setitem__("projector", out)
        ),
        model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    at_image = seen["embeds"][inputs["input_ids"] == IMAGE_TOKEN_ID].reshape(3, N_IMAGE_TOKENS, -1)
    assert torch.equal(at_image, seen["projector"])


def test_processor_matches_vlm_inputs(tokenizer):
    if not (FOLDER / "processor_config.json").exists():
        pytest.skip("no processor saved")
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(FOLDER, local_files_only=True)
    batch = sample_qa(torch.Generator().manual_seed(TEST_SEED + 2), 4)
    images = shapes.render_batch(batch.scenes)
    expected = vlm_inputs(tokenizer, images, batch.questions)
    got = processor(
        images=list(images.permute(0, 2, 3, 1).numpy()),
        text=["<bos> <image> " + q for q in batch.questions],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    torch.testing.assert_close(got["pixel_values"].float(), expected["pixel_values"])


# ----------------------------------------------------------------------------------------------
# Behaviour and mechanism


def test_held_out_accuracy(model, tokenizer, report):
    assert TEST_SEED not in (report["seed"], report["seed"] + EVAL_SEED_OFFSET)
    batch = sample_qa(torch.Generator().manual_seed(TEST_SEED), 256)
    inputs = vlm_inputs(tokenizer, shapes.render_batch(batch.scenes), batch.questions)
    with torch.no_grad():
        predicted = last_logits(model, inputs).argmax(-1)
    correct = predicted == answer_ids(tokenizer, batch.answers)
    is_colour = torch.tensor([a in shapes.COLOURS for a in batch.answers])
    assert correct.float().mean() >= 0.95
    assert correct[is_colour].float().mean() >= 0.95
    assert correct[~is_colour].float().mean() >= 0.95
    assert report["accuracy"]["all"] >= 0.95


# Shares of the clean-vs-corrupt logit difference that restoring one cell's image tokens must
# recover: at least this much for the asked-about shape's cell, at most this much (in absolute
# value) for another shape's cell. The shipped model recovers about 1.0 and 0.0.
MIN_RECOVERED = 0.8
MAX_RECOVERED_OTHER = 0.2


@pytest.mark.parametrize("ask", ["colour", "shape"])
def test_answer_flows_from_the_asked_shapes_image_tokens(model, tokenizer, report, ask):
    """Corrupt the asked-about shape; restoring its cell's image tokens brings the answer back.

    For a colour question the corruption recolours the shape, for a shape question it changes
    the kind of the shape of the asked colour. The restoration is a forward hook on the
    projector that puts the clean run's rows back for the four patches of one cell: the
    asked-about shape's cell recovers most of the logit difference, another shape's cell
    almost none.
    """
    cases = sample_mechanism_cases(torch.Generator().manual_seed(TEST_SEED + 3), 128, ask=ask)
    clean = vlm_inputs(tokenizer, shapes.render_batch(cases.clean), cases.questions)
    corrupt = vlm_inputs(tokenizer, shapes.render_batch(cases.corrupted), cases.questions)
    clean_ids = answer_ids(tokenizer, cases.clean_answers)[:, None]
    corrupt_ids = answer_ids(tokenizer, cases.corrupt_answers)[:, None]
    projector = model.model.multi_modal_projector

    def logit_diff(logits):
        return (logits.gather(1, clean_ids) - logits.gather(1, corrupt_ids))[:, 0]

    def cell_mask(cells):
        mask = torch.zeros(len(cells), N_IMAGE_TOKENS, 1, dtype=torch.bool)
        for row, cell in enumerate(cells):
            mask[row, shapes.cell_patches(cell, patch_size=PATCH_SIZE)] = True
        return mask

    saved = []
    with torch.no_grad():
        handle = projector.register_forward_hook(lambda m, a, out: saved.append(out))
        try:
            clean_logits = last_logits(model, clean)
        finally:
            handle.remove()
        corrupt_logits = last_logits(model, corrupt)

        def restored(cells):
            mask = cell_mask(cells)
            handle = projector.register_forward_hook(
                lambda m, a, out: torch.where(mask, saved[0], out)
            )
            try:
                return last_logits(model, corrupt)
            finally:
                handle.remove()

        target_logits = restored(cases.target_cells)
        other_logits = restored(cases.other_cells)

    # The corruption changes the answer to the new colour (or kind).
    assert (corrupt_logits.argmax(-1)[:, None] == corrupt_ids).float().mean() >= 0.9
    ld_clean, ld_corrupt = logit_diff(clean_logits).mean(), logit_diff(corrupt_logits).mean()
    assert ld_clean > 0 > ld_corrupt

    def recovered(logits):
        return ((logit_diff(logits).mean() - ld_corrupt) / (ld_clean - ld_corrupt)).item()

    assert recovered(target_logits) >= MIN_RECOVERED
    assert abs(recovered(other_logits)) <= MAX_RECOVERED_OTHER
    recorded = report["mechanism"][ask]
    assert recorded["restore_target_cell"]["recovered"] >= MIN_RECOVERED
    assert abs(recorded["restore_other_cell"]["recovered"]) <= MAX_RECOVERED_OTHER
