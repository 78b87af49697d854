"""The shipped ``induction-2l`` model: loads offline, does induction, has the recorded heads."""

from __future__ import annotations

import json

import pytest
import torch

from mechinterp.zoo import ZOO, zoo_path
from mechinterp.zoo.train_induction import (
    BOS_ID,
    EVAL_SEED_OFFSET,
    FIRST_WORD_ID,
    PAD_ID,
    SEQ_LEN,
    SKIP_RULE_FRACTION,
    UNK_ID,
    head_scores,
    induction_accuracy,
    make_vocab,
    sample_repeated_batch,
    sample_training_batch,
    skip_rule,
)

# Held-out data for these tests: not the training stream (seed 0) nor training's evaluation.
TEST_SEED = 20_250_101
MAX_FOLDER_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def folder():
    return zoo_path("induction-2l")


@pytest.fixture(scope="module")
def model(folder):
    transformers = pytest.importorskip("transformers")
    # Eager attention, because the head tests read attention weights.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def report(folder):
    return json.loads((folder / "training_report.json").read_text())


@pytest.fixture(scope="module")
def batch(report):
    assert TEST_SEED not in (report["seed"], report["seed"] + EVAL_SEED_OFFSET)
    return sample_repeated_batch(256, torch.Generator().manual_seed(TEST_SEED))


@pytest.fixture(scope="module")
def scores(model, batch):
    return head_scores(model, batch)


def test_zoo_names():
    assert zoo_path("induction-2l").name == ZOO["induction-2l"]
    with pytest.raises(LookupError, match="induction-2l"):
        zoo_path("no-such-model")


def test_folder_contents_and_size(folder):
    names = {p.name for p in folder.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert required in names
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{folder} holds {size} bytes"


def test_weights_are_float32(model):
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.n_layer == 2


def test_tokenizer_roundtrip(folder):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    vocab = make_vocab()
    assert tokenizer.get_vocab() == {word: i for i, word in enumerate(vocab)}
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        BOS_ID,
        PAD_ID,
        UNK_ID,
    )
    words = vocab[3:13]
    ids = tokenizer(" ".join(words))["input_ids"]
    assert ids == [vocab.index(w) for w in words]  # no <bos> added by the tokenizer
    assert tokenizer("<bos> " + words[0])["input_ids"] == [BOS_ID, vocab.index(words[0])]
    assert tokenizer.decode(ids) == " ".join(words)
    assert tokenizer("notaword")["input_ids"] == [UNK_ID]


def test_samplers_place_the_repeat_and_the_rule():
    generator = torch.Generator().manual_seed(0)
    batch = sample_repeated_batch(32, generator)
    for row, start, length in zip(batch.input_ids, batch.first_start, batch.span_len):
        assert row[0] == BOS_ID
        assert torch.equal(row[start : start + length], row[start + length : start + 2 * length])
    input_ids, mask = sample_training_batch(8, generator)
    assert input_ids.shape == mask.shape == (8, SEQ_LEN)
    rule = skip_rule()
    rule_rows = input_ids[: int(8 * SKIP_RULE_FRACTION)]
    assert torch.equal(rule_rows[:, 3:], rule[rule_rows[:, 1:-2] - FIRST_WORD_ID])


def test_held_out_induction_accuracy(model, batch):
    assert induction_accuracy(model, batch) >= 0.95


def test_previous_token_head(scores, report):
    layer0 = scores["previous_token"][0]
    head = max(range(len(layer0)), key=layer0.__getitem__)
    assert layer0[head] > 0.4
    assert all(layer0[head] > s for h, s in enumerate(layer0) if h != head)
    assert head == report["previous_token_head"]["head"]


def test_induction_head(scores, report):
    layer1 = scores["induction"][1]
    head = max(range(len(layer1)), key=layer1.__getitem__)
    assert layer1[head] > 0.4
    assert all(layer1[head] > s for h, s in enumerate(layer1) if h != head)
    assert head == report["induction_head"]["head"]
