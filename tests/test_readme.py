"""The README's Python example runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for number, block in enumerate(blocks):
        # nnsight reads a trace's body from its source file, so the example runs from a file.
        script = tmp_path / f"readme_{number}.py"
        script.write_text(block)
        namespace = runpy.run_path(str(script))
        assert namespace["out"].logits is not None
