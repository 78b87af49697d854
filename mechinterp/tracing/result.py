"""The result of causal tracing: a [kind, token, layer] table of recovered probabilities."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechinterp.errors import InputError
from mechinterp.saved import read_result, write_result

_FORMAT = "mechinterp.TraceResult/1"


@dataclass
class TraceResult:
    """Probabilities of the clean answer with one state restored, averaged over noise draws.

    Attributes:
        kinds: the kinds of state restored (see :data:`mechinterp.tracing.KINDS`).
        scores: ``[kind, pos, layer]`` mean probability of the answer.
        stderr: ``[kind, pos, layer]`` its standard error over the noise draws.
        base: probability of the answer in the clean run.
        low: mean probability with the subject noised and nothing restored.
        tokens: the prompt's tokens as text; ``subject`` is their noised range ``[begin, end)``.
        answer, answer_text: the token whose probability is measured.
        samples, noise, window, uniform, seed, multivariate, replace: the settings.
    """

    kinds: tuple[str, ...]
    scores: torch.Tensor
    stderr: torch.Tensor
    base: float
    low: float
    tokens: list[str]
    subject: tuple[int, int]
    answer: int
    answer_text: str
    samples: int
    noise: float
    window: int
    uniform: bool
    seed: int
    multivariate: bool = False
    replace: bool = False

    def indirect_effect(self) -> torch.Tensor:
        """``[kind, pos, layer]`` recovery above the noised run: ``scores - low``."""
        return self.scores - self.low

    def table(self, kind: str) -> torch.Tensor:
        """``[pos, layer]`` scores of one kind."""
        if kind not in self.kinds:
            msg = f"kind must be one of the traced kinds {list(self.kinds)}; got {kind!r}"
            raise InputError(msg)
        return self.scores[self.kinds.index(kind)]

    def to_records(self) -> list[dict]:
        """One dict per (kind, token, layer)."""
        return [
            {"kind": kind, "pos": pos, "token": self.tokens[pos], "layer": layer,
             "score": float(self.scores[k, pos, layer]),
             "stderr": float(self.stderr[k, pos, layer]),
             "subject": self.subject[0] <= pos < self.subject[1]}
            for k, kind in enumerate(self.kinds)
            for pos in range(self.scores.shape[1])
            for layer in range(self.scores.shape[2])
        ]

    def plot(self):
        """ROME-style heatmaps, one per kind: tokens down, layers across; returns the figure."""
        import matplotlib.pyplot as plt

        count = len(self.kinds)
        figure, axes = plt.subplots(1, count, figsize=(3.6 * count, 0.3 * len(self.tokens) + 1.6),
                                    squeeze=False)
        labels = [f"{t}*" if self.subject[0] <= i < self.subject[1] else t
                  for i, t in enumerate(self.tokens)]
        colours = {"mlp": "Greens", "attn": "Reds"}
        for ax, kind, scores in zip(axes[0], self.kinds, self.scores):
            image = ax.imshow(scores.numpy(), cmap=colours.get(kind, "Purples"), vmin=self.low,
                              aspect="auto")
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlabel("layer")
            step = max(1, scores.shape[1] // 12)
            ax.set_xticks(range(0, scores.shape[1], step))
            ax.set_title(f"restore {kind}", fontsize=10)
            figure.colorbar(image, ax=ax, fraction=0.05,
                            label=f"p({self.answer_text.strip()})" if ax is axes[0][-1] else None)
        figure.suptitle(f"causal trace, noised tokens marked *: clean p = {self.base:.3f}, "
                        f"noised p = {self.low:.3f}", fontsize=10)
        figure.tight_layout()
        return figure

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (safetensors: the tables, with the rest as JSON metadata)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("scores", "stderr")}
        write_result(path, {"scores": self.scores, "stderr": self.stderr},
                     {"fields": json.dumps(fields)}, format=_FORMAT)

    @staticmethod
    def load(path: str | Path) -> TraceResult:
        tensors, meta = read_result(path, format=_FORMAT)
        fields = json.loads(meta["fields"])
        fields["kinds"], fields["subject"] = tuple(fields["kinds"]), tuple(fields["subject"])
        return TraceResult(scores=tensors["scores"], stderr=tensors["stderr"], **fields)
