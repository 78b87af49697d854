"""Overhead of reading every residual site in one forward, against a plain forward.

GPT-2-small architecture (12 layers, d_model 768, vocab 50257) with random weights, prompts of
32 tokens, batch 1 and 64. Reads resid_pre, resid_mid and resid_post of every layer (36 sites).

Compared side by side in one process:
- plain: the transformers model, never wrapped by nnsight (the floor);
- wrapped plain: the model mechinterp wraps, called directly (nnsight's per-module cost alone);
- mechinterp cache: ``model.cache(tokens, select("resid_pre", "resid_mid", "resid_post"))``;
- nnsight trace: the same 36 tensors saved inside ``model.trace(...)``.

Each timing is the median of ``--repeats`` calls after warm-up, with the device synchronised
around each call; the four variants are called in alternation, so drift affects them alike.
Correctness is checked before timing: all three give the same logits and the cached tensors
equal the nnsight-saved ones.

Run: ``python benchmarks/bench_sites.py --device cuda --json sites.json``
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import transformers

import mechinterp
from mechinterp import select


def _interleaved(device: torch.device, fns: dict, repeats: int, warmup: int = 10) -> dict:
    """Median seconds per call of each function, timed in alternation (one call of each per
    round), so that drift in clocks or load hits every variant alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _nnsight_reads(model, tokens: mechinterp.Tokens, n_layers: int) -> list[torch.Tensor]:
    saved = []
    blocks = model.transformer.h
    with model.trace(tokens.input_ids, attention_mask=tokens.attention_mask):
        for layer in range(n_layers):  # nnsight needs requests in execution order
            saved.append(blocks[layer].input.save())
            saved.append(blocks[layer].ln_2.input.save())
            saved.append(blocks[layer].output.save())
    return saved


def measure(device: str, batches: list[int], seq: int, repeats: int) -> list[dict]:
    device_ = torch.device(device)
    torch.manual_seed(0)
    config = transformers.GPT2Config()  # GPT-2 small: 12 layers, d_model 768
    plain = transformers.GPT2LMHeadModel(config).eval().to(device_)
    wrapped = copy.deepcopy(plain)  # nnsight instruments the module it wraps, so keep plain apart
    model = mechinterp.load(wrapped)
    sites = model.sites(select("resid_pre", "resid_mid", "resid_post"))
    rows = []
    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device_)
        tokens = mechinterp.Tokens(ids, torch.ones_like(ids))
        with torch.no_grad():
            reference = plain(ids).logits
            ours = model.run(tokens, cache=sites)
            theirs = _nnsight_reads(model, tokens, config.n_layer)
        torch.testing.assert_close(ours.logits, reference)
        for site, saved in zip(sites_in_nnsight_order(config.n_layer), theirs):
            torch.testing.assert_close(ours.cache[site], saved)

        def run_plain(ids=ids):
            with torch.no_grad():
                plain(ids)

        def run_instrumented(ids=ids):
            with torch.no_grad():
                wrapped(ids)

        timed = _interleaved(device_, {
            "plain": run_plain, "wrapped": run_instrumented,
            "ours": lambda tokens=tokens: model.cache(tokens, sites),
            "nnsight": lambda tokens=tokens: _nnsight_reads(model, tokens, config.n_layer),
        }, repeats)
        t_plain, t_instrumented = timed["plain"], timed["wrapped"]
        t_ours, t_nnsight = timed["ours"], timed["nnsight"]
        rows.append({
            "device": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu",
            "dtype": "float32", "batch": batch, "seq": seq, "sites": len(sites),
            "plain_ms": t_plain * 1e3, "nnsight_wrapped_plain_ms": t_instrumented * 1e3,
            "mechinterp_cache_ms": t_ours * 1e3,
            "nnsight_trace_ms": t_nnsight * 1e3,
            "mechinterp_overhead": t_ours / t_plain, "nnsight_overhead": t_nnsight / t_plain,
        })
    return rows


def profile_cache(device: str, seq: int, calls: int = 200, top: int = 25) -> str:
    """Where a batch-1 ``cache`` call spends its Python time, mechinterp frames only."""
    device_ = torch.device(device)
    torch.manual_seed(0)
    model = mechinterp.load(transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(device_))
    sites = model.sites(select("resid_pre", "resid_mid", "resid_post"))
    ids = torch.randint(0, model.dims.d_vocab, (1, seq), device=device_)
    tokens = mechinterp.Tokens(ids, torch.ones_like(ids))
    for _ in range(10):
        model.cache(tokens, sites)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        model.cache(tokens, sites)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats("mechinterp", top)
    return text.getvalue()


def sites_in_nnsight_order(n_layers: int) -> list[mechinterp.Site]:
    return [mechinterp.Site(component, layer=layer) for layer in range(n_layers)
            for component in ("resid_pre", "resid_mid", "resid_post")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--profile", action="store_true",
                        help="also print where a batch-1 cache call spends its Python time")
    args = parser.parse_args()
    rows = measure(args.device, args.batches, args.seq, args.repeats)
    for row in rows:
        print(f"{row['device']} fp32 batch {row['batch']:>3} x {row['seq']} tokens, "
              f"{row['sites']} residual sites: plain {row['plain_ms']:.3f} ms, "
              f"same model wrapped by nnsight {row['nnsight_wrapped_plain_ms']:.3f} ms, "
              f"mechinterp cache {row['mechinterp_cache_ms']:.3f} ms "
              f"({row['mechinterp_overhead']:.3f}x), nnsight trace {row['nnsight_trace_ms']:.3f} ms "
              f"({row['nnsight_overhead']:.3f}x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"build": mechinterp.build_info(), "rows": rows}, handle, indent=2)
    if args.profile:
        print(profile_cache(args.device, args.seq))


if __name__ == "__main__":
    main()
