"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import functools
import json
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_json(path: str | None, out: dict) -> None:
    """Write a benchmark's rows with the build they ran on, when a path is given."""
    if path:
        import mechinterp

        with open(path, "w") as handle:
            json.dump({"build": mechinterp.build_info(), **out}, handle, indent=2)


def gpt2_config(config) -> dict:
    """The sizes of a GPT-2 config that benchmarks record."""
    return {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
            "vocab_size": config.vocab_size}


def random_gpt2(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A GPT-2 of ``config`` with seeded random weights, and the same model loaded by mechinterp."""
    import transformers

    import mechinterp

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval().to(device, dtype)
    return hf, mechinterp.load(hf)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GiB = float(1 << 30)


def timed(device: torch.device, fn):
    """``fn()`` and its seconds, with the device synchronised around it."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    """Start a fresh peak-memory count (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """GiB allocated at the peak since :func:`reset_peak`, weights included (CUDA only)."""
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def times(device: torch.device, fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def median_time(device: torch.device, fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    return statistics.median(times(device, fn, repeats))


def interleaved_medians(device: torch.device, fns: dict, repeats: int) -> dict:
    """Median seconds of each of ``fns`` (name -> callable), timed in turn, one call of each per
    round, after one warm-up call of each.

    Ratios between them are then taken at the same clocks: a GPU slows as it heats over a run
    of heavy calls (an H100 by up to 10% over a few hundred ms of GEMMs), which biases ratios of
    runs timed one after another. The rounds' orders come from :func:`balanced_orders`, so that
    every call comes right after every other equally often: a call right after a long GEMM runs
    at the clocks the GEMM's power draw left, and a fixed order charged that to whichever call
    came next (an H100 encode at 4096 x 131072 timed right after ``torch.mm`` took 1.18-1.22x
    its time, the same encode timed two places later 1.10-1.17x).
    """
    for fn in fns.values():
        fn()
    seconds = {name: [] for name in fns}
    items = list(fns.items())
    orders = balanced_orders(len(items))
    for round_ in range(repeats):
        for index in orders[round_ % len(orders)]:
            name, fn = items[index]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each ordered pair of neighbours occurs equally often, and
    each item comes first equally often: a Williams design, ``n`` orders for even ``n`` and
    ``2n`` (each with its reverse) for odd ``n``.

    Examples:
        >>> balanced_orders(4)
        [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    if n <= 1:
        return [list(range(n))]
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(item + shift) % n for item in first] for shift in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return orders


def peak_extra_gib(device: torch.device, fn) -> float:
    """GiB allocated by ``fn()`` at its peak above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / float(1 << 30)


def plain_forward_floor(hf, ids: torch.Tensor, rows: int, device: torch.device, *,
                        last_only: bool, batches=(32, 64, 128, 256, 512)) -> tuple[float, int]:
    """Seconds for ``rows`` plain forwards of ``ids`` at the fastest batch size, and that size.

    ``last_only`` asks the model for logits at the last position only (``logits_to_keep=1``).
    """
    best = None
    kwargs = {"logits_to_keep": 1} if last_only else {}
    for batch in batches:
        try:
            with torch.no_grad():
                per_batch = median_time(device, functools.partial(hf, ids.repeat(batch, 1), **kwargs), 3)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        total = per_batch * rows / batch
        if best is None or total < best[0]:
            best = (total, batch)
    assert best is not None, "no batch size fit in memory"
    return best
