"""The shipped ``toy-unet`` model: a tiny text-conditioned diffusion U-Net over coloured shapes.

The model loads offline, draws the colour its caption names, and the colour word steers the
colour through cross-attention: patching the colour word's key/value inputs of every ``attn2``
with another caption's recolours the image, patching the shape word's does not.
"""

from __future__ import annotations

import json
import pathlib
from importlib.resources import files

import pytest
import torch

from mechinterp.zoo import ZOO, shapes
from mechinterp.zoo.train_toy_unet import (
    BOS_ID,
    COLOUR_POSITION,
    EOS_ID,
    EVAL_SEED_OFFSET,
    PAD_ID,
    SHAPE_POSITION,
    caption_ids,
    captions,
    classify_colour,
    classify_shape,
    encode_captions,
    generate,
    load_toy_unet,
    make_vocab,
    render_shape,
)

pytest.importorskip("diffusers")

# Held-out noise seeds for these tests: not the training stream nor training's evaluation.
TEST_SEED = 20_250_103
STEPS = 10  # DDIM steps, as in the report's evaluation
MIN_RATE = 0.9
MIN_SHAPE_RATE = 0.75  # shape accuracy, a looser claim than the colour's
MAX_FOLDER_BYTES = 10 * 1024 * 1024
FOLDER = pathlib.Path(str(files("mechinterp.zoo") / "toy-unet"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded():
    return load_toy_unet(FOLDER)


@pytest.fixture(scope="module")
def report():
    return json.loads((FOLDER / "training_report.json").read_text())


def seeds(n, offset=0):
    return [torch.Generator().manual_seed(TEST_SEED + offset + i) for i in range(n)]


def colours_of(captions_):
    return [c.split()[0] for c in captions_]


def rate(got, wanted):
    return sum(a == b for a, b in zip(got, wanted)) / len(wanted)


# Fourteen base captions, every colour twice (with two different shapes), and sources that
# differ from them in both colour and shape.
BASE = [
    f"{colour} {shapes.SHAPES[(i + j) % len(shapes.SHAPES)]}"
    for i, colour in enumerate(shapes.COLOUR_NAMES)
    for j in (0, 2)
]
SOURCE = [
    f"{shapes.COLOUR_NAMES[(i // 2 + 3) % 7]} {shapes.SHAPES[(shapes.SHAPES.index(k) + 1) % 4]}"
    for i, k in enumerate(c.split()[1] for c in BASE)
]


# ----------------------------------------------------------------------------------------------
# The shipped folder


def test_zoo_name():
    if "toy-unet" not in ZOO:
        pytest.skip("toy-unet is not registered in mechinterp.zoo.ZOO yet")
    from mechinterp.zoo import zoo_path

    assert zoo_path("toy-unet") == FOLDER


def test_folder_contents_and_size():
    for required in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "training_report.json",
    ):
        assert (FOLDER / required).is_file(), required
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{FOLDER} holds {size} bytes"


def test_configs(loaded):
    unet, text_encoder, _, scheduler = loaded
    config = unet.config
    assert (config.sample_size, config.in_channels, config.out_channels) == (16, 3, 3)
    assert config.cross_attention_dim == text_encoder.config.hidden_size == 32
    # The text reaches the U-Net through cross-attention only.
    assert config.class_embed_type is None and config.addition_embed_type is None
    assert config.encoder_hid_dim is None
    assert text_encoder.config.num_hidden_layers == 0
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.prediction_type == "epsilon"
    for module in (unet, text_encoder):
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_tokenizer_writes_fixed_positions(loaded):
    _, _, tokenizer, _ = loaded
    vocab = make_vocab()
    assert tokenizer.get_vocab() == {word: i for i, word in enumerate(vocab)}
    ids = caption_ids(tokenizer, captions())
    assert ids.shape == (28, 4)
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, 3] == EOS_ID).all()
    assert ids[:, COLOUR_POSITION].tolist() == [vocab.index(c) for c in colours_of(captions())]
    assert ids[:, SHAPE_POSITION].tolist() == [vocab.index(c.split()[1]) for c in captions()]
    assert tokenizer.decode(ids[0]) == "<bos> red circle <eos>"
    assert caption_ids(tokenizer, [""]).tolist() == [[BOS_ID, PAD_ID, PAD_ID, EOS_ID]]
    with pytest.raises(ValueError, match="captions"):
        caption_ids(tokenizer, ["circle red"])


def test_each_state_depends_on_its_own_word_only(loaded):
    _, text_encoder, tokenizer, _ = loaded
    with torch.no_grad():
        states = encode_captions(
            tokenizer, text_encoder, ["red circle", "red square", "blue circle"]
        )
    assert states.shape == (3, 4, 32)
    torch.testing.assert_close(states[0, COLOUR_POSITION], states[1, COLOUR_POSITION])
    torch.testing.assert_close(states[0, SHAPE_POSITION], states[2, SHAPE_POSITION])
    torch.testing.assert_close(states[0, 3], states[1, 3])
    assert not torch.allclose(states[0, COLOUR_POSITION], states[2, COLOUR_POSITION])


def test_classifiers_on_renders():
    scenes = [
        (shapes.Shape(k, c, cell=i % 4),)
        for i, (c, k) in enumerate((c, k) for c in shapes.COLOUR_NAMES for k in shapes.SHAPES)
    ]
    images = torch.stack([render_shape(s[0]) for s in scenes])
    assert images.shape == (28, 3, 16, 16)
    assert classify_colour(images) == [s[0].colour for s in scenes]
    assert classify_shape(images) == [s[0].kind for s in scenes]
    assert classify_colour(torch.zeros(1, 3, 16, 16)) == [None]


# ----------------------------------------------------------------------------------------------
# Behaviour


def test_generations_have_the_captions_colour(loaded, report):
    """Every caption once (every colour four times), on held-out noise seeds."""
    unet, text_encoder, tokenizer, scheduler = loaded
    assert TEST_SEED not in (report["seed"], report["seed"] + EVAL_SEED_OFFSET)
    with torch.no_grad():
        states = encode_captions(tokenizer, text_encoder, captions())
    images = generate(unet, scheduler, states, steps=STEPS, generator=seeds(28))
    assert images.shape == (28, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert rate(classify_colour(images), colours_of(captions())) >= MIN_RATE
    # The shape is not the point of the model, but it is drawn too (96% in the report).
    assert rate(classify_shape(images), [c.split()[1] for c in captions()]) >= MIN_SHAPE_RATE
    assert report["accuracy"]["colour"] >= MIN_RATE


def test_classifier_free_guidance(loaded, report):
    unet, text_encoder, tokenizer, scheduler = loaded
    with torch.no_grad():
        states = encode_captions(tokenizer, text_encoder, BASE)
        uncond = encode_captions(tokenizer, text_encoder, [""])
    images = generate(
        unet,
        scheduler,
        states,
        steps=STEPS,
        generator=seeds(len(BASE), offset=100),
        guidance_scale=2.0,
        uncond_hidden_states=uncond,
    )
    assert rate(classify_colour(images), colours_of(BASE)) >= MIN_RATE
    assert report["accuracy_guided"]["colour"] >= MIN_RATE
    with pytest.raises(ValueError, match="uncond_hidden_states"):
        generate(unet, scheduler, states, steps=STEPS, generator=seeds(1)[0], guidance_scale=2.0)


def test_generation_is_deterministic_given_the_seed(loaded):
    unet, text_encoder, tokenizer, scheduler = loaded
    with torch.no_grad():
        states = encode_captions(tokenizer, text_encoder, BASE[:4])

    def draw(seed):
        return generate(
            unet, scheduler, states, steps=STEPS, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    # With one generator per row, a row depends on its own seed only.
    together = generate(unet, scheduler, states, steps=STEPS, generator=seeds(4))
    alone = generate(unet, scheduler, states[2:3], steps=STEPS, generator=seeds(4)[2:3])
    torch.testing.assert_close(together[2:3], alone, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Mechanism


def attn2_layers(unet):
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    # One in the second down block, one in the mid block, two in the first up block.
    assert len(layers) == 4
    return layers


def generate_with_kv_patch(loaded, base_states, source_states, position, generators):
    """Generate from ``base_states`` with the key/value inputs of every ``attn2`` at
    ``position`` taken from ``source_states`` (forward pre-hooks on ``to_k`` and ``to_v``)."""
    unet, _, _, scheduler = loaded

    def patch(module, args):
        (states,) = args
        patched = states.clone()
        patched[:, position] = source_states[:, position]
        return (patched,)

    handles = [
        linear.register_forward_pre_hook(patch)
        for attn in attn2_layers(unet)
        for linear in (attn.to_k, attn.to_v)
    ]
    try:
        return generate(unet, scheduler, base_states, steps=STEPS, generator=generators)
    finally:
        for handle in handles:
            handle.remove()


def test_colour_word_steers_colour_through_cross_attention(loaded, report):
    """Patching the colour word's key/value inputs recolours the image; the shape word's does not.

    "red circle" with the colour word's keys and values from "yellow square" comes out yellow
    (and still a circle); with the shape word's instead it stays red (and becomes a square).
    """
    unet, text_encoder, tokenizer, scheduler = loaded
    assert len(set(colours_of(BASE))) == 7 and len(BASE) == 14
    assert all(
        b.split()[0] != s.split()[0] and b.split()[1] != s.split()[1] for b, s in zip(BASE, SOURCE)
    )
    with torch.no_grad():
        base = encode_captions(tokenizer, text_encoder, BASE)
        source = encode_captions(tokenizer, text_encoder, SOURCE)
    clean = generate(unet, scheduler, base, steps=STEPS, generator=seeds(14, offset=200))
    colour_patched = generate_with_kv_patch(
        loaded, base, source, COLOUR_POSITION, seeds(14, offset=200)
    )
    shape_patched = generate_with_kv_patch(
        loaded, base, source, SHAPE_POSITION, seeds(14, offset=200)
    )

    assert rate(classify_colour(clean), colours_of(BASE)) >= MIN_RATE
    assert rate(classify_colour(colour_patched), colours_of(SOURCE)) >= MIN_RATE
    assert rate(classify_colour(shape_patched), colours_of(BASE)) >= MIN_RATE
    # ... and the shape follows the shape word: the two words act on separate properties.
    assert rate(classify_shape(colour_patched), [c.split()[1] for c in BASE]) >= MIN_SHAPE_RATE
    assert rate(classify_shape(shape_patched), [c.split()[1] for c in SOURCE]) >= MIN_SHAPE_RATE

    # The encoder states feed nothing but attn2's keys and values: patching the states
    # themselves at the colour word's position gives the very same images.
    states = base.clone()
    states[:, COLOUR_POSITION] = source[:, COLOUR_POSITION]
    same = generate(unet, scheduler, states, steps=STEPS, generator=seeds(14, offset=200))
    assert torch.equal(same, colour_patched)

    mechanism = report["mechanism"]
    assert mechanism["patch_colour_position"]["colour_is_source"] >= MIN_RATE
    assert mechanism["patch_shape_position"]["colour_is_base"] >= MIN_RATE


def test_without_cross_attention_the_colour_is_lost(loaded, report):
    """Zeroing every attn2 output cuts the text off: the colour no longer follows the caption."""
    unet, text_encoder, tokenizer, scheduler = loaded
    with torch.no_grad():
        states = encode_captions(tokenizer, text_encoder, captions())
    handles = [
        attn.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        for attn in attn2_layers(unet)
    ]
    try:
        images = generate(unet, scheduler, states, steps=STEPS, generator=seeds(28))
    finally:
        for handle in handles:
            handle.remove()
    assert rate(classify_colour(images), colours_of(captions())) <= 0.5
    assert report["no_cross_attention"]["colour"] <= 0.5
