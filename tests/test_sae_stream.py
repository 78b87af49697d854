"""stream_features and FeatureStore on the shipped model: equal to a direct encode, resumable,
atomic, with statistics equal to dense references."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mechinterp
from mechinterp import Site
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.sae import SAE, FeatureStore, collect_activations, encode_sparse, stream_features
from mechinterp.sae import stream as stream_module
from mechinterp.sae.stream import resolve_site
from mechinterp.zoo import zoo_sae

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = Site("resid_post", layer=0)
# Prompts of different lengths, so batches are padded; 11 prompts in batches of 3 give 4 shards.
PROMPTS = [
    "fuba bu mabi fafi vetu fuba bu mabi",
    "bu",
    "mabi fafi vetu",
    "vetu fuba bu mabi fafi vetu fuba bu",
    "fafi fafi",
    "medo zutu damu dono ramu la medo zutu damu",
    "zibi duba",
    "la la la la",
    "fu vu fe fu vu fe",
    "damu",
    "ramu zibi duba fuba bu mabi fafi ramu zibi",
]
BATCH = 3


@pytest.fixture(scope="module")
def model():
    return mechinterp.load("induction-2l")


@pytest.fixture(scope="module")
def topk():
    return zoo_sae("induction-2l-sae")


@pytest.fixture(scope="module")
def relu():
    """A ReLU SAE on the same site, whose rows have different numbers of latents."""
    g = torch.Generator().manual_seed(0)
    return SAE(W_enc=torch.randn(64, 96, generator=g) * 0.3, b_enc=torch.full((96,), -0.6),
               W_dec=torch.randn(96, 64, generator=g) * 0.1, b_dec=torch.zeros(64),
               architecture="relu", hook_name="resid_post.0")


@pytest.fixture(scope="module")
def activations(model):
    """The site's activations of every real token, batched as the stream batches them."""
    return collect_activations(model, PROMPTS, SITE, batch_size=BATCH)


def _stream(model, sae, out, **options):
    options = {"batch_size": BATCH, "progress": False, **options}
    return stream_features(model, sae, options.pop("dataset", PROMPTS), out=out, **options)


def _shards(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, [load_file(str(folder / s["file"])) for s in manifest["shards"]]


def _assert_same_store(a, b) -> None:
    manifest_a, shards_a = _shards(a)
    manifest_b, shards_b = _shards(b)
    assert manifest_a == manifest_b
    for one, two in zip(shards_a, shards_b, strict=True):
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_store_equals_a_direct_encode(model, activations, kind, request, tmp_path) -> None:
    sae = request.getfixturevalue(kind)
    store = _stream(model, sae, tmp_path / "store")
    direct = encode_sparse(sae, activations)
    stored = store.features(slice(None))
    assert store.rows == activations.shape[0] == stored.rows
    assert len(store.manifest["shards"]) == 4 and store.complete
    assert torch.equal(stored.row_ptr, direct.row_ptr)
    assert torch.equal(stored.indices, direct.indices)
    torch.testing.assert_close(stored.values, direct.values, rtol=0, atol=0)
    if kind == "relu":
        assert stored.l0.unique().numel() > 3  # rows of many lengths went through the shards
    # Rows are tokens in prompt order, then position order, without padding.
    where = store.locate(slice(None))
    expected = [(p, q, t) for p, prompt in enumerate(PROMPTS)
                for q, t in enumerate(model.tokenize(prompt).input_ids[0].tolist())]
    assert list(zip(where.prompts.tolist(), where.positions.tolist(),
                    where.token_ids.tolist())) == expected


def test_features_of_chosen_rows_cross_shards(model, topk, activations, tmp_path) -> None:
    store = _stream(model, topk, tmp_path / "store")
    dense = topk.encode(activations)
    rows = [37, 0, -1, 12, 12, 58]
    chosen = store.features(rows)
    assert chosen.shape == (len(rows),)
    torch.testing.assert_close(chosen.to_dense(), dense[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.features(torch.tensor([5])).to_dense(), dense[5:6],
                               rtol=1e-5, atol=1e-6)
    assert store.features([]).rows == 0
    for bad in ([store.rows], [-store.rows - 1], [1.5], "3", torch.tensor([True])):
        with pytest.raises(InputError, match="rows must"):
            store.features(bad)
    first = store.prompt_rows(3)
    assert store.locate(first).positions.tolist() == list(range(first.numel()))
    assert set(store.locate(first).prompts.tolist()) == {3}
    with pytest.raises(InputError, match="prompt must be an int"):
        store.prompt_rows(len(PROMPTS))


def test_statistics_match_dense_activations(model, relu, activations, tmp_path) -> None:
    store = _stream(model, relu, tmp_path / "store")
    dense = relu.encode(activations).double()
    fired = (dense > 0).double()
    torch.testing.assert_close(store.frequency(), fired.mean(0))
    torch.testing.assert_close(store.mean_activation(), dense.mean(0), rtol=1e-5, atol=1e-7)
    assert store.mean_l0() == pytest.approx(float(fired.sum(1).mean()))
    assert (store.frequency() == 0).any() and (store.frequency() > 0).any()
    for latent in (int(fired.sum(0).argmax()), int(fired.sum(0).argmin())):
        top = store.top_activations(latent, 7)
        column = dense[:, latent]
        count = min(7, int((column > 0).sum()))
        assert len(top) == count
        expected = column.topk(count)
        torch.testing.assert_close(top.values.double(), expected.values, rtol=1e-5, atol=1e-6)
        assert set(top.rows.tolist()) == set(expected.indices.tolist())
        where = store.locate(top.rows)
        assert torch.equal(top.prompts, where.prompts) and torch.equal(top.token_ids,
                                                                       where.token_ids)
        assert [r["row"] for r in top.to_records()] == top.rows.tolist()
    with pytest.raises(InputError, match=r"latent must be an int \[0, 96\)"):
        store.top_activations(96, 3)
    with pytest.raises(InputError, match="k must be an int >= 1"):
        store.top_activations(0, 0)


def _failing_encoder(monkeypatch, after: int) -> list[int]:
    """Make the stream's encode raise on call ``after + 1``; returns the call counter."""
    calls = [0]
    real = stream_module.encode_sparse

    def encode(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "encode_sparse", encode)
    return calls


def test_resume_after_a_failure_equals_an_uninterrupted_run(model, topk, tmp_path,
                                                            monkeypatch) -> None:
    clean = tmp_path / "clean"
    _stream(model, topk, clean)
    out = tmp_path / "interrupted"
    calls = _failing_encoder(monkeypatch, after=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        _stream(model, topk, out)
    manifest, shards = _shards(out)
    assert len(shards) == 2 and not manifest["complete"]
    assert FeatureStore(out).rows == sum(s["row_ptr"].numel() - 1 for s in shards)
    assert not FeatureStore(out).complete
    monkeypatch.undo()
    calls = _failing_encoder(monkeypatch, after=100)
    store = _stream(model, topk, out)
    assert calls[0] == 2  # only the two unfinished batches ran
    assert store.complete
    _assert_same_store(clean, out)
    # A finished store comes back without encoding anything.
    again = _stream(model, topk, out, batch_size=5)
    assert calls[0] == 2 and again.rows == store.rows


def test_resume_with_another_batch_size_continues(model, topk, activations, tmp_path,
                                                  monkeypatch) -> None:
    out = tmp_path / "store"
    _failing_encoder(monkeypatch, after=1)
    with pytest.raises(RuntimeError):
        _stream(model, topk, out)
    monkeypatch.undo()
    store = _stream(model, topk, out, batch_size=4)
    assert [s["prompts"] for s in store.manifest["shards"]] == [[0, 3], [3, 7], [7, 11]]
    torch.testing.assert_close(store.features(slice(None)).to_dense(), topk.encode(activations),
                               rtol=1e-4, atol=1e-5)


def test_shards_are_written_atomically(model, topk, tmp_path, monkeypatch) -> None:
    out = tmp_path / "store"
    real = stream_module.save_file
    calls = [0]

    def crash_midway(tensors, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            with open(path, "wb") as handle:  # half a file, then the crash
                handle.write(b"\x00" * 10)
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(stream_module, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        _stream(model, topk, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "shard-00000.safetensors"]
    manifest, shards = _shards(out)
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    assert shards[0]["row_ptr"].numel() - 1 == FeatureStore(out).rows
    # A temporary file left by a hard kill is cleared by the next run.
    (out / ".shard-00001.safetensors.tmp").write_bytes(b"\x00")
    monkeypatch.undo()
    _stream(model, topk, out)
    _stream(model, topk, tmp_path / "clean")
    assert not list(out.glob(".*.tmp"))
    _assert_same_store(tmp_path / "clean", out)


def test_other_arguments_are_refused_unless_overwritten(model, topk, relu, tmp_path) -> None:
    out = tmp_path / "store"
    _stream(model, topk, out, batch_size=1)
    assert len(list(out.glob("shard-*"))) == len(PROMPTS)
    with pytest.raises(InputError, match=r"holds features of other arguments \(sae differ\)"):
        _stream(model, relu, out)
    with pytest.raises(InputError, match=r"\(dataset differ\).*resume=False"):
        _stream(model, topk, out, dataset=PROMPTS[:-1])
    with pytest.raises(InputError, match=r"\(site differ\)"):
        _stream(model, topk, out, site=Site("resid_post", layer=1))
    # Layer -2 of the 2-layer model is layer 0: the same run, which is finished.
    assert _stream(model, topk, out, site="resid_post.-2").manifest["identity"]["site"] == \
        "resid_post.0"
    assert FeatureStore(out).manifest["identity"]["sae"]["architecture"] == "topk"
    store = _stream(model, relu, out, batch_size=len(PROMPTS), resume=False)
    assert store.manifest["identity"]["sae"]["architecture"] == "relu"
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]


def test_token_datasets(model, topk, tmp_path) -> None:
    tokens = model.tokenize(PROMPTS)  # left-padded Tokens
    from_tokens = _stream(model, topk, tmp_path / "tokens", dataset=tokens, batch_size=len(PROMPTS))
    from_prompts = _stream(model, topk, tmp_path / "prompts", batch_size=len(PROMPTS))
    assert torch.equal(from_tokens.locate(slice(None)).positions,
                       from_prompts.locate(slice(None)).positions)
    torch.testing.assert_close(from_tokens.features(slice(None)).values,
                               from_prompts.features(slice(None)).values)
    ids = torch.tensor([[3, 4, 6, 5], [8, 3, 4, 6]])
    store = _stream(model, topk, tmp_path / "ids", dataset=ids)
    assert store.rows == 8 and store.locate([5]).positions.tolist() == [1]
    assert store.manifest["identity"]["dataset"]["kind"] == "token_ids"


def test_progress_bar(model, topk, tmp_path, capsys) -> None:
    _stream(model, topk, tmp_path / "store", progress=True)
    assert "encoding features" in capsys.readouterr().err


def test_bad_inputs_are_refused_before_writing(model, topk, tmp_path) -> None:
    out = tmp_path / "store"
    cases = [
        ({"site": Site("resid_post", layer=5)}, SiteError, "layer for resid_post.5 must lie"),
        ({"site": "neuron.0"}, ShapeError, r"d_in=64 features, but the activation at neuron.0 has 256"),
        ({"site": "head.1"}, ShapeError, "one vector per token"),
        ({"site": "resid_post"}, SiteError, "site must be 'component.layer'"),
        ({"dataset": []}, InputError, "dataset must hold at least one prompt"),
        ({"dataset": torch.zeros(2, 0, dtype=torch.long)}, InputError, "at least one prompt"),
        ({"dataset": [1, 2]}, InputError, "dataset must be a list of prompts"),
        ({"dataset": torch.zeros(2, 3)}, InputError, "int token ids"),
        ({"batch_size": 0}, InputError, "batch_size must be an int >= 1; got 0"),
        ({"batch_size": -2}, InputError, "batch_size must be an int >= 1; got -2"),
        ({"batch_size": True}, InputError, "batch_size must be an int >= 1; got True"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            _stream(model, topk, out, **options)
    assert not out.exists()
    with pytest.raises(InputError, match="sae must be an SAE"):
        stream_features(model, "induction-2l-sae", PROMPTS, out=out)
    anonymous = SAE(W_enc=topk.W_enc, b_enc=topk.b_enc, W_dec=topk.W_dec, b_dec=topk.b_dec)
    with pytest.raises(SiteError, match="the SAE has no hook_name"):
        _stream(model, anonymous, out)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="out must be a folder"):
        _stream(model, topk, blocker)
    with pytest.raises(InputError, match="written by stream_features"):
        FeatureStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(InputError, match="got 'other'"):
        FeatureStore(tmp_path)


def test_resolve_site_names() -> None:
    assert resolve_site(None, "resid_post.0") == Site("resid_post", layer=0)
    assert resolve_site(None, "blocks.2.hook_resid_pre") == Site("resid_pre", layer=2)
    assert resolve_site(None, "mlp_out.-1") == Site("mlp_out", layer=-1)
    assert resolve_site(None, "embed") == Site("embed")
    assert resolve_site(zoo_sae("induction-2l-sae"), None) == Site("resid_post", layer=0)
    with pytest.raises(SiteError, match="got 'blocks.0.hook_q'"):
        resolve_site(None, "blocks.0.hook_q")
    with pytest.raises(SiteError, match="got int"):
        resolve_site(None, 3)
