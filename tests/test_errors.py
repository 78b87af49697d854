"""Bad input gets an error that names the argument, what was expected and what was given."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from families import FAMILIES, build, token_ids

import mechinterp
from mechinterp import Add, Set, Site, Zero, select
from mechinterp.errors import (
    DeviceError,
    DTypeError,
    InputError,
    MechinterpError,
    ShapeError,
    SiteError,
    UnsupportedModelError,
)
from mechinterp.model import InterpModel


@pytest.fixture(scope="module")
def gpt2() -> InterpModel:
    return InterpModel(build(FAMILIES[0]))


@pytest.fixture(scope="module")
def llama() -> InterpModel:
    return InterpModel(build(next(f for f in FAMILIES if f.name == "llama")))


def test_errors_are_also_builtin_errors() -> None:
    assert issubclass(SiteError, LookupError) and issubclass(SiteError, MechinterpError)
    for error in (ShapeError, DTypeError, DeviceError, InputError, UnsupportedModelError):
        assert issubclass(error, ValueError) and issubclass(error, MechinterpError)


def test_unknown_component_lists_the_vocabulary() -> None:
    with pytest.raises(SiteError, match=r"component must be one of .*'resid_pre'.*got 'resid'"):
        Site("resid", layer=0)
    with pytest.raises(SiteError, match="got 'mlp'"):
        select("mlp")


def test_site_shape_of_arguments() -> None:
    with pytest.raises(SiteError, match="needs a layer"):
        Site("resid_pre")
    with pytest.raises(SiteError, match="has no layer"):
        Site("logits", layer=0)
    with pytest.raises(SiteError, match="takes no head index"):
        Site("resid_pre", layer=0, head=1)
    with pytest.raises(SiteError, match="takes no neuron index"):
        Site("head", layer=0, neuron=1)
    with pytest.raises(InputError, match="pos must be an int"):
        Site("resid_pre", layer=0, pos="last")


@pytest.mark.parametrize(
    ("site", "pattern"),
    [
        (Site("resid_pre", layer=2), r"layer for resid_pre.2 must lie in \[-2, 2\); got 2"),
        (Site("head", layer=0, head=4), r"head for .* must lie in \[0, 4\); got 4"),
        (Site("neuron", layer=1, neuron=128), r"neuron for .* must lie in \[0, 128\); got 128"),
        (Site("attn_out", layer=0, pos=7), r"pos must lie in \[-7, 7\) .* got pos=7"),
        (Site("attn_out", layer=0, pos=-8), r"got pos=-8"),
    ],
)
def test_out_of_range_indices_name_the_valid_range(gpt2: InterpModel, site: Site, pattern: str) -> None:
    with pytest.raises(SiteError, match=pattern):
        gpt2.cache(token_ids(length=7), [site])
    with pytest.raises(SiteError, match=pattern):
        gpt2.run(token_ids(length=7), edits=[Zero(site)])


def test_grouped_query_keys_have_fewer_heads(llama: InterpModel) -> None:
    llama.cache(token_ids(), [Site("q", layer=0, head=3)])
    with pytest.raises(SiteError, match=r"head for k.0\[head=3\] must lie in \[0, 2\)"):
        llama.cache(token_ids(), [Site("k", layer=0, head=3)])


def test_wrong_value_shape_dtype_and_device(gpt2: InterpModel) -> None:
    site = Site("resid_post", layer=0, pos=-1)
    with pytest.raises(ShapeError, match=r"broadcast to the selection's shape \(2, 32\).*got shape \(5,\)"):
        gpt2.run(token_ids(), edits=[Set(site, torch.zeros(5))])
    with pytest.raises(DTypeError, match="must have the activation's dtype torch.float32; got torch.float64"):
        gpt2.run(token_ids(), edits=[Set(site, torch.zeros(32, dtype=torch.float64))])
    with pytest.raises(DTypeError, match="floating-point"):
        gpt2.run(token_ids(), edits=[Add(site, torch.zeros(32, dtype=torch.long))])
    with pytest.raises(DeviceError, match="device cpu; got meta"):
        gpt2.run(token_ids(), edits=[Set(site, torch.zeros(32, device="meta"))])


def test_bad_inputs(gpt2: InterpModel) -> None:
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 61\); got values in \[0, 99\]"):
        gpt2.cache(torch.tensor([[0, 99]]), [Site("embed")])
    with pytest.raises(ShapeError, match="integer token ids"):
        gpt2.cache(torch.zeros(2, 3), [Site("embed")])
    with pytest.raises(InputError, match="loaded without a tokenizer"):
        gpt2.cache("hello", [Site("embed")])
    with pytest.raises(InputError, match="edits must be Intervention objects"):
        gpt2.run(token_ids(), edits=[Site("embed")])
    with pytest.raises(InputError, match="rows must be"):
        Zero(Site("embed"), rows=[])


def test_rows_out_of_range(gpt2: InterpModel) -> None:
    with pytest.raises(SiteError, match=r"rows for .* must lie in \[-2, 2\); got \[5\]"):
        gpt2.run(token_ids(batch=2), edits=[Zero(Site("embed"), rows=5)])


def test_unsupported_architecture_names_the_supported_ones(tmp_path) -> None:
    config = transformers.GPTJConfig(n_embd=16, n_head=2, n_layer=1, rotary_dim=4, vocab_size=50,
                                     n_positions=32)
    model = transformers.GPTJForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match=r"no site table for model_type 'gptj'.*'gpt2'"):
        InterpModel(model)
    model.save_pretrained(tmp_path / "gptj")
    with pytest.raises(UnsupportedModelError, match="'gptj'"):
        mechinterp.load(tmp_path / "gptj")
    with pytest.raises(InputError, match="directory holding config.json .*or a shipped model"):
        mechinterp.load(tmp_path / "missing")
    with pytest.raises(InputError, match="got int"):
        mechinterp.load(3)


def test_import_changes_no_global_state() -> None:
    code = "import sys, mechinterp; print('nnsight' in sys.modules, hasattr(object, 'save'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
