"""load(): model objects, directories and shipped names; tokenization with padding and BOS."""

from __future__ import annotations

import torch
from families import FAMILIES, build

import mechinterp
from mechinterp import Site
from mechinterp.zoo import zoo_path


def test_a_shipped_name_and_its_directory_load_the_same_model() -> None:
    by_name = mechinterp.load("induction-2l")
    by_path = mechinterp.load(zoo_path("induction-2l"))
    assert by_name.family == by_path.family == "gpt2"
    tokens = by_name.tokenize("fuba bu fafi")
    torch.testing.assert_close(by_name.logits(tokens), by_path.logits(tokens), rtol=0, atol=0)


def test_saved_directory_round_trips(tmp_path) -> None:
    family = next(f for f in FAMILIES if f.name == "llama")
    original = build(family)
    original.save_pretrained(tmp_path / "llama")
    model = mechinterp.load(tmp_path / "llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), original(ids).logits, rtol=0, atol=0)


def test_dtype_and_device_arguments() -> None:
    model = mechinterp.load("induction-2l", dtype=torch.float64, device="cpu")
    cache = model.cache("fuba bu", [Site("resid_post", layer=0)])
    assert cache[Site("resid_post", layer=0)].dtype == torch.float64


def test_tokenize_pads_left_and_prepends_bos_once() -> None:
    model = mechinterp.load("induction-2l")
    bos = model.tokenizer.bos_token_id
    tokens = model.tokenize(["fuba bu fafi", model.tokenizer.bos_token + " bi"])
    ids, mask = tokens.input_ids, tokens.attention_mask
    assert ids.shape == (2, 4)
    assert ids[0, 0] == bos and mask[0].tolist() == [1, 1, 1, 1]
    assert mask[1].tolist() == [0, 0, 1, 1] and ids[1, 2] == bos
    # The last real token is pos=-1 in both rows despite the padding.
    last = model.cache(tokens, [Site("embed", pos=-1)])[Site("embed", pos=-1)]
    alone = model.cache(model.tokenize("bi"), [Site("embed", pos=-1)])[Site("embed", pos=-1)]
    torch.testing.assert_close(last[1], alone[0])
