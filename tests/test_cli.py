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
    for name in ("index.html", "report.json", "head_scores.png", "head_ablation.png"):
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
