"""``mechinterp demo --model toy-vlm``: the shipped LLaVA toy, its image tokens and its circuit.

The model answers "what colour is the square ?" about 32 x 32 scenes of coloured shapes. Its
mechanism is known: the answer is read from the image tokens of the asked-about shape's cell.
The report measures accuracy, patches each cell's image tokens at each layer from the clean
scene into one where the shape was recoloured, and finds the circuit edge by edge.
"""

from __future__ import annotations

import time

import torch

from mechinterp.report import Report, Section
from mechinterp.sites import Site


def vlm_sections(report: Report, model, *, seed: int = 1234, cases: int = 64) -> None:
    """Add the toy VLM's sections to ``report``."""
    from mechinterp.zoo.train_toy_vlm import (
        accuracy,
        sample_qa,
    )

    batch = sample_qa(torch.Generator().manual_seed(seed), 256)
    scores = accuracy(model._module, model.tokenizer, batch, device=str(model.device))
    report.add(Section("Model", facts={
        "model": repr(model),
        "vision tower": f"{model.table.towers['vision'].n_layers} layers, 16 image tokens (8 x 8 patches)",
        "held-out accuracy (256 scenes)": f"{scores['all']:.3f} (colour questions "
                                          f"{scores['colour_questions']:.3f}, shape questions "
                                          f"{scores['shape_questions']:.3f})"}), data=scores)

    clean, corrupt, metric = recolour_pairs(model, seed=seed + 1, pairs=cases)
    _patching_section(report, model, clean, corrupt, metric)
    _circuit_section(report, model, clean, corrupt, metric)


def recolour_pairs(model, *, seed: int = 0, pairs: int = 64):
    """``(clean, corrupt, LogitDiff)``: colour questions about the shape in image cell 0, the
    corrupted scene recolouring that shape, scored by the clean answer against the new colour."""
    from mechinterp.patching import LogitDiff
    from mechinterp.zoo import shapes
    from mechinterp.zoo.train_toy_vlm import answer_ids, sample_mechanism_cases, vlm_inputs

    found = sample_mechanism_cases(torch.Generator().manual_seed(seed), 4 * pairs, ask="colour")
    rows = [i for i, cell in enumerate(found.target_cells) if cell == 0][:pairs]

    def inputs(scenes):
        return vlm_inputs(model.tokenizer, shapes.render_batch([scenes[i] for i in rows]),
                          [found.questions[i] for i in rows])

    metric = LogitDiff(answer_ids(model.tokenizer, [found.clean_answers[i] for i in rows]),
                       answer_ids(model.tokenizer, [found.corrupt_answers[i] for i in rows]))
    return inputs(found.clean), inputs(found.corrupted), metric


def _patching_section(report, model, clean, corrupt, metric) -> None:
    import matplotlib.pyplot as plt

    from mechinterp.patching import activation_patch
    from mechinterp.zoo import shapes

    image = model.image_positions(clean)
    layers = model.dims.n_layers
    sites = [Site("resid_pre", layer=layer,
                  pos=tuple(image[p] for p in shapes.cell_patches(cell, patch_size=8)))
             for layer in range(layers) for cell in range(shapes.N_CELLS)]
    start = time.perf_counter()
    result = activation_patch(model, clean, corrupt, sites, metric, progress=False)
    seconds = time.perf_counter() - start
    grid = torch.tensor([r["normalized"] for r in result.to_records()]).view(layers, shapes.N_CELLS)
    figure, ax = plt.subplots(figsize=(5, 2.2))
    shown = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xlabel("image cell (its 4 image tokens)")
    ax.set_ylabel("layer (resid_pre)")
    ax.set_xticks(range(shapes.N_CELLS))
    ax.set_yticks(range(layers))
    figure.colorbar(shown, ax=ax)
    name = report.save_figure(figure, "vlm_image_patching.png")
    facts = {
        "prompt pairs": f"{clean['input_ids'].shape[0]} colour questions about the shape in cell 0; the corrupted "
                        f"scene recolours that shape",
        "restoring cell 0's image tokens, per layer": ", ".join(f"{v:.3f}" for v in grid[:, 0].tolist()),
        "largest effect of any other cell": f"{float(grid[:, 1:].abs().max()):.3f}",
        "cells / time": f"{len(sites)} cells x {clean['input_ids'].shape[0]} pairs in {seconds:.2f} s",
    }
    report.add(Section("Image-token patching",
                       "Each cell restores the four image tokens of one image cell at one layer "
                       "from the clean scene; 1 recovers the clean answer's logit difference.",
                       facts, [name]), data={"grid": grid.tolist()})


def _circuit_section(report, model, clean, corrupt, metric) -> None:
    from mechinterp.circuits import CircuitTask, attribute_edges, faithfulness

    task = CircuitTask(model, clean, corrupt, metric=metric, progress=False)
    scores = attribute_edges(task, method="eap-ig")
    curve = faithfulness(task, scores, bootstrap=100)
    circuit = scores.top(6)
    kept = (task.evaluate(circuit.kept).mean() - curve.empty) / (curve.full - curve.empty)
    name = report.save_figure(circuit.plot(), "vlm_circuit.png")
    facts = {
        "top 6 EAP-IG edges": ", ".join(circuit.edges),
        "their faithfulness": f"{float(kept):.3f}",
        "faithfulness curve (MIB)": f"CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}",
    }
    report.add(Section("Circuit", "EAP-IG over the language model's edges; the image reaches it "
                       "through the embeddings (`embed`).", facts, [name]),
               data={"edges": circuit.edges, "faithfulness": float(kept), "cpr": curve.cpr})
