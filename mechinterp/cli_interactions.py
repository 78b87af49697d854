"""The ``mechinterp shapley`` and ``mechinterp interactions`` commands.

Both build a model game on one prompt (players: its tokens, or every attention head), then
``shapley`` computes Shapley values or an interaction index (exactly, or with an estimator and
a budget of coalitions) and ``interactions`` the Harsanyi interactions of every order (and,
with ``--and-or``, the AND-OR decomposition). Results go to a folder as safetensors, JSON
records and a figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DEMO_PROMPT = "kete vetu fuba mabi kete vetu"
ESTIMATORS = ("exact", "kernelshap", "leverage", "permutation", "svarm", "regression")


def _game_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="induction-2l",
                        help="shipped model name or a local model directory (default: induction-2l)")
    parser.add_argument("--prompt", default=_DEMO_PROMPT,
                        help="the prompt (default: an induction prompt for the shipped model)")
    parser.add_argument("--players", default="tokens", choices=["tokens", "heads"],
                        help="the prompt's tokens, or every attention head (default: tokens)")
    parser.add_argument("--masking", default="baseline", choices=["baseline", "attention"],
                        help="how absent tokens are masked (default: baseline embedding)")
    parser.add_argument("--output", default="log-odds", choices=["log-odds"],
                        help="the value of a coalition: log-odds of the unmasked prediction")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _game(args: argparse.Namespace):
    from mechinterp.interactions.model_games import ComponentGame, TokenGame
    from mechinterp.loading import load
    from mechinterp.sites import select

    model = load(args.model, device=args.device)
    if args.players == "heads":
        return ComponentGame(model, args.prompt, select("head").layers().heads(),
                             output=args.output, progress=False)
    return TokenGame(model, args.prompt, masking=args.masking, output=args.output,
                     progress=False)


def _write(result, out: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "result.safetensors")
    (out / "records.json").write_text(json.dumps(result.to_records(), indent=1))
    result.plot(kind).savefig(out / f"{kind}.png", dpi=120, bbox_inches="tight")


def _print_top(result, k: int = 8) -> None:
    for subset, value in result.top_k(k):
        stderr = "" if result.stderr is None else f" ± {float(result.stderr[result.position(subset)]):.4f}"
        print(f"  {result.label(subset):<40} {value:+.4f}{stderr}")


def _salient(result) -> str:
    stats = result.sparsity()
    return (f"{int(stats['n_salient'])} of {int(stats['n_interactions'])} interactions are salient "
            f"(|I| > 5% of the largest) and hold {stats['salient_strength']:.0%} of the strength "
            f"(Gini {stats['gini']:.2f})")


def shapley_parser(parser: argparse.ArgumentParser) -> None:
    _game_arguments(parser)
    parser.add_argument("--index", default="SV",
                        help="SV, BV, SII, k-SII, STII, FSII or FBII (default: SV)")
    parser.add_argument("--order", type=int, default=None,
                        help="largest subsets (default: 1 for SV and BV, else 2)")
    parser.add_argument("--estimator", default="exact", choices=ESTIMATORS,
                        help="exact enumeration, or an estimator with --budget (default: exact)")
    parser.add_argument("--budget", type=int, default=2048,
                        help="coalitions an estimator may evaluate (default: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="the estimator's seed")
    parser.add_argument("--out", default="shapley",
                        help="folder for result.safetensors, records.json and bar.png")


def shapley(args: argparse.Namespace) -> int:
    from mechinterp.errors import InputError
    from mechinterp.interactions import (
        SVARM,
        KernelSHAP,
        LeverageSHAP,
        PermutationSamplingSV,
        RegressionAdjustedKSII,
        exact,
    )

    order = args.order if args.order is not None else (1 if args.index in ("SV", "BV") else 2)
    game = _game(args)
    if args.estimator == "exact":
        result = exact(game, index=args.index, order=order)
    else:
        if (args.index, order) != ("SV", 1) and args.estimator != "regression":
            msg = (f"--estimator {args.estimator} estimates Shapley values (--index SV); for "
                   f"{args.index} of order {order} use --estimator regression (k-SII) or exact")
            raise InputError(msg)
        if args.estimator == "regression" and args.index not in ("SV", "k-SII"):
            msg = f"--estimator regression estimates SV or k-SII; got --index {args.index}"
            raise InputError(msg)
        approximator = {
            "kernelshap": lambda: KernelSHAP(),
            "leverage": lambda: LeverageSHAP(),
            "permutation": lambda: PermutationSamplingSV(),
            "svarm": lambda: SVARM(),
            "regression": lambda: RegressionAdjustedKSII(order=order),
        }[args.estimator]()
        result = approximator.approximate(game, budget=args.budget, seed=args.seed)
    print(f"{result.index} of order <= {result.max_order} over {game.n_players} players "
          f"({args.players}), {result.estimator}, {game.evaluations} coalitions evaluated; "
          f"v(empty) = {result.baseline_value:.4f}, v(all) = {result.full_value:.4f}")
    _print_top(result)
    out = Path(args.out)
    _write(result, out, "bar")
    print(f"written to {out}/ (result.safetensors, records.json, bar.png)")
    return 0


def interactions_parser(parser: argparse.ArgumentParser) -> None:
    _game_arguments(parser)
    parser.add_argument("--and-or", action="store_true",
                        help="also split the game into AND and OR interactions (Li & Zhang)")
    parser.add_argument("--steps", type=int, default=2000,
                        help="optimisation steps of --and-or (default: 2000)")
    parser.add_argument("--out", default="interactions",
                        help="folder for result.safetensors, records.json and orders.png")


def interactions(args: argparse.Namespace) -> int:
    from mechinterp.interactions import exact

    game = _game(args)
    harsanyi = exact(game, index="Moebius", order=game.n_players)
    strength = harsanyi.strength_by_order()
    print(f"Harsanyi interactions of {game.n_players} players ({args.players}), "
          f"{game.evaluations} coalitions; strength by order: "
          + ", ".join(f"{order}: {value:.3f}" for order, value in strength.items()))
    print(_salient(harsanyi))
    _print_top(harsanyi)
    out = Path(args.out)
    _write(harsanyi, out, "orders")
    if args.and_or:
        from mechinterp.interactions.andor import and_or_interactions

        split = and_or_interactions(game, steps=args.steps, progress=False)
        for name, result in (("AND", split.and_result), ("OR", split.or_result)):
            print(f"{name} interactions: {_salient(result)}")
            _print_top(result, 5)
            _write(result, out / name.lower(), "orders")
    print(f"written to {out}/")
    return 0
