"""Edge scores and circuits, with exports (JSON, networkx, Graphviz DOT) and a figure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechinterp.circuits.graph import CircuitGraph
from mechinterp.errors import InputError


def _graph_dict(graph: CircuitGraph) -> dict:
    return {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
            "n_kv_heads": graph.n_kv_heads, "parallel": graph.parallel}


def _graph_from(data: dict) -> CircuitGraph:
    return CircuitGraph(data["n_layers"], data["n_heads"], data["n_kv_heads"], data["parallel"])


@dataclass(frozen=True)
class EdgeScores:
    """A score per edge: the estimated change of the mean metric when the edge alone is removed.

    Attributes:
        graph: the graph the scores index.
        scores: ``[source, destination]`` float64, 0 off the edges.
        method, metric, ablation: how they were computed.
    """

    graph: CircuitGraph
    scores: torch.Tensor
    method: str
    metric: str = ""
    ablation: str = ""

    def ranked(self) -> list[tuple[str, float]]:
        """Every edge with its score, largest magnitude first (ties in source-major order)."""
        edges = self.graph.valid.nonzero()
        values = self.scores[edges[:, 0], edges[:, 1]]
        order = torch.sort(values.abs(), descending=True, stable=True).indices
        return [(self.graph.edge_name(tuple(edges[i].tolist())), float(values[i])) for i in order]

    def top(self, n_edges: int) -> Circuit:
        """The circuit of the ``n_edges`` edges with the largest score magnitudes."""
        total = self.graph.n_edges
        if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not 0 <= n_edges <= total:
            msg = f"n_edges must be an int in [0, {total}]; got {n_edges!r}"
            raise InputError(msg)
        return Circuit(self.graph, self.top_masks([n_edges])[0], scores=self.scores)

    def top_masks(self, sizes: list[int]) -> torch.Tensor:
        """``[len(sizes), source, destination]`` bool masks of the top ``size`` edges each."""
        edges = self.graph.valid.nonzero()
        values = self.scores[edges[:, 0], edges[:, 1]].abs()
        order = torch.sort(values, descending=True, stable=True).indices
        masks = torch.zeros(len(sizes), self.graph.n_sources, self.graph.n_destinations,
                            dtype=torch.bool)
        for i, size in enumerate(sizes):
            chosen = edges[order[:size]]
            masks[i, chosen[:, 0], chosen[:, 1]] = True
        return masks

    def to_frame(self):
        """A pandas DataFrame with columns edge, source, destination, score."""
        import pandas as pd

        rows = [(name, *name.split("->"), score) for name, score in self.ranked()]
        return pd.DataFrame(rows, columns=["edge", "source", "destination", "score"])

    def save(self, path: str | Path) -> None:
        """Write the scores as JSON (edge name -> score) with the graph and provenance."""
        data = {"graph": _graph_dict(self.graph), "method": self.method, "metric": self.metric,
                "ablation": self.ablation, "scores": dict(self.ranked())}
        Path(path).write_text(json.dumps(data, indent=1))

    @staticmethod
    def load(path: str | Path) -> EdgeScores:
        data = json.loads(Path(path).read_text())
        graph = _graph_from(data["graph"])
        scores = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
        for name, value in data["scores"].items():
            scores[graph.edge_index(name)] = value
        return EdgeScores(graph, scores, data["method"], data["metric"], data["ablation"])


@dataclass(frozen=True)
class Circuit:
    """A set of kept edges of a graph.

    Attributes:
        graph: the graph.
        kept: ``[source, destination]`` bool mask of the circuit's edges.
        scores: optional ``[source, destination]`` edge scores shown in exports.
        info: free-form provenance (method, threshold, faithfulness...).
    """

    graph: CircuitGraph
    kept: torch.Tensor
    scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", self.graph.check_mask(self.kept, "kept") & self.graph.valid)

    @staticmethod
    def from_edges(graph: CircuitGraph, edges: list[str], **info: object) -> Circuit:
        return Circuit(graph, graph.mask_of(edges), info=dict(info))

    @property
    def edges(self) -> list[str]:
        return self.graph.edges(self.kept)

    @property
    def n_edges(self) -> int:
        return int(self.kept.sum())

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by a kept edge (sources, heads, MLPs and logits), in graph order."""
        graph = self.graph
        sources = self.kept.any(dim=1).nonzero().flatten().tolist()
        destinations = self.kept.any(dim=0).nonzero().flatten().tolist()
        touched = {graph.source_names[s] for s in sources}
        touched |= {graph.node_of_destination(d) for d in destinations}
        order = [*graph.source_names, "logits"]
        return [name for name in order if name in touched]

    def pruned(self) -> Circuit:
        """Drop edges that cannot matter: from a source node nothing kept feeds (other than
        ``embed``), or into a node that feeds nothing kept on the way to ``logits``."""
        graph = self.graph
        kept = self.kept.clone()
        node_of_source = list(graph.source_names)
        node_of_destination = [graph.node_of_destination(d) for d in range(graph.n_destinations)]
        changed = True
        while changed:
            fed = {node_of_destination[d] for d in kept.any(dim=0).nonzero().flatten().tolist()}
            feeds = {node_of_source[s] for s in kept.any(dim=1).nonzero().flatten().tolist()}
            before = int(kept.sum())
            for s, name in enumerate(node_of_source):
                if name != "embed" and name not in fed:
                    kept[s] = False
            for d, name in enumerate(node_of_destination):
                if name != "logits" and name not in feeds:
                    kept[:, d] = False
            changed = int(kept.sum()) != before
        return Circuit(graph, kept, self.scores, {**self.info, "pruned": True})

    # -- exports -----------------------------------------------------------------------------

    def _edge_records(self) -> list[dict]:
        records = []
        for s, d in self.kept.nonzero().tolist():
            destination = self.graph.destination_names[d]
            part = destination.rsplit(".", 1)[1] if destination.count(".") == 2 else None
            record = {"edge": self.graph.edge_name((s, d)), "source": self.graph.source_names[s],
                      "target": self.graph.node_of_destination(d), "input": part}
            if self.scores is not None:
                record["score"] = float(self.scores[s, d])
            records.append(record)
        return records

    def to_dict(self) -> dict:
        return {"graph": _graph_dict(self.graph), "nodes": self.nodes,
                "edges": self._edge_records(), "info": self.info}

    def to_json(self, path: str | Path | None = None) -> str:
        """The circuit as JSON (written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_json(text_or_path: str | Path) -> Circuit:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        graph = _graph_from(data["graph"])
        kept = graph.mask_of([record["edge"] for record in data["edges"]])
        scores = None
        if data["edges"] and all("score" in record for record in data["edges"]):
            scores = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
            for record in data["edges"]:
                scores[graph.edge_index(record["edge"])] = record["score"]
        return Circuit(graph, kept, scores, data.get("info", {}))

    def to_networkx(self):
        """A ``networkx.MultiDiGraph``: nodes are components, one edge per kept edge, with the
        destination input (``q``/``k``/``v`` or None) and the score as attributes."""
        import networkx as nx

        out = nx.MultiDiGraph()
        for node in self.nodes:
            out.add_node(node, layer=_layer_of(node))
        for record in self._edge_records():
            attributes = {key: record[key] for key in ("input", "score", "edge") if key in record}
            out.add_edge(record["source"], record["target"], **attributes)
        return out

    def to_dot(self) -> str:
        """Graphviz DOT source; query, key and value inputs get their own colours."""
        colours = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", None: "#555555"}
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for node in self.nodes:
            lines.append(f'  "{node}";')
        for record in self._edge_records():
            label = f' label="{record["input"]}",' if record["input"] else ""
            width = ""
            if "score" in record:
                width = f" penwidth={1 + 3 * min(1.0, abs(record['score']) / self._max_score()):.2f},"
            lines.append(f'  "{record["source"]}" -> "{record["target"]}" [{label}{width} '
                         f'color="{colours[record["input"]]}"];')
        lines.append("}")
        return "\n".join(lines)

    def _max_score(self) -> float:
        if self.scores is None:
            return 1.0
        values = self.scores[self.kept].abs()
        return float(values.max()) if values.numel() and float(values.max()) > 0 else 1.0

    def plot(self, ax=None):
        """Draw the circuit layer by layer (embed at the bottom, logits at the top); returns the
        matplotlib figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 1.2 * self.graph.n_heads + 2),
                                          1.2 * self.graph.n_layers * 2 + 2))
        position = _layout(self.graph)
        colours = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", None: "#555555"}
        top = self._max_score()
        for record in self._edge_records():
            (x0, y0), (x1, y1) = position[record["source"]], position[record["target"]]
            width = 0.5 + 2.5 * (abs(record["score"]) / top if "score" in record else 0.5)
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "->", "color": colours[record["input"]],
                                    "lw": width, "alpha": 0.7, "shrinkA": 8, "shrinkB": 8,
                                    # Curved, so edges that skip a layer do not run through
                                    # the nodes between.
                                    "connectionstyle": "arc3,rad=0.2"})
        for node in self.nodes:
            x, y = position[node]
            ax.text(x, y, node, ha="center", va="center", fontsize=8,
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#333333"})
        xs = [p[0] for p in position.values()]
        ys = [p[1] for p in position.values()]
        ax.set_xlim(min(xs) - 1, max(xs) + 1)
        ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
        for part, colour in colours.items():
            ax.plot([], [], color=colour, label="residual" if part is None else f"{part} input")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.axis("off")
        ax.set_title(f"circuit: {self.n_edges} edges, {len(self.nodes)} nodes")
        return ax.figure


def _layer_of(node: str) -> int:
    if node == "embed":
        return -1
    if node == "logits":
        return 10**6
    return int(node.split(".")[0][1:])


def _layout(graph: CircuitGraph) -> dict[str, tuple[float, float]]:
    """Heads of a layer on one row, its MLP on the row above."""
    centre = (graph.n_heads - 1) / 2
    position = {"embed": (centre, 0.0), "logits": (centre, 2.0 * graph.n_layers + 1)}
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            position[f"a{layer}.h{head}"] = (float(head), 2.0 * layer + 1)
        position[f"m{layer}"] = (centre, 2.0 * layer + 2)
    return position
