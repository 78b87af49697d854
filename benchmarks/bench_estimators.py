"""Shapley-value and k-SII estimators against shapiq's at equal budgets, on sum-of-unanimity games.

Games: sums of unanimity games (SOUM) with coefficients uniform in [-1, 1) (shapiq's SOUM
convention) and terms of 1-5 uniformly chosen players: 30 terms for n = 16 (the setting of
shapiq's published comparisons), 2n terms for n = 64 and 128 (the same number of terms per
player, so that every player matters and the game is not trivially sparse). Their Shapley
values and k-SII are known in closed form.

For each n, budget (evaluations of the value function; the empty and full coalitions count) and
seed, every estimator gets its own copy of the game behind a counter, and we record

- MSE: mean squared error over the players (SV) or over all subsets of 1-2 players (k-SII);
- Precision@10: share of the 10 largest entries by |value| that the estimate also ranks top 10;
- seconds of the whole call, and the evaluations it actually used.

Ours (mechinterp): KernelSHAP (paired, stratified, without replacement), LeverageSHAP,
PermutationSamplingSV (antithetic), SVARM (stratified), RegressionAdjustedKSII for SV (order 1)
and for k-SII (order 2). shapiq, side by side in the same process where installed: KernelSHAP
(pairing trick), SVARM, PermutationSamplingSV and KernelSHAPIQ (k-SII, order 2).

Correctness first: the closed forms must equal shapiq's ExactComputer on a small game, every
estimator of ours must be exact with a budget of 2**n on a small game, and no estimator may
use more evaluations than its budget.

Run: ``python benchmarks/bench_estimators.py --json estimators.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings

import torch

from mechinterp.interactions.approximators import (
    SVARM,
    KernelSHAP,
    LeverageSHAP,
    PermutationSamplingSV,
    RegressionAdjustedKSII,
)
from mechinterp.interactions.games import CallableGame, SumOfUnanimityGame

ORDER = 2  # k of k-SII


def soum(n: int, seed: int) -> SumOfUnanimityGame:
    terms = 30 if n <= 16 else 2 * n
    return SumOfUnanimityGame.random(n, n_terms=terms, min_size=1, max_size=5, seed=seed)


def precision_at(estimate: torch.Tensor, truth: torch.Tensor, k: int = 10) -> float:
    k = min(k, truth.numel())
    ours = set(estimate.abs().topk(k).indices.tolist())
    theirs = set(truth.abs().topk(k).indices.tolist())
    return len(ours & theirs) / k


def _ours() -> dict:
    return {
        ("SV", "KernelSHAP"): KernelSHAP,
        ("SV", "LeverageSHAP"): LeverageSHAP,
        ("SV", "PermutationSamplingSV"): PermutationSamplingSV,
        ("SV", "SVARM"): SVARM,
        ("SV", "RegressionAdjusted"): lambda: RegressionAdjustedKSII(order=1),
        ("k-SII", "RegressionAdjustedKSII"): lambda: RegressionAdjustedKSII(order=ORDER),
    }


def _theirs() -> dict:
    try:
        import shapiq
    except ImportError:
        return {}
    return {
        ("SV", "KernelSHAP"): lambda n, s: shapiq.KernelSHAP(n, pairing_trick=True,
                                                              random_state=s),
        ("SV", "SVARM"): lambda n, s: shapiq.SVARM(n, random_state=s),
        ("SV", "PermutationSamplingSV"): lambda n, s: shapiq.PermutationSamplingSV(
            n, random_state=s),
        ("k-SII", "KernelSHAPIQ"): lambda n, s: shapiq.KernelSHAPIQ(n, max_order=ORDER,
                                                                      index="k-SII",
                                                                      random_state=s),
    }


class _Counted:
    """A numpy callable for shapiq that evaluates through our game and counts rows."""

    def __init__(self, game: SumOfUnanimityGame) -> None:
        self.game = game
        self.rows = 0

    def __call__(self, coalitions):
        batch = torch.as_tensor(coalitions, dtype=torch.bool).reshape(-1, self.game.n_players)
        self.rows += batch.shape[0]
        return self.game.value_function(batch).numpy()


def check_correctness() -> None:
    """Closed forms equal shapiq's exact values; ours are exact at a budget of 2**n."""
    game = soum(10, seed=123)
    truths = {"SV": game.exact("SV"), "k-SII": game.exact("k-SII", order=ORDER)}
    for (index, name), make in _ours().items():
        copy = CallableGame(game.value_function, game.n_players)
        result = make().approximate(copy, budget=2**10, seed=0)
        error = float((result.values - truths[index].values).abs().max())
        assert error < 1e-8, f"{name} is not exact at full budget (error {error:.2e})"
        assert copy.evaluations <= 2**10
    try:
        import shapiq
    except ImportError:
        return
    computer = shapiq.ExactComputer(n_players=10, game=_Counted(game))
    for index, truth in truths.items():
        theirs = computer(index, order=1 if index == "SV" else ORDER)
        error = max(abs(float(theirs[s]) - v) for s, v in zip(truth.subsets,
                                                               truth.values.tolist(),
                                                               strict=True))
        assert error < 1e-9, f"closed-form {index} differs from shapiq's ExactComputer ({error})"


def measure(sizes: list[int], budgets: list[int], seeds: int, peers: bool) -> dict:
    out: dict = {"rows": [], "sizes": sizes, "budgets": budgets, "seeds": seeds,
                 "threads": torch.get_num_threads()}
    ours, theirs = _ours(), (_theirs() if peers else {})
    out["peers"] = bool(theirs)
    for n in sizes:
        games = [soum(n, seed) for seed in range(seeds)]
        truths = [{"SV": g.exact("SV").values,
                   "k-SII": g.exact("k-SII", order=ORDER).values} for g in games]
        for budget in budgets:
            methods = [("mechinterp", key, make) for key, make in ours.items()]
            methods += [("shapiq", key, make) for key, make in theirs.items()]
            for library, (index, name), make in methods:
                errors, precisions, seconds, used = [], [], [], []
                skipped = None
                for seed, (game, truth) in enumerate(zip(games, truths, strict=True)):
                    start = time.perf_counter()
                    if library == "mechinterp":
                        copy = CallableGame(game.value_function, n, batch_size=1 << 16)
                        estimator = make()
                        if budget < estimator.minimum_budget(n):
                            skipped = f"needs {estimator.minimum_budget(n)} evaluations"
                            break
                        result = estimator.approximate(copy, budget=budget, seed=seed)
                        estimate, evaluations = result.values, copy.evaluations
                    else:
                        counted = _Counted(game)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            values = make(n, seed).approximate(budget, counted)
                        order = 1 if index == "SV" else ORDER
                        subsets = [s for size in range(1, order + 1)
                                   for s in itertools.combinations(range(n), size)]
                        estimate = torch.tensor([float(values[s]) for s in subsets],
                                                dtype=torch.float64)
                        evaluations = counted.rows
                    seconds.append(time.perf_counter() - start)
                    assert evaluations <= budget, f"{library} {name} used {evaluations} > {budget}"
                    errors.append(float(((estimate - truth[index]) ** 2).mean()))
                    precisions.append(precision_at(estimate, truth[index]))
                    used.append(evaluations)
                if skipped:
                    row = {"n": n, "budget": budget, "index": index, "library": library,
                           "method": name, "skipped": skipped}
                    out["rows"].append(row)
                    print(f"n={n:<4} budget={budget:<5} {index:<6} {library:<10} {name:<24} "
                          f"skipped: {skipped}", flush=True)
                    continue
                row = {"n": n, "budget": budget, "index": index, "library": library,
                       "method": name, "mse": statistics.fmean(errors),
                       "mse_per_seed": errors, "precision_at_10": statistics.fmean(precisions),
                       "seconds": statistics.fmean(seconds), "evaluations": max(used)}
                out["rows"].append(row)
                print(_describe(row), flush=True)
    return out


def _describe(row: dict) -> str:
    return (f"n={row['n']:<4} budget={row['budget']:<5} {row['index']:<6} "
            f"{row['library']:<10} {row['method']:<24} MSE {row['mse']:.2e}  "
            f"P@10 {row['precision_at_10']:.2f}  {row['seconds']:.2f} s  "
            f"({row['evaluations']} evaluations)")


def table(out: dict) -> str:
    """A markdown table: one line per (index, library, method), MSE / P@10 per (n, budget)."""
    columns = [(n, b) for n in out["sizes"] for b in out["budgets"]]
    cells: dict = {}
    for row in out["rows"]:
        key = (row["index"], row["library"], row["method"])
        cells.setdefault(key, {})[(row["n"], row["budget"])] = row
    lines = ["| index | library | method | " + " | ".join(f"n={n} B={b}" for n, b in columns)
             + " |", "|" + "---|" * (3 + len(columns))]
    for (index, library, method), by_column in cells.items():
        entries = []
        for column in columns:
            row = by_column.get(column)
            entries.append("-" if row is None or "skipped" in row else
                           f"{row['mse']:.1e} / {row['precision_at_10']:.2f}")
        lines.append(f"| {index} | {library} | {method} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--budgets", type=int, nargs="+", default=[200, 1000, 4000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="skip shapiq")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    check_correctness()
    out = measure(args.sizes, args.budgets, args.seeds, not args.no_peers)
    print()
    print("MSE / Precision@10 (mean over seeds)")
    print(table(out))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
