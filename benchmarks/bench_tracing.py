"""Causal tracing (ROME's table) against the plain-forward floor and causal-tracer.

GPT-2-medium architecture (24 layers, d_model 1024, vocab 50257) with random weights, a
20-token prompt whose subject is 3 tokens, 10 noise draws, kinds hidden / mlp / attn (window 10):
3 x 20 x 24 = 1,440 restorations x 10 draws = 14,400 patched rows, the table ROME computes.

Side by side in one process, on one device:
- mechinterp ``causal_trace`` (wall time of the whole call), with and without prefix reuse;
- the floor: as many plain forwards as rows, in the fastest batch, with logits at the last
  position only (and, for reference, at every position as transformers does by default);
- causal-tracer (PyPI, ROME's algorithm with rows packed in batches), where installed.

Peak GPU memory is recorded for mechinterp.

Run: ``python benchmarks/bench_tracing.py --json tracing.json``
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import transformers
from _timing import device_name, gpt2_config, plain_forward_floor, random_gpt2, write_json
from _timing import median_time as _median_time
from _timing import sync as _sync

from mechinterp.tracing import causal_trace


def _causal_tracer_seconds(hf, tokenizer, prompt: str, subject: str, device, samples: int,
                           noise: float) -> float | None:
    """Seconds for causal-tracer's three tables (hidden, mlp, attention), or None if missing."""
    try:
        from causal_tracer import CausalTracer
    except ImportError:
        return None
    tracer = CausalTracer(hf, tokenizer, noise=noise, device=device)
    start = time.perf_counter()
    # causal-tracer's own default window is 1; ROME's table restores MLP and attention in 10.
    for kind, window in (("hidden", 1), ("mlp", 10), ("attention", 10)):
        tracer.calculate_hidden_flow(prompt, subject=subject, kind=kind, samples=samples,
                                     window=window)
    _sync(device)
    return time.perf_counter() - start


def measure(device: str, dtypes: list[str], repeats: int, config, seq: int, subject_len: int,
            samples: int) -> dict:
    device_ = torch.device(device)
    out: dict = {"device": device_name(device_), "rows": []}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hf, model = random_gpt2(config, device_, dtype)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=g).to(device_)
        subject = (3, 3 + subject_len)
        trace = functools.partial(causal_trace, model, ids, subject, samples=samples,
                                  progress=False)
        with_reuse, without = trace(), trace(reuse=False)
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(with_reuse.scores, without.scores, rtol=tol, atol=tol * with_reuse.base)
        cells = with_reuse.scores.numel()
        row = {"dtype": dtype_name, "seq": seq, "subject_tokens": subject_len, "samples": samples,
               "restorations": cells, "rows": cells * samples}
        for label, reuse in (("mechinterp_s", True), ("mechinterp_no_reuse_s", False)):
            if device_.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device_)
            row[label] = _median_time(device_, functools.partial(trace, reuse=reuse), repeats)
            if device_.type == "cuda":
                row[label.replace("_s", "_peak_gib")] = torch.cuda.max_memory_allocated(device_) / 2**30
        row["floor_s"], row["floor_batch"] = plain_forward_floor(hf, ids, row["rows"], device_,
                                                                  last_only=True)
        row["floor_all_logits_s"], _ = plain_forward_floor(hf, ids, row["rows"], device_,
                                                           last_only=False)
        row["vs_floor"] = row["mechinterp_s"] / row["floor_s"]
        row["vs_floor_all_logits"] = row["mechinterp_s"] / row["floor_all_logits_s"]
        seconds = _peer(hf, config, device_, samples, with_reuse.noise)
        if seconds is not None:  # causal-tracer on the same model, in the same dtype
            row["causal_tracer_s"] = seconds
            row["speedup_vs_causal_tracer"] = seconds / row["mechinterp_s"]
        out["rows"].append(row)
        print(_describe(row), flush=True)
        del hf, model
        if device_.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _peer(hf, config, device, samples: int, noise: float) -> float | None:
    """causal-tracer on a prompt of the same length, with a word tokenizer of the same vocab."""
    try:
        import causal_tracer  # noqa: F401
    except ImportError:
        return None
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(config.vocab_size)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0",
                                                     pad_token="w0")
    prompt = " ".join(words[1000 + i] for i in range(20))
    subject = " ".join(words[1003 + i] for i in range(3))
    return _causal_tracer_seconds(hf, tokenizer, prompt, subject, device, samples, noise)


def _describe(row: dict) -> str:
    text = (
        f"{row['dtype']} {row['restorations']} restorations x {row['samples']} draws "
        f"({row['rows']} rows): mechinterp {row['mechinterp_s']:.3f} s (no reuse "
        f"{row['mechinterp_no_reuse_s']:.3f} s), floor {row['floor_s']:.3f} s at batch "
        f"{row['floor_batch']} -> {row['vs_floor']:.2f}x floor; floor with all logits "
        f"{row['floor_all_logits_s']:.3f} s -> {row['vs_floor_all_logits']:.2f}x"
    )
    if "mechinterp_peak_gib" in row:
        text += f"; peak {row['mechinterp_peak_gib']:.2f} GiB"
    if "causal_tracer_s" in row:
        text += (f"; causal-tracer {row['causal_tracer_s']:.2f} s -> mechinterp "
                 f"{row['speedup_vs_causal_tracer']:.1f}x faster")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, d_model 64 model instead of GPT-2 medium")
    args = parser.parse_args()
    config = transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16)  # GPT-2 medium
    if args.smoke:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4)
    out = measure(args.device, args.dtypes, args.repeats, config, 20, 3, args.samples)
    out["config"] = gpt2_config(config)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
