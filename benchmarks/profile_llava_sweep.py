"""Where an image-token x layer sweep's time goes on a LLaVA-1.5-7B-shaped model.

Builds the case of ``bench_multimodal.py`` (random bf16 weights, one image pair), runs the
``resid_pre`` sweep over ``--image-tokens`` image positions with every forward timed on its own
(device synchronised), and prints, per forward: its rows, first position and first layer, its
wall time and its time per unit of work (one row through every layer and position is one unit),
next to plain forwards of the same model. Then the operators with the most device time over
``--profiled`` forwards of the sweep (``torch.profiler``).

Run: ``python benchmarks/profile_llava_sweep.py [--image-tokens 144] [--small]``
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from _timing import device_name, sync
from bench_multimodal import _spread, llava_case

from mechinterp import select
from mechinterp.patching import LogitDiff, activation_patch
from mechinterp.patching import sweep as sweep_module
from mechinterp.patching.schedule import depth

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_ms_per_row(case, rows: int) -> float:
    """Milliseconds per row of a full plain forward of ``rows`` corrupted rows."""
    hf = case.model._module
    batch = {name: value.repeat(rows, *([1] * (value.dim() - 1)))
             for name, value in case.corrupt.items()}
    with torch.no_grad():
        hf(**batch, logits_to_keep=1)
        sync(DEVICE)
        start = time.perf_counter()
        hf(**batch, logits_to_keep=1)
        sync(DEVICE)
    return (time.perf_counter() - start) * 1e3 / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-tokens", type=int, default=144)
    parser.add_argument("--small", action="store_true", help="a tiny LLaVA, to try the script")
    parser.add_argument("--profiled", type=int, default=3, help="forwards under the profiler")
    parser.add_argument("--rows", type=int, default=25, help="rows of the operator table")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    device = DEVICE
    case = llava_case(device, small=args.small)
    model = case.model
    n_layers = model.dims.n_layers
    seq = int(case.clean["input_ids"].shape[1])
    positions = _spread(list(model.image_positions(case.clean)), args.image_tokens)
    selector = select("resid_pre").layers().positions(*positions)
    sweep = functools.partial(activation_patch, model, case.clean, case.corrupt, selector,
                              LogitDiff(case.answer, case.wrong), progress=False,
                              batch_size=args.batch_size)
    sweep()  # warm-up

    records: list[dict] = []
    original = sweep_module._Sweep._patched

    def timed_patched(self, chunk, reuse, extra):
        sync(DEVICE)
        began = time.perf_counter()
        out = original(self, chunk, reuse, extra)
        sync(DEVICE)
        start = min(self.start_of[i] for i in chunk) if reuse and self.prefix_kv else 0
        layer = min(self.layer_of[i] for i in chunk) if reuse else 0
        work = len(chunk) * self.n_pairs * depth(layer, n_layers) * (seq - start) / seq
        ideal = sum(depth(self.layer_of[i], n_layers) * (seq - self.start_of[i]) / seq
                    for i in chunk) * self.n_pairs
        records.append({"rows": len(chunk) * self.n_pairs, "start": start, "layer": layer,
                        "ms": (time.perf_counter() - began) * 1e3, "work": work, "ideal": ideal})
        return out

    sweep_module._Sweep._patched = timed_patched
    sync(DEVICE)
    began = time.perf_counter()
    result = sweep()
    sync(DEVICE)
    total_ms = (time.perf_counter() - began) * 1e3
    sweep_module._Sweep._patched = original

    cells = len(result.sites)
    per_row = {rows: plain_ms_per_row(case, rows) for rows in (1, 8, 32)}
    print(f"{device_name(device)}; seq {seq}, {cells} cells, "
          f"{len(records) + 1} forwards, sweep {total_ms:.0f} ms = {total_ms / cells:.2f} ms/cell")
    print("plain forward ms per row: " + ", ".join(f"{r} rows {ms:.2f}" for r, ms in per_row.items()))
    unit = per_row[32]
    forwards_ms = sum(r["ms"] for r in records)
    work = sum(r["work"] for r in records)
    ideal = sum(r["ideal"] for r in records)
    print(f"patched forwards: {forwards_ms:.0f} ms; first forward and the rest "
          f"{total_ms - forwards_ms:.0f} ms")
    print(f"work units: planned {work:.1f}, ideal {ideal:.1f}; at the plain rate "
          f"{work * unit:.0f} ms; measured/plain-rate {forwards_ms / (work * unit):.2f}")
    print(f"{'rows':>5} {'start':>5} {'layer':>5} {'ms':>8} {'work':>7} {'ms/unit':>8}")
    for r in records:
        print(f"{r['rows']:5d} {r['start']:5d} {r['layer']:5d} {r['ms']:8.1f} {r['work']:7.2f} "
              f"{r['ms'] / max(r['work'], 1e-9):8.2f}")

    profiled = 0

    def limited(self, chunk, reuse, extra):
        nonlocal profiled
        profiled += 1
        if profiled > args.profiled:
            return torch.zeros(len(chunk) * self.n_pairs, device=device)
        return original(self, chunk, reuse, extra)

    sweep_module._Sweep._patched = limited
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        sweep()
        sync(DEVICE)
    sweep_module._Sweep._patched = original
    print(f"\n== first forward and {args.profiled} patched forwards, by device time")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
