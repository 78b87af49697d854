"""The result of a patching sweep: one metric value per (prompt pair, site), with labelled axes."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechinterp.errors import InputError
from mechinterp.saved import read_result, write_result
from mechinterp.sites import Site

_FORMAT = "mechinterp.PatchingResult/1"

_FIELDS = ("component", "layer", "pos", "head", "neuron")


def _site_dict(site: Site) -> dict:
    return {name: getattr(site, name) for name in _FIELDS}


def _site_from_dict(data: dict) -> Site:
    def index(value):
        return tuple(value) if isinstance(value, list) else value

    return Site(data["component"], layer=data["layer"], pos=index(data["pos"]),
                head=index(data["head"]), neuron=index(data["neuron"]))


def grid_axes(sites: list[Site]) -> tuple[tuple[str, ...], dict[str, list]]:
    """The axes the sites vary along, if they form a full grid in row-major order.

    Returns the axis names (outermost first) and each axis's labels, or ``(("site",), ...)``
    when the sites are not a grid.
    """
    varying = [name for name in _FIELDS if len({getattr(s, name) for s in sites}) > 1]
    labels: dict[str, list] = {}
    for name in varying:
        seen: list = []
        for site in sites:
            value = getattr(site, name)
            if value not in seen:
                seen.append(value)
        labels[name] = seen
    # Order axes by how slowly they change along the list.
    def changes(name: str) -> int:
        return sum(getattr(a, name) != getattr(b, name) for a, b in itertools.pairwise(sites))

    varying.sort(key=changes)
    expected = [()]
    for name in varying:
        expected = [(*prefix, value) for prefix in expected for value in labels[name]]
    actual = [tuple(getattr(s, name) for name in varying) for s in sites]
    if actual != expected:
        return ("site",), {"site": [str(s) for s in sites]}
    return tuple(varying), {name: labels[name] for name in varying}


@dataclass
class PatchingResult:
    """Metric values of patched runs.

    Attributes:
        sites: the patched sites, one per cell.
        values: ``[pair, site]`` metric of each patched run.
        clean: ``[pair]`` metric of the clean (source) runs, unpatched.
        corrupt: ``[pair]`` metric of the corrupted (patched) runs, unpatched.
        metric: description of the metric.
        source: where patched values came from (``clean``, ``mean`` or ``resample``).
        alpha: interpolation weight (1 replaces).
        done: ``[site]`` which cells are computed (all of them once a sweep finishes).
    """

    sites: list[Site]
    values: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    metric: str
    source: str = "clean"
    alpha: float = 1.0
    done: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.done is None:
            self.done = torch.ones(len(self.sites), dtype=torch.bool)

    @property
    def n_pairs(self) -> int:
        return self.values.shape[0]

    def normalized(self) -> torch.Tensor:
        """``[pair, site]`` patch effect ``(m - m_corrupt) / (m_clean - m_corrupt)``: 0 means no
        effect, 1 means the patch restores the clean metric."""
        return (self.values - self.corrupt[:, None]) / (self.clean - self.corrupt)[:, None]

    def mean(self, *, normalized: bool = False) -> torch.Tensor:
        """``[site]`` mean over prompt pairs."""
        values = self.normalized() if normalized else self.values
        return values.mean(0)

    def stderr(self, *, normalized: bool = False) -> torch.Tensor:
        """``[site]`` standard error of the mean over prompt pairs (NaN for a single pair)."""
        values = self.normalized() if normalized else self.values
        if self.n_pairs < 2:
            return torch.full_like(values[0], math.nan)
        return values.std(0, correction=1) / math.sqrt(self.n_pairs)

    def grid(self, *, normalized: bool = False) -> tuple[torch.Tensor, tuple[str, ...], dict[str, list]]:
        """The mean over pairs reshaped to the sites' grid: ``(values, axes, labels)``.

        A ``select("resid_pre").layers().positions()`` sweep gives axes ``("layer", "pos")``.
        """
        axes, labels = grid_axes(self.sites)
        shape = [len(labels[a]) for a in axes]
        return self.mean(normalized=normalized).reshape(shape), axes, labels

    def to_records(self) -> list[dict]:
        """One dict per site: its fields, mean, stderr and normalised mean."""
        mean, err = self.mean(), self.stderr()
        norm = self.mean(normalized=True)
        return [
            {**_site_dict(site), "site": str(site), "mean": float(mean[i]), "stderr": float(err[i]),
             "normalized": float(norm[i])}
            for i, site in enumerate(self.sites)
        ]

    def to_frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            msg = "to_frame needs pandas (pip install pandas); to_records() gives the same rows"
            raise InputError(msg) from None
        return pd.DataFrame.from_records(self.to_records())

    def plot(self, *, normalized: bool = True, ax=None):
        """A heatmap of the grid (a bar chart when the sites form one axis); returns the figure."""
        import matplotlib.pyplot as plt

        values, axes, labels = self.grid(normalized=normalized)
        values = values.detach().float().cpu()
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        title = f"{'normalised ' if normalized else ''}{self.metric}"
        if values.dim() == 1:
            ax.bar(range(len(values)), values.numpy())
            ax.set_xticks(range(len(values)), [str(v) for v in labels[axes[0]]], rotation=90)
            ax.set_xlabel(axes[0])
        else:
            matrix = values.reshape(values.shape[0], -1).numpy()
            limit = float(abs(matrix).max()) or 1.0
            image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.figure.colorbar(image, ax=ax)
            ax.set_ylabel(axes[0])
            ax.set_yticks(range(matrix.shape[0]), [str(v) for v in labels[axes[0]]])
            ax.set_xlabel(" x ".join(axes[1:]))
            if len(axes) == 2:
                ax.set_xticks(range(matrix.shape[1]), [str(v) for v in labels[axes[1]]],
                              fontsize=7)
        ax.set_title(title)
        return ax.figure

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | Path, *, fingerprint: str = "") -> None:
        """Write to ``path`` (safetensors: the tensors plus the sites and settings as JSON),
        atomically, so an interrupted write never leaves a broken file."""
        meta = {
            "sites": json.dumps([_site_dict(s) for s in self.sites]),
            "metric": self.metric, "source": self.source, "alpha": repr(self.alpha),
            "fingerprint": fingerprint,
        }
        tensors = {"values": self.values, "clean": self.clean, "corrupt": self.corrupt,
                   "done": self.done}
        write_result(path, tensors, meta, format=_FORMAT)

    @staticmethod
    def load(path: str | Path) -> PatchingResult:
        """Read a result written by :meth:`save`."""
        result, _ = PatchingResult._load_with_fingerprint(path)
        return result

    @staticmethod
    def _load_with_fingerprint(path: str | Path) -> tuple[PatchingResult, str]:
        tensors, meta = read_result(path, format=_FORMAT)
        sites = [_site_from_dict(d) for d in json.loads(meta["sites"])]
        result = PatchingResult(sites, tensors["values"], tensors["clean"], tensors["corrupt"],
                                meta["metric"], meta["source"], float(meta["alpha"]), tensors["done"])
        return result, meta.get("fingerprint", "")
