"""Token-game throughput: coalitions per second, mechinterp's TokenGame against captum.

GPT-2-small architecture (12 layers, d_model 768, 12 heads, vocab 50257) with random weights, a
prompt of ``--tokens`` random tokens (24 by default), every token a player, absent tokens given
the mean embedding, value = log-odds of the unmasked run's top token at the last position.

- mechinterp: ``TokenGame(...)(coalitions)`` on ``--coalitions`` random coalitions (wall time of
  the whole call: checks, batching, forwards, values back on the host), at its default batch
  size and at ``--batch-sizes``.
- captum, side by side in the same process where installed: ``ShapleyValueSampling`` on the
  same forward function (``inputs_embeds`` -> log-odds, logits at the last position only), its
  own baseline masking (one feature per token, baseline = the mean embedding), at
  ``perturbations_per_eval`` 1, 16, 64 and 256. Its rate is the rows its forward function
  evaluated per second (counted by a wrapper), over ``--captum-evals`` rows or so.
- the floor: plain forwards of the prompt (no masking, no output) at the fastest of batch sizes
  64 to 4,096, logits at the last position only.

Correctness first: on a few coalitions, the game's values must equal the captum forward function
on the same masked embeddings.

Run: ``python benchmarks/bench_model_games.py --json model_games.json``
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import torch
import transformers
from _timing import (
    device_name,
    gpt2_config,
    median_time,
    plain_forward_floor,
    random_gpt2,
    write_json,
)
from _timing import sync as _sync

from mechinterp.interactions.model_games import TokenGame

PPES = (1, 16, 64, 256)
FLOOR_BATCHES = (64, 256, 1024, 4096)


def _log_odds(logits: torch.Tensor, target: int) -> torch.Tensor:
    z = logits.float()
    others = z.index_fill(1, torch.tensor([target], device=z.device), float("-inf"))
    return z[:, target] - torch.logsumexp(others, dim=1)


class _Forward:
    """captum's forward function: token embeddings -> log-odds, counting the rows it sees."""

    def __init__(self, hf, target: int):
        self.hf, self.target, self.rows = hf, target, 0

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        self.rows += embeds.shape[0]
        out = self.hf(inputs_embeds=embeds, logits_to_keep=1, use_cache=False)
        return _log_odds(out.logits[:, -1], self.target)


def _check(game: TokenGame, forward: _Forward, hf, ids: torch.Tensor, mean: torch.Tensor,
           device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    coalitions = torch.rand(6, game.n_players, generator=g) < 0.5
    ours = game(coalitions)
    embeds = hf.get_input_embeddings()(ids).repeat(coalitions.shape[0], 1, 1)
    keep = coalitions.to(device)[..., None]
    theirs = forward(torch.where(keep, embeds, mean.to(dtype))).double().cpu()
    tol = 1e-3 if dtype == torch.float32 else 0.25  # bf16 forwards in different batch shapes
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


def _captum(hf, ids, mean, target, device, evals: int, n_players: int) -> dict:
    try:
        from captum.attr import ShapleyValueSampling
    except ImportError:
        return {}
    embeds = hf.get_input_embeddings()(ids).detach()
    seq, width = embeds.shape[1], embeds.shape[2]
    # One feature per token as a [1, pos, 1] mask, broadcast over d_model: captum maps every
    # mask element to its feature with one host read each, per permutation, so a full-size
    # [1, pos, d_model] mask (same attributions) runs ~100x slower on a GPU.
    mask = torch.arange(seq, device=device).view(1, seq, 1)
    baselines = mean.to(embeds.dtype).expand(1, seq, width)
    out = {}
    # Each sampled permutation costs n_players evaluations (+1 for the baseline).
    samples = max(1, math.ceil(evals / n_players))
    for ppe in PPES:
        forward = _Forward(hf, target)
        method = ShapleyValueSampling(forward)
        method.attribute(embeds, baselines=baselines, feature_mask=mask, n_samples=1,
                         perturbations_per_eval=ppe)  # warm-up
        forward.rows = 0
        _sync(device)
        start = time.perf_counter()
        method.attribute(embeds, baselines=baselines, feature_mask=mask, n_samples=samples,
                         perturbations_per_eval=ppe)
        _sync(device)
        seconds = time.perf_counter() - start
        out[ppe] = {"rows": forward.rows, "s": seconds, "coalitions_per_s": forward.rows / seconds}
    return out


def measure(device: str, dtypes: list[str], tokens: int, n_coalitions: int,
            batch_sizes: list[int], captum_evals: int, repeats: int,
            config: transformers.GPT2Config) -> dict:
    device_ = torch.device(device)
    out: dict = {"device": device_name(device_), "rows": []}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hf, model = random_gpt2(config, device_, dtype)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g).to(device_)
        coalitions = torch.rand(n_coalitions, tokens, generator=g) < 0.5
        start = time.perf_counter()
        game = TokenGame(model, ids, progress=False)
        setup_s = time.perf_counter() - start
        mean = hf.get_input_embeddings().weight.detach().mean(0)
        forward = _Forward(hf, game.target)
        _check(game, forward, hf, ids, mean, device_, dtype)

        row = {"dtype": dtype_name, "players": game.n_players, "tokens": tokens,
               "coalitions": n_coalitions, "mechinterp_setup_s": setup_s,
               "default_batch_size": game.batch_size}
        timings = {}
        for batch in [game.batch_size, *batch_sizes]:
            if batch in timings:
                continue
            seconds = median_time(device_, functools.partial(game, coalitions, batch_size=batch),
                                  repeats)
            timings[batch] = seconds
        best = min(timings, key=timings.get)
        row["mechinterp_s_by_batch"] = {str(b): s for b, s in timings.items()}
        row["mechinterp_s"] = timings[game.batch_size]
        row["mechinterp_coalitions_per_s"] = n_coalitions / timings[game.batch_size]
        row["mechinterp_best_batch"] = best
        row["mechinterp_best_coalitions_per_s"] = n_coalitions / timings[best]
        floor_s, floor_batch = plain_forward_floor(hf, ids, n_coalitions, device_, last_only=True,
                                                   batches=FLOOR_BATCHES)
        row["floor_coalitions_per_s"], row["floor_batch"] = n_coalitions / floor_s, floor_batch
        row["vs_floor"] = timings[game.batch_size] / floor_s

        captum = _captum(hf, ids, mean, game.target, device_, captum_evals, game.n_players)
        if captum:
            best_ppe = max(captum, key=lambda p: captum[p]["coalitions_per_s"])
            row["captum"] = {str(p): v for p, v in captum.items()}
            row["captum_best_ppe"] = best_ppe
            row["captum_best_coalitions_per_s"] = captum[best_ppe]["coalitions_per_s"]
            row["speedup_vs_captum"] = (row["mechinterp_coalitions_per_s"]
                                        / row["captum_best_coalitions_per_s"])
        out["rows"].append(row)
        print(_describe(row), flush=True)
        del hf, model, game
        if device_.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _describe(row: dict) -> str:
    text = (f"{row['dtype']} {row['players']} players, {row['coalitions']} coalitions: mechinterp "
            f"{row['mechinterp_coalitions_per_s']:,.0f} coalitions/s at batch "
            f"{row['default_batch_size']} (best {row['mechinterp_best_coalitions_per_s']:,.0f} at "
            f"{row['mechinterp_best_batch']}); plain-forward floor "
            f"{row['floor_coalitions_per_s']:,.0f}/s at batch {row['floor_batch']} -> "
            f"{row['vs_floor']:.2f}x floor")
    if "captum" in row:
        rates = ", ".join(f"ppe {p}: {v['coalitions_per_s']:,.0f}/s"
                          for p, v in row["captum"].items())
        text += (f"; captum ShapleyValueSampling {rates} -> mechinterp "
                 f"{row['speedup_vs_captum']:.1f}x captum's best (ppe {row['captum_best_ppe']})")
    else:
        text += "; captum not installed"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=24, help="prompt length = players")
    parser.add_argument("--coalitions", type=int, default=4096)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--captum-evals", type=int, default=1024,
                        help="rows each captum setting evaluates (rounded up to permutations)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 matmuls use TF32 tensor cores (for every contender)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, d_model 64 model and fewer coalitions (checks the script)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = transformers.GPT2Config()  # GPT-2 small
    if args.smoke:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4)
        args.coalitions, args.captum_evals = min(args.coalitions, 512), min(args.captum_evals, 96)
        args.batch_sizes = [b for b in args.batch_sizes if b <= args.coalitions]
    out = measure(args.device, args.dtypes, args.tokens, args.coalitions, args.batch_sizes,
                  args.captum_evals, args.repeats, config)
    out["tf32"] = bool(args.tf32)
    out["config"] = gpt2_config(config)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
