"""The README's Python example runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path: Path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "README.md should show sites and activation patching"
    monkeypatch.chdir(tmp_path)  # examples may write files
    for number, block in enumerate(blocks):
        # nnsight reads a trace's body from its source file, so the example runs from a file.
        script = tmp_path / f"readme_{number}.py"
        script.write_text(block)
        namespace = runpy.run_path(str(script))
        if "out" in namespace:
            assert namespace["out"].logits is not None
        if "result" in namespace:
            assert namespace["axes"] == ("layer", "pos", "head")
            assert (tmp_path / "sweep.safetensors").exists()
