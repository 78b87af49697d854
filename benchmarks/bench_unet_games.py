"""Text-token game throughput on a U-Net: coalitions per second, batched against a per-coalition
loop of ``model.generate``.

A ``TextTokenGame`` whose players are ``--players`` text-token positions (1, 2, ...; absent
positions take the negative prompt's states) is evaluated on ``--coalitions`` random coalitions
(each player present with probability 1/2, seeded). Its value is the mean of the finished
sample's channel 0 (the final latent for the SD-shaped model, which has no VAE; the red channel
of the toy's image), a smooth metric so that the two ways can be compared closely.

Models (``--model``):

- ``sd15``: a ``diffusers.UNet2DConditionModel`` of SD-1.5's shape with seeded random weights
  (as ``bench_unet.py`` builds it: fp16 on CUDA, fp32 on a CPU, ``--dtype`` to choose), a
  default ``DDIMScheduler``, random prompt and negative-prompt states ``[1, 77, 768]`` and
  noise ``[1, 4, 64, 64]``. ``--small`` swaps in a tiny U-Net of the same architecture (16 x 16
  latents) that runs on a CPU in seconds.
- ``toy-unet``: the shipped toy, prompt "red circle" and the empty negative prompt, its four
  token positions as at most four players.

Compared in one process, on one device, on the same weights:

- batched: ``game(coalitions)``, wall time of the whole call (``batch_size`` coalitions per
  generation: the game's default, sized to the device's memory, or ``--batch-size``).
- loop: for each coalition, the game's masked states for it alone through ``model.generate``
  from the same noise (one denoising loop per coalition), ``--loop-coalitions`` of them timed
  and the time per coalition scaled to all.

Correctness first, on the loop's coalitions, with the metric's spread over the batched values as
the scale: the game at one coalition per generation runs the loop's operations at the loop's
shapes and must agree within 1e-4 x spread (fp32/fp64) or 5e-2 x spread (fp16/bf16); the
batched values, whose rounding differs with the batch shape (and which guidance at the noisiest
steps amplifies), are checked within 1e-2 x spread in fp32/fp64 and reported otherwise. The
script exits non-zero, before reporting times, when a check fails.

Run: ``python benchmarks/bench_unet_games.py --json unet_games.json``
(on a CPU: ``python benchmarks/bench_unet_games.py --small --device cpu --threads 1
--coalitions 8 --loop-coalitions 4 --steps 2``).
"""

from __future__ import annotations

import argparse
import sys
import time

import diffusers
import torch
from _timing import device_name, peak_gib, reset_peak, sync, timed, write_json
from bench_unet import DTYPES, TOKENS, build_unet, check, gib_text, metric, unet_config, verdict

import mechinterp
from mechinterp.diffusion.games import TextTokenGame
from mechinterp.diffusion.model import DiffusionModel


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
          ) -> tuple[DiffusionModel, dict]:
    """The model, and the game's prompt, negative prompt, noise and players."""
    if args.model == "toy-unet":
        # The toy's own dtype is float32; diffusers warns about casts it was not asked for.
        cast = {} if dtype == torch.float32 else {"dtype": dtype}
        model = mechinterp.load("toy-unet", device=device, **cast)
        players = list(range(min(args.players, 4)))
        return model, {"prompt": "red circle", "negative_prompt": "", "noise": None,
                       "players": players, "name": "toy-unet"}
    config = unet_config(small=args.small)
    model = DiffusionModel(build_unet(config, device, dtype, seed=args.seed),
                           scheduler=diffusers.DDIMScheduler(), name="sd15-shape-random")

    def draw(offset: int, *shape: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed + offset)
        return torch.randn(*shape, generator=generator).to(device, dtype)

    width, size = config["cross_attention_dim"], config["sample_size"]
    players = list(range(1, min(args.players, TOKENS - 1) + 1))
    return model, {"prompt": draw(1, 1, TOKENS, width), "negative_prompt": draw(2, 1, TOKENS, width),
                   "noise": draw(3, 1, config["in_channels"], size, size), "players": players,
                   "name": "tiny SD-1.5-shaped U-Net" if args.small else "SD-1.5-shaped U-Net"}


def loop_values(model: DiffusionModel, game: TextTokenGame, coalitions: torch.Tensor, *,
                steps: int, guidance: float | None) -> torch.Tensor:
    """``[coalition]``: one ``model.generate`` per coalition on its masked states."""
    negative = game.negative_states if guidance is not None else ""
    out = []
    with torch.no_grad():
        for coalition in coalitions:
            run = model.generate(game.masked_states(coalition[None]), steps=steps,
                                 noise=game.noise, guidance_scale=guidance,
                                 negative_prompt=negative)
            final = run.images if run.images is not None else run.sample
            out.append(metric(final).double().cpu())
    return torch.cat(out)


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    model, setup = build(args, device, dtype)
    guidance = args.guidance if args.guidance > 0 else None
    game = TextTokenGame(model, setup["prompt"], metric=metric, players=setup["players"],
                         steps=args.steps, seed=args.seed, noise=setup["noise"],
                         guidance_scale=guidance, negative_prompt=setup["negative_prompt"],
                         batch_size=args.batch_size, progress=False)
    generator = torch.Generator().manual_seed(args.seed + 10)
    coalitions = torch.rand(args.coalitions, game.n_players, generator=generator) < 0.5
    looped = coalitions[:min(args.loop_coalitions, args.coalitions)]
    params = sum(p.numel() for p in model._module.parameters())
    row = {"model": setup["name"], "device": device_name(device),
           "dtype": str(dtype).removeprefix("torch."), "params": params,
           "sample": list(model.sample_shape), "steps": args.steps, "guidance": guidance,
           "players": game.n_players, "coalitions": args.coalitions,
           "loop_coalitions": looped.shape[0]}

    with torch.no_grad():
        # Warm-up of both ways (first-call costs: plans, kernels, allocator), then the check at
        # the loop's shapes: the game one coalition per generation.
        game(coalitions[:2])
        loop_values(model, game, looped[:1], steps=args.steps, guidance=guidance)
        matched = game(looped, batch_size=1)

        reset_peak(device)
        game.evaluations = 0
        batched, row["batched_s"] = timed(device, lambda: game(coalitions))
        row["batched_peak_gib"] = peak_gib(device)
        row["batch_size"] = game.batch_size  # after any out-of-memory halving
        assert game.evaluations == args.coalitions

        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        theirs = loop_values(model, game, looped, steps=args.steps, guidance=guidance)
        sync(device)
        row["loop_per_coalition_s"] = (time.perf_counter() - start) / looped.shape[0]
        row["loop_peak_gib"] = peak_gib(device)
    row["loop_s"] = row["loop_per_coalition_s"] * args.coalitions
    row["batched_coalitions_per_s"] = args.coalitions / row["batched_s"]
    row["loop_coalitions_per_s"] = 1.0 / row["loop_per_coalition_s"]
    row["speedup_vs_loop"] = row["batched_coalitions_per_s"] / row["loop_coalitions_per_s"]

    spread = float(batched.max() - batched.min()) or 1.0
    fp32 = dtype in (torch.float32, torch.float64)
    check(row, "matched", matched, theirs, 1e-4 if fp32 else 5e-2, spread)
    check(row, "batched", batched[:looped.shape[0]], theirs, 1e-2 if fp32 else None, spread)
    row["metric_spread"] = spread
    row["compared"] = [{"coalition": c.int().tolist(), "loop": float(t), "matched": float(m),
                        "batched": float(b)}
                       for c, t, m, b in zip(looped, theirs, matched, batched)]
    row["passed"] = row["matched_passed"] and row["batched_passed"] is not False
    return row


def describe_check(row: dict) -> str:
    lines = [(f"correctness on {row['loop_coalitions']} coalitions, metric spread "
              f"{row['metric_spread']:.3g}:")]
    lines += [f"  {''.join(str(b) for b in c['coalition'])}: loop {c['loop']:+.6f}  "
              f"game, one per generation {c['matched']:+.6f}  batched {c['batched']:+.6f}"
              for c in row["compared"]]
    lines.append(f"  one coalition per generation: {verdict(row, 'matched')}")
    lines.append(f"  batched:                      {verdict(row, 'batched')}")
    return "\n".join(lines)


def describe(row: dict) -> str:
    guidance = "none" if row["guidance"] is None else f"{row['guidance']:g} (U-Net batch x2)"
    scaled = (f"measured on {row['loop_coalitions']}, scaled to {row['coalitions']}"
              if row["loop_coalitions"] < row["coalitions"] else f"all {row['coalitions']}")
    table = [
        ("model", f"{row['model']}: {row['params'] / 1e6:.1f}M params, sample {row['sample']}"),
        ("dtype / device", f"{row['dtype']} / {row['device']}"),
        ("generation", f"DDIM, {row['steps']} steps, guidance {guidance}"),
        ("game", f"TextTokenGame, {row['players']} players, {row['coalitions']} coalitions"),
        ("batched", (f"{row['batched_coalitions_per_s']:.3f} coalitions/s ({row['batched_s']:.3f} s,"
                     f" game batch_size {row['batch_size']}; peak "
                     f"{gib_text(row['batched_peak_gib'])})")),
        ("loop", (f"{row['loop_coalitions_per_s']:.3f} coalitions/s ({row['loop_s']:.3f} s, "
                  f"{scaled}; peak {gib_text(row['loop_peak_gib'])})")),
        ("batched / loop", f"{row['speedup_vs_loop']:.2f}x"),
    ]
    width = max(len(name) for name, _ in table)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "toy-unet"), default="sd15")
    parser.add_argument("--small", action="store_true",
                        help="sd15: a tiny U-Net of the same architecture (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="model dtype (default: float16 on CUDA for sd15, float32 otherwise)")
    parser.add_argument("--players", type=int, default=8,
                        help="text-token players (positions 1..n; at most 4 for the toy)")
    parser.add_argument("--coalitions", type=int, default=64, help="coalitions evaluated")
    parser.add_argument("--loop-coalitions", type=int, default=16,
                        help="coalitions the per-coalition loop runs; scaled to all (default 16)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the game's coalitions per generation (default: its own)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale; 0 or negative for none")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; 1 on a CPU shared with other work, "
                             "where waking idle threads costs more than the small operations)")
    parser.add_argument("--json", help="also write the row to this file")
    args = parser.parse_args()
    for name in ("players", "coalitions", "loop_coalitions", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got "
                         f"{getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if device.type == "cuda" and args.model == "sd15" else torch.float32)
    # fp32 values are compared closely; TF32 would round differently in different batch shapes.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    row = measure(args, device, dtype)
    print(describe_check(row), flush=True)
    if not row["passed"]:
        sys.exit("the batched game and the per-coalition loop disagree beyond the tolerance; "
                 "times not reported")
    print(describe(row), flush=True)
    write_json(args.json, {"device": device_name(device), "torch": torch.__version__,
                           "diffusers": diffusers.__version__, "rows": [row]})


if __name__ == "__main__":
    main()
