"""Where a patching sweep's time goes on a GPU, next to the plain forwards it replaces.

GPT-2-small architecture, random weights, a 32-token prompt pair differing at position 5, the
resid_pre sweep (12 x 32 cells). Prints, for the sweep with and without reuse and for one plain
forward of as many rows, the wall time and the operators with the most device time
(``torch.profiler``).

With ``--host``, prints instead where the host's (Python's) time goes in the sweep with reuse
(``cProfile``, sorted by own time and by cumulative time): a sweep whose device time is below
the plain forwards' can still be slower when the host cannot queue work fast enough.

Run: ``python benchmarks/profile_sweep.py [--dtype bfloat16] [--rows 20] [--host]``
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats

import torch
import transformers
from _timing import median_time

import mechinterp
from mechinterp import select
from mechinterp.patching import LogitDiff, activation_patch


def profile(label: str, fn, rows: int) -> None:
    device = torch.device("cuda")
    seconds = median_time(device, fn, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n== {label}: {seconds * 1e3:.2f} ms wall")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows,
                                    max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=15, help="rows of each table")
    parser.add_argument("--host", action="store_true", help="profile the host's Python instead")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(device, dtype)
    model = mechinterp.load(hf)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50257, (1, 32), generator=g).to(device)
    corrupt = clean.clone()
    corrupt[0, 5] = (corrupt[0, 5] + 1) % 50257
    selector = select("resid_pre").layers().positions()
    metric = LogitDiff(1000, 2000)
    if args.host:
        sweep = functools.partial(activation_patch, model, clean, corrupt, selector, metric,
                                  progress=False)
        print(f"sweep: {median_time(device, sweep, 10) * 1e3:.2f} ms wall")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            sweep()
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.rows)
        stats.sort_stats("cumulative").print_stats(args.rows)
        return
    for reuse in (True, False):
        profile(f"resid_pre sweep, reuse={reuse}", functools.partial(
            activation_patch, model, clean, corrupt, selector, metric, reuse=reuse,
            progress=False), args.rows)
    batch = corrupt.repeat(326, 1)

    def plain() -> None:
        with torch.no_grad():
            hf(batch, logits_to_keep=1)

    profile("plain forward, 326 rows", plain, args.rows)


if __name__ == "__main__":
    main()
