"""A report folder: JSON data, PNG figures and an index.html that links them.

Each capability adds sections; a section is a title, some prose, a table of key figures and
optional figures. The page has no scripts and no external assets, so it opens offline.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from mechinterp.errors import InputError


@dataclass
class Section:
    title: str
    text: str = ""
    facts: dict[str, object] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)  # file names inside the report folder


class Report:
    """Collects sections and writes ``index.html`` and ``report.json`` into ``folder``."""

    def __init__(self, folder: str | Path, title: str):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            msg = f"out must be a directory (or not exist yet); got the file {str(self.folder)!r}"
            raise InputError(msg)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.sections: list[Section] = []
        self.data: dict[str, object] = {}

    def add(self, section: Section, data: dict[str, object] | None = None) -> None:
        self.sections.append(section)
        if data is not None:
            self.data[section.title] = data

    def save_figure(self, figure: object, name: str) -> str:
        """Save a matplotlib figure as ``name`` in the folder and close it."""
        import matplotlib.pyplot as plt

        figure.savefig(self.folder / name, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
        plt.close(figure)  # type: ignore[arg-type]
        return name

    def write(self) -> Path:
        (self.folder / "report.json").write_text(json.dumps(self.data, indent=2, default=str))
        index = self.folder / "index.html"
        index.write_text(self._html())
        return index

    def _html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            ("<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .6rem;"
             "text-align:left}img{max-width:100%;margin:.5rem 0}</style></head><body>"),
            f"<h1>{html.escape(self.title)}</h1>",
            "<p>Data: <a href='report.json'>report.json</a></p>",
        ]
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
            if section.text:
                parts.append(f"<p>{html.escape(section.text)}</p>")
            if section.facts:
                rows = "".join(
                    f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in section.facts.items()
                )
                parts.append(f"<table>{rows}</table>")
            for name in section.figures:
                parts.append(f"<p><a href='{html.escape(name)}'><img src='{html.escape(name)}' "
                             f"alt='{html.escape(name)}'></a></p>")
        parts.append("</body></html>")
        return "\n".join(parts)
