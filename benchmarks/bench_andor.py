"""AND-OR interaction extraction: seconds per optimisation step, against dense matrices.

The papers' reference code (Li and Zhang; Chen et al.) computes the AND and OR interactions with
two ``2**n x 2**n`` transform matrices, so each SGD step is four dense matrix-vector products
(two forward, two in the backward pass) over ``2 * 4**n`` entries; the matrices alone need 128 MiB
in float32 at n = 12, 2 GiB at n = 14 and 32 GiB at n = 16. mechinterp's
``and_or_interactions`` runs the same optimisation (SGD, momentum 0.9, learning rate decayed
log-linearly, ``q`` clamped after each step) with four ``O(n 2**n)`` compiled transforms per step.

A random game on n players (fixed seed). At each n of ``--sizes``:

- correctness first: the dense matrices equal the compiled transforms on the game, and where the
  dense path runs, a dozen steps of both give the same ``p``, ``q`` and loss curve;
- seconds per step of each, from runs of S and of 0 steps (the difference removes the set-up and
  the final evaluation): mechinterp at every n (on cuda also without its CUDA graph, one kernel
  launch at a time), the dense path up to ``--dense-max`` (it is refused beyond, and the memory
  its matrices would need is reported instead);
- the speed-up, and coalitions per second (``2**n`` per step).

Run: ``python benchmarks/bench_andor.py --json andor.json``
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from _timing import median_time

import mechinterp
from mechinterp.interactions import moebius_transform, or_interactions
from mechinterp.interactions.andor import _WARMUP, _optimise

LR, MOMENTUM, DECAY, QTHRES = 1e-5, 0.9, 0.1, 0.04


def random_game(n: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + n)
    # Log-odds-like values: a few units, as the papers' outputs.
    return (3 * torch.randn(2**n, generator=g, dtype=torch.float64)).to(device, dtype)


def dense_matrices(n: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Moebius and OR transform matrices, ``[2**n, 2**n]`` each.

    The subset lattice is a product of n two-element lattices, so the Moebius matrix is the
    n-fold Kronecker power of ``[[1, 0], [-1, 1]]``. The OR transform reads the table at
    complements (a column reversal), negates, and keeps ``v(empty)`` at the empty set.
    """
    factor = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype, device=device)
    moebius = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(n):
        moebius = torch.kron(moebius, factor)
    or_matrix = -moebius.flip(1)
    or_matrix[0] = 0.0
    or_matrix[0, 0] = 1.0
    return moebius, or_matrix


def dense_run(values: torch.Tensor, moebius: torch.Tensor, or_matrix: torch.Tensor, steps: int,
              q_bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The papers' optimisation with dense matrices: ``(p, q, loss curve)``."""
    p = torch.zeros_like(values, requires_grad=True)
    q = torch.zeros_like(values, requires_grad=True)
    optimizer = torch.optim.SGD([p, q], lr=LR, momentum=MOMENTUM)
    curve = torch.empty(steps + 1, dtype=torch.float64, device=values.device)

    def loss_of() -> torch.Tensor:
        half = 0.5 * (values + q)
        return (moebius @ (half + p)).abs().sum() + (or_matrix @ (half - p)).abs().sum()

    for step in range(steps):
        loss = loss_of()
        curve[step] = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.param_groups[0]["lr"] = LR * DECAY ** (step / max(steps - 1, 1))
        optimizer.step()
        with torch.no_grad():
            q.clamp_(-q_bound, q_bound)
    with torch.no_grad():
        curve[steps] = loss_of()
    return p.detach(), q.detach(), curve


def ours_run(values: torch.Tensor, steps: int, q_bound: float, graph: bool = True):
    return _optimise(values[None], steps=steps, lr=LR, lr_decay=DECAY, momentum=MOMENTUM,
                     q_bounds=[q_bound], p_bound=None, alpha=0.0, progress=False, graph=graph)


def per_step(device: torch.device, run, steps: int, repeats: int) -> float:
    """Seconds per step in the steady state: medians of runs of ``base + steps`` and ``base``
    steps, difference. On cuda ``base`` covers the eager warm-up steps and the capture of the
    CUDA graph; elsewhere it is 0."""
    base = _WARMUP + 1 if device.type == "cuda" else 0
    full = median_time(device, lambda: run(base + steps), repeats)
    empty = median_time(device, lambda: run(base), repeats)
    return max(full - empty, 0.0) / steps


def _check(values: torch.Tensor, moebius: torch.Tensor | None, or_matrix: torch.Tensor | None,
           q_bound: float, tol: float) -> None:
    scale = float(values.abs().max()) * values.shape[0]
    if moebius is not None:
        torch.testing.assert_close(moebius @ values, moebius_transform(values), rtol=tol,
                                   atol=tol * scale)
        torch.testing.assert_close(or_matrix @ values, or_interactions(values), rtol=tol,
                                   atol=tol * scale)
        # Past the warm-up, so that on cuda the replayed CUDA graph is checked too.
        ours = ours_run(values, 12, q_bound)
        p, q, curve = dense_run(values, moebius, or_matrix, 12, q_bound)
        torch.testing.assert_close(ours.p[0], p, rtol=tol, atol=tol * float(p.abs().max()))
        torch.testing.assert_close(ours.q[0], q, rtol=tol, atol=tol * q_bound)
        torch.testing.assert_close(ours.loss, curve.cpu(), rtol=tol, atol=0.0)
    else:
        start = 0.5 * (moebius_transform(values).abs().sum() + or_interactions(values).abs().sum())
        loss = ours_run(values, 0, q_bound).loss[0]
        assert abs(float(loss) - float(start)) <= tol * float(start), (float(loss), float(start))


def _row(n: int, device: torch.device, dtype: torch.dtype, dense_max: int, repeats: int) -> dict:
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    element = torch.tensor([], dtype=dtype).element_size()
    values = random_game(n, device, dtype)
    q_bound = QTHRES * abs(float(values[-1] - values[0]))
    row = {"n": n, "coalitions": 2**n, "dense_matrices_gib": 2 * 4**n * element / 2**30}
    moebius = or_matrix = None
    if n <= dense_max:
        start = time.perf_counter()
        moebius, or_matrix = dense_matrices(n, device, dtype)
        row["dense_setup_s"] = time.perf_counter() - start
    _check(values, moebius, or_matrix, q_bound, tol)
    # Enough steps to time, a few at large n on a cpu, where one step takes a good fraction of
    # a second.
    steps = 200 if device.type == "cuda" else max(4, min(200, 2**22 // 2**n))
    row["mechinterp_steps_timed"] = steps
    row["mechinterp_s_per_step"] = per_step(
        device, functools.partial(ours_run, values, q_bound=q_bound), steps, repeats)
    row["mechinterp_coalitions_per_s"] = 2**n / row["mechinterp_s_per_step"]
    if device.type == "cuda":
        # The same steps launched one kernel at a time instead of replayed as a CUDA graph.
        row["mechinterp_eager_s_per_step"] = per_step(
            device, functools.partial(ours_run, values, q_bound=q_bound, graph=False), steps,
            repeats)
    if moebius is not None:
        dense_steps = 200 if device.type == "cuda" else max(4, min(100, 2**18 // 2**n))
        row["dense_steps_timed"] = dense_steps
        run = functools.partial(dense_run, values, moebius, or_matrix, q_bound=q_bound)
        row["dense_s_per_step"] = per_step(device, run, dense_steps, repeats)
        row["speedup_vs_dense"] = row["dense_s_per_step"] / row["mechinterp_s_per_step"]
    return row


def measure(device: str, sizes: list[int], dense_max: int, dtype_name: str,
            repeats: int) -> dict:
    device_ = torch.device(device)
    name = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu"
    out: dict = {"device": name, "dtype": dtype_name, "rows": []}
    for n in sizes:
        row = _row(n, device_, getattr(torch, dtype_name), dense_max, repeats)
        if device_.type == "cuda":
            torch.cuda.empty_cache()
        out["rows"].append(row)
        print(_describe(row), flush=True)
    return out


def _describe(row: dict) -> str:
    text = (f"n={row['n']}: mechinterp {row['mechinterp_s_per_step'] * 1e3:.3f} ms/step "
            f"({row['mechinterp_coalitions_per_s']:.3g} coalitions/s)")
    if "mechinterp_eager_s_per_step" in row:
        text += f" (without the CUDA graph {row['mechinterp_eager_s_per_step'] * 1e3:.3f} ms/step)"
    if "dense_s_per_step" in row:
        text += (f"; dense {row['dense_s_per_step'] * 1e3:.3f} ms/step "
                 f"(matrices {row['dense_matrices_gib']:.3f} GiB, built in "
                 f"{row['dense_setup_s']:.2f} s) -> {row['speedup_vs_dense']:.1f}x faster")
    else:
        text += f"; dense not run (its matrices would need {row['dense_matrices_gib']:,.0f} GiB)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 12, 16, 20])
    parser.add_argument("--dense-max", type=int, default=12,
                        help="largest n for the dense path (13 needs 0.5 GiB in float32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float32 is what the papers' code uses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    out = measure(args.device, args.sizes, args.dense_max, args.dtype, args.repeats)
    out["config"] = {"lr": LR, "momentum": MOMENTUM, "lr_decay": DECAY, "qthres": QTHRES}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"build": mechinterp.build_info(), **out}, handle, indent=2)


if __name__ == "__main__":
    main()
