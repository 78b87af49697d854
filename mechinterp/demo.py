"""``mechinterp demo``: the pipeline run end to end on the shipped induction model.

The model is a 2-layer GPT-2 trained on repeated random spans, so its mechanism is known: a
previous-token head in layer 0 feeds an induction head in layer 1. The demo finds both from
their attention patterns, then confirms causally that zero-ablating either one destroys
in-context copying while ablating any other head does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechinterp.build import build_info
from mechinterp.heads import (
    induction_accuracy,
    induction_pairs,
    induction_scores,
    previous_token_scores,
    repeated_tokens,
)
from mechinterp.interventions import Zero
from mechinterp.loading import load
from mechinterp.model import InterpModel
from mechinterp.patching import LogitDiff, activation_patch, agreement, attribution_patch
from mechinterp.report import Report, Section
from mechinterp.sites import Site, select
from mechinterp.tracing import causal_trace


def run_demo(out: str | Path, *, model_name: str = "induction-2l", batch: int = 64,
             span: int = 12, seed: int = 1234, device: str = "cpu") -> Path:
    """Write the demo report into ``out``; returns the path of its ``index.html``."""
    report = Report(out, f"mechinterp demo: {model_name}")
    info = build_info()
    report.add(Section("Build", facts=info), data=info)

    model = load(model_name, device=device)
    if model.family == "unet":
        from mechinterp.demo_unet import unet_sections

        unet_sections(report, model, seed=seed)
        return report.write()
    if model.family == "llava":
        from mechinterp.demo_vlm import vlm_sections

        vlm_sections(report, model, seed=seed)
        return report.write()
    data = repeated_tokens(model, batch=batch, span=span, seed=seed)
    _model_section(report, model, data)
    prev, induction = previous_token_scores(model, data), induction_scores(model, data)
    _heads_section(report, prev, induction)
    _ablation_section(report, model, data, prev, induction)
    _patching_section(report, model, seed=seed)
    _tracing_section(report, model)
    _sae_section(report, model, data)
    _circuit_section(report, model)
    return report.write()


def _model_section(report: Report, model: InterpModel, data) -> None:
    logits = model.logits(data.tokens)
    accuracy = induction_accuracy(logits, data)
    d = model.dims
    facts = {
        "model": repr(model),
        "held-out sequences": f"{data.tokens.shape[0]} x [bos + {data.span} tokens repeated twice]",
        "induction accuracy (argmax, second repeat)": f"{accuracy:.4f}",
    }
    report.add(Section("Model", "A 2-layer GPT-2 trained on repeated random spans predicts the "
                       "second repeat by copying from the first.", facts),
               data={"accuracy": accuracy, "n_layers": d.n_layers, "n_heads": d.n_heads,
                     "d_model": d.d_model})


def _heads_section(report: Report, prev: torch.Tensor, induction: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, scores, title in ((axes[0], prev, "previous-token score"),
                              (axes[1], induction, "induction score")):
        image = ax.imshow(scores.numpy(), vmin=0, vmax=1, cmap="Blues")
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(scores.shape[1]))
        ax.set_yticks(range(scores.shape[0]))
        for (layer, head), value in _cells(scores):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=8)
        figure.colorbar(image, ax=ax, fraction=0.046)
    name = report.save_figure(figure, "head_scores.png")
    top_prev, top_induction = _argmax(prev[0:1]), _argmax(induction[1:2])
    facts = {
        "previous-token head (layer 0)": f"L0H{top_prev[1]} score {prev[0, top_prev[1]]:.3f}",
        "induction head (layer 1)": f"L1H{top_induction[1]} score {induction[1, top_induction[1]]:.3f}",
    }
    report.add(Section("Heads found from attention patterns",
                       "Mean attention one token back (previous-token) and, in the second repeat, "
                       "to the token after the earlier occurrence (induction).", facts, [name]),
               data={"previous_token": prev.tolist(), "induction": induction.tolist()})


def _ablation_section(report: Report, model: InterpModel, data, prev: torch.Tensor,
                      induction: torch.Tensor) -> None:
    import matplotlib.pyplot as plt

    clean = induction_accuracy(model.logits(data.tokens), data)
    d = model.dims
    heads = [(layer, head) for layer in range(d.n_layers) for head in range(d.n_heads)]
    accuracy = {}
    for layer, head in tqdm(heads, desc="ablating heads", leave=False):
        logits = model.logits(data.tokens, edits=[Zero(Site("head", layer=layer, head=head))])
        accuracy[f"L{layer}H{head}"] = induction_accuracy(logits, data)
    figure, ax = plt.subplots(figsize=(8, 3))
    ax.bar(list(accuracy), list(accuracy.values()), color="tab:orange")
    ax.axhline(clean, color="k", linestyle="--", label=f"no ablation ({clean:.3f})")
    ax.set_ylabel("induction accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    name = report.save_figure(figure, "head_ablation.png")
    prev_head = f"L0H{_argmax(prev[0:1])[1]}"
    induction_head = f"L1H{_argmax(induction[1:2])[1]}"
    facts = {
        "clean accuracy": f"{clean:.4f}",
        f"ablate {prev_head} (previous-token)": f"{accuracy[prev_head]:.4f}",
        f"ablate {induction_head} (induction)": f"{accuracy[induction_head]:.4f}",
        "ablate any other head (lowest)": f"{min(v for k, v in accuracy.items() if k not in (prev_head, induction_head)):.4f}",
    }
    report.add(Section("Zero-ablating each head",
                       "One forward per head with that head's output (the input of the attention "
                       "output projection) set to zero.", facts, [name]),
               data={"clean": clean, "ablated": accuracy})


def _patching_section(report: Report, model: InterpModel, *, seed: int, pairs: int = 32,
                      span: int = 12, k: int = 6) -> None:
    import matplotlib.pyplot as plt

    data = induction_pairs(model, pairs=pairs, span=span, k=k, seed=seed)
    metric = LogitDiff(data.answer, data.wrong)
    start = time.perf_counter()
    resid = activation_patch(model, data.clean, data.corrupt, select("resid_pre").layers().positions(),
                             metric, progress=False)
    heads = activation_patch(model, data.clean, data.corrupt, select("head").layers().heads(),
                             metric, progress=False)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    estimates = [attribution_patch(model, data.clean, data.corrupt, result.sites, metric,
                                   progress=False) for result in (resid, heads)]
    atp_seconds = time.perf_counter() - start
    atp = [agreement(exact, estimate) for exact, estimate in zip((resid, heads), estimates)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    resid.plot(ax=axes[0])
    axes[0].set_title("resid_pre, normalised logit difference")
    heads.plot(ax=axes[1])
    axes[1].set_title("head outputs (all positions)")
    axes[1].set_xlabel("head")
    name = report.save_figure(figure, "activation_patching.png")
    resid_grid, _, resid_labels = resid.grid(normalized=True)
    head_grid, _, _ = heads.grid(normalized=True)
    top_layer, top_head = divmod(int(head_grid.argmax()), head_grid.shape[1])
    changed = resid_labels["pos"][data.changed]
    facts = {
        "prompt pairs": f"{pairs} x {data.clean.shape[1]} tokens; the corrupted prompt replaces the "
                        f"token at position {changed} (the earlier occurrence of the answer)",
        "logit difference answer - wrong": f"clean {float(resid.clean.mean()):.2f}, corrupted "
                                           f"{float(resid.corrupt.mean()):.2f}",
        f"resid_pre at position {changed}, layers 0 and 1": ", ".join(
            f"{float(v):.3f}" for v in resid_grid[:, data.changed]),
        "largest effect of any other resid_pre cell": f"{float(_without_column(resid_grid, data.changed).abs().max()):.3f}",
        "head whose output restores the most": f"L{top_layer}H{top_head}: {float(head_grid.max()):.3f}",
        "cells / time": f"{len(resid.sites) + len(heads.sites)} cells x {pairs} pairs in {seconds:.2f} s",
        "attribution patching (AtP) vs exact, resid_pre": _agreement_text(atp[0]),
        "attribution patching (AtP) vs exact, heads": _agreement_text(atp[1]),
        "AtP time (one forward and one backward per pass)": f"{atp_seconds:.2f} s",
    }
    report.add(Section("Activation patching",
                       "Each cell runs the corrupted prompt with one site's activation taken from "
                       "the clean prompt; 1 means the clean logit difference is fully restored, 0 "
                       "means no effect. The answer's identity lives at its earlier position until "
                       "the induction head moves it to the last position.", facts, [name]),
               data={"resid_pre": resid.to_records(), "head": heads.to_records(),
                     "atp_agreement": {"resid_pre": atp[0], "head": atp[1]},
                     "clean": resid.clean.tolist(), "corrupt": resid.corrupt.tolist()})


def _tracing_section(report: Report, model: InterpModel, *, prompt: str = "fuba bu mabi fafi vetu fuba bu mabi",
                     subject: str = "fafi") -> None:
    start = time.perf_counter()
    trace = causal_trace(model, prompt, subject, samples=10, progress=False)
    seconds = time.perf_counter() - start
    name = report.save_figure(trace.plot(), "causal_trace.png")
    hidden = trace.table("hidden")
    last = len(trace.tokens) - 1
    facts = {
        "prompt": f"{prompt!r}; noised subject {subject!r} at position {trace.subject[0]}",
        "answer": f"{trace.answer_text.strip()!r}: clean p = {trace.base:.3f}, noised p = {trace.low:.3f}",
        "restore the subject's layer-0 output": f"p = {float(hidden[trace.subject[0], 0]):.3f}",
        "restore the subject's layer-1 output (after the induction head read it)":
            f"p = {float(hidden[trace.subject[0], 1]):.3f}",
        "restore the last position's layer-1 output": f"p = {float(hidden[last, 1]):.3f}",
        "runs / time": f"{len(trace.kinds) * hidden.numel()} restorations x {trace.samples} noise "
                       f"draws in {seconds:.2f} s",
    }
    report.add(Section("Causal tracing",
                       "ROME's causal tracing: Gaussian noise (3 standard deviations of the "
                       "embeddings) on the subject token, then one state at a time restored to "
                       "its clean value; the colour is the probability of the clean answer.",
                       facts, [name]),
               data={"records": trace.to_records(), "base": trace.base, "low": trace.low})


def _sae_section(report: Report, model: InterpModel, data, *, per_kind: int = 4,
                 n_examples: int = 10) -> None:
    from mechinterp.zoo import zoo_sae

    sae = zoo_sae("induction-2l-sae", device=model.device)
    component, layer = sae.hook_name.rsplit(".", 1)
    site = Site(component, layer=int(layer))
    x = model.cache(data.tokens, [site])[site].to(sae.dtype)  # [batch, pos, d_model]
    acts = sae.encode(x)  # [batch, pos, d_sae]
    fvu = float((sae.decode(acts) - x).pow(2).sum() / (x - x.mean(dim=(0, 1))).pow(2).sum())
    l0 = float((acts > 0).sum(-1).float().mean())
    frequency = (acts > 0).float().mean(dim=(0, 1))
    ids = data.tokens.input_ids.to(acts.device)
    words = model.tokenizer.convert_ids_to_tokens(list(range(model.dims.d_vocab)))
    # -1 marks "no word": special tokens, and the (missing) word before the first position.
    special = torch.tensor(model.tokenizer.all_special_ids, device=ids.device)
    current = ids.masked_fill(torch.isin(ids, special), -1)
    previous = torch.cat([torch.full_like(ids[:, :1], -1), current[:, :-1]], dim=1)
    # Each latent's strongest activations: [n_examples, d_sae] values and flat (row, pos) indices.
    strength, where = acts.flatten(0, 1).topk(n_examples, dim=0)
    word_of = {}  # kind -> [d_sae] the word a latent stands for, or -1
    for kind, label in (("current", current), ("previous", previous)):
        top = label.flatten()[where]
        # A latent stands for a word when all its strongest activations sit on that word.
        same = ((top == top[:1]) & (strength > 0)).all(dim=0) & (top[0] >= 0)
        word_of[kind] = torch.where(same, top[0], -1)
    by_frequency = frequency.argsort(descending=True).tolist()
    facts = {
        "SAE": f"induction-2l-sae: TopK, {sae.d_sae} latents, k = {sae.k}, reads {site}",
        "FVU / mean L0 on these sequences": f"{fvu:.4f} / {l0:.2f}",
        "latents active on these sequences": f"{int((frequency > 0).sum())} of {sae.d_sae}",
        f"latents whose {n_examples} strongest activations share the current word":
            int((word_of["current"] >= 0).sum()),
        f"latents whose {n_examples} strongest activations share the previous word":
            int((word_of["previous"] >= 0).sum()),
        "most frequent latents": ", ".join(
            f"{f} ({float(frequency[f]):.1%})" for f in by_frequency[:4]),
    }
    width = ids.shape[1]
    features = []
    for kind in ("current", "previous"):
        for feature in [f for f in by_frequency if word_of[kind][f] >= 0][:per_kind]:
            word = words[int(word_of[kind][feature])]
            contexts = []
            for value, flat in zip(strength[:3, feature].tolist(), where[:3, feature].tolist()):
                row, pos = divmod(flat, width)
                before = " ".join(words[t] for t in ids[row, max(0, pos - 3):pos].tolist())
                contexts.append({"text": f"{before} [{words[int(ids[row, pos])]}]".strip(),
                                 "activation": value})
            features.append({"feature": feature, "frequency": float(frequency[feature]),
                             "word": word, "kind": kind, "top_contexts": contexts})
            facts[f"feature {feature} ({float(frequency[feature]):.1%} of tokens)"] = (
                f"{kind} word {word!r}; strongest: " + ", ".join(
                    f"'{c['text']}' {c['activation']:.2f}" for c in contexts))
    report.add(Section("Sparse autoencoder features",
                       "The shipped TopK SAE (trained by mechinterp.zoo.train_sae on the model's "
                       "training mix) encodes the residual stream after layer 0, which the "
                       "induction head reads. Many latents stand for one word: the current one, "
                       "from the embedding, or the previous one, written by the previous-token "
                       "head. Below, the most frequent latents of each kind with their strongest "
                       "activations; the bracketed word is where the latent fires.", facts),
               data={"fvu": fvu, "mean_l0": l0, "n_examples": n_examples,
                     "current_word_latents": int((word_of["current"] >= 0).sum()),
                     "previous_word_latents": int((word_of["previous"] >= 0).sum()),
                     "features": features})


def _circuit_section(report: Report, model: InterpModel, *, pairs: int = 32) -> None:
    from mechinterp.circuits import CircuitTask, acdc, attribute_edges, faithfulness, roc_auc
    from mechinterp.circuits.induction import induction_circuit, induction_task
    from mechinterp.patching import KL

    task = induction_task(model, pairs=pairs, progress=False)
    graph = task.graph
    truth = graph.mask_of(induction_circuit())
    start = time.perf_counter()
    scores = attribute_edges(task, method="eap-ig", steps=5)
    seconds = time.perf_counter() - start
    exact = attribute_edges(task, method="exact")
    curve = faithfulness(task, scores, bootstrap=200)
    circuit = scores.top(int(truth.sum()))
    kept = (task.evaluate(circuit.kept).mean() - curve.empty) / (curve.full - curve.empty)
    # ACDC prunes on the KL divergence from the clean run, as in its paper.
    kl_task = CircuitTask(model, task.clean, task.corrupt, metric=KL(), progress=False)
    found = acdc(kl_task, threshold=0.1)
    # The same search with removed edges reading zero, the mean, or another prompt instead.
    by_ablation = {"corrupt": (curve.cpr, curve.cmd)}
    for ablation in ("zero", "mean", "resample"):
        other = induction_task(model, pairs=pairs, ablation=ablation, progress=False)
        other_curve = faithfulness(other, attribute_edges(other, method="eap-ig"), bootstrap=0)
        by_ablation[ablation] = (other_curve.cpr, other_curve.cmd)
    figure = circuit.plot()
    name = report.save_figure(figure, "circuit.png")
    curve_name = report.save_figure(curve.plot(), "circuit_faithfulness.png")
    estimate, truth_scores = scores.scores[graph.valid], exact.scores[graph.valid]
    pearson = float(torch.corrcoef(torch.stack([estimate, truth_scores]))[0, 1])
    overlap = int((found.kept & truth).sum())
    facts = {
        "graph": f"{graph.n_sources} sources, {graph.n_destinations} destinations (q, k, v "
                 f"inputs separate), {graph.n_edges} edges",
        "prompt pairs": f"{pairs}: half corrupt the earlier answer token, half the token before it",
        "EAP-IG (5 steps) time": f"{seconds:.2f} s",
        "EAP-IG vs exact edge patching (Pearson over edges)": f"{pearson:.3f}",
        "ROC-AUC against the known induction circuit": f"EAP-IG {roc_auc(scores, truth):.3f}, "
                                                        f"exact {roc_auc(exact, truth):.3f}",
        f"top {circuit.n_edges} EAP-IG edges": ", ".join(circuit.edges),
        "their faithfulness": f"{float(kept):.3f}",
        "faithfulness curve (MIB)": f"CPR {curve.cpr:.3f} [{curve.cpr_interval[0]:.3f}, "
                                    f"{curve.cpr_interval[1]:.3f}], CMD {curve.cmd:.3f}",
        "CPR / CMD by what removed edges read": ", ".join(
            f"{ablation} {cpr:.3f} / {cmd:.3f}" for ablation, (cpr, cmd) in by_ablation.items()),
        "ACDC (KL, threshold 0.1)": f"{found.n_edges} edges, {overlap} of the "
                                    f"{int(truth.sum())} known ones, {found.info['forwards']} "
                                    f"forwards in {found.info['seconds']:.2f} s",
    }
    report.add(Section("Circuit discovery",
                       "Every edge of the model's graph (a source's output as read by one "
                       "destination: a head's query, key or value input, an MLP, the logits) "
                       "scored by EAP-IG, and the top edges drawn. The known circuit: the "
                       "previous-token head's output reaches the induction head's key, the "
                       "induction head copies the token (read from the embeddings and MLP 0) to "
                       "the logits.", facts, [name, curve_name]),
               data={"edges": circuit.to_dict()["edges"], "cpr": curve.cpr, "cmd": curve.cmd,
                     "roc_auc": roc_auc(scores, truth), "acdc_edges": found.edges,
                     "cpr_cmd_by_ablation": by_ablation,
                     "faithfulness": curve.faithfulness.tolist(), "fractions": curve.fractions})


def _agreement_text(scores: dict[str, float]) -> str:
    return (f"Pearson {scores['pearson']:.3f}, Spearman {scores['spearman']:.3f}, "
            f"top-10% overlap {scores['top10_overlap']:.2f}")


def _without_column(grid: torch.Tensor, column: int) -> torch.Tensor:
    keep = [c for c in range(grid.shape[1]) if c != column]
    return grid[:, keep]


def _cells(scores: torch.Tensor):
    for layer in range(scores.shape[0]):
        for head in range(scores.shape[1]):
            yield (layer, head), float(scores[layer, head])


def _argmax(scores: torch.Tensor) -> tuple[int, int]:
    flat = int(scores.argmax())
    return divmod(flat, scores.shape[1])
