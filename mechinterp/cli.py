"""The ``mechinterp`` command line: ``info``, ``demo``; later capabilities add subcommands.

Each subcommand is a function ``(args) -> int`` registered in :data:`COMMANDS` with a parser
builder, so adding one touches nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from mechinterp.errors import MechinterpError


def _info_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _info(args: argparse.Namespace) -> int:
    from mechinterp.build import build_info
    from mechinterp.models import FAMILIES
    from mechinterp.zoo import ZOO

    info = build_info()
    info["families"] = sorted(FAMILIES)
    info["shipped_models"] = sorted(ZOO)
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


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "info": ("show the build (CUDA kernels, threads, versions) and supported families",
             _info_parser, _info),
    "demo": ("analyse the shipped demo model and write an HTML report", _demo_parser, _demo),
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
