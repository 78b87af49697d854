"""The command line and the demo report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mechinterp.cli import main
from mechinterp.demo import run_demo


def test_help_lists_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "mechinterp.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "info" in out.stdout and "demo" in out.stdout


def test_info_reports_build_and_families(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"gpt2", "llama", "gpt_neox", "bert"} <= set(info["families"])
    assert "induction-2l" in info["shipped_models"]
    assert isinstance(info["cuda"], bool)


def test_errors_exit_with_a_message(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker)]) == 2
    assert "out must be a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_a_report_that_finds_the_mechanism(tmp_path) -> None:
    index = run_demo(tmp_path / "report", batch=32)
    folder = index.parent
    for name in ("index.html", "report.json", "head_scores.png", "head_ablation.png",
                 "activation_patching.png", "causal_trace.png"):
        assert (folder / name).stat().st_size > 0, name
    report = json.loads((folder / "report.json").read_text())
    assert report["Model"]["accuracy"] >= 0.95
    ablation = report["Zero-ablating each head"]
    ranked = sorted(ablation["ablated"], key=ablation["ablated"].get)
    prev = report["Heads found from attention patterns"]["previous_token"]
    induction = report["Heads found from attention patterns"]["induction"]
    prev_head = f"L0H{max(range(len(prev[0])), key=lambda h: prev[0][h])}"
    induction_head = f"L1H{max(range(len(induction[1])), key=lambda h: induction[1][h])}"
    # The two heads found from patterns are the two whose ablation hurts most.
    assert set(ranked[:2]) == {prev_head, induction_head}
    assert ablation["ablated"][induction_head] < 0.5 * ablation["clean"]
    assert "<img src='head_scores.png'" in index.read_text()

    # Patching: only the induction head's output restores the answer; in the residual stream it
    # lives at the earlier occurrence's position, in both layers.
    patching = report["Activation patching"]
    heads = {r["site"]: r["normalized"] for r in patching["head"]}
    assert heads.pop(f"head.1[head={induction_head[-1]}]") > 0.9
    assert max(abs(v) for v in heads.values()) < 0.1
    strong = [r for r in patching["resid_pre"] if r["normalized"] > 0.9]
    assert len(strong) == 2 and strong[0]["pos"] == strong[1]["pos"]
    assert {r["layer"] for r in strong} == {0, 1}
    assert patching["atp_agreement"]["head"]["pearson"] > 0.9
    tracing = report["Causal tracing"]
    restored = [r for r in tracing["records"] if r["kind"] == "hidden"
                and r["score"] > 0.5 * tracing["base"]]
    assert {(r["subject"], r["layer"]) for r in restored} == {(True, 0), (False, 1)}
    circuit = report["Circuit discovery"]
    assert circuit["roc_auc"] >= 0.95 and circuit["cpr"] > 0.8
    assert {f"a0.h{prev_head[-1]}->a1.h{induction_head[-1]}.k"} <= {e["edge"] for e in circuit["edges"]}


def test_patch_command_writes_results_and_resumes(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "patching"
    assert main(["patch", "--sites", "head", "--pairs", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8 cells x 8 pairs" in printed
    top = printed.split("largest normalised effects:")[1].split()[0]
    assert top == "head.1[head=3]"  # the shipped model's induction head
    for name in ("result.safetensors", "records.json", "heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    records = json.loads((out / "records.json").read_text())
    assert main(["patch", "--sites", "head", "--pairs", "8", "--out", str(out)]) == 0
    assert json.loads((out / "records.json").read_text()) == records
    assert main(["patch", "--sites", "neuron:layer,x", "--out", str(out)]) == 2
    assert "--sites axes must be among layer, pos, head, neuron" in capsys.readouterr().err
    assert main(["patch", "--clean", "fuba bu", "--out", str(out)]) == 2
    assert "--corrupt must be given once per --clean prompt (1); got 0" in capsys.readouterr().err


def test_trace_command(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace"
    assert main(["trace", "--samples", "4", "--kinds", "hidden", "attn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "answer 'fafi'" in printed and "restore hidden" in printed
    for name in ("trace.safetensors", "records.json", "trace.png"):
        assert (out / name).stat().st_size > 0, name
    assert main(["trace", "--subject", "zzz", "--out", str(out)]) == 2
    assert "does not occur in the prompt" in capsys.readouterr().err


def test_shapley_command_finds_the_induction_head(tmp_path, capsys) -> None:
    from mechinterp.interactions import InteractionResult

    out = tmp_path / "shapley"
    assert main(["shapley", "--players", "heads", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SV of order <= 1 over 8 players (heads), exact, 256 coalitions" in printed
    result = InteractionResult.load(out / "result.safetensors")
    # The induction head L1H3 carries the prediction: the largest Shapley value.
    assert result.top_k(1)[0][0] == (result.players.index("head.1[head=3]"),)
    assert abs(float(result.values[1:].sum()) - (result.full_value - result.baseline_value)) < 1e-6
    assert (out / "bar.png").stat().st_size > 0
    assert main(["shapley", "--estimator", "kernelshap", "--budget", "40", "--out", str(out)]) == 0
    assert "KernelSHAP" in capsys.readouterr().out
    assert main(["shapley", "--estimator", "svarm", "--index", "k-SII", "--out", str(out)]) == 2
    assert "use --estimator regression" in capsys.readouterr().err


def test_interactions_command(tmp_path, capsys) -> None:
    out = tmp_path / "interactions"
    assert main(["interactions", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Harsanyi interactions of 6 players (tokens), 64 coalitions" in printed
    assert "interactions are salient" in printed
    assert (out / "orders.png").stat().st_size > 0


def test_demo_of_the_toy_vlm(tmp_path) -> None:
    assert main(["demo", "--model", "toy-vlm", "--out", str(tmp_path / "vlm")]) == 0
    report = json.loads((tmp_path / "vlm" / "report.json").read_text())
    assert report["Model"]["all"] >= 0.95
    grid = report["Image-token patching"]["grid"]  # [layer][cell]
    # The asked-about shape sits in cell 0: only its image tokens restore the answer.
    assert all(row[0] > 0.8 and max(abs(v) for v in row[1:]) < 0.2 for row in grid)
    assert report["Circuit"]["faithfulness"] > 0.8
    assert (tmp_path / "vlm" / "vlm_image_patching.png").stat().st_size > 0


def test_demo_of_the_toy_unet(tmp_path) -> None:
    pytest.importorskip("diffusers")
    assert main(["demo", "--model", "toy-unet", "--out", str(tmp_path / "unet")]) == 0
    report = json.loads((tmp_path / "unet" / "report.json").read_text())
    assert report["Diffusion model"]["colour"] >= 0.9
    maps = report["Cross-attention maps"]
    assert maps["inside"] > 1.5 * maps["outside"]
    mechanism = report["Cross-attention carries the colour"]
    assert mechanism["colour_word_patched_source_colour"] >= 0.9
    assert mechanism["shape_word_patched_base_colour"] >= 0.9
    assert mechanism["cross_attention_zeroed_colour"] <= 0.4
    sweep = report["Site x timestep patching"]
    grid = sweep["grid"]  # [site][step], restored from that step on
    assert sweep["sites"][-1] == "block.4" and grid[-1][0] > 0.9
    assert (tmp_path / "unet" / "unet_timestep_patching.png").stat().st_size > 0
