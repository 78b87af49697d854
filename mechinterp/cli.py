"""The ``mechinterp`` command line: ``info``, ``demo``, ``patch``, ``trace``, ``shapley``,
``interactions``, ``sae``, ``circuit``.

Each subcommand is a function ``(args) -> int`` registered in :data:`COMMANDS` with a parser
builder, so adding one touches nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from mechinterp import cli_circuit, cli_interactions, cli_sae
from mechinterp.errors import MechinterpError


def _info_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _info(args: argparse.Namespace) -> int:
    from mechinterp.build import build_info
    from mechinterp.models import FAMILIES
    from mechinterp.zoo import ZOO, ZOO_SAES

    info = build_info()
    info["families"] = sorted(FAMILIES)
    info["shipped_models"] = sorted(ZOO)
    info["shipped_saes"] = sorted(ZOO_SAES)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _demo_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="report", help="report folder (default: ./report)")
    parser.add_argument("--model", default="induction-2l", help="shipped model to analyse")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out data")


def _demo(args: argparse.Namespace) -> int:
    from mechinterp.demo import run_demo

    index = run_demo(args.out, model_name=args.model, device=args.device, seed=args.seed)
    print(f"report written to {index}")
    return 0


_DEFAULT_AXES = {"head": "layer,head", "q": "layer,head", "k": "layer,head", "v": "layer,head",
                 "pattern": "layer,head", "neuron": "layer,neuron", "embed": "pos"}


def prompt_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the ``--clean/--corrupt/--answer/--wrong`` prompt pairs."""
    parser.add_argument("--model", default="induction-2l",
                        help="shipped model name or a local model directory (default: induction-2l)")
    parser.add_argument("--clean", action="append",
                        help="clean prompt (repeat for several pairs); default: induction pairs "
                             "built for the shipped induction model")
    parser.add_argument("--corrupt", action="append", help="corrupted prompt, one per --clean")
    parser.add_argument("--answer", action="append", help="right answer token (string or id)")
    parser.add_argument("--wrong", action="append", help="wrong answer token (string or id)")


def prompt_pairs(args: argparse.Namespace):
    """``(clean, corrupt, LogitDiff)`` from explicit ``--clean`` prompts, checked; None when no
    prompts were given (the command then builds its own default pairs)."""
    from mechinterp.errors import InputError
    from mechinterp.patching import LogitDiff

    if args.clean is None:
        if args.corrupt or args.answer or args.wrong:
            msg = "--corrupt, --answer and --wrong need --clean prompts"
            raise InputError(msg)
        return None
    for name in ("corrupt", "answer", "wrong"):
        given = getattr(args, name) or []
        if len(given) not in ((1, len(args.clean)) if name != "corrupt" else (len(args.clean),)):
            msg = f"--{name} must be given once per --clean prompt ({len(args.clean)}); got {len(given)}"
            raise InputError(msg)
    metric = LogitDiff([_token(t) for t in args.answer], [_token(t) for t in args.wrong])
    return args.clean, args.corrupt, metric


def _patch_parser(parser: argparse.ArgumentParser) -> None:
    prompt_pair_arguments(parser)
    parser.add_argument("--sites", default="resid_pre",
                        help="COMPONENT[:AXES], AXES from layer,pos,head,neuron (default: "
                             "resid_pre:layer,pos; head:layer,head)")
    parser.add_argument("--source", default="clean", choices=["clean", "mean", "resample"])
    parser.add_argument("--pairs", type=int, default=32, help="induction pairs when no prompts given")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", default="patching",
                        help="folder for result.safetensors, records.json and heatmap.png; an "
                             "interrupted sweep with the same arguments resumes from it")


def _selector(spec: str):
    from mechinterp.errors import InputError
    from mechinterp.sites import select

    component, _, axes_text = spec.partition(":")
    axes = (axes_text or _DEFAULT_AXES.get(component, "layer,pos")).split(",")
    unknown = sorted(set(axes) - {"layer", "pos", "head", "neuron"})
    if unknown:
        msg = f"--sites axes must be among layer, pos, head, neuron; got {unknown} in {spec!r}"
        raise InputError(msg)
    selector = select(component)
    if "layer" in axes:
        selector = selector.layers()
    if "pos" in axes:
        selector = selector.positions()
    if "head" in axes:
        selector = selector.heads()
    if "neuron" in axes:
        selector = selector.neurons()
    return selector


def _token(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _patch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mechinterp.heads import induction_pairs
    from mechinterp.loading import load
    from mechinterp.patching import LogitDiff, activation_patch

    model = load(args.model, device=args.device)
    pairs = prompt_pairs(args)
    if pairs is None:
        data = induction_pairs(model, pairs=args.pairs, span=12, k=6, seed=0)
        clean, corrupt, metric = data.clean, data.corrupt, LogitDiff(data.answer, data.wrong)
    else:
        clean, corrupt, metric = pairs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = activation_patch(model, clean, corrupt, _selector(args.sites), metric,
                              source=args.source, batch_size=args.batch_size,
                              results=out / "result.safetensors")
    records = result.to_records()
    (out / "records.json").write_text(json.dumps(records, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    result.plot().savefig(out / "heatmap.png", dpi=120, bbox_inches="tight")
    print(f"{len(records)} cells x {result.n_pairs} pairs; logit difference clean "
          f"{float(result.clean.mean()):.3f}, corrupted {float(result.corrupt.mean()):.3f}")
    print("largest normalised effects:")
    for record in sorted(records, key=lambda r: -abs(r["normalized"]))[:5]:
        print(f"  {record['site']:<32} {record['normalized']:+.3f}")
    print(f"written to {out}/ (result.safetensors, records.json, heatmap.png)")
    return 0


def _trace_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="induction-2l",
                        help="shipped model name or a local model directory (default: induction-2l)")
    parser.add_argument("--prompt", default="fuba bu mabi fafi vetu fuba bu mabi",
                        help="the prompt (default: an induction prompt for the shipped model)")
    parser.add_argument("--subject", default="fafi",
                        help="the noised tokens: a substring of the prompt (default: fafi)")
    parser.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"],
                        help="states to restore: hidden mlp attn hidden-no-mlp hidden-no-attn")
    parser.add_argument("--samples", type=int, default=10, help="noise draws (default: 10)")
    parser.add_argument("--noise", type=float, default=None,
                        help="noise standard deviation (default: 3 x the embeddings' std)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn")
    parser.add_argument("--multivariate", action="store_true",
                        help="draw from the Gaussian fitted to the embeddings (ROME's option)")
    parser.add_argument("--replace", action="store_true",
                        help="replace the subject's embeddings by the draws instead of adding them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", default="trace", help="folder for trace.safetensors, "
                        "records.json and trace.png")


def _trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mechinterp.loading import load
    from mechinterp.tracing import causal_trace

    model = load(args.model, device=args.device)
    result = causal_trace(model, args.prompt, args.subject, kinds=args.kinds,
                          samples=args.samples, noise=args.noise, window=args.window,
                          multivariate=args.multivariate, replace=args.replace, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "trace.safetensors")
    (out / "records.json").write_text(json.dumps(result.to_records(), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    result.plot().savefig(out / "trace.png", dpi=120, bbox_inches="tight")
    print(f"answer {result.answer_text.strip()!r}: clean p = {result.base:.4f}, subject noised "
          f"p = {result.low:.4f} ({result.samples} draws, noise {result.noise:.4f})")
    for k, kind in enumerate(result.kinds):
        table = result.scores[k]
        pos, layer = divmod(int(table.argmax()), table.shape[1])
        print(f"  restore {kind:<15} best at token {pos} ({result.tokens[pos].strip()!r}), "
              f"layer {layer}: p = {float(table.max()):.4f}")
    print(f"written to {out}/ (trace.safetensors, records.json, trace.png)")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "info": ("show the build (CUDA kernels, threads, versions) and supported families",
             _info_parser, _info),
    "demo": ("analyse the shipped demo model and write an HTML report", _demo_parser, _demo),
    "patch": ("activation patching: patch every site of a grid from clean into corrupted runs",
              _patch_parser, _patch),
    "trace": ("causal tracing (ROME): noise the subject, restore each (token, layer) state",
              _trace_parser, _trace),
    "shapley": ("Shapley values or interaction indices of a prompt's tokens or of the heads",
                cli_interactions.shapley_parser, cli_interactions.shapley),
    "interactions": ("Harsanyi (and AND-OR) interactions of a prompt's tokens or of the heads",
                     cli_interactions.interactions_parser, cli_interactions.interactions),
    "sae": ("SAE features: encode a dataset to disk, top features, steer a latent",
            cli_sae.sae_parser, cli_sae.sae),
    "circuit": ("circuit discovery: EAP / EAP-IG / exact edge scores or ACDC, faithfulness, exports",
                cli_circuit.circuit_parser, cli_circuit.circuit),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechinterp",
        description="Causal interventions, attributions and circuits for PyTorch models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except MechinterpError as error:
        print(f"mechinterp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
