"""Image-token x layer activation patching on LLaVA models: mechinterp against an nnsight loop.

A sweep restores, one cell at a time, the clean run's residual stream (``resid_pre``) of one
language-model layer at one image-token position into the corrupted run; the prompts share
their text and differ in the image (the asked-about shape recoloured); metric = logit
difference of the clean answer against the corrupted answer at the last position. Cases
(``--cases``, default both):

- ``toy-vlm``: the shipped toy LLaVA (``mechinterp.load("toy-vlm")``, fp32) on colour
  questions about the shape in image cell 0, scenes drawn by the zoo's ``shapes`` helpers
  (``demo_vlm.recolour_pairs``): 2 layers x 16 image tokens, ``--toy-pairs`` pairs.
- ``llava``: a LLaVA-1.5-7B-shaped model with random bf16 weights, built on the device: Llama
  language model (32 layers, d_model 4096, 32 heads, d_mlp 11008, vocab 32064), CLIP
  ViT-L/14-336 vision tower (24 layers, d 1024, 16 heads, d_mlp 4096; image 336, patch 14:
  576 image tokens; features of its second-to-last layer), one prompt pair of 598 tokens (ids
  standing in for ``USER: <image>\\n<question> ASSISTANT:``) with a rendered scene and its
  recoloured copy. The answers are the clean and corrupted runs' top tokens. The full sweep is
  32 x 576 = 18,432 cells (``--image-tokens`` keeps that many image positions, evenly spaced).
  ``--small`` replaces it with a tiny model of the same architecture (4 x 16 cells), for CPUs.

Compared side by side in one process, on one device, on the same weights:

- mechinterp: ``activation_patch`` over ``select("resid_pre").layers().positions(*image)``,
  wall time of the whole call (clean and corrupted runs included). The first call is timed
  on its own (it builds the sweep's layout) and gives the values; the reported time is the
  median of ``--repeats`` further calls.
- nnsight: the loop a user writes with ``nnsight.NNsight`` wrapping the same transformers
  module (nnsight lets several envoys share one module, so the 7B weights exist once): one
  trace of the clean prompt saving every layer's input, then one trace of the corrupted prompt
  per cell that writes the clean value at (layer, image position) and saves the metric. The
  loop runs ``--nnsight-cells`` cells spread evenly over the sweep (after one warm-up cell);
  its time per cell is scaled to all cells, and the clean trace added, where it ran fewer
  (reported as scaled).

Correctness first: on the cells both computed, nnsight's values must equal mechinterp's (fp32:
1e-4 relative; bf16: 5e-2 relative or 1/16 of the largest last-position logit, since batching
changes bf16 rounding). The largest absolute difference is reported either way, with the range
of the values over the sweep. Peak GPU memory (weights included) is recorded for each. A full
7B sweep takes minutes on one GPU; with the default two repeats the case makes three of them.

Run: ``python benchmarks/bench_multimodal.py --json multimodal.json``
(on a CPU: ``--small --device cpu``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass

import torch
import transformers
from _timing import device_name, peak_gib, reset_peak, sync, timed, write_json
from nnsight import NNsight

import mechinterp
from mechinterp import select
from mechinterp.patching import LogitDiff, activation_patch

CASES = ("toy-vlm", "llava")
GiB = float(1 << 30)


@dataclass
class Case:
    """One model and its prompt pairs, ready to sweep.

    ``clean`` and ``corrupt`` are model inputs (``input_ids``, ``attention_mask``,
    ``pixel_values``) on the model's device; ``answer`` and ``wrong`` hold one token id per pair.
    """

    name: str
    description: str
    model: mechinterp.InterpModel
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    answer: torch.Tensor
    wrong: torch.Tensor
    sizes: dict


# -- cases -------------------------------------------------------------------------------------


def toy_case(device: torch.device, pairs: int) -> Case:
    """The shipped toy VLM with colour questions about the shape in cell 0, recoloured."""
    from mechinterp.demo_vlm import recolour_pairs

    model = mechinterp.load("toy-vlm", device=device)
    clean, corrupt, metric = recolour_pairs(model, seed=1, pairs=pairs)
    return Case("toy-vlm", "shipped toy LLaVA", model, _to(clean, device), _to(corrupt, device),
                torch.as_tensor(metric.answer), torch.as_tensor(metric.wrong),
                _sizes(model._module))


def llava_config(*, small: bool) -> transformers.LlavaConfig:
    """LLaVA-1.5-7B's configuration, or a tiny one of the same architecture."""
    if small:
        vision = transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
        # Weights drawn 8x wider than the 7B's (0.02 x sqrt(4096 / 64)) give logits of the same
        # spread, so that patching effects stand out of bf16 rounding as they do there.
        text = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
            initializer_range=0.16)
        image_token = 120
    else:
        vision = transformers.CLIPVisionConfig(
            image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
            num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
            hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
            max_position_embeddings=4096, rms_norm_eps=1e-5)
        image_token = 32000
    # The default feature strategy drops the class token: one image token per patch.
    n_image = (vision.image_size // vision.patch_size) ** 2
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        image_seq_length=n_image, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_case(device: torch.device, *, small: bool, seed: int = 0) -> Case:
    """A LLaVA of :func:`llava_config` with seeded random bf16 weights, built on ``device``,
    and one prompt pair: a rendered scene against the same scene with one shape recoloured."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from mechinterp.zoo import shapes

    dtype = torch.bfloat16
    config = llava_config(small=small)
    torch.manual_seed(seed)
    # Initialising 7B parameters on the CPU and moving them takes minutes; on the device, seconds.
    with torch.device(device):
        hf = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model = mechinterp.load(hf)

    g = torch.Generator().manual_seed(seed + 1)
    scene = shapes.sample_scene(g)
    recoloured = shapes.recolour(scene, scene[0].kind, shapes.unused_colours(scene)[0])
    images = shapes.render_batch([scene, recoloured], config.vision_config.image_size)
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    pixels = ((images.float() / 255 - mean) / std).to(device, dtype)

    # Token ids in place of "<s> USER: <image>\n<question> ASSISTANT:" (no tokenizer: random
    # weights), the text tokens drawn below the image token.
    text = torch.randint(2, config.image_token_id, (21,), generator=g).tolist()
    ids = [1, *text[:4], *[config.image_token_id] * config.image_seq_length, *text[4:]]
    input_ids = torch.tensor([ids], device=device)
    clean = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "pixel_values": pixels[:1]}
    corrupt = dict(clean, pixel_values=pixels[1:])
    answer, wrong = _top_answers(hf, clean, corrupt)
    description = "tiny LLaVA shape" if small else "LLaVA-1.5-7B shape"
    return Case("llava", f"{description}, random weights", model, clean, corrupt, answer, wrong,
                _sizes(hf))


def _top_answers(hf, clean: dict, corrupt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean run's top token, and the corrupted run's (its runner-up where they agree)."""
    with torch.no_grad():
        clean_logits = hf(**clean, use_cache=False).logits[:, -1].float()
        corrupt_logits = hf(**corrupt, use_cache=False).logits[:, -1].float()
    answer = clean_logits.argmax(-1)
    ranked = corrupt_logits.topk(2, dim=-1).indices
    wrong = torch.where(ranked[:, 0] == answer, ranked[:, 1], ranked[:, 0])
    return answer.cpu(), wrong.cpu()


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def _sizes(hf) -> dict:
    """The sizes of a LLaVA that the rows record."""
    text, vision = hf.config.text_config, hf.config.vision_config
    params = sum(p.numel() for p in hf.parameters())
    return {
        "params": params,
        "weights_gib": sum(p.numel() * p.element_size() for p in hf.parameters()) / GiB,
        "n_layers": text.num_hidden_layers, "d_model": text.hidden_size,
        "n_heads": text.num_attention_heads, "d_mlp": text.intermediate_size,
        "vocab_size": text.vocab_size, "vision_layers": vision.num_hidden_layers,
        "vision_d_model": vision.hidden_size, "vision_heads": vision.num_attention_heads,
        "vision_d_mlp": vision.intermediate_size, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "vision_feature_layer": hf.config.vision_feature_layer,
    }


# -- the nnsight loop --------------------------------------------------------------------------


def nnsight_sweep(peer: NNsight, case: Case, cells: list[tuple[int, int]], device: torch.device
                  ) -> tuple[torch.Tensor, float, float]:
    """Values ``[pair, cell]`` of the cells ``(layer, absolute position)`` by one trace each,
    the seconds of the clean trace and the seconds per cell."""
    layers = peer.model.language_model.layers
    n_layers = len(layers)
    rows = torch.arange(case.answer.shape[0], device=device)
    answer, wrong = case.answer.to(device), case.wrong.to(device)
    clean: list = []
    values: list = []
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        with peer.trace(**case.clean, use_cache=False):
            for layer in range(n_layers):  # nnsight serves requests in execution order
                clean.append(layers[layer].input.save())
        sync(device)
        clean_s = time.perf_counter() - start
        start = time.perf_counter()
        for layer, pos in cells:
            with peer.trace(**case.corrupt, use_cache=False):
                layers[layer].input[:, pos] = clean[layer][:, pos]
                logits = peer.output.logits[:, -1].float()
                values.append((logits[rows, answer] - logits[rows, wrong]).save())
        sync(device)
        per_cell_s = (time.perf_counter() - start) / len(cells)
    return torch.stack(values, dim=1), clean_s, per_cell_s


# -- measuring ---------------------------------------------------------------------------------


def _spread(items: list, n: int | None) -> list:
    """``n`` items evenly spaced over ``items``, first and last included (all when ``n`` is None
    or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def measure(case: Case, device: torch.device, *, image_tokens: int | None, nnsight_cells: int,
            repeats: int) -> dict:
    model = case.model
    mask = case.clean["attention_mask"]
    # The loop writes absolute positions and lets the model number them, as a user's would;
    # without padding these are mechinterp's positions (counted from the first real token).
    assert bool(mask.all()), "prompts must not be padded"
    image = model.image_positions(case.clean)
    positions = _spread(list(image), image_tokens)
    selector = select("resid_pre").layers().positions(*positions)
    metric = LogitDiff(case.answer, case.wrong)
    sweep = functools.partial(activation_patch, model, case.clean, case.corrupt, selector, metric,
                              progress=False)
    dtype = next(model._module.parameters()).dtype
    row = {"case": case.name, "model": case.description, "device": device_name(device),
           "dtype": str(dtype).removeprefix("torch."), "pairs": int(case.answer.shape[0]),
           "seq": int(case.clean["input_ids"].shape[1]), "image_tokens": len(image),
           "swept_image_tokens": len(positions), **case.sizes}

    ours, row["mechinterp_first_s"] = timed(device, sweep)
    row["cells"] = len(ours.sites)
    chosen = _spread(list(range(row["cells"])), nnsight_cells)
    cells = [(ours.sites[i].layer, ours.sites[i].pos) for i in chosen]

    peer = NNsight(model._module)
    nnsight_sweep(peer, case, cells[:1], device)  # warm-up
    reset_peak(device)
    theirs, row["nnsight_clean_s"], row["nnsight_per_cell_s"] = nnsight_sweep(
        peer, case, cells, device)
    row["nnsight_peak_gib"] = peak_gib(device)
    row["nnsight_cells"] = len(cells)
    row["nnsight_scaled"] = len(cells) < row["cells"]
    row["nnsight_s"] = row["nnsight_clean_s"] + row["nnsight_per_cell_s"] * row["cells"]

    expected = ours.values[:, chosen].float().cpu()
    theirs = theirs.float().cpu()
    scale = float(expected.abs().max())
    logit_scale = float(model.run(case.corrupt).logits[:, -1].float().abs().max())
    if dtype == torch.float32:
        rtol, atol = 1e-4, 1e-4 * max(scale, 1.0)
    else:
        # Batching changes bf16 rounding (~2**-8 of a value per operation) and a logit
        # difference inherits the logits' error, which grows with the logits, not the difference.
        rtol, atol = 5e-2, max(5e-2 * scale, 2**-4 * logit_scale)
    row.update({"max_abs_diff": float((theirs - expected).abs().max()), "value_scale": scale,
                "logit_scale": logit_scale, "rtol": rtol, "atol": atol,
                "value_range": float(ours.values.max() - ours.values.min()),
                "examples": [{"layer": cells[k][0], "pos": cells[k][1],
                              "mechinterp": float(expected[0, k]), "nnsight": float(theirs[0, k])}
                             for k in _spread(list(range(len(cells))), 3)]})
    torch.testing.assert_close(theirs, expected, rtol=rtol, atol=atol)

    reset_peak(device)
    seconds = [timed(device, sweep)[1] for _ in range(repeats)]
    row["mechinterp_peak_gib"] = peak_gib(device)
    row["mechinterp_s"] = statistics.median(seconds)
    row["speedup_vs_nnsight"] = row["nnsight_s"] / row["mechinterp_s"]
    return row


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def describe(row: dict) -> str:
    scaled = f" (scaled from {row['nnsight_cells']} cells)" if row["nnsight_scaled"] else ""
    lines = [
        (f"[{row['case']}] {row['model']}: {row['params'] / 1e6:.1f}M params, {row['dtype']}, "
         f"{row['device']}; {row['n_layers']} layers x {row['swept_image_tokens']} of "
         f"{row['image_tokens']} image tokens = {row['cells']} cells, {row['pairs']} pair(s) of "
         f"{row['seq']} tokens"),
        (f"  mechinterp {row['mechinterp_s']:.3f} s (first sweep {row['mechinterp_first_s']:.3f}"
         f" s), peak {_gib(row['mechinterp_peak_gib'])}"),
        (f"  nnsight {row['nnsight_per_cell_s'] * 1e3:.2f} ms per cell + clean trace "
         f"{row['nnsight_clean_s'] * 1e3:.1f} ms -> {row['nnsight_s']:.3f} s{scaled}, peak "
         f"{_gib(row['nnsight_peak_gib'])}"),
        (f"  nnsight time / mechinterp time = {row['speedup_vs_nnsight']:.2f}; values agree on "
         f"{row['nnsight_cells']} cells: max |diff| {row['max_abs_diff']:.3g} (scale "
         f"{row['value_scale']:.3g}, range over all cells {row['value_range']:.3g}, atol "
         f"{row['atol']:.3g})"),
    ]
    lines += [f"    layer {e['layer']} pos {e['pos']}: mechinterp {e['mechinterp']:+.6f}, "
              f"nnsight {e['nnsight']:+.6f}" for e in row["examples"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true",
                        help="a tiny LLaVA-shaped model instead of the 7B shape (CPU tests)")
    parser.add_argument("--image-tokens", type=int, default=None,
                        help="image positions swept, evenly spaced (default: all)")
    parser.add_argument("--nnsight-cells", type=int, default=64,
                        help="cells the nnsight loop runs, evenly spread; its time is scaled")
    parser.add_argument("--toy-pairs", type=int, default=16, help="prompt pairs of the toy VLM")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed mechinterp sweeps after the first (the median is reported)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    for name in ("image_tokens", "nnsight_cells", "toy_pairs", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {value}")
    device = torch.device(args.device)
    # fp32 values are compared tightly; TF32 would round differently in different batch shapes.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict = {"device": device_name(device), "torch": torch.__version__,
                 "transformers": transformers.__version__, "small": args.small, "rows": []}
    builders = {"toy-vlm": functools.partial(toy_case, device, args.toy_pairs),
                "llava": functools.partial(llava_case, device, small=args.small)}
    for name in CASES:
        if name not in args.cases:
            continue
        case = builders[name]()
        row = measure(case, device, image_tokens=args.image_tokens,
                      nnsight_cells=args.nnsight_cells, repeats=args.repeats)
        out["rows"].append(row)
        print(describe(row), flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.json, out)


if __name__ == "__main__":
    main()
