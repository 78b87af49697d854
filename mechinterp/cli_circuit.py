"""The ``mechinterp circuit`` command: score every edge of a model's graph, keep the top edges
(or run ACDC), measure faithfulness, and write the circuit (JSON, DOT, figures).

On the shipped ``induction-2l`` model it uses induction prompt pairs by default and reports the
ROC-AUC of the scores against the induction circuit known from training; on ``toy-vlm``, colour
questions whose corrupted scene recolours the asked-about shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("eap-ig", "eap", "eap-ig-activations", "exact", "acdc")


def circuit_parser(parser: argparse.ArgumentParser) -> None:
    from mechinterp.cli import prompt_pair_arguments

    prompt_pair_arguments(parser)
    parser.add_argument("--pairs", type=int, default=32,
                        help="default prompt pairs when none are given: induction pairs, or for "
                             "toy-vlm colour questions with the asked shape recoloured")
    parser.add_argument("--method", default="eap-ig", choices=METHODS)
    parser.add_argument("--steps", type=int, default=5, help="integrated-gradient steps (default: 5)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="ACDC threshold on the change of the metric (default: 0.05)")
    parser.add_argument("--edges", type=int, default=None,
                        help="edges to keep (default: the smallest top-scoring circuit with "
                             "faithfulness >= --target)")
    parser.add_argument("--target", type=float, default=0.8,
                        help="faithfulness the default circuit size must reach (default: 0.8)")
    parser.add_argument("--ablation", default="corrupt", choices=["corrupt", "zero", "mean", "resample"])
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", default="circuit",
                        help="folder for scores.json, circuit.json, circuit.dot, circuit.png and "
                             "faithfulness.png")


def _task(args: argparse.Namespace, model):
    from mechinterp.circuits import CircuitTask
    from mechinterp.circuits.induction import induction_task
    from mechinterp.cli import prompt_pairs

    options = {"ablation": args.ablation, "batch_size": args.batch_size}
    pairs = prompt_pairs(args)
    if pairs is None and model.family == "llava":
        from mechinterp.demo_vlm import recolour_pairs

        clean, corrupt, metric = recolour_pairs(model, pairs=args.pairs)
        return CircuitTask(model, clean, corrupt, metric=metric, **options)
    if pairs is None:
        return induction_task(model, pairs=args.pairs, **options)
    clean, corrupt, metric = pairs
    return CircuitTask(model, clean, corrupt, metric=metric, **options)


def circuit(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from mechinterp.circuits import acdc, attribute_edges, faithfulness, roc_auc
    from mechinterp.circuits.induction import induction_circuit
    from mechinterp.errors import InputError
    from mechinterp.loading import load

    model = load(args.model, device=args.device)
    task = _task(args, model)
    graph = task.graph
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": args.model, "method": args.method, "ablation": args.ablation,
                     "prompts": task.n_rows, "edges_in_graph": graph.n_edges,
                     "metric_clean": float(task.reference.full.mean()),
                     "metric_empty": float(task.reference.empty.mean())}
    if args.method == "acdc":
        found = acdc(task, threshold=args.threshold)
        summary.update(forwards=found.info["forwards"], seconds=round(found.info["seconds"], 3))
        scores = None
    else:
        scores = attribute_edges(task, method=args.method, steps=args.steps)
        scores.save(out / "scores.json")
        curve = faithfulness(task, scores, bootstrap=200)
        curve.plot().savefig(out / "faithfulness.png", dpi=120, bbox_inches="tight")
        summary.update(cpr=curve.cpr, cmd=curve.cmd)
        if args.edges is None:
            found = _smallest_faithful(task, scores, args.target)
        elif not 0 <= args.edges <= graph.n_edges:
            msg = f"--edges must lie in [0, {graph.n_edges}]; got {args.edges}"
            raise InputError(msg)
        else:
            found = scores.top(args.edges)
        if args.model == "induction-2l":
            summary["roc_auc_vs_known_circuit"] = roc_auc(scores, graph.mask_of(induction_circuit()))
    kept = found.kept
    faithful = (task.evaluate(kept).mean() - task.reference.empty.mean()) / (
        task.reference.full.mean() - task.reference.empty.mean())
    summary.update(circuit_edges=found.n_edges, circuit_faithfulness=float(faithful),
                   nodes=found.nodes)
    found.to_json(out / "circuit.json")
    (out / "circuit.dot").write_text(found.to_dot())
    found.plot().savefig(out / "circuit.png", dpi=120, bbox_inches="tight")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{graph.n_edges} edges, {task.n_rows} prompt pairs; metric clean "
          f"{summary['metric_clean']:.3f}, all edges removed {summary['metric_empty']:.3f}")
    if scores is not None:
        print(f"{args.method}: CPR {summary['cpr']:.3f}, CMD {summary['cmd']:.3f}"
              + (f", ROC-AUC vs the known circuit {summary['roc_auc_vs_known_circuit']:.3f}"
                 if "roc_auc_vs_known_circuit" in summary else ""))
        print("top edges:")
        for name, value in scores.ranked()[:8]:
            print(f"  {name:<24} {value:+.4f}")
    print(f"circuit: {found.n_edges} edges, faithfulness {float(faithful):.3f}, nodes "
          f"{', '.join(found.nodes)}")
    print(f"written to {out}/")
    return 0


def _smallest_faithful(task, scores, target: float):
    """The smallest top-scoring circuit whose faithfulness reaches ``target`` (all edges when
    none does): a grid of 16 sizes, then every size between the last grid size below the target
    and the first one reaching it."""
    total = task.graph.n_edges
    full, empty = task.reference.full.mean(), task.reference.empty.mean()

    def first_reaching(sizes: list[int]) -> int | None:
        values = task.evaluate(scores.top_masks(sizes)).mean(1)
        reached = ((values - empty) / (full - empty) >= target).nonzero().flatten()
        return sizes[int(reached[0])] if len(reached) else None

    grid = sorted({round(total * i / 15) for i in range(16)})
    coarse = first_reaching(grid)
    if coarse is None:
        return scores.top(total)
    below = max([size for size in grid if size < coarse], default=0)
    fine = first_reaching(list(range(below, coarse + 1)))
    return scores.top(coarse if fine is None else fine)
