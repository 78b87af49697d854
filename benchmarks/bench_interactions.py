"""Exact interactions from a full value table: mechinterp against shapiq, and the Moebius
transform against the bandwidth floor.

A random game on n players (a float64 table of 2**n values, fixed seed). Rows:

- ``exact``: at each n of ``--sizes``, mechinterp's Moebius transform, Shapley values and
  k-SII of order 2, each from the value table (the Shapley values and k-SII include the Moebius
  transform); at each n of ``--peer-sizes``, shapiq 1.4.1's ``ExactComputer`` on the same game in
  the same process, checked equal (1e-10) before anything is timed, and the speed-up. shapiq's
  game is evaluated once up front and not timed; each index gets a fresh computer, so none
  reuses another's work. shapiq's Moebius transform is pure Python over 3**n pairs (minutes at
  n = 16, ~10 minutes at n = 18), so the peer runs at n = 16 only unless asked.
- ``fsii``: mechinterp's FSII at ``--fsii-size`` (orders 2 and 3); shapiq's exact FSII builds
  a 2**n x 2**n diagonal matrix, beyond memory at n = 16.
- ``moebius``: the in-place transform at each n of ``--moebius-sizes`` (cuda only, by default
  20..28), float32 and float64: GB/s counted as n passes over the table, and the time over the
  floor of n passes at the device's copy bandwidth (one ``copy_`` of the table, read + write),
  below 1 when the transform beats n separate passes.

Run: ``python benchmarks/bench_interactions.py --json interactions.json``
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import numpy as np
import torch
from _timing import median_time
from _timing import sync as _sync

import mechinterp
from mechinterp import _ops
from mechinterp.interactions import (
    exact_interactions,
    mask_of,
    moebius_transform,
    subsets_up_to,
)


def random_game(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(2**n, generator=g, dtype=torch.float64).to(device)


def _ours(values: torch.Tensor, device: torch.device, repeats: int) -> dict:
    tasks = {
        "moebius": lambda: moebius_transform(values),
        "sv": lambda: exact_interactions(values, index="SV", order=1),
        "ksii2": lambda: exact_interactions(values, index="k-SII", order=2),
    }
    return {f"mechinterp_{name}_s": median_time(device, task, repeats)
            for name, task in tasks.items()}


def _versus_shapiq(values: torch.Tensor, row: dict) -> None:
    """Time shapiq's ExactComputer on the same game after checking it agrees with ours."""
    from shapiq.game_theory.exact import ExactComputer

    n = values.shape[0].bit_length() - 1
    table = values.cpu().numpy()
    weights = (1 << np.arange(n)).astype(np.int64)

    def game(coalitions: np.ndarray) -> np.ndarray:
        return table[coalitions.astype(np.int64) @ weights]

    ours = {
        "moebius": moebius_transform(values).cpu()[[mask_of(s) for s in subsets_up_to(n, n)]],
        "sv": exact_interactions(values, index="SV", order=1).cpu(),
        "ksii2": exact_interactions(values, index="k-SII", order=2).cpu(),
    }
    calls = {"moebius": ("Moebius", n), "sv": ("SV", 1), "ksii2": ("k-SII", 2)}
    for name, (index, order) in calls.items():
        computer = ExactComputer(game, n_players=n, evaluate_game=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = computer(index, order)
        seconds = time.perf_counter() - start
        theirs = torch.tensor([result[s] for s in subsets_up_to(n, order)], dtype=torch.float64)
        torch.testing.assert_close(ours[name], theirs, rtol=0, atol=1e-10)
        row[f"shapiq_{name}_s"] = seconds
        row[f"speedup_{name}"] = seconds / row[f"mechinterp_{name}_s"]
        print(f"  shapiq {index} n={n}: {seconds:.2f} s, mechinterp "
              f"{row[f'mechinterp_{name}_s'] * 1e3:.3f} ms -> {row[f'speedup_{name}']:.0f}x",
              flush=True)


def exact_rows(device: torch.device, sizes: list[int], peer_sizes: list[int],
               repeats: int) -> list[dict]:
    rows = []
    try:
        import shapiq  # noqa: F401

        have_shapiq = True
    except ImportError:
        have_shapiq = False
    for n in sorted(set(sizes) | set(peer_sizes)):
        values = random_game(n, device)
        row = {"bench": "exact", "n": n, "dtype": "float64", **_ours(values, device, repeats)}
        print(f"exact n={n}: mechinterp Moebius {row['mechinterp_moebius_s'] * 1e3:.3f} ms, SV "
              f"{row['mechinterp_sv_s'] * 1e3:.3f} ms, k-SII(2) "
              f"{row['mechinterp_ksii2_s'] * 1e3:.3f} ms (each from the value table)", flush=True)
        if have_shapiq and n in peer_sizes:
            _versus_shapiq(values, row)
        rows.append(row)
    return rows


def fsii_rows(device: torch.device, n: int, repeats: int) -> list[dict]:
    values = random_game(n, device)
    rows = []
    for order in (2, 3):
        fsii = exact_interactions(values, index="FSII", order=order)
        # FSII is efficient: the non-empty entries share v(N) - v(empty).
        assert abs(float(fsii[1:].sum() - (values[-1] - values[0]))) < 1e-9
        seconds = median_time(device, lambda order=order: exact_interactions(
            values, index="FSII", order=order), repeats)
        rows.append({"bench": "fsii", "n": n, "order": order, "dtype": "float64",
                     "mechinterp_s": seconds})
        print(f"FSII n={n} order {order}: {seconds * 1e3:.3f} ms", flush=True)
    return rows


def _sweeps(n: int) -> int:
    """Passes over memory the in-place transform makes: the low 12 players, then 8 at a time."""
    return 1 if n <= 12 else 1 + math.ceil((n - 12) / 8)


def _check_sampled_entries(values: torch.Tensor, dividends: torch.Tensor, n: int) -> None:
    """Dividends of random coalitions of at most 10 players equal the definition (float64)."""
    g = torch.Generator().manual_seed(n)
    cpu_values = values.cpu().double()
    for _ in range(16):
        players = torch.randperm(n, generator=g)[: int(torch.randint(0, min(n, 10) + 1, (1,),
                                                                         generator=g))]
        mask = mask_of(players.tolist())
        parts = torch.arange(mask + 1)
        parts = parts[(parts & ~mask) == 0]
        signs = 1 - 2 * ((len(players) - _popcount(parts)) % 2)
        expected = float((signs * cpu_values[parts]).sum())
        got = float(dividends[mask])
        scale = float(cpu_values[parts].abs().sum())
        eps = 1e-12 if dividends.dtype == torch.float64 else 1e-5
        assert abs(got - expected) <= eps * scale * n, (mask, got, expected)


def _popcount(masks: torch.Tensor) -> torch.Tensor:
    return sum(((masks >> i) & 1 for i in range(masks.max().item().bit_length() + 1)),
               torch.zeros_like(masks))


def moebius_rows(device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float64):
        for n in sizes:
            table_bytes = 2**n * torch.empty((), dtype=dtype).element_size()
            try:
                _ops.require_memory("bench", 3 * table_bytes, device, f"n={n} tables")
                values = random_game(n, device).to(dtype)
            except (mechinterp.InputError, torch.OutOfMemoryError):
                print(f"Moebius n={n} {dtype}: does not fit, skipped", flush=True)
                continue
            work = values.clone()
            _check_sampled_entries(values, _ops.moebius_(work), n)  # correctness first
            buffer = torch.empty_like(values)
            copy_s = median_time(device, lambda b=buffer, v=values: b.copy_(v), repeats)
            transform_s = median_time(device, lambda w=work: _ops.moebius_(w), repeats)
            floor_s = n * copy_s
            row = {
                "bench": "moebius", "n": n, "dtype": str(dtype).removeprefix("torch."),
                "mechinterp_s": transform_s, "copy_s": copy_s,
                "copy_gbps": 2 * table_bytes / copy_s / 1e9,
                "n_pass_gbps": 2 * n * table_bytes / transform_s / 1e9,
                "sweeps": _sweeps(n),
                "achieved_gbps": 2 * _sweeps(n) * table_bytes / transform_s / 1e9,
                "floor_s": floor_s, "vs_floor": transform_s / floor_s,
            }
            rows.append(row)
            print(f"Moebius n={n} {row['dtype']}: {transform_s * 1e3:.3f} ms, "
                  f"{row['n_pass_gbps']:.0f} GB/s as n passes ({row['sweeps']} sweeps at "
                  f"{row['achieved_gbps']:.0f} GB/s); copy {row['copy_gbps']:.0f} GB/s -> "
                  f"{row['vs_floor']:.3f}x the n-pass floor", flush=True)
            del values, work, buffer
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 18],
                        help="n for mechinterp's exact Moebius, SV and k-SII(2)")
    parser.add_argument("--peer-sizes", type=int, nargs="*", default=[16],
                        help="n at which shapiq's ExactComputer runs too (n=18 takes ~15 min)")
    parser.add_argument("--fsii-size", type=int, default=16)
    parser.add_argument("--moebius-sizes", type=int, nargs="*", default=None,
                        help="n for the bandwidth rows (default 20..28 on cuda, 16..24 on cpu)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # mechinterp's OpenMP kernels follow it
    if args.moebius_sizes is None:
        args.moebius_sizes = list(range(20, 29)) if device.type == "cuda" else [16, 20, 24]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, threads: {torch.get_num_threads()}", flush=True)
    rows = exact_rows(device, args.sizes, args.peer_sizes, args.repeats)
    rows += fsii_rows(device, args.fsii_size, args.repeats)
    rows += moebius_rows(device, args.moebius_sizes, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"build": mechinterp.build_info(), "device": name,
                       "threads": torch.get_num_threads(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
