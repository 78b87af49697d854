"""Train ``induction-2l-sae``: a TopK sparse autoencoder on the residual stream of ``induction-2l``.

The SAE reads ``resid_post`` of layer 0, the residual stream between the two layers. That is
exactly what layer 1's induction head reads: the current word (from the embedding; the head's
query looks for it) and the previous word (written there by layer 0's previous-token head; the
head's key matches on it). So the latents should split into "the current word is X" and "the
previous word was Y", plus a few that track the position; after layer 1 the stream would also
carry the prediction, mixing a third kind of feature into every token.

Activations come from the model's own training distribution (``sample_training_batch``: repeated
spans and skip-rule sequences), drawn from a seed of their own; the report's held-out numbers
come from a different seed.

Run::

    python -m mechinterp.zoo.train_sae [--out DIR] [--steps N] [--device cpu|cuda] [--seed N]

It takes about 70 seconds on two CPU cores and is deterministic given the seed, the
device and the thread count. ``DIR`` (default: the ``induction-2l-sae`` folder beside this
file) receives ``cfg.json`` and ``sae_weights.safetensors`` (SAELens layout) and
``training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mechinterp.sites import Site
from mechinterp.zoo.train_induction import BATCH_SIZE as SEQUENCES_PER_BATCH
from mechinterp.zoo.train_induction import sample_training_batch

MODEL = "induction-2l"
SITE = Site("resid_post", layer=0)
D_SAE = 512
K = 8

# 32 batches of 64 sequences of 64 tokens: 131,072 activation rows.
TRAIN_BATCHES = 32
HELDOUT_BATCHES = 8
DATA_SEED = 1
HELDOUT_SEED = DATA_SEED + 10_000

STEPS = 4000
BATCH_SIZE = 1024
LR = 3e-3
DEFAULT_SEED = 0
# About 1.5 passes over the rows: a latent silent that long gets the AuxK loss's attention.
DEAD_AFTER_TOKENS = 200_000

DEFAULT_OUT = Path(__file__).parent / "induction-2l-sae"


def token_batches(n_batches: int, seed: int) -> Iterator[torch.Tensor]:
    """Token ids ``[64, 64]`` from the model's training mix, ``n_batches`` times."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        input_ids, _ = sample_training_batch(SEQUENCES_PER_BATCH, generator)
        yield input_ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the SAE to")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    from mechinterp.loading import load
    from mechinterp.sae.formats import save_sae
    from mechinterp.sae.training import collect_activations, train_sae

    start = time.perf_counter()
    model = load(MODEL, device=args.device)
    train = collect_activations(model, token_batches(TRAIN_BATCHES, DATA_SEED), SITE)
    heldout = collect_activations(model, token_batches(HELDOUT_BATCHES, HELDOUT_SEED), SITE)
    sae, stats = train_sae(
        train,
        d_sae=D_SAE,
        architecture="topk",
        k=K,
        steps=args.steps,
        batch_size=BATCH_SIZE,
        lr=LR,
        seed=args.seed,
        device=args.device,
        dead_after_tokens=DEAD_AFTER_TOKENS,
        hook_name=str(SITE),
    )
    sae = sae.to("cpu")
    heldout_fvu, heldout_l0 = _fvu_and_l0(sae, heldout)
    wall_seconds = time.perf_counter() - start

    report = {
        "sae": "induction-2l-sae",
        "model": MODEL,
        "hook_name": str(SITE),
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": D_SAE,
        "k": K,
        "seed": args.seed,
        "data_seed": DATA_SEED,
        "heldout_seed": HELDOUT_SEED,
        "train_rows": train.shape[0],
        "heldout_rows": heldout.shape[0],
        "steps": stats.steps,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "dead_after_tokens": DEAD_AFTER_TOKENS,
        "fvu": stats.fvu,
        "mean_l0": stats.mean_l0,
        "dead_fraction": stats.dead_fraction,
        "heldout_fvu": heldout_fvu,
        "heldout_mean_l0": heldout_l0,
        "train_wall_seconds": round(stats.wall_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loss_curve": [round(value, 5) for value in stats.loss_curve],
    }
    save_sae(sae, args.out)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"FVU {stats.fvu:.4f} (held out {heldout_fvu:.4f})  L0 {stats.mean_l0:.2f}  "
        f"dead {stats.dead_fraction:.3f}  {wall_seconds:.0f}s  -> {args.out}"
    )
    return report


@torch.no_grad()
def _fvu_and_l0(sae, x: torch.Tensor) -> tuple[float, float]:
    acts = sae.encode(x)
    error = (sae.decode(acts) - x).double().pow(2).sum()
    variance = (x - x.mean(dim=0)).double().pow(2).sum()
    return float(error / variance), float((acts != 0).sum(dim=1).double().mean())


if __name__ == "__main__":
    main()
