"""U-Net block x timestep patching on an SD-1.5-shaped U-Net: mechinterp against an nnsight loop.

A sweep restores, one cell at a time, the clean generation's output of one U-Net block (each of
the down blocks, the mid block and the up blocks: 9 for SD-1.5) at one denoising step into the
generation of the corrupted prompts, and scores the finished sample: the metric is the mean of
the final latent's channel 0 per row (there is no VAE, so the metric sees the final latent).
Every block x every step is a cell: 9 x 10 = 90 cells at the defaults.

The model is a ``diffusers.UNet2DConditionModel`` of SD-1.5's shape (block channels
320/640/1280/1280, 2 layers per block, cross-attention width 768, 64 x 64 latents) with seeded
random weights, fp16 on CUDA (``--dtype``) and fp32 on a CPU, driven by a default
``DDIMScheduler``. No text encoder: the prompts are random encoder hidden states
``[batch, 77, 768]`` (clean and corrupted from different seeds), the negative prompt of
classifier-free guidance one more ``[1, 77, 768]``, and both generations start from the same
noise ``[batch, 4, 64, 64]``. ``--small`` swaps in a tiny U-Net of the same architecture (2 down
and 2 up blocks, 32/64 channels, 16 x 16 latents) that runs on a CPU in well under a minute.

Compared side by side in one process, on one device, on the same weights:

- mechinterp: ``timestep_patch`` over ``select("block")`` at every step, wall time of the whole
  call (its clean and corrupted generations included; ``--max-rows`` passes through), after the
  correctness check below has warmed it up.
- nnsight: the loop a user writes with ``nnsight.NNsight`` wrapping the same U-Net. One clean
  generation traces every step and saves each block's output; then every cell is a full
  generation of the corrupted prompts whose U-Net forward at the cell's step is traced and
  overwrites the block's output in place with the clean value (in place, so that a down
  block's skip connection, the same tensor, gets it too), the other steps calling the plain
  U-Net. The denoising loop is mechinterp's: a fresh scheduler per generation, guidance with
  the unconditional rows first. Each cell costs the same (all steps run whatever the patched
  step), so the loop runs ``--loop-cells`` cells (one per block, spread over the steps) and its
  time per cell is scaled to all cells; the clean generation is added to its time.

Correctness first, on the loop's cells, with the metric's spread over the sweep (largest minus
smallest of every cell, clean and corrupted value) as the scale:

- matched shapes, checked: mechinterp sweeps each of those cells on its own with one cell per
  U-Net forward (``max_rows`` = the batch), so that it runs the loop's operations at the loop's
  shapes; the values must agree within 1e-4 x spread (fp32/fp64) or 5e-2 x spread (fp16/bf16).
  The script exits non-zero, before reporting times, otherwise.
- the timed sweep: its values for those cells are compared too, and reported. It batches a
  step's cells into one forward, which rounds differently, and a random U-Net under DDIM's
  default (linear-beta) schedule and guidance amplifies rounding at the noisiest steps: noise of
  fp16's precision moves the final metric by up to a good part of the clean-corrupt gap, fp32's
  by about 1e-3 of the spread. So this comparison is checked (1e-2 x spread) in fp32 only.

Peak GPU memory (weights included) is recorded for each.

``--attribution`` also measures attribution patching
(``mechinterp.diffusion.attribution.attribution_patch``), the first-order estimate of the same
sweep from one clean generation, one corrupted generation with gradients and one backward pass,
with every step's U-Net activations kept and with them recomputed in the backward pass
(``checkpoint=True``): wall time and peak memory of each against the timed exact sweep, how the
two estimates differ (they compute the same gradients), and how the estimated effects (value
minus corrupted metric, averaged over rows) correlate with the exact ones: Pearson and Spearman
over every cell and over the cells after the first (noisiest) step, where a linear estimate is
weakest, and the fraction of the cells with an exact effect over a tenth of the largest whose
sign the estimate gets. A configuration that runs out of GPU memory is recorded as such.

Run: ``python benchmarks/bench_unet.py --json unet.json``
(on a CPU: ``python benchmarks/bench_unet.py --small --device cpu``; add ``--attribution``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import diffusers
import nnsight
import torch
from _timing import device_name, peak_gib, reset_peak, sync, timed, write_json
from nnsight import NNsight

from mechinterp import Site, select
from mechinterp.diffusion.attribution import attribution_patch
from mechinterp.diffusion.model import DiffusionModel
from mechinterp.diffusion.sweep import timestep_patch
from mechinterp.patching.attribution import pearson, spearman

GiB = float(1 << 30)
TOKENS = 77  # CLIP's padded prompt length
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def metric(final: torch.Tensor) -> torch.Tensor:
    """``[rows]``: the mean of the final latent's channel 0."""
    return final[:, 0].float().mean((1, 2))


# -- the model and its inputs ------------------------------------------------------------------


def unet_config(*, small: bool) -> dict:
    """SD-1.5's U-Net configuration, or a tiny one of the same architecture."""
    if small:
        return {"sample_size": 16, "in_channels": 4, "out_channels": 4,
                "block_out_channels": (32, 64), "layers_per_block": 1,
                "cross_attention_dim": 32, "attention_head_dim": 8,
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    return {"sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
            "cross_attention_dim": 768, "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A U-Net of ``config`` with seeded random weights, built on ``device``."""
    torch.manual_seed(seed)
    # Initialising 860M parameters on the CPU takes a while; on a GPU, a moment.
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**config)
    # nn.Module's own cast: diffusers' override warns about modules to keep in fp32 even when
    # there are none (there are none in this U-Net).
    return torch.nn.Module.to(unet, dtype).eval()


@dataclass
class Inputs:
    """Encoder hidden states of the clean, corrupted and negative prompts, and the shared
    starting noise, on the model's device and in its dtype."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    negative: torch.Tensor
    noise: torch.Tensor


def make_inputs(config: dict, batch: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Inputs:
    """Random inputs, drawn on the CPU from fixed seeds so that any device sees the same."""
    def draw(offset: int, *shape: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + offset)
        return torch.randn(*shape, generator=generator).to(device, dtype)

    width, size = config["cross_attention_dim"], config["sample_size"]
    return Inputs(clean=draw(1, batch, TOKENS, width), corrupt=draw(2, batch, TOKENS, width),
                  negative=draw(3, 1, TOKENS, width),
                  noise=draw(4, batch, config["in_channels"], size, size))


# -- mechinterp --------------------------------------------------------------------------------


def mechinterp_sweep(model: DiffusionModel, inputs: Inputs, *, steps: int,
                     guidance: float | None, max_rows: int | None, **only):
    """``timestep_patch`` over every block at every step (``only`` narrows it to some cells)."""
    return timestep_patch(model, inputs.clean, inputs.corrupt, metric=metric, steps=steps,
                          noise=inputs.noise, guidance_scale=guidance,
                          negative_prompt=inputs.negative, max_rows=max_rows, progress=False,
                          **only)


# -- the nnsight loop --------------------------------------------------------------------------


class BlockLoop:
    """The per-cell loop a user writes with nnsight: denoising by hand, traced at chosen steps.

    Blocks are numbered as mechinterp's ``Site("block", layer=l)``: down blocks, the mid block,
    up blocks.
    """

    def __init__(self, unet, scheduler, inputs: Inputs, *, steps: int, guidance: float | None):
        self.unet = unet
        self.peer = NNsight(unet)
        self.scheduler = scheduler
        self.inputs = inputs
        self.steps = steps
        self.guidance = guidance
        self.n_down, self.n_up = len(unet.down_blocks), len(unet.up_blocks)

    def unet_states(self, states: torch.Tensor) -> torch.Tensor:
        """The U-Net's text states: under guidance, the negative prompt's rows first."""
        if self.guidance is None:
            return states
        negative = self.inputs.negative.expand(states.shape[0], -1, -1)
        return torch.cat([negative, states])

    def generate(self, states: torch.Tensor, forward) -> torch.Tensor:
        """The final sample of ``states``, with ``forward(i, x, t, states)`` predicting the
        noise at step ``i`` (DDIM is deterministic: no generator needed)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # fresh state
        scheduler.set_timesteps(self.steps, device=self.inputs.noise.device)
        states = self.unet_states(states)
        sample = self.inputs.noise * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([sample, sample]) if self.guidance is not None else sample
            prediction = forward(i, scheduler.scale_model_input(x, t), t, states)
            if self.guidance is not None:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + self.guidance * (cond - uncond)
            sample = scheduler.step(prediction, t, sample).prev_sample
        return sample

    def plain(self, x, t, states) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=states).sample

    def read_blocks(self, x, t, states) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One traced forward: its prediction and every block's output."""
        peer, blocks = self.peer, []
        with peer.trace(x, t, encoder_hidden_states=states):
            # nnsight serves requests in execution order: down blocks, mid block, up blocks.
            blocks.extend(peer.down_blocks[i].output[0].save() for i in range(self.n_down))
            blocks.append(peer.mid_block.output.save())
            blocks.extend(peer.up_blocks[i].output.save() for i in range(self.n_up))
            prediction = peer.output.sample.save()
        return prediction, blocks

    def write_block(self, block: int, value: torch.Tensor, x, t, states) -> torch.Tensor:
        """One traced forward with ``block``'s output overwritten in place by ``value``."""
        peer, n_down = self.peer, self.n_down
        with peer.trace(x, t, encoder_hidden_states=states):
            if block < n_down:
                # A down block returns (hidden state, skip connections), the last skip being
                # the hidden state itself: writing in place patches both.
                peer.down_blocks[block].output[0][:] = value
            elif block == n_down:
                peer.mid_block.output[:] = value
            else:
                peer.up_blocks[block - n_down - 1].output[:] = value
            prediction = peer.output.sample.save()
        return prediction

    def clean_cache(self) -> list[list[torch.Tensor]]:
        """``[step][block]``: each block's output at each step of the clean generation."""
        cache = []

        def forward(i, x, t, states):
            prediction, blocks = self.read_blocks(x, t, states)
            cache.append(blocks)
            return prediction

        self.generate(self.inputs.clean, forward)
        return cache

    def patched(self, cache: list[list[torch.Tensor]], block: int, step: int) -> torch.Tensor:
        """``[rows]`` metric of the corrupted generation with ``block`` restored at ``step``."""
        def forward(i, x, t, states):
            if i != step:
                return self.plain(x, t, states)
            return self.write_block(block, cache[step][block], x, t, states)

        return metric(self.generate(self.inputs.corrupt, forward)).cpu()

    def warm_up(self) -> None:
        """One read and one write forward, so that nnsight's first-trace costs are not timed."""
        x = self.inputs.noise
        if self.guidance is not None:
            x = torch.cat([x, x])
        t = torch.tensor(self.scheduler.config.num_train_timesteps - 1, device=x.device)
        states = self.unet_states(self.inputs.clean)
        _, blocks = self.read_blocks(x, t, states)
        self.write_block(0, blocks[0], x, t, states)
        sync(x.device)


def loop_cells(n_blocks: int, steps: int, n: int) -> list[tuple[int, int]]:
    """``n`` cells ``(block, step)``: blocks in turn, steps evenly spread from first to last."""
    n = min(n, n_blocks * steps)
    if n == 1:
        return [(0, 0)]
    cells = [(k % n_blocks, round(k * (steps - 1) / (n - 1))) for k in range(n)]
    return list(dict.fromkeys(cells))  # drop repeats (possible only past one cell per block)


def nnsight_sweep(loop: BlockLoop, cells: list[tuple[int, int]], device: torch.device
                  ) -> tuple[torch.Tensor, float, float]:
    """``[row, cell]`` metric values, seconds of the clean generation and seconds per cell."""
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        cache = loop.clean_cache()
        sync(device)
        clean_s = time.perf_counter() - start
        start = time.perf_counter()
        values = [loop.patched(cache, block, step) for block, step in cells]
        sync(device)
        per_cell_s = (time.perf_counter() - start) / len(cells)
    return torch.stack(values, dim=1), clean_s, per_cell_s


# -- measuring ---------------------------------------------------------------------------------


def matched_values(model: DiffusionModel, inputs: Inputs, cells: list[tuple[int, int]], *,
                   steps: int, guidance: float | None) -> torch.Tensor:
    """``[row, cell]``: mechinterp's values of ``cells``, each swept on its own with one cell per
    U-Net forward (``max_rows`` = the batch), so that every forward has the loop's shape."""
    batch = inputs.clean.shape[0]
    values = [mechinterp_sweep(model, inputs, steps=steps, guidance=guidance, max_rows=batch,
                               sites=[Site("block", layer=block)], at_steps=[step]).values[:, 0, 0]
              for block, step in cells]
    return torch.stack(values, dim=1)


def check(row: dict, name: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float | None,
          spread: float) -> None:
    """Record the largest difference of ``ours`` from ``theirs`` under ``name``, and whether it
    is within ``rtol`` x ``spread`` (None: reported, not checked)."""
    row[f"{name}_max_abs_diff"] = float((ours - theirs).abs().max())
    row[f"{name}_tolerance"] = None if rtol is None else rtol * spread
    row[f"{name}_passed"] = None if rtol is None else row[f"{name}_max_abs_diff"] <= rtol * spread


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    config = unet_config(small=args.small)
    unet = build_unet(config, device, dtype, seed=args.seed)
    scheduler = diffusers.DDIMScheduler()
    model = DiffusionModel(unet, scheduler=scheduler, name="sd15-shape-random")
    inputs = make_inputs(config, args.batch, device, dtype, seed=args.seed)
    guidance = args.guidance if args.guidance > 0 else None
    steps = args.steps
    n_blocks = len(model.sites(select("block")))
    params = sum(p.numel() for p in unet.parameters())
    row = {"model": "tiny SD-1.5-shaped U-Net" if args.small else "SD-1.5-shaped U-Net",
           "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
           "params": params,
           "weights_gib": sum(p.numel() * p.element_size() for p in unet.parameters()) / GiB,
           "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
           "scheduler": "DDIMScheduler", "batch": args.batch, "steps": steps,
           "guidance": guidance, "blocks": n_blocks, "cells": n_blocks * steps,
           "max_rows": args.max_rows}

    # The nnsight loop, timed; its values are the reference.
    loop = BlockLoop(unet, scheduler, inputs, steps=steps, guidance=guidance)
    cells = loop_cells(n_blocks, steps, args.loop_cells)
    with torch.no_grad():
        loop.warm_up()
    reset_peak(device)
    theirs, row["nnsight_clean_s"], row["nnsight_per_cell_s"] = nnsight_sweep(loop, cells, device)
    row["nnsight_peak_gib"] = peak_gib(device)
    row["nnsight_cells"] = len(cells)
    row["nnsight_scaled"] = len(cells) < row["cells"]
    row["nnsight_s"] = row["nnsight_clean_s"] + row["nnsight_per_cell_s"] * row["cells"]

    # Before mechinterp is timed: its values of the loop's cells at the loop's shapes, for the
    # correctness check (this also warms it up).
    with torch.no_grad():
        matched = matched_values(model, inputs, cells, steps=steps, guidance=guidance)
        reset_peak(device)
        ours, row["mechinterp_s"] = timed(device, lambda: mechinterp_sweep(
            model, inputs, steps=steps, guidance=guidance, max_rows=args.max_rows))
        row["mechinterp_peak_gib"] = peak_gib(device)
    row["speedup_vs_nnsight"] = row["nnsight_s"] / row["mechinterp_s"]

    batched = torch.stack([ours.values[:, block, step] for block, step in cells], dim=1)
    every = torch.cat([ours.values.flatten(), ours.clean, ours.corrupt])
    spread = float(every.max() - every.min())
    fp32 = dtype in (torch.float32, torch.float64)
    # At matched shapes the two compute the same operations: agreement to rounding.
    check(row, "matched", matched, theirs, 1e-4 if fp32 else 5e-2, spread)
    # The timed sweep batches a step's cells, which changes the rounding, and the sampler
    # amplifies rounding at the noisiest steps (fp16-sized noise moves the metric by a good part
    # of the clean-corrupt gap): only fp32 keeps this close enough to check.
    check(row, "batched", batched, theirs, 1e-2 if fp32 else None, spread)
    row.update({
        "metric_spread": spread, "clean_metric": ours.clean.tolist(),
        "corrupt_metric": ours.corrupt.tolist(),
        "compared": [{"block": block, "step": step, "nnsight": theirs[:, k].tolist(),
                      "mechinterp_matched": matched[:, k].tolist(),
                      "mechinterp_batched": batched[:, k].tolist()}
                     for k, (block, step) in enumerate(cells)],
    })
    row["passed"] = row["matched_passed"] and row["batched_passed"] is not False
    if args.attribution:
        row.update(measure_attribution(model, inputs, ours, steps=steps, guidance=guidance,
                                       device=device))
    return row


# -- attribution patching --------------------------------------------------------------------


def attribution_sweep(model: DiffusionModel, inputs: Inputs, *, steps: int,
                      guidance: float | None, checkpoint: bool, **only):
    """``attribution_patch`` over every block at every step (``only`` narrows it)."""
    return attribution_patch(model, inputs.clean, inputs.corrupt, metric=metric, steps=steps,
                             noise=inputs.noise, guidance_scale=guidance,
                             negative_prompt=inputs.negative, checkpoint=checkpoint,
                             progress=False, **only)


def agreement(exact, estimate) -> dict:
    """How the estimated effects ``[block, step]`` (value minus corrupted metric, mean over rows)
    track the exact ones."""
    x = (exact.values - exact.corrupt[:, None, None]).double().mean(0)
    y = (estimate.values - estimate.corrupt[:, None, None].double()).mean(0)
    large = x.abs() > 0.1 * x.abs().max()
    out = {"pearson": pearson(x, y), "spearman": spearman(x, y),
           "large_cells": int(large.sum()),
           "large_sign_agreement": float((x[large].sign() == y[large].sign()).double().mean())}
    if x.shape[1] > 2:
        later_x, later_y = x[:, 1:].flatten(), y[:, 1:].flatten()
        out.update({"pearson_after_step0": pearson(later_x, later_y),
                    "spearman_after_step0": spearman(later_x, later_y)})
    return out


def measure_attribution(model: DiffusionModel, inputs: Inputs, exact, *, steps: int,
                        guidance: float | None, device: torch.device) -> dict:
    """Attribution patching with and without checkpointing against the exact sweep ``exact``."""
    row: dict = {}
    # Warm-up at one step (the backward pass's kernels included), so that first-call costs
    # are not timed.
    attribution_sweep(model, inputs, steps=steps, guidance=guidance, checkpoint=False,
                      at_steps=[steps - 1])
    results = {}
    for name, checkpoint in (("atp", False), ("atp_checkpoint", True)):
        reset_peak(device)
        try:
            results[name], row[f"{name}_s"] = timed(device, lambda c=checkpoint: attribution_sweep(
                model, inputs, steps=steps, guidance=guidance, checkpoint=c))
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_s"] = None
            row[f"{name}_out_of_memory"] = True
            torch.cuda.empty_cache()
            continue
        row[f"{name}_peak_gib"] = peak_gib(device)
        row[f"{name}_agreement"] = agreement(exact, results[name])
        row[f"{name}_corrupt_max_abs_diff"] = float(
            (results[name].corrupt - exact.corrupt).abs().max())
    if len(results) == 2:
        row["atp_checkpoint_max_abs_diff"] = float(
            (results["atp"].values - results["atp_checkpoint"].values).abs().max())
    return row


# -- reporting ---------------------------------------------------------------------------------


def gib_text(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


def verdict(row: dict, name: str) -> str:
    if row[f"{name}_passed"] is None:
        return f"max |diff| {row[f'{name}_max_abs_diff']:.3g} (not checked in {row['dtype']})"
    return (f"max |diff| {row[f'{name}_max_abs_diff']:.3g} vs tolerance "
            f"{row[f'{name}_tolerance']:.3g}: {'ok' if row[f'{name}_passed'] else 'FAILED'}")


def describe_check(row: dict) -> str:
    lines = [(f"correctness on {row['nnsight_cells']} cells, metric spread "
              f"{row['metric_spread']:.3g} (row 0 shown):")]
    lines += [f"  block {c['block']} step {c['step']}: nnsight {c['nnsight'][0]:+.6f}  "
              f"mechinterp matched {c['mechinterp_matched'][0]:+.6f}  "
              f"batched {c['mechinterp_batched'][0]:+.6f}" for c in row["compared"]]
    lines.append(f"  matched shapes (one cell per forward): {verdict(row, 'matched')}")
    lines.append(f"  timed sweep (a step's cells batched):  {verdict(row, 'batched')}")
    return "\n".join(lines)


def describe(row: dict) -> str:
    c = row["config"]
    scaled = (f"measured on {row['nnsight_cells']} cells, scaled to {row['cells']}"
              if row["nnsight_scaled"] else f"all {row['cells']} cells")
    guidance = "none" if row["guidance"] is None else f"{row['guidance']:g} (U-Net batch x2)"
    size = c["sample_size"]
    table = [
        ("model", (f"{row['model']}, random weights: {row['params'] / 1e6:.1f}M params "
                   f"({row['weights_gib']:.2f} GiB)")),
        ("shape", (f"channels {c['block_out_channels']}, {c['layers_per_block']} layers/block, "
                   f"cross-attn width {c['cross_attention_dim']}, latents "
                   f"{c['in_channels']} x {size} x {size}")),
        ("dtype / device", f"{row['dtype']} / {row['device']}"),
        ("generation", f"DDIM, {row['steps']} steps, batch {row['batch']}, guidance {guidance}"),
        ("cells", f"{row['blocks']} blocks x {row['steps']} steps = {row['cells']}"),
        ("mechinterp", (f"{row['mechinterp_s']:.3f} s (timestep_patch, whole call), peak "
                        f"{gib_text(row['mechinterp_peak_gib'])}")),
        ("nnsight loop", (f"{row['nnsight_s']:.3f} s ({scaled}): clean cache "
                          f"{row['nnsight_clean_s']:.3f} s + {row['nnsight_per_cell_s']:.3f} s "
                          f"per cell; peak {gib_text(row['nnsight_peak_gib'])}")),
        ("nnsight / mechinterp", f"{row['speedup_vs_nnsight']:.2f}x"),
        ("max |diff| vs nnsight", (f"{row['matched_max_abs_diff']:.3g} at matched shapes, "
                                   f"{row['batched_max_abs_diff']:.3g} for the timed sweep "
                                   f"({row['nnsight_cells']} cells; metric spread "
                                   f"{row['metric_spread']:.3g})")),
    ]
    if "atp_s" in row:
        table += describe_attribution(row)
    width = max(len(name) for name, _ in table)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in table)


def describe_attribution(row: dict) -> list[tuple[str, str]]:
    lines = []
    for name, label in (("atp", "AtP"), ("atp_checkpoint", "AtP, checkpointed")):
        if row[f"{name}_s"] is None:
            lines.append((label, "out of GPU memory"))
            continue
        agree = row[f"{name}_agreement"]
        later = ""
        if "pearson_after_step0" in agree:
            later = (f"; after step 0: Pearson {agree['pearson_after_step0']:.3f}, Spearman "
                     f"{agree['spearman_after_step0']:.3f}")
        lines += [
            (label, (f"{row[f'{name}_s']:.3f} s ({row['mechinterp_s'] / row[f'{name}_s']:.2f}x "
                     f"faster than the exact sweep), peak {gib_text(row[f'{name}_peak_gib'])}")),
            (f"{label} vs exact", (f"Pearson {agree['pearson']:.3f}, Spearman "
                                   f"{agree['spearman']:.3f}{later}; sign right in "
                                   f"{agree['large_sign_agreement']:.0%} of the "
                                   f"{agree['large_cells']} cells over a tenth of the largest")),
        ]
    if "atp_checkpoint_max_abs_diff" in row:
        lines.append(("AtP checkpointed vs kept", (
            f"max |diff| {row['atp_checkpoint_max_abs_diff']:.3g}")))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="model dtype (default: float16 on CUDA, float32 on a CPU)")
    parser.add_argument("--small", action="store_true",
                        help="a tiny U-Net of the same architecture instead of SD-1.5's shape "
                             "(CPU smoke run)")
    parser.add_argument("--batch", type=int, default=1, help="prompt rows (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale; 0 or negative for none "
                             "(default 7.5)")
    parser.add_argument("--loop-cells", type=int, default=9,
                        help="cells the nnsight loop runs, one per block in turn, spread over "
                             "the steps; its time is scaled to all cells (default 9)")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="timestep_patch's max_rows: most generations per U-Net forward "
                             "(default: every block of a step at once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--attribution", action="store_true",
                        help="also time attribution patching (with and without checkpointing) "
                             "against the exact sweep, with its peak memory and correlation")
    parser.add_argument("--json", help="also write the row to this file")
    args = parser.parse_args()
    for name in ("batch", "steps", "loop_cells"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got "
                         f"{getattr(args, name)}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)
    # fp32 values are compared tightly; TF32 would round differently in different batch shapes.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    row = measure(args, device, dtype)
    print(describe_check(row), flush=True)
    if not row["passed"]:
        sys.exit("nnsight and mechinterp disagree beyond the tolerance; times not reported")
    print(describe(row), flush=True)
    write_json(args.json, {"device": device_name(device), "torch": torch.__version__,
                           "diffusers": diffusers.__version__, "nnsight": nnsight.__version__,
                           "small": args.small, "rows": [row]})


if __name__ == "__main__":
    main()
