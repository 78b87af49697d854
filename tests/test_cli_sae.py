"""``mechinterp sae encode | top-features | steer`` through ``mechinterp.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch

import mechinterp
from mechinterp.cli import main
from mechinterp.heads import induction_pairs
from mechinterp.sae import FeatureStore, SAEEdit, encode_sparse, save_sae
from mechinterp.zoo import zoo_path, zoo_sae

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "fuba bu mabi fafi vetu fuba bu mabi"  # the induction model answers "fafi"


@pytest.fixture(scope="module")
def model():
    return mechinterp.load("induction-2l")


@pytest.fixture(scope="module")
def sae():
    return zoo_sae("induction-2l-sae")


@pytest.fixture(scope="module")
def direct(model, sae):
    """The prompt's tokens and its features encoded directly."""
    result = model.run(PROMPT, cache=[sae_site(sae)])
    return result.tokens.input_ids[0], encode_sparse(sae, result.cache[sae_site(sae)][0])


def sae_site(sae):
    return mechinterp.Site("resid_post", layer=int(sae.hook_name.split(".")[1]))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sae", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def top_latents(features, pos: int, k: int) -> list[int]:
    start, stop = int(features.row_ptr[pos]), int(features.row_ptr[pos + 1])
    values, latents = features.values[start:stop], features.indices[start:stop]
    return [int(latents[i]) for i in values.argsort(descending=True)[:k] if values[i] > 0]


def test_encode_writes_a_store_and_resumes(model, sae, tmp_path, capsys) -> None:
    out = tmp_path / "features"
    argv = ["encode", "--pairs", "6", "--batch-size", "4", "--out", str(out), "--no-progress"]
    code, printed, _ = run(capsys, *argv)
    assert code == 0
    clean = induction_pairs(model, pairs=6, span=12, k=6, seed=0).clean
    store = FeatureStore(out)
    assert store.rows == clean.input_ids.numel() == 120 and store.complete
    dead = int((store.frequency() == 0).sum())
    assert "encoded 120 tokens of 6 prompts at resid_post.0 with induction-2l-sae" in printed
    assert f"mean L0 {store.mean_l0():.2f}; dead latents {dead} of 512" in printed
    assert "(manifest.json, 2 shards)" in printed
    x = model.run(clean, cache=[sae_site(sae)]).cache[sae_site(sae)].flatten(0, 1)
    torch.testing.assert_close(store.features(slice(None)).to_dense(), sae.encode(x),
                               rtol=1e-4, atol=1e-5)
    # Same arguments: the finished store is reused; other prompts need --overwrite.
    assert run(capsys, *argv)[1] == printed
    code, _, err = run(capsys, "encode", "--prompt", "fuba bu", "--out", str(out))
    assert code == 2 and "dataset differ" in err and "--overwrite" in err
    code, printed, _ = run(capsys, "encode", "--prompt", "fuba bu", "--prompt", "bu mabi",
                           "--out", str(out), "--overwrite", "--no-progress")
    assert code == 0 and "encoded 6 tokens of 2 prompts" in printed
    assert "(manifest.json, 1 shard)" in printed


def test_encode_reads_a_prompts_file(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fuba bu mabi\n\nbu fafi\nvetu\n")
    out = tmp_path / "features"
    code, printed, _ = run(capsys, "encode", "--prompts-file", str(prompts), "--out", str(out),
                           "--no-progress")
    assert code == 0 and "encoded 9 tokens of 3 prompts" in printed
    code, _, err = run(capsys, "encode", "--prompts-file", str(prompts), "--prompt", "bu",
                       "--out", str(out))
    assert code == 2 and "--prompt or --prompts-file, not both" in err
    (tmp_path / "empty.txt").write_text("\n \n")
    code, _, err = run(capsys, "encode", "--prompts-file", str(tmp_path / "empty.txt"))
    assert code == 2 and "must hold at least one non-empty line" in err
    code, _, err = run(capsys, "encode", "--prompts-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "--prompts-file must be an existing text file" in err
    code, _, err = run(capsys, "encode", "--batch-size", "0", "--out", str(tmp_path / "x"))
    assert code == 2 and "batch_size must be an int >= 1; got 0" in err
    assert not (tmp_path / "x").exists()


def test_top_features_of_a_prompt(model, sae, direct, tmp_path, capsys) -> None:
    ids, features = direct
    code, printed, _ = run(capsys, "top-features", "--prompt", PROMPT, "--top", "3", "--json")
    assert code == 0
    report = json.loads(printed)
    assert report["site"] == "resid_post.0" and len(report["positions"]) == ids.numel()
    for pos, entry in enumerate(report["positions"]):
        assert entry["token_id"] == int(ids[pos])
        assert [item["latent"] for item in entry["latents"]] == top_latents(features, pos, 3)
    code, table, _ = run(capsys, "top-features")  # the default prompt is PROMPT
    assert code == 0
    lines = table.splitlines()
    assert lines[1].split() == ["pos", "token", "latent", "(activation)"]
    for pos, line in enumerate(lines[2:]):
        cells = line.split()
        assert cells[:2] == [str(pos), report["positions"][pos]["token"]]
        assert [int(c) for c in cells[2::2]] == top_latents(features, pos, 5)
    # A local SAE folder and a local model directory give the same table.
    save_sae(sae, tmp_path / "sae")
    code, same, _ = run(capsys, "top-features", "--sae", str(tmp_path / "sae"), "--model",
                        str(zoo_path("induction-2l")))
    assert code == 0 and same.splitlines()[1:] == lines[1:]


def test_top_features_from_a_store(model, sae, direct, tmp_path, capsys) -> None:
    out = tmp_path / "features"
    prompts = [PROMPT, "vetu fuba bu mabi fafi vetu", "bu mabi fafi"]
    argv = ["encode", "--out", str(out), "--no-progress"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert run(capsys, *argv)[0] == 0
    store = FeatureStore(out)
    ids, features = direct
    # Per position of a stored prompt: the same as encoding the prompt directly.
    code, printed, _ = run(capsys, "top-features", "--store", str(out), "--prompt-index", "0",
                           "--json")
    assert code == 0
    report = json.loads(printed)
    assert [[i["latent"] for i in p["latents"]] for p in report["positions"]] == [
        top_latents(features, pos, 5) for pos in range(ids.numel())]
    # A latent's top contexts: the store's top activations, with the token marked.
    latent = top_latents(features, 4, 1)[0]  # strongest latent on 'fafi' after 'mabi'
    code, printed, _ = run(capsys, "top-features", "--store", str(out), "--latent", str(latent),
                           "--top", "4", "--json")
    assert code == 0
    report = json.loads(printed)
    top = store.top_activations(latent, 4)
    assert [a["row"] for a in report["activations"]] == top.rows.tolist()
    assert [a["value"] for a in report["activations"]] == pytest.approx(top.values.tolist())
    assert report["frequency"] == pytest.approx(float(store.frequency()[latent]))
    first = report["activations"][0]
    assert f"[[{first['token']}]]" in first["context"]
    code, table, _ = run(capsys, "top-features", "--store", str(out), "--latent", str(latent))
    assert code == 0 and f"latent {latent} at resid_post.0" in table
    assert "[[fafi]]" in table  # it fires on 'fafi', the token after 'mabi'
    dead = int((store.frequency() == 0).nonzero()[0])
    code, table, _ = run(capsys, "top-features", "--store", str(out), "--latent", str(dead))
    assert code == 0 and "fires on 0.00% of tokens" in table and "never fires" in table
    for argv, message in [
        (["--latent", "3"], "--latent needs --store"),
        (["--store", str(out), "--prompt", "bu"], "--prompt or --store, not both"),
        (["--store", str(out), "--latent", "512"], "latent must be an int [0, 512)"),
        (["--store", str(out), "--prompt-index", "3"], "prompt must be an int [0, 3)"),
        (["--store", str(tmp_path)], "written by stream_features"),
        (["--top", "0"], "--top must be a positive int"),
        (["--site", "neuron.0"], "the SAE reads d_in=64 features"),
        (["--sae", "no-such-sae"], "--sae must be a shipped SAE (induction-2l-sae)"),
    ]:
        code, _, err = run(capsys, "top-features", *argv)
        assert code == 2 and message in err, (argv, err)


def test_steer_ablating_the_previous_token_latent_breaks_induction(model, sae, direct,
                                                                   capsys) -> None:
    ids, features = direct
    site = sae_site(sae)
    # On 'fafi' (position 4, after 'mabi') the strongest latent says "the previous token was
    # mabi": the key the induction head looks for when the prompt ends in 'mabi'.
    latent = top_latents(features, 4, 1)[0]
    code, printed, _ = run(capsys, "steer", "--latent", str(latent), "--value", "0", "--json")
    assert code == 0
    report = json.loads(printed)
    plain = {t["token"]: t["prob"] for t in report["unedited"]}
    edited = {t["token"]: t["prob"] for t in report["edited"]}
    assert report["unedited"][0]["token"] == "fafi" and plain["fafi"] > 0.5
    assert edited.get("fafi", 0.0) < 0.2 * plain["fafi"]
    assert report["unedited_continuation"][0] == "fafi"
    assert report["edited_continuation"][0] != "fafi"
    # The edited distribution is SAEEdit's, computed directly.
    logits = model.logits(ids[None], edits=[SAEEdit(site, sae, clamp={latent: 0.0})])
    probs = torch.softmax(logits[0, -1].double(), dim=-1)
    for token in report["edited"]:
        assert token["prob"] == pytest.approx(float(probs[token["token_id"]]), rel=1e-6)
    # A latent that is off everywhere in the prompt, clamped to 0, changes nothing.
    silent = next(i for i in range(sae.d_sae) if i not in set(features.indices.tolist()))
    code, printed, _ = run(capsys, "steer", "--latent", str(silent), "--value", "0", "--json")
    report = json.loads(printed)
    assert report["edited"] == report["unedited"]
    # Steering adds the decoder direction; the text output shows both columns.
    code, table, _ = run(capsys, "steer", "--latent", str(latent), "--scale", "3",
                         "--generate", "2")
    assert code == 0
    assert f"latent {latent} steered by +3" in table
    assert table.splitlines()[2].split()[:3] == ["rank", "unedited", "p"]
    assert "greedy continuation (2 tokens)" in table and "unedited: fafi vetu" in table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dtype_casts_the_sae_for_every_subcommand(model, sae, tmp_path, capsys, dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    half = sae.to(dtype=dtype)
    result = model.run(PROMPT, cache=[sae_site(sae)])
    ids, features = result.tokens.input_ids[0], encode_sparse(half, result.cache[sae_site(sae)][0])
    code, printed, _ = run(capsys, "top-features", "--prompt", PROMPT, "--top", "3", "--json",
                           "--dtype", name)
    assert code == 0
    for pos, entry in enumerate(json.loads(printed)["positions"]):
        assert [item["latent"] for item in entry["latents"]] == top_latents(features, pos, 3)
    out = tmp_path / "features"
    code, _, _ = run(capsys, "encode", "--prompt", PROMPT, "--out", str(out), "--no-progress",
                     "--dtype", name)
    store = FeatureStore(out)
    assert code == 0 and store.manifest["dtype"] == name
    stored = store.features(slice(None))
    assert stored.values.dtype == dtype and torch.equal(stored.to_dense(), features.to_dense())
    # Another dtype is another SAE: the store is not resumed from.
    code, _, err = run(capsys, "encode", "--prompt", PROMPT, "--out", str(out))
    assert code == 2 and "--overwrite" in err
    # The edit runs on the cast SAE; the model keeps its own dtype.
    latent = top_latents(features, 4, 1)[0]
    code, printed, _ = run(capsys, "steer", "--latent", str(latent), "--value", "0", "--json",
                           "--dtype", name)
    assert code == 0
    logits = model.logits(ids[None], edits=[SAEEdit(sae_site(sae), half, clamp={latent: 0.0})])
    probs = torch.softmax(logits[0, -1].double(), dim=-1)
    for token in json.loads(printed)["edited"]:
        assert token["prob"] == pytest.approx(float(probs[token["token_id"]]), rel=1e-6)


def test_steer_errors(capsys) -> None:
    code, _, err = run(capsys, "steer", "--latent", "600", "--value", "1")
    assert code == 2 and "feature 600 is out of range [0, d_sae=512)" in err
    code, _, err = run(capsys, "steer", "--latent", "3", "--value", "1", "--generate", "-1")
    assert code == 2 and "--generate must be a non-negative int" in err
    with pytest.raises(SystemExit):
        main(["sae", "steer", "--latent", "3", "--value", "1", "--scale", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sae", "steer", "--latent", "3"])
    assert "one of the arguments --value --scale is required" in capsys.readouterr().err


def test_sae_needs_a_subcommand_and_info_lists_saes(capsys) -> None:
    code, _, err = run(capsys)
    assert code == 2 and "a subcommand is required: encode, top-features, steer" in err
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shipped_saes"] == ["induction-2l-sae"]
    assert "induction-2l" in info["shipped_models"]
    assert main(["info"]) == 0
    assert "shipped_saes    induction-2l-sae" in capsys.readouterr().out
