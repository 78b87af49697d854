"""Activation-patching sweeps against the plain-forward floor and TransformerLens.

GPT-2-small architecture (12 layers, d_model 768, 12 heads, vocab 50257) with random weights, a
prompt pair of 32 tokens, metric = logit difference at the last position. Sweeps:

- resid_pre: 12 layers x 32 positions = 384 cells (TransformerLens ``get_act_patch_resid_pre``);
- head x position: 12 layers x 32 positions x 12 heads = 4,608 cells
  (``get_act_patch_attn_head_out_by_pos``).

Compared side by side in one process, on one device:
- mechinterp ``activation_patch`` (wall time of the whole call, clean and corrupted runs included),
  with and without prefix reuse, and ``attribution_patch`` (AtP) with its agreement with exact;
- the floor: as many plain forwards of the prompt as there are cells, in the batch size that is
  fastest, once as transformers runs them by default (logits at every position) and once with
  logits only at the last position (the stricter floor);
- TransformerLens, where installed (fp32 only): HookedTransformer with the same weights. Its head
  sweep costs one forward per cell; ``--tl-head-layers`` limits it to the first layers and the
  per-cell time is scaled to all cells (reported as such).

Correctness first: mechinterp's values must equal TransformerLens's (fp32) and reuse must change
nothing. Peak GPU memory is recorded for each mechinterp sweep.

Run: ``python benchmarks/bench_patching.py --json patching.json``
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import transformers
from _peers import transformer_lens_gpt2
from _timing import device_name, gpt2_config, plain_forward_floor, write_json
from _timing import median_time as _median_time
from _timing import sync as _sync

import mechinterp
from mechinterp import select
from mechinterp.patching import LogitDiff, activation_patch, agreement, attribution_patch

ANSWER, WRONG = 1000, 2000


def _transformer_lens(hf, device, dtype):
    """A HookedTransformer with ``hf``'s weights, or None when TransformerLens is missing."""
    try:
        return transformer_lens_gpt2(hf, device, dtype)
    except ImportError:
        return None


def measure(device: str, dtypes: list[str], tl_head_layers: int, repeats: int,
            config: transformers.GPT2Config) -> dict:
    device_ = torch.device(device)
    torch.manual_seed(0)
    out: dict = {"device": device_name(device_), "rows": []}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hf = transformers.GPT2LMHeadModel(config).eval().to(device_, dtype)
        model = mechinterp.load(hf)
        n_layers, n_heads = model.dims.n_layers, model.dims.n_heads
        g = torch.Generator().manual_seed(1)
        clean = torch.randint(0, 50257, (1, 32), generator=g).to(device_)
        corrupt = clean.clone()
        corrupt[0, 5] = (corrupt[0, 5] + 1) % 50257
        metric = LogitDiff(ANSWER, WRONG)
        sweeps = {
            "resid_pre": select("resid_pre").layers().positions(),
            "head_by_pos": select("head").layers().positions().heads(),
        }
        tl = _transformer_lens(hf, device_, dtype) if dtype == torch.float32 else None
        for name, selector in sweeps.items():
            cells = len(model.sites(selector, n_positions=32))
            with_reuse = activation_patch(model, clean, corrupt, selector, metric, progress=False)
            without = activation_patch(model, clean, corrupt, selector, metric, reuse=False,
                                       progress=False)
            # Reuse changes the shapes a row is computed in (batch, positions), hence rounding:
            # bf16 keeps ~3 digits, and a logit difference inherits the logits' absolute error
            # (a few units in the last place of logits of order 1-10).
            scale = float(without.values.abs().max())
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            atol = tol * scale if dtype == torch.float32 else max(tol * scale, 2**-4)
            torch.testing.assert_close(with_reuse.values, without.values, rtol=tol, atol=atol)
            row = {"sweep": name, "dtype": dtype_name, "cells": cells, "seq": 32}
            for label, reuse in (("mechinterp_s", True), ("mechinterp_no_reuse_s", False)):
                if device_.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device_)
                sweep = functools.partial(activation_patch, model, clean, corrupt, selector, metric,
                                          reuse=reuse, progress=False)
                row[label] = _median_time(device_, sweep, repeats)
                if device_.type == "cuda":
                    row[label.replace("_s", "_peak_gib")] = torch.cuda.max_memory_allocated(device_) / 2**30
            row["mechinterp_first_s"] = _median_time(device_, functools.partial(
                _first_sweep, model, clean, corrupt, selector, metric), repeats)
            estimate = attribution_patch(model, clean, corrupt, selector, metric, progress=False)
            row.update({f"atp_{k}": v for k, v in agreement(with_reuse, estimate).items()})
            row["atp_s"] = _median_time(device_, functools.partial(
                attribution_patch, model, clean, corrupt, selector, metric, progress=False), repeats)
            row["floor_s"], row["floor_batch"] = plain_forward_floor(hf, corrupt, cells, device_,
                                                                  last_only=True)
            row["floor_all_logits_s"], row["floor_all_logits_batch"] = plain_forward_floor(
                hf, corrupt, cells, device_, last_only=False)
            row["vs_floor"] = row["mechinterp_s"] / row["floor_s"]
            row["first_vs_floor"] = row["mechinterp_first_s"] / row["floor_s"]
            row["vs_floor_all_logits"] = row["mechinterp_s"] / row["floor_all_logits_s"]
            if tl is not None:
                row.update(_versus_transformer_lens(tl, clean, corrupt, name, with_reuse,
                                                    row["mechinterp_s"], n_layers, n_heads,
                                                    tl_head_layers, device_))
            out["rows"].append(row)
            print(_describe(row), flush=True)
        del hf, model, tl
        if device_.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _first_sweep(model, clean, corrupt, selector, metric) -> None:
    """A sweep as the first one over its grid: a model remembers the layout of a grid it swept
    (its cells and where they write), which the first sweep builds."""
    model.__dict__.pop("_sweep_layouts", None)
    activation_patch(model, clean, corrupt, selector, metric, progress=False)


def _versus_transformer_lens(tl, clean, corrupt, name, ours, ours_s, n_layers, n_heads,
                             head_layers, device) -> dict:
    from transformer_lens import patching

    _, clean_cache = tl.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, ANSWER] - logits[0, -1, WRONG]

    grid, _, _ = ours.grid()
    if name == "resid_pre":
        start = time.perf_counter()
        theirs = patching.get_act_patch_resid_pre(tl, corrupt, clean_cache, metric)
        _sync(device)
        seconds = time.perf_counter() - start
        torch.testing.assert_close(grid.float().cpu(), theirs.float().cpu(), rtol=1e-3, atol=2e-3)
        return {"transformer_lens_s": seconds, "transformer_lens_cells": theirs.numel(),
                "speedup_vs_transformer_lens": seconds / ours_s}
    # One forward per cell: time the first layers' cells, check them, scale per cell.
    index_df = _head_index(head_layers, corrupt.shape[1], n_heads)
    start = time.perf_counter()
    # get_act_patch_attn_head_out_by_pos, restricted to the rows of index_df.
    flat = patching.generic_activation_patch(
        tl, corrupt, clean_cache, metric, patch_setter=patching.layer_pos_head_vector_patch_setter,
        activation_name="z", index_df=index_df)
    _sync(device)
    seconds = time.perf_counter() - start
    measured = flat.numel()
    theirs = flat.reshape(head_layers, corrupt.shape[1], n_heads)
    torch.testing.assert_close(grid[:head_layers].float().cpu(), theirs.float().cpu(), rtol=1e-3,
                               atol=2e-3)
    cells = n_layers * corrupt.shape[1] * n_heads
    scaled = seconds / measured * cells
    return {"transformer_lens_s": scaled, "transformer_lens_cells": measured,
            "transformer_lens_scaled_from_cells": measured,
            "speedup_vs_transformer_lens": scaled / ours_s}


def _head_index(layers: int, positions: int, heads: int):
    import pandas as pd

    rows = [(l, p, h) for l in range(layers) for p in range(positions) for h in range(heads)]
    return pd.DataFrame(rows, columns=["layer", "pos", "head"])


def _describe(row: dict) -> str:
    text = (
        f"{row['sweep']} {row['dtype']} {row['cells']} cells: mechinterp {row['mechinterp_s']:.3f} s "
        f"(no reuse {row['mechinterp_no_reuse_s']:.3f} s), floor {row['floor_s']:.3f} s at batch "
        f"{row['floor_batch']} -> {row['vs_floor']:.2f}x floor (first sweep of the grid "
        f"{row['mechinterp_first_s']:.3f} s -> {row['first_vs_floor']:.2f}x); floor with all logits "
        f"{row['floor_all_logits_s']:.3f} s -> {row['vs_floor_all_logits']:.2f}x"
    )
    text += (f"; AtP {row['atp_s']:.3f} s (Pearson {row['atp_pearson']:.3f}, Spearman "
             f"{row['atp_spearman']:.3f} vs exact)")
    if "mechinterp_peak_gib" in row:
        text += f"; peak {row['mechinterp_peak_gib']:.2f} GiB"
    if "transformer_lens_s" in row:
        text += (f"; TransformerLens {row['transformer_lens_s']:.2f} s"
                 f"{' (scaled from ' + str(row['transformer_lens_cells']) + ' cells)' if 'transformer_lens_scaled_from_cells' in row else ''}"
                 f" -> mechinterp {row['speedup_vs_transformer_lens']:.0f}x faster")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tl-head-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, d_model 64 model instead of GPT-2 small (checks the script)")
    args = parser.parse_args()
    config = transformers.GPT2Config()  # GPT-2 small
    if args.smoke:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4)
    out = measure(args.device, args.dtypes, args.tl_head_layers, args.repeats, config)
    out["config"] = gpt2_config(config)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
