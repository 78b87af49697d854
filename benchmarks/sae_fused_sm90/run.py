"""JumpReLU encode fused into a CUTLASS GEMM epilogue (threshold_epilogue.cu) against cuBLAS and
mechinterp's ``encode_sparse``, on an H100 in bf16, N = 16,384 tokens.

For each shape and each built variant (``name=path.so`` arguments, built by run.sh):

- agreement with the dense bf16 encode (``addmm`` + threshold): row pointers, column indices and
  values must be identical, and no warp may overflow its record region;
- interleaved wall-clock medians (one call of each per round) of ``gemm`` (cuBLAS ``addmm``
  into bf16), ``ours`` (the package's ``encode_sparse``), and per variant ``<name>_gemm`` (the
  fused GEMM alone) and ``<name>_encode`` (fused GEMM + compaction to compressed rows, including
  its host sync), printed as ratios to ``gemm``.

Run on a GPU machine: ``bash benchmarks/sae_fused_sm90/run.sh``
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks._timing import interleaved_medians
from benchmarks.bench_sae import random_sae
from mechinterp.sae import encode_sparse

TILE_M, TILE_N, WARPS_PER_TILE = 128, 256, 8
SHAPES = [(768, 32768, 32), (2304, 65536, 64), (4096, 131072, 64)]


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.sae_encode_launch.restype = i
    lib.sae_encode_launch.argtypes = [p, p, p, p, p, p, i, p, i, i, i, p, ctypes.c_size_t, p]
    lib.records_to_rows.restype = i
    lib.records_to_rows.argtypes = [p, p, i, i, i, p, p, p, p, p, p, p]
    return lib


def bf16_bounds(threshold: torch.Tensor) -> torch.Tensor:
    """max(threshold, 0) rounded down to bf16: for a bf16 h, h > t exactly when h > bound."""
    t = threshold.float().clamp_min(0)
    near = t.to(torch.bfloat16)
    bits = near.view(torch.int16)
    return torch.where(near.float() > t, bits - 1, bits).view(torch.bfloat16).contiguous()


class Fused:
    """One built variant's buffers and calls for one problem."""

    def __init__(self, lib, x, weight, bias, bounds, cap: int):
        self.lib, self.x, self.weight, self.bias, self.bounds, self.cap = lib, x, weight, bias, bounds, cap
        n, d_sae = x.shape[0], weight.shape[1]
        tiles = -(-n // TILE_M) * -(-d_sae // TILE_N) * WARPS_PER_TILE
        self.records = torch.empty(tiles * cap, dtype=torch.int32, device=x.device)
        self.warp_count = torch.empty(tiles, dtype=torch.int32, device=x.device)
        self.counts = torch.zeros(2 * n, dtype=torch.int32, device=x.device)  # row totals, cursors
        self.workspace = torch.empty(64 << 20, dtype=torch.uint8, device=x.device)

    def gemm(self):
        x, w = self.x, self.weight
        rc = self.lib.sae_encode_launch(
            x.data_ptr(), w.data_ptr(), self.bias.data_ptr(), self.bounds.data_ptr(),
            self.records.data_ptr(), self.warp_count.data_ptr(), self.cap, self.counts.data_ptr(),
            x.shape[0], w.shape[1], x.shape[1], self.workspace.data_ptr(), self.workspace.numel(),
            torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"fused GEMM failed at setup step {rc}")

    def encode(self):
        n, d_sae = self.x.shape[0], self.weight.shape[1]
        self.counts.zero_()
        self.gemm()
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=self.x.device)
        torch.cumsum(self.counts[:n], 0, out=row_ptr[1:])
        nnz, overflowed = torch.stack([row_ptr[-1], (self.warp_count > self.cap).sum()]).tolist()
        index = torch.empty(nnz, dtype=torch.int64, device=self.x.device)
        value = torch.empty(nnz, dtype=torch.bfloat16, device=self.x.device)
        scratch_index = torch.empty(nnz, dtype=torch.int32, device=self.x.device)
        scratch_value = torch.empty(nnz, dtype=torch.bfloat16, device=self.x.device)
        rc = self.lib.records_to_rows(
            self.records.data_ptr(), self.warp_count.data_ptr(), self.cap, n, d_sae,
            row_ptr.data_ptr(), self.counts[n:].data_ptr(), scratch_index.data_ptr(),
            scratch_value.data_ptr(), index.data_ptr(), value.data_ptr(),
            torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"compaction launch failed: CUDA error {rc}")
        return row_ptr, index, value, overflowed


def run_shape(libs: dict, device: torch.device, d_in: int, d_sae: int, k: int, args) -> None:
    sae = random_sae(d_in, d_sae, k, "jumprelu", device, torch.bfloat16)
    x = torch.randn(args.tokens, d_in, device=device, dtype=torch.bfloat16,
                    generator=torch.Generator(device).manual_seed(0))
    weight = sae.W_enc.contiguous()
    bias, bounds = sae.b_enc.float().contiguous(), bf16_bounds(sae.threshold)
    dense = torch.addmm(sae.b_enc, x, weight)
    keep = dense.float() > sae.threshold.float().clamp_min(0)
    rows, cols = keep.nonzero(as_tuple=True)
    ref_ptr = torch.zeros(args.tokens + 1, dtype=torch.int64, device=device)
    torch.cumsum(keep.sum(1), 0, out=ref_ptr[1:])
    fns = {"gemm": lambda: torch.addmm(sae.b_enc, x, weight, out=dense),
           "ours": lambda: encode_sparse(sae, x)}
    for name, lib in libs.items():
        fused = Fused(lib, x, weight, bias, bounds, args.cap)
        row_ptr, index, value, overflowed = fused.encode()
        same = (torch.equal(row_ptr, ref_ptr) and torch.equal(index, cols)
                and torch.equal(value, dense[rows, cols]))
        print(f"{d_in}x{d_sae} {name}: identical to the dense bf16 encode: {same}; "
              f"overflowed warps {overflowed}; mean L0 {keep.sum(1).float().mean():.1f}")
        fns[f"{name}_gemm"] = fused.gemm
        fns[f"{name}_encode"] = fused.encode
    del keep, rows, cols
    medians = interleaved_medians(device, fns, args.repeats)
    base = medians["gemm"]
    print(f"{d_in}x{d_sae}x{k}: gemm {base * 1e3:.3f} ms; " + ", ".join(
        f"{name} {t / base:.3f}x" for name, t in medians.items() if name != "gemm"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libs", nargs="+", help="name=path.so of built variants")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cap", type=int, default=32, help="record slots per (tile, warp)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    libs = {name: load(path) for name, path in (a.split("=", 1) for a in args.libs)}
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, bf16, N = {args.tokens}, cap = {args.cap}")
    for d_in, d_sae, k in SHAPES:
        run_shape(libs, device, d_in, d_sae, k, args)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
