"""SAE encode and decode: mechinterp's chunked sparse encode against a bare GEMM and SAELens.

For each (d_in, d_sae, k) of ``--shapes`` and each architecture (TopK with k, JumpReLU with
thresholds set so that the mean L0 is about k; ``--archs gated`` adds gated SAEs whose gates
open for about k, without SAELens), on N = ``--tokens`` random tokens, in bf16 (``--dtype float16``:
fp16, with the keys below named ``fp16`` for ``bf16``):

- ``gemm``: one ``torch.mm`` of the same shape and dtype (cuBLAS), the floor any encode pays;
  it, ``ours``, the bf16 ``dense`` and SAELens's bf16 encode are timed in turn (one call of
  each per round), so that their ratios are taken at the same GPU clocks;
- ``ours``: ``encode_sparse`` (chunked GEMM + compiled top-k / threshold selector, sparse output;
  on Hopper, threshold SAEs take the fused GEMM, and ``ours_chunked`` times the chunked path;
  TopK takes it on request, timed as ``ours_fused``);
- ``dense``: the ops SAELens runs (GEMM + bias, then ``topk`` + ReLU + scatter into a dense
  ``[N, d_sae]``, or ReLU times the threshold mask), in bf16 and in float32 (TF32 off);
- ``saelens``: SAELens's own ``encode`` on the same weights when ``sae_lens`` imports, in bf16
  and in its default float32;
- peak memory above the inputs and weights for each;
- agreement on the first rows: index Jaccard and mean L0 of ours and of the bf16 dense encode
  against the float32 reference, and how often our sets equal the bf16 dense encode's;
- ``decode_sparse`` of our output against the measured device-to-device copy bandwidth.

With ``--cpu`` it also times the CPU encode against torch's ``addmm`` + ``topk`` on the host.

Run: ``python benchmarks/bench_sae.py --json sae.json``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import tempfile
import types

import torch

from benchmarks._timing import device_name, interleaved_medians, median_time, write_json
from benchmarks._timing import peak_extra_gib as peak_extra
from mechinterp.sae import SAE, decode_sparse, encode_sparse, save_sae
from mechinterp.sae.fused import default_reason, unsupported_reason
from mechinterp.sae.screen import fast_bf16_cpu

GiB = float(1 << 30)


def random_sae(d_in: int, d_sae: int, k: int, arch: str, device, dtype, seed: int = 0) -> SAE:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    w_enc = w_dec.T.contiguous() * 1.5
    b_enc = -0.1 * torch.rand(d_sae, generator=g)
    fields = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": torch.zeros(d_in),
                  "architecture": arch}
    if arch == "topk":
        fields["k"] = k
    elif arch == "gated":
        # Gates open at the quantile of x W_enc that leaves about k on; magnitudes scaled by
        # exp(r_mag) around 1, and shifted down a little, which closes a few more.
        x = torch.randn(256, d_in, generator=g)
        level = torch.quantile((x @ w_enc).flatten()[: 1 << 24].float(), 1 - k / d_sae)
        fields["b_gate"] = torch.full((d_sae,), -float(level))
        fields["r_mag"] = 0.1 * torch.randn(d_sae, generator=g)
        fields["b_mag"] = b_enc
    else:
        # One threshold for all latents at the pre-activation quantile that leaves about k on.
        x = torch.randn(256, d_in, generator=g)
        h = x @ w_enc + b_enc
        level = torch.quantile(h.flatten()[: 1 << 24].float(), 1 - k / d_sae)
        fields["threshold"] = torch.full((d_sae,), float(level))
    return SAE(**fields).to(device=device, dtype=dtype)


def dense_encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """What SAELens computes: the dense pre-activations, then the activation, densely."""
    if sae.architecture == "gated":
        h = x @ sae.W_enc
        return (h + sae.b_gate > 0) * torch.relu(h * torch.exp(sae.r_mag) + sae.b_mag)
    h = torch.addmm(sae.b_enc, x, sae.W_enc)
    if sae.architecture == "topk":
        values, index = h.topk(sae.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, index, torch.relu(values))
    return torch.relu(h) * (h > sae.threshold)


def import_saelens():
    """SAELens's SAE class, or why it cannot be imported.

    SAELens imports wandb at module level for its training logs only; where wandb is absent a
    placeholder module lets the encode path import.
    """
    for _ in range(3):
        try:
            from sae_lens import SAE as LensSAE
        except ModuleNotFoundError as error:
            if error.name != "wandb":
                return str(error)
            sys.modules["wandb"] = types.ModuleType("wandb")
        except Exception as error:  # noqa: BLE001 - any import failure means "not available"
            return str(error)
        else:
            return LensSAE
    return "sae_lens did not import"


def saelens_encoder(sae: SAE, dtype: torch.dtype | None, folder: str):
    """SAELens's encode on the same weights, or None when sae_lens is not installed."""
    LensSAE = import_saelens()
    if isinstance(LensSAE, str) or sae.architecture == "gated":
        return None  # SAELens does not load the gated files save_sae writes
    path = os.path.join(folder, f"{sae.architecture}-{sae.d_sae}")
    if not os.path.exists(path):
        save_sae(sae.to(dtype=torch.float32), path)
    kwargs = {"device": str(sae.device)}
    if dtype is not None:
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
    lens = LensSAE.load_from_disk(path, **kwargs)
    lens.eval()
    return lens


def _row_sets(features, rows: int) -> list[set[int]]:
    """Each row's latents with a non-zero activation."""
    starts = features.row_ptr[: rows + 1].cpu().tolist()
    index, value = features.indices.cpu(), features.values.cpu()
    return [set(index[a:b][value[a:b] != 0].tolist()) for a, b in itertools.pairwise(starts)]


def _dense_sets(dense: torch.Tensor) -> list[set[int]]:
    return [set(r.nonzero().flatten().tolist()) for r in dense.cpu()]


def set_agreement(sae: SAE, x: torch.Tensor, features, tag: str, rows: int = 512) -> dict:
    """Ours and the dense encode in the SAE's dtype (``tag``: bf16 or fp16) against the float32
    reference on the same weights.

    The issue's criteria: index Jaccard >= 0.98 and mean L0 within 1% of float32; the share of
    rows whose set equals the bf16 dense encode's shows how often the two bf16 paths differ.
    """
    rows = min(rows, x.shape[0])
    reference = _dense_sets(dense_encode(sae.to(dtype=torch.float32), x[:rows].float()))
    dense_half = _dense_sets(dense_encode(sae, x[:rows]))
    ours = _row_sets(features, rows)

    def jaccard(sets):
        return sum(len(a & b) / max(len(a | b), 1) for a, b in zip(sets, reference)) / rows

    def mean_l0(sets):
        return sum(map(len, sets)) / rows

    return {"rows_compared": rows, "jaccard_ours_vs_fp32": jaccard(ours),
            f"jaccard_dense_{tag}_vs_fp32": jaccard(dense_half), "l0_fp32": mean_l0(reference),
            "l0_ours": mean_l0(ours), f"l0_dense_{tag}": mean_l0(dense_half),
            f"identical_to_dense_{tag}": sum(a == b for a, b in zip(ours, dense_half)) / rows}


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of 1 GiB)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    seconds = median_time(device, functools.partial(b.copy_, a), 10)
    return 2 * a.numel() * 4 / seconds


_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def bench_shape(d_in, d_sae, k, arch, n, device, repeats, folder,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    tag = _TAGS[dtype]
    sae = random_sae(d_in, d_sae, k, arch, device, dtype)
    x = torch.randn(n, d_in, device=device, dtype=dtype)
    row = {"d_in": d_in, "d_sae": d_sae, "k": k, "arch": arch, "tokens": n,
           "dtype": str(dtype).removeprefix("torch.")}
    encode = functools.partial(encode_sparse, sae, x)
    dense = functools.partial(dense_encode, sae, x)
    # The calls in the SAE's dtype whose ratios the targets name are timed in turn, at the same
    # clocks.
    timed = {"gemm": functools.partial(torch.mm, x, sae.W_enc), "ours": encode,
             f"dense_{tag}": dense}
    fusable = unsupported_reason(sae, x.device) is None
    # encode_sparse's default path; the other one is timed too where the fused GEMM applies.
    row["ours_path"] = "fused" if default_reason(sae, x.device) is None else "chunked"
    if row["ours_path"] == "fused":
        timed["ours_chunked"] = functools.partial(encode_sparse, sae, x, fused=False)
    elif fusable:
        timed["ours_fused"] = functools.partial(encode_sparse, sae, x, fused=True)
    lens_half = saelens_encoder(sae, dtype, folder)
    if lens_half is not None:
        timed[f"saelens_{tag}"] = functools.partial(_no_grad_encode, lens_half, x)
    for name, seconds in interleaved_medians(device, timed, repeats).items():
        row[f"{name}_s"] = seconds
    row["ours_peak_gib"] = peak_extra(device, encode)
    row["ours_vs_gemm"] = row["ours_s"] / row["gemm_s"]
    for other in ("ours_chunked", "ours_fused"):
        if f"{other}_s" in row:
            row[f"{other}_vs_gemm"] = row[f"{other}_s"] / row["gemm_s"]
    row["gemm_tflops"] = 2 * n * d_in * d_sae / row["gemm_s"] / 1e12
    features = encode()
    row.update(set_agreement(sae, x, features, tag))
    row[f"dense_{tag}_peak_gib"] = peak_extra(device, dense)
    if lens_half is not None:
        row[f"saelens_{tag}_peak_gib"] = peak_extra(device, timed.pop(f"saelens_{tag}"))
        del lens_half

    sae32, x32 = sae.to(dtype=torch.float32), x.float()
    dense32 = functools.partial(dense_encode, sae32, x32)
    row["dense_fp32_s"] = median_time(device, dense32, max(2, repeats // 2))
    del sae32, x32
    lens = saelens_encoder(sae, None, folder)
    if lens is not None:
        call = functools.partial(_no_grad_encode, lens, x.float())
        row["saelens_default_s"] = median_time(device, call, max(2, repeats // 2))
        row["saelens_default_peak_gib"] = peak_extra(device, call)
        del lens, call
    for peer in (f"dense_{tag}", "dense_fp32", f"saelens_{tag}", "saelens_default"):
        if f"{peer}_s" in row:
            row[f"speedup_vs_{peer}"] = row[f"{peer}_s"] / row["ours_s"]
    for peer in (f"dense_{tag}", f"saelens_{tag}"):
        if f"{peer}_peak_gib" in row:
            row[f"memory_ratio_vs_{peer}"] = row["ours_peak_gib"] / row[f"{peer}_peak_gib"]

    decode = functools.partial(decode_sparse, sae, features)
    row["decode_s"] = median_time(device, decode, repeats)
    gathered = features.indices.numel() * d_in * 2 + n * d_in * 2
    row["decode_bytes_per_s"] = gathered / row["decode_s"]
    return row


def _no_grad_encode(lens, x):
    with torch.no_grad():
        return lens.encode(x)


def bench_cpu(d_in, d_sae, k, n, repeats) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        sae = random_sae(d_in, d_sae, k, "topk", device, dtype)
        # torch's bf16 GEMM on CPUs without bf16 instructions runs ~300x slower than fp32: a
        # few tokens make the point.
        tokens = n if dtype == torch.float32 else min(n, 32)
        x = torch.randn(tokens, d_in, dtype=dtype)
        ours = median_time(device, functools.partial(encode_sparse, sae, x), repeats)

        def torch_encode(sae=sae, x=x):
            h = torch.addmm(sae.b_enc, x, sae.W_enc)
            return h.topk(sae.k, dim=-1)

        peer = median_time(device, torch_encode, repeats if dtype == torch.float32 else 1)
        row = {"device": "cpu", "threads": torch.get_num_threads(), "d_in": d_in,
               "d_sae": d_sae, "k": k, "tokens": tokens, "dtype": str(dtype), "ours_s": ours,
               "torch_addmm_topk_s": peer, "speedup": peer / ours,
               "fast_bf16_cpu": fast_bf16_cpu()}
        if dtype == torch.float32:
            # The float32 encode with and without the bf16 screen (the default where it is fast).
            for screen in (True, False):
                row[f"ours_screen_{screen}_s"] = median_time(
                    device, functools.partial(encode_sparse, sae, x, screen=screen), repeats)
            row["screened_vs_unscreened"] = row["ours_screen_False_s"] / row["ours_screen_True_s"]
            dense = torch.addmm(sae.b_enc, x, sae.W_enc).topk(k, dim=-1).indices
            got = encode_sparse(sae, x).indices.reshape(tokens, k)
            row["sets_equal_torch_fp32"] = sum(set(a.tolist()) == set(b.tolist())
                                               for a, b in zip(got, dense)) / tokens
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x32768x32,2304x65536x64,4096x131072x64")
    parser.add_argument("--archs", default="topk,jumprelu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="the SAE's and the tokens' dtype (the GPU rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="also time the CPU encode")
    parser.add_argument("--cpu-tokens", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"device": device_name(device), "rows": [], "cpu_rows": []}
    lens = import_saelens()
    out["saelens"] = (f"sae_lens {sys.modules['sae_lens'].__version__}"
                      if not isinstance(lens, str) else f"unavailable: {lens}")
    print(out["saelens"], flush=True)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        if device.type == "cuda":
            out["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
            for shape in args.shapes.split(","):
                d_in, d_sae, k = map(int, shape.split("x"))
                for arch in args.archs.split(","):
                    row = bench_shape(d_in, d_sae, k, arch, args.tokens, device, args.repeats,
                                      folder, getattr(torch, args.dtype))
                    row["decode_fraction_of_copy_bw"] = (row["decode_bytes_per_s"]
                                                         / out["copy_bandwidth_bytes_per_s"])
                    out["rows"].append(row)
                    print({key: (round(v, 5) if isinstance(v, float) else v)
                           for key, v in row.items()}, flush=True)
                    torch.cuda.empty_cache()
        if args.cpu or device.type == "cpu":
            out["cpu_rows"] = bench_cpu(768, 32768, 32, args.cpu_tokens, 3)
            for row in out["cpu_rows"]:
                print(row, flush=True)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
