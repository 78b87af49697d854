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

Then a model game (``--model-game`` runs only it, ``--no-model-game`` skips it): a TokenGame on
the shipped model induction-2l, a prompt of 14 tokens (the players) whose end repeats its start,
valued by the log-odds of the model's prediction (the repeated token) less the empty
coalition's. Its 2**14 values are computed once, in one batched evaluation; exact SV and k-SII
come from that table, and both libraries' estimators look their coalitions up in it (ours
through a TabularGame, shapiq's through a shapiq.Game subclass), so that they see identical
values and the seconds are the estimators' own. Seeds vary the sampling on the one game.

Correctness first: the closed forms must equal shapiq's ExactComputer on a small game, every
estimator of ours must be exact with a budget of 2**n on a small game, the model game's exact
values must equal shapiq's ExactComputer on its table, and no estimator may use more
evaluations than its budget.

Run: ``python benchmarks/bench_estimators.py --json estimators.json``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

import mechinterp
from mechinterp.interactions import TabularGame, TokenGame, exact
from mechinterp.interactions.approximators import (
    SVARM,
    KernelSHAP,
    LeverageSHAP,
    PermutationSamplingSV,
    RegressionAdjustedKSII,
)
from mechinterp.interactions.games import CallableGame, Game, SumOfUnanimityGame
from mechinterp.interactions.result import InteractionResult

ORDER = 2  # k of k-SII
MODEL = "induction-2l"
# 14 words of the model's vocabulary, the last six repeating the first six, so that the model
# predicts the repeat of the 7th ("nazi"); the 8th ("leno") makes 14 players.
PROMPT = "kete vetu fuba mabi sano daso nazi leno kete vetu fuba mabi sano daso"


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


class Fresh(NamedTuple):
    """Factories of one game seen by each library, each with its evaluation counter at zero."""

    ours: Callable[[], Game]  # counts in .evaluations
    theirs: Callable[[], Callable]  # a numpy callable for shapiq; counts in .rows


def _soum_fresh(game: SumOfUnanimityGame) -> Fresh:
    return Fresh(lambda: CallableGame(game.value_function, game.n_players, batch_size=1 << 16),
                 lambda: _Counted(game))


def _estimate(library: str, index: str, make: Callable, fresh: Fresh, n: int, budget: int,
              seed: int) -> tuple[torch.Tensor, int] | str:
    """One estimate over the subsets of 1..order players and the evaluations it used, or why
    the estimator cannot run at this budget."""
    if library == "mechinterp":
        game, estimator = fresh.ours(), make()
        if budget < estimator.minimum_budget(n):
            return f"needs {estimator.minimum_budget(n)} evaluations"
        result = estimator.approximate(game, budget=budget, seed=seed)
        return _nonempty(result), game.evaluations
    counted = fresh.theirs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = make(n, seed).approximate(budget, counted)
    order = 1 if index == "SV" else ORDER
    subsets = [s for size in range(1, order + 1) for s in itertools.combinations(range(n), size)]
    estimate = torch.tensor([float(values[s]) for s in subsets], dtype=torch.float64)
    return estimate, counted.rows


def _nonempty(result: InteractionResult) -> torch.Tensor:
    """Values of the subsets of 1..max_order players: results listing the empty set too (exact's
    do) must line up with the estimators', which start at single players."""
    return result.values[1:] if result.min_order == 0 else result.values


def _compare(out: dict, n: int, budget: int, truths: list[dict], fresh: list[Fresh],
             methods: list[tuple]) -> None:
    """Every method on every seed's game at one budget; appends and prints one row per method."""
    for library, (index, name), make in methods:
        errors, precisions, seconds, used = [], [], [], []
        skipped = None
        for seed, (truth, game) in enumerate(zip(truths, fresh, strict=True)):
            start = time.perf_counter()
            found = _estimate(library, index, make, game, n, budget, seed)
            if isinstance(found, str):
                skipped = found
                break
            seconds.append(time.perf_counter() - start)
            estimate, evaluations = found
            assert evaluations <= budget, f"{library} {name} used {evaluations} > {budget}"
            errors.append(float(((estimate - truth[index]) ** 2).mean()))
            precisions.append(precision_at(estimate, truth[index]))
            used.append(evaluations)
        row = {"n": n, "budget": budget, "index": index, "library": library, "method": name}
        if skipped:
            row["skipped"] = skipped
            print(f"n={n:<4} budget={budget:<5} {index:<6} {library:<10} {name:<24} "
                  f"skipped: {skipped}", flush=True)
        else:
            row.update({"mse": statistics.fmean(errors), "mse_per_seed": errors,
                        "precision_at_10": statistics.fmean(precisions),
                        "seconds": statistics.fmean(seconds), "evaluations": max(used)})
            print(_describe(row), flush=True)
        out["rows"].append(row)


def _methods(peers: bool) -> list[tuple]:
    methods = [("mechinterp", key, make) for key, make in _ours().items()]
    return methods + [("shapiq", key, make) for key, make in (_theirs() if peers else {}).items()]


def measure(sizes: list[int], budgets: list[int], seeds: int, peers: bool) -> dict:
    out: dict = {"rows": [], "sizes": sizes, "budgets": budgets, "seeds": seeds,
                 "threads": torch.get_num_threads()}
    methods = _methods(peers)
    out["peers"] = any(library == "shapiq" for library, _, _ in methods)
    for n in sizes:
        games = [soum(n, seed) for seed in range(seeds)]
        truths = [{"SV": g.exact("SV").values,
                   "k-SII": g.exact("k-SII", order=ORDER).values} for g in games]
        for budget in budgets:
            _compare(out, n, budget, truths, [_soum_fresh(g) for g in games], methods)
    return out


# -- a model game ------------------------------------------------------------------------------


def model_table(prompt: str) -> tuple[torch.Tensor, tuple[str, ...], str, float]:
    """The token game's values on all 2**n coalitions (one batched evaluation), its players,
    the scored token and the seconds the table took.

    The value is the log-odds of the model's prediction, less its value on the empty
    coalition: centred as shapiq's games are by default, so neither library meets a constant
    it must carry (Shapley values and k-SII do not change).
    """
    model = mechinterp.load(MODEL, device="cpu")
    game = TokenGame(model, prompt, subtract_empty=True, progress=False)
    start = time.perf_counter()
    table = game.table()
    seconds = time.perf_counter() - start
    return table, game.players, model.tokenizer.decode([game.target]), seconds


@functools.cache
def _shapiq_tabular_class() -> type:
    """shapiq.Game subclass reading values from a table (built on first use: shapiq is
    optional)."""
    import shapiq

    class ShapiqTabular(shapiq.Game):
        def __init__(self, values: torch.Tensor) -> None:
            n = values.numel().bit_length() - 1
            # normalize=False: the table is already centred, and shapiq must see exactly the
            # values our estimators see.
            super().__init__(n, normalize=False)
            self.values = values.to(torch.float64).numpy()
            self.bits = 1 << np.arange(n, dtype=np.int64)
            self.rows = 0

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            self.rows += coalitions.shape[0]
            return self.values[coalitions.astype(np.int64) @ self.bits]

    return ShapiqTabular


def _table_fresh(table: torch.Tensor) -> Fresh:
    return Fresh(lambda: TabularGame(table), lambda: _shapiq_tabular_class()(table))


def check_model_truth(table: torch.Tensor, truths: dict) -> None:
    """Our exact values from the table equal shapiq's ExactComputer on its tabular game."""
    try:
        import shapiq
    except ImportError:
        return
    n = table.numel().bit_length() - 1
    computer = shapiq.ExactComputer(n_players=n, game=_shapiq_tabular_class()(table))
    for index, truth in truths.items():
        order = 1 if index == "SV" else ORDER
        theirs = computer(index, order=order)
        subsets = [s for size in range(1, order + 1) for s in itertools.combinations(range(n), size)]
        error = max(abs(float(theirs[s]) - v) for s, v in zip(subsets, truth.tolist(), strict=True))
        assert error < 1e-9, f"exact {index} of the model game differs from shapiq's ({error})"


def measure_model_game(prompt: str, budgets: list[int], seeds: int, peers: bool) -> dict:
    """Both libraries' estimators on one token game of the shipped model, looked up in its table.

    The model runs once, on all 2**n coalitions; every estimator then reads that table (ours as
    a TabularGame, shapiq's as a shapiq.Game), so a budget costs lookups, not forward passes:
    the seconds measure the estimators alone and every library scores the very same values.
    Seeds vary the estimators' sampling; the game stays the same.
    """
    table, players, target, seconds = model_table(prompt)
    n = len(players)
    truths = {"SV": _nonempty(exact(table, index="SV")),
              "k-SII": _nonempty(exact(table, index="k-SII", order=ORDER))}
    if peers:
        check_model_truth(table, truths)
    print(f"\nModel game: TokenGame on {MODEL}, {n} token players {list(players)}, log-odds of "
          f"{target!r} less v(empty); table of {table.numel()} coalitions in {seconds:.1f} s. "
          f"Both libraries look values up in that table.", flush=True)
    methods = _methods(peers)
    out: dict = {"rows": [], "sizes": [n], "budgets": budgets, "seeds": seeds, "model": MODEL,
                 "prompt": prompt, "players": list(players), "target": target,
                 "table_seconds": seconds, "tabular": True,
                 "peers": any(library == "shapiq" for library, _, _ in methods),
                 "exact": {index: truth.tolist() for index, truth in truths.items()}}
    for budget in budgets:
        _compare(out, n, budget, [truths] * seeds, [_table_fresh(table)] * seeds, methods)
    return out


def best_sv(out: dict) -> list[dict]:
    """Per budget, the lowest SV MSE of each library: does our best match shapiq's best?"""
    summary = []
    for budget in out["budgets"]:
        best = {}
        for row in out["rows"]:
            if row["budget"] == budget and row["index"] == "SV" and "mse" in row:
                library = row["library"]
                if library not in best or row["mse"] < best[library]["mse"]:
                    best[library] = row
        summary.append({"budget": budget, **{library: (row["method"], row["mse"])
                                             for library, row in best.items()}})
    return summary


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


def _print_best(summary: list[dict]) -> None:
    for entry in summary:
        ours, theirs = entry.get("mechinterp"), entry.get("shapiq")
        if ours is None:
            print(f"budget {entry['budget']}: no SV estimate of ours")
            continue
        line = f"budget {entry['budget']}: best SV ours {ours[0]} {ours[1]:.2e}"
        if theirs is not None:
            verdict = "no worse than" if ours[1] <= theirs[1] else "WORSE than"
            line += f"; {verdict} shapiq's best, {theirs[0]} {theirs[1]:.2e}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--budgets", type=int, nargs="+", default=[200, 1000, 4000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="skip shapiq")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--model-game", action="store_true",
                      help="run only the model game (by default it follows the SOUM games)")
    part.add_argument("--no-model-game", action="store_true", help="run only the SOUM games")
    parser.add_argument("--prompt", default=PROMPT, help="the model game's prompt")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    check_correctness()
    out: dict = {}
    if not args.model_game:
        out = measure(args.sizes, args.budgets, args.seeds, not args.no_peers)
        print()
        print("SOUM games: MSE / Precision@10 (mean over seeds)")
        print(table(out))
    if not args.no_model_game:
        model = measure_model_game(args.prompt, args.budgets, args.seeds, not args.no_peers)
        model["best_sv"] = best_sv(model)
        out["model_game"] = model
        print()
        print(f"Model game ({MODEL}, {len(model['players'])} tokens, values looked up in one "
              f"table): MSE / Precision@10 (mean over seeds)")
        print(table(model))
        _print_best(model["best_sv"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
