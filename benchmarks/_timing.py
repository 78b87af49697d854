"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import functools
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(device: torch.device, fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
