"""Circuit discovery: mechinterp's EAP-IG and ACDC against auto-circuit on the same weights.

Sections (``--sections``, default all):

- ``eap-ig``: GPT-2-small architecture (12 layers, 12 heads, d_model 768, vocab 50257) with
  seeded random weights, an IOI-style set of 100 prompt pairs of 15 random tokens (clean: names
  A, B, B at fixed places; corrupt: two other names C, D, D), metric = logit difference A - B at
  the last position. The same weights are loaded into a TransformerLens ``HookedTransformer``
  for auto-circuit (Miller et al. 2024; factorized graph with separate q/k/v inputs, the graph
  mechinterp uses). Timed: mechinterp ``eap-ig`` (Hanna et al. 2024, embeddings interpolated,
  ``--steps`` gradients) and ``eap-ig-activations``; auto-circuit ``mask_gradient_prune_scores``
  with ``integrated_grad_samples=--ac-samples`` (every edge's mask moves from 0 to 1 together:
  ``samples + 1`` gradients). Agreement of the scores over the matched edges (Pearson,
  Spearman, top-k overlap) and peak CUDA memory of each.
- ``acdc``: ACDC (Conmy et al. 2023) on the shipped ``induction-2l`` model with
  ``induction_pairs(pairs=32, span=8, k=4, seed=0)``, KL to the clean run at the last position,
  one threshold for both (``--acdc-threshold``), all 32 pairs in one batch (auto-circuit's
  ACDC reads only the first batch): forwards per edge (counted at the unembedding), wall time,
  the circuits' sizes and overlap. auto-circuit starts each forward at the destination's block
  from the cached clean residual stream; mechinterp runs the whole model. auto-circuit visits
  the edges of a layer in a set's order (which depends on ``PYTHONHASHSEED``); it is given
  mechinterp's order (the same algorithm, the same sequence of decisions: the circuits can be
  compared edge for edge) unless ``--ac-native-order``.
- ``llama``: memory of mechinterp EAP-IG on a 1B-parameter-shaped Llama (hidden 2048, 16 layers,
  32 heads, 8 key/value heads, intermediate 8192, vocab 32000, random bf16), 16 prompt pairs of
  32 tokens, CUDA only (with ``--small``, a tiny Llama on any device, to test the code path).
- ``bert``: mechinterp EAP-IG on a post-LayerNorm encoder, the BERT-base architecture (12
  layers, 12 heads, d_model 768, intermediate 3072, vocab 30522, ``BertForMaskedLM``, seeded
  random weights, fp32), with the ``eap-ig`` section's IOI-style pairs (100 x 15 tokens) scored
  at the last position. No peer attributes edges of post-LayerNorm models, so this reports time
  and peak memory (and the cost against the same run on GPT-2 small when both sections run).

Correctness before timing, in every section: TransformerLens's logits equal transformers' on the
same weights; mechinterp's full graph is the clean run and its empty graph the corrupted run;
auto-circuit's graph with every edge patched is the corrupted run; the edge sets match one to
one under the name mapping (auto-circuit ``"A0.1->A1.3.K"`` is mechinterp ``"a0.h1->a1.h3.k"``,
``"Resid Start"`` is ``embed``, ``"MLP 0"`` is ``m0``, ``"Resid End"`` is ``logits``); and plain
EAP (one gradient at the clean run: auto-circuit ``mask_val=0``) agrees between the two to
float rounding, which pins the mapping, the sign (auto-circuit differentiates minus the logit
difference) and the scale.

Both models run with frozen weights (``requires_grad_(False)``, as auto-circuit's own
``load_tl_model`` does). Timings: one warm-up call, then the best and the median of
``--repeats`` calls, each from prompts to scores (mechinterp's time includes building the
``CircuitTask``, i.e. its clean and corrupted recording forwards; auto-circuit's includes its
corrupted recording forward; wrapping the model with ``patchable_model`` is setup, not timed).

auto-circuit 1.0.1 imports plotly (a figure template and a type hint) and blobfile (loading
OpenAI's SAE weights) at module level; where they are missing, placeholder modules stand in.
It also imports ``HookedTransformerKeyValueCache``, which TransformerLens 3 renamed
``TransformerLensKeyValueCache``: the old name is aliased (only type hints and a KV-cache option
that is not used here refer to it).

Run: ``python benchmarks/bench_circuits.py --out circuits.json``
(on a CPU: ``--small`` for tiny configurations).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import types

os.environ.setdefault("TQDM_DISABLE", "1")  # auto-circuit draws progress bars unconditionally

import torch
import transformers
from _peers import transformer_lens_gpt2
from _timing import device_name, times, write_json
from _timing import peak_extra_gib as peak_gib

import mechinterp
from mechinterp.circuits import CircuitTask, acdc, attribute_edges
from mechinterp.heads import induction_pairs
from mechinterp.patching import KL, LogitDiff

GiB = float(1 << 30)
SECTIONS = ("eap-ig", "acdc", "llama", "bert")


# -- auto-circuit ------------------------------------------------------------------------------


def import_auto_circuit():
    """auto-circuit's entry points as a namespace, or why they cannot be imported."""
    try:
        import transformer_lens
    except ImportError as error:
        return f"transformer_lens: {error}"
    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        # TransformerLens 3 renamed the class and removed its module; auto-circuit only names it.
        cache = transformer_lens.TransformerLensKeyValueCache
        transformer_lens.HookedTransformerKeyValueCache = cache
        module = types.ModuleType("transformer_lens.past_key_value_caching")
        module.HookedTransformerKeyValueCache = cache
        sys.modules.setdefault("transformer_lens.past_key_value_caching", module)
    stubbed = []
    for _ in range(4):
        try:
            from auto_circuit.data import PromptDataLoader, PromptDataset
            from auto_circuit.prune_algos.ACDC import acdc_prune_scores
            from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
            from auto_circuit.utils.ablation_activations import src_ablations
            from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
        except ModuleNotFoundError as error:
            if error.name not in ("plotly", "blobfile") or error.name in stubbed:
                return str(error)
            _stub(error.name)
            stubbed.append(error.name)
        except Exception as error:  # noqa: BLE001 - any import failure means "not available"
            return f"{type(error).__name__}: {error}"
        else:
            from importlib.metadata import PackageNotFoundError, version

            try:
                release = version("auto-circuit")
            except PackageNotFoundError:
                release = "(version unknown)"
            return types.SimpleNamespace(
                PromptDataLoader=PromptDataLoader, PromptDataset=PromptDataset,
                acdc_prune_scores=acdc_prune_scores,
                mask_gradient_prune_scores=mask_gradient_prune_scores,
                src_ablations=src_ablations, patch_mode=patch_mode,
                patchable_model=patchable_model, set_all_masks=set_all_masks,
                version=release, stubbed=stubbed)
    return "auto_circuit did not import"


def _stub(name: str) -> None:
    """A placeholder for a module auto-circuit imports for figures or SAE files only."""
    if name == "blobfile":
        module = types.ModuleType("blobfile")
        module.BlobFile = None
        sys.modules["blobfile"] = module
        return

    class Templates(dict):
        def __missing__(self, key):
            font = types.SimpleNamespace()
            value = self[key] = types.SimpleNamespace(layout=types.SimpleNamespace(font=font))
            return value

    plotly = types.ModuleType("plotly")
    plotly.io = types.ModuleType("plotly.io")
    plotly.io.templates = Templates()
    plotly.graph_objects = types.ModuleType("plotly.graph_objects")
    plotly.graph_objects.Figure = type("Figure", (), {})
    sys.modules.update({"plotly": plotly, "plotly.io": plotly.io,
                        "plotly.graph_objects": plotly.graph_objects})


def hooked_gpt2(hf, device: torch.device):
    """A TransformerLens HookedTransformer with ``hf``'s weights, set up as auto-circuit's
    ``load_tl_model`` sets it up (head results, split q/k/v inputs, MLP inputs; frozen)."""
    tl = transformer_lens_gpt2(hf, device, next(hf.parameters()).dtype, use_attn_result=True,
                               use_split_qkv_input=True, use_hook_mlp_in=True)
    return tl.requires_grad_(False)


def peer_graph(ac, hf, clean: torch.Tensor, graph, device: torch.device, row: dict):
    """auto-circuit's patchable model of ``hf`` and its edge map onto ``graph``, after checking
    that TransformerLens computes ``hf``'s logits (recorded in ``row``)."""
    tl = hooked_gpt2(hf, device)
    with torch.no_grad():
        reference = hf(clean).logits
        row["tl_vs_hf_logits_max_abs"] = float((tl(clean) - reference).abs().max())
    assert row["tl_vs_hf_logits_max_abs"] <= 1e-4 * max(1.0, float(reference.abs().max())), row
    patchable = ac.patchable_model(tl, factorized=True, slice_output="last_seq",
                                   separate_qkv=True, device=device)
    edge_map = EdgeMap(patchable, graph)
    row.update(edge_map.counts)
    return tl, patchable, edge_map


def node_name(name: str) -> str:
    """mechinterp's name of an auto-circuit node: ``"A1.3.K"`` -> ``"a1.h3.k"``."""
    fixed = {"Resid Start": "embed", "Resid End": "logits"}
    if name in fixed:
        return fixed[name]
    if name.startswith("MLP "):
        return f"m{int(name[4:])}"
    layer, head, *part = name.split(".")
    return f"a{int(layer[1:])}.h{int(head)}" + (f".{part[0].lower()}" if part else "")


class EdgeMap:
    """auto-circuit's edges matched to mechinterp's ``[source, destination]`` entries."""

    def __init__(self, patchable, graph):
        self.graph = graph
        self.edges = list(patchable.edges)
        self.names = [f"{node_name(e.src.name)}->{node_name(e.dest.name)}" for e in self.edges]
        ours = set(graph.edges())
        self.counts = {"auto_circuit_edges": len(self.edges), "mechinterp_edges": graph.n_edges,
                       "unmatched_auto_circuit": sorted(set(self.names) - ours)[:10],
                       "unmatched_mechinterp": sorted(ours - set(self.names))[:10]}
        if len(set(self.names)) != len(self.names) or set(self.names) != ours:
            msg = f"the edge sets differ: {self.counts}"
            raise AssertionError(msg)
        index = torch.tensor([graph.edge_index(name) for name in self.names])
        self.source, self.destination = index[:, 0], index[:, 1]
        self.by_name = dict(zip(self.names, self.edges, strict=True))

    def matrix(self, prune_scores: dict) -> torch.Tensor:
        """auto-circuit's per-module scores as a ``[source, destination]`` float64 matrix."""
        flat = {key: value.detach().double().cpu() for key, value in prune_scores.items()}
        values = torch.tensor([float(flat[e.dest.module_name][e.patch_idx]) for e in self.edges],
                              dtype=torch.float64)
        out = torch.zeros(self.graph.n_sources, self.graph.n_destinations, dtype=torch.float64)
        out[self.source, self.destination] = values
        return out

    def in_order_of(self, graph) -> list:
        """auto-circuit's edges in the order mechinterp's ACDC visits them."""
        return [self.by_name[graph.edge_name((s, d))]
                for d in reversed(range(graph.n_destinations))
                for s in reversed(range(graph.sources_before(d)))]


def ac_loader(ac, clean, corrupt, answer, wrong, batch_size: int):
    dataset = ac.PromptDataset(clean, corrupt, [a[None] for a in answer], [w[None] for w in wrong])
    return ac.PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size,
                               shuffle=False)


def ac_all_patched(ac, patchable, clean, corrupt) -> torch.Tensor:
    """auto-circuit's logits on ``clean`` with every edge patched from ``corrupt``."""
    with torch.no_grad():
        patch = ac.src_ablations(patchable, corrupt)
        ac.set_all_masks(patchable, val=1.0)
        try:
            with ac.patch_mode(patchable, patch):
                return patchable(clean)
        finally:
            ac.set_all_masks(patchable, val=0.0)


# -- measuring ---------------------------------------------------------------------------------


def timed(device: torch.device, fn, repeats: int) -> dict:
    """Best and median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    seconds = times(device, fn, repeats)
    return {"best_s": min(seconds), "median_s": statistics.median(seconds)}


def count_calls(module: torch.nn.Module, fn) -> tuple[object, int]:
    """``fn()`` and how many times it ran ``module`` (the unembedding: one per forward)."""
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        handle.remove()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (Spearman's convention)."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def agreement(a: torch.Tensor, b: torch.Tensor, top: int) -> dict:
    """Pearson and Spearman of two score vectors, and the overlap of their top-|score| sets."""
    a, b = a.double(), b.double()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])
    top_a = set(a.abs().argsort(descending=True)[:top].tolist())
    top_b = set(b.abs().argsort(descending=True)[:top].tolist())
    return {"pearson": pearson, "spearman": spearman, "top_k": top,
            "top_k_overlap": len(top_a & top_b) / top}


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[:, -1].double()
    return last[rows, answer.to(logits.device)] - last[rows, wrong.to(logits.device)]


def ioi_pairs(n: int, seq: int, vocab: int, seed: int = 0):
    """IOI-shaped random prompts: ``A`` at 2, ``B`` at 4 and 9 (the repeated subject), the answer
    ``A`` and the wrong answer ``B`` at the last position; the corrupted prompt has two other
    names ``C, D`` in the same places (the "ABC" corruption of Wang et al. 2023)."""
    g = torch.Generator().manual_seed(seed)
    names = torch.randperm(vocab - 10, generator=g)[:50] + 10
    clean = torch.randint(10, vocab, (n, seq), generator=g)
    pick = names[torch.stack([torch.randperm(len(names), generator=g)[:4] for _ in range(n)])]
    a, b, c, d = pick.T
    corrupt = clean.clone()
    for column, clean_name, corrupt_name in ((2, a, c), (4, b, d), (9, b, d)):
        clean[:, column], corrupt[:, column] = clean_name, corrupt_name
    return clean, corrupt, a.clone(), b.clone()


def _check_task(task, hf, clean, corrupt, answer, wrong, *, tol: float, empty_tol: float) -> dict:
    """The full graph is the clean run and the empty graph the corrupted run (``empty_tol``
    allows for the per-head projections, which round differently from the fused one)."""
    valid = task.graph.valid
    full, empty = task.evaluate(torch.stack([valid, torch.zeros_like(valid)]))
    with torch.no_grad():
        expected_full = logit_diff(hf(clean).logits, answer, wrong).cpu()
        expected_empty = logit_diff(hf(corrupt).logits, answer, wrong).cpu()
    out = {"full_graph_vs_clean_max_abs": float((full - expected_full).abs().max()),
           "empty_graph_vs_corrupt_max_abs": float((empty - expected_empty).abs().max()),
           "clean_metric_mean": float(expected_full.mean()),
           "corrupt_metric_mean": float(expected_empty.mean())}
    scale = max(1.0, float(expected_full.abs().max()))
    assert out["full_graph_vs_clean_max_abs"] <= tol * scale, out
    assert out["empty_graph_vs_corrupt_max_abs"] <= empty_tol * scale, out
    return out


# -- a. EAP-IG on GPT-2 small ------------------------------------------------------------------


def bench_eap_ig(args, device: torch.device, ac) -> dict:
    if args.small:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000,
                                          n_positions=64)
    else:
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    n_pairs = args.pairs
    batch = args.batch_size or n_pairs
    if n_pairs % batch:
        msg = (f"--batch-size must divide --pairs (auto-circuit drops a last partial batch); "
               f"got {batch} for {n_pairs}")
        raise SystemExit(msg)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval().to(device).requires_grad_(False)
    model = mechinterp.load(hf)
    pairs = ioi_pairs(n_pairs, 15, config.vocab_size)
    clean, corrupt, answer, wrong = (t.to(device) for t in pairs)
    row = {"model": f"gpt2 {config.n_layer}L d{config.n_embd} h{config.n_head} "
                    f"v{config.vocab_size}",
           "dtype": "float32", "pairs": n_pairs, "seq": 15, "batch_size": batch,
           "steps": args.steps}

    def make_task():
        return CircuitTask(model, clean, corrupt, metric=LogitDiff(answer, wrong),
                           batch_size=batch, progress=False)

    task = make_task()
    graph = task.graph
    row["n_edges"] = graph.n_edges
    row.update(_check_task(task, hf, clean, corrupt, answer, wrong, tol=1e-5, empty_tol=1e-3))

    def ours(method):
        return attribute_edges(make_task(), method=method, steps=args.steps).scores

    if isinstance(ac, str):
        row["auto_circuit"] = f"unavailable: {ac}"
    else:
        tl, patchable, edge_map = peer_graph(ac, hf, clean, graph, device, row)
        with torch.no_grad():
            patched = ac_all_patched(ac, patchable, clean, corrupt)
            row["ac_all_patched_vs_corrupt_max_abs"] = float((patched - tl(corrupt)).abs().max())
        scale = max(1.0, float(patched.abs().max()))
        assert row["ac_all_patched_vs_corrupt_max_abs"] <= 1e-4 * scale, row
        loader = ac_loader(ac, clean, corrupt, answer, wrong, batch)
        n_batches = n_pairs // batch

        def theirs(**kwargs):
            return ac.mask_gradient_prune_scores(patchable, loader, None, grad_function="logit",
                                                 answer_function="avg_diff", **kwargs)

        # EAP: the same first-order estimate in both; auto-circuit's loss is minus the mean
        # logit difference of each batch, summed over batches.
        eap_ours = attribute_edges(task, method="eap").scores[graph.valid]
        eap_theirs = -edge_map.matrix(theirs(mask_val=0.0))[graph.valid] / n_batches
        error = float((eap_ours - eap_theirs).abs().max() / eap_ours.abs().max())
        row["eap_max_rel_diff"] = error
        row["eap_pearson"] = float(torch.corrcoef(torch.stack([eap_ours, eap_theirs]))[0, 1])
        assert error < 1e-3, f"EAP differs between mechinterp and auto-circuit: {error:.2e}"

    # Timing and memory.
    top = max(1, min(100, graph.n_edges // 10))
    scores = {}
    for method in ("eap-ig", "eap-ig-activations"):
        key = "ours" if method == "eap-ig" else "ours_activations"
        fn = functools.partial(ours, method)
        row.update({f"{key}_{k}": v for k, v in timed(device, fn, args.repeats).items()})
        row[f"{key}_peak_gib"] = peak_gib(device, fn)
        scores[key] = fn()[graph.valid]
    # Completeness: the embeddings move from corrupted to clean, so their edges' scores add up
    # to (about, with ``steps`` gradients) the change of the metric from the clean to the
    # corrupted run.
    row["metric_change_empty_minus_full"] = float(task.reference.empty.mean()
                                                  - task.reference.full.mean())
    row["ours_embed_edges_sum"] = float(scores["ours"][: int(graph.valid[0].sum())].sum())
    row["ours_gradients"] = args.steps
    if not isinstance(ac, str):
        samples = args.ac_samples
        fn = functools.partial(theirs, integrated_grad_samples=samples)
        row.update({f"ac_{k}": v for k, v in timed(device, fn, args.repeats).items()})
        row["ac_peak_gib"] = peak_gib(device, fn)
        row["ac_gradients"] = samples + 1
        # Mean over the samples + 1 gradients, the sign and the batch sum as in EAP above.
        theirs_ig = -edge_map.matrix(fn())[graph.valid] / (samples + 1) / n_batches
        row["speedup_vs_ac"] = row["ac_median_s"] / row["ours_median_s"]
        row["memory_ratio_vs_ac"] = row["ours_peak_gib"] / row["ac_peak_gib"] \
            if device.type == "cuda" else float("nan")
        for key, ours_scores in scores.items():
            agree = agreement(ours_scores, theirs_ig, top)
            row.update({f"{key}_vs_ac_{k}": v for k, v in agree.items()})
        # Completeness: every mask moves together, so all of auto-circuit's scores add up to
        # (about, with a Riemann sum) the change of the metric from the clean to the corrupted run.
        row["ac_all_edges_sum"] = float(theirs_ig.sum())
    row["ours_vs_activations_pearson"] = agreement(scores["ours"], scores["ours_activations"],
                                                   top)["pearson"]
    return row


# -- b. ACDC on the induction model ------------------------------------------------------------


def bench_acdc(args, device: torch.device, ac) -> dict:
    model = mechinterp.load("induction-2l", device=device)
    hf = model._module.eval().requires_grad_(False)
    data = induction_pairs(model, pairs=32, span=8, k=4, seed=0)
    clean, corrupt = data.clean.input_ids.to(device), data.corrupt.input_ids.to(device)
    threshold = args.acdc_threshold
    row = {"model": "induction-2l", "pairs": clean.shape[0], "seq": clean.shape[1],
           "metric": "KL(clean || circuit) at the last position", "threshold": threshold}

    def make_task():
        return CircuitTask(model, clean, corrupt, metric=KL(), progress=False)

    task = make_task()
    graph = task.graph
    row["n_edges"] = graph.n_edges
    valid = graph.valid
    full, empty = task.evaluate(torch.stack([valid, torch.zeros_like(valid)])).mean(dim=1)
    with torch.no_grad():
        reference = hf(clean).logits[:, -1].double().log_softmax(-1)
        corrupted = hf(corrupt).logits[:, -1].double().log_softmax(-1)
        expected = (reference.exp() * (reference - corrupted)).sum(-1).mean()
    row["full_graph_kl"] = float(full)
    row["empty_graph_kl"], row["corrupt_run_kl"] = float(empty), float(expected)
    assert abs(float(full)) < 1e-5, row
    assert abs(float(empty) - float(expected)) < 1e-4 * max(1.0, float(expected)), row

    circuit = acdc(task, threshold=threshold)
    # Edge trials (one per edge, plus the speculative ones discarded after a kept edge) and
    # the batched forwards that ran them.
    row["ours_edge_forwards"] = circuit.info["forwards"]
    row["ours_forwards_per_edge"] = circuit.info["forwards"] / graph.n_edges
    row["ours_batched_forwards"] = circuit.info["batches"]
    _, row["ours_forwards_counted"] = count_calls(hf.lm_head, lambda: acdc(make_task(),
                                                                            threshold=threshold))
    row["ours_edges"] = circuit.n_edges
    row["ours_final_kl"] = circuit.info["final_metric"]

    def fn():
        return acdc(make_task(), threshold=threshold)

    row.update({f"ours_{k}": v for k, v in timed(device, fn, args.repeats).items()})
    row["ours_peak_gib"] = peak_gib(device, fn)

    if isinstance(ac, str):
        row["auto_circuit"] = f"unavailable: {ac}"
    else:
        tl, patchable, edge_map = peer_graph(ac, hf, clean, graph, device, row)
        if not args.ac_native_order:
            # The same visiting order as mechinterp's: auto-circuit sorts its edge set by the
            # destination's layer with a stable sort, so a list in mechinterp's order stays so.
            patchable.edges = edge_map.in_order_of(graph)
        row["edge_order"] = "auto-circuit's own" if args.ac_native_order else "mechinterp's"
        loader = ac_loader(ac, clean, corrupt, data.answer.to(device), data.wrong.to(device),
                           clean.shape[0])

        def theirs():
            ac.set_all_masks(patchable, val=0.0)
            return ac.acdc_prune_scores(patchable, loader, None, tao_exps=[0],
                                        tao_bases=[threshold], faithfulness_target="kl_div")

        # Kept edges were never removed: their score stays infinite.
        prune_scores, row["ac_forwards_counted"] = count_calls(tl.unembed, theirs)
        kept = torch.isinf(edge_map.matrix(prune_scores)) & valid
        ac.set_all_masks(patchable, val=0.0)
        row["ac_edges"] = int(kept.sum())
        # One forward per edge (from the destination's block on), after 4 set-up forwards.
        row["ac_edge_forwards"] = row["ac_forwards_counted"] - 4
        row["ac_forwards_per_edge"] = row["ac_edge_forwards"] / graph.n_edges
        row["ac_circuit_kl_by_ours"] = float(task.evaluate(kept).mean())
        row.update({f"ac_{k}": v for k, v in timed(device, theirs, args.repeats).items()})
        row["ac_peak_gib"] = peak_gib(device, theirs)
        both = int((kept & circuit.kept).sum())
        row["overlap_edges"] = both
        row["jaccard"] = both / max(1, int((kept | circuit.kept).sum()))
        row["only_ours"] = graph.edges(circuit.kept & ~kept)
        row["only_ac"] = graph.edges(kept & ~circuit.kept)
        row["speedup_vs_ac"] = row["ac_median_s"] / row["ours_median_s"]
    # Forwards outside the per-edge loop: ours records the clean and corrupted runs and
    # evaluates the full graph (3); auto-circuit records both runs and runs the clean prompts
    # twice (4).
    return row


# -- c. memory on a 1B-parameter-shaped Llama ---------------------------------------------------


def bench_llama(args, device: torch.device) -> dict:
    if device.type != "cuda" and not args.small:
        return {"skipped": "needs CUDA (run with --small for a tiny Llama on this device)"}
    if args.small:
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=128, vocab_size=1000)
    else:
        config = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8,
                                          intermediate_size=8192, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    hf = hf.to(torch.bfloat16).eval().requires_grad_(False)
    weights_gib = sum(p.numel() * p.element_size() for p in hf.parameters()) / GiB
    model = mechinterp.load(hf)
    clean, corrupt, answer, wrong = (t.to(device) for t in ioi_pairs(16, 32, config.vocab_size))
    batch = args.llama_batch
    row = {"model": (f"llama {config.num_hidden_layers}L d{config.hidden_size} "
                     f"h{config.num_attention_heads}/{config.num_key_value_heads} "
                     f"ff{config.intermediate_size} v{config.vocab_size}"),
           "params": sum(p.numel() for p in hf.parameters()), "weights_gib": weights_gib,
           "dtype": "bfloat16", "pairs": 16, "seq": 32, "batch_size": batch, "steps": args.steps}

    def make_task():
        return CircuitTask(model, clean, corrupt, metric=LogitDiff(answer, wrong),
                           batch_size=batch, progress=False)

    task = make_task()
    row["n_edges"] = task.graph.n_edges
    # bf16: the full graph reproduces the plain forward (weights of zero leave it untouched);
    # the empty graph goes through the per-head projections, rounded differently.
    row.update(_check_task(task, hf, clean, corrupt, answer, wrong, tol=1e-6, empty_tol=0.1))
    del task

    def fn():
        return attribute_edges(make_task(), method="eap-ig", steps=args.steps)

    repeats = max(1, min(args.repeats, 3))
    row.update({f"ours_{k}": v for k, v in timed(device, fn, repeats).items()})
    row["ours_peak_gib"] = peak_gib(device, fn)
    scores = fn().scores
    row["scores_finite"] = bool(torch.isfinite(scores).all())
    assert row["scores_finite"], row
    return row


def bench_bert(args, device: torch.device) -> dict:
    if args.small:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=1000)
        pairs = 8
    else:
        config = transformers.BertConfig()  # BERT-base
        pairs = args.pairs
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.BertForMaskedLM(config)
    hf = hf.eval().requires_grad_(False)
    model = mechinterp.load(hf)
    clean, corrupt, answer, wrong = (t.to(device) for t in ioi_pairs(pairs, 15, config.vocab_size))
    row = {"model": (f"bert {config.num_hidden_layers}L d{config.hidden_size} "
                     f"h{config.num_attention_heads} ff{config.intermediate_size} "
                     f"v{config.vocab_size}"),
           "params": sum(p.numel() for p in hf.parameters()), "dtype": "float32",
           "pairs": pairs, "seq": 15, "steps": args.steps}

    def make_task():
        return CircuitTask(model, clean, corrupt, metric=LogitDiff(answer, wrong),
                           batch_size=args.batch_size or None, progress=False)

    task = make_task()
    row["n_edges"] = task.graph.n_edges
    row["batch_size"] = task.batch_size
    # The empty graph rebuilds every reader's input from the corrupted run's contributions
    # through twelve pairs of LayerNorms.
    row.update(_check_task(task, hf, clean, corrupt, answer, wrong, tol=1e-5, empty_tol=1e-3))
    del task

    def fn():
        return attribute_edges(make_task(), method="eap-ig", steps=args.steps)

    row.update({f"ours_{k}": v for k, v in timed(device, fn, args.repeats).items()})
    row["ours_peak_gib"] = peak_gib(device, fn)
    scores = fn().scores
    row["scores_finite"] = bool(torch.isfinite(scores).all())
    assert row["scores_finite"], row
    return row


# -- report ------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _timing_cells(row: dict, key: str) -> str:
    return (f"{_fmt(row[f'{key}_best_s'], '8.3f')} {_fmt(row[f'{key}_median_s'], '9.3f')} "
            f"{_fmt(row[f'{key}_peak_gib'], '9.3f')}")


def table(out: dict) -> str:
    lines = [f"device: {out['device']}; {out['auto_circuit']}"]
    a = out.get("eap_ig")
    if a:
        lines.append(f"\n[eap-ig] {a['model']}, {a['pairs']} pairs x {a['seq']} tokens, "
                     f"{a['n_edges']} edges (auto-circuit {a.get('auto_circuit_edges', '-')})")
        lines.append(f"  checks: full graph - clean {_fmt(a['full_graph_vs_clean_max_abs'])}, "
                     f"empty - corrupt {_fmt(a['empty_graph_vs_corrupt_max_abs'])}, "
                     f"TL - HF logits {_fmt(a.get('tl_vs_hf_logits_max_abs'))}, "
                     f"EAP rel. diff {_fmt(a.get('eap_max_rel_diff'))}")
        lines.append(f"  {'method':31s} {'grads':>5s} {'best s':>8s} {'median s':>9s} "
                     f"{'peak GiB':>9s} {'pearson':>8s} {'spearman':>8s} {'top-k':>6s}")
        rows = [("mechinterp eap-ig", "ours", a["ours_gradients"]),
                ("mechinterp eap-ig-activations", "ours_activations", a["ours_gradients"])]
        if "ac_median_s" in a:
            rows.append(("auto-circuit mask-gradient IG", "ac", a["ac_gradients"]))
        for label, key, grads in rows:
            agree = ""
            if key != "ac" and "ac_median_s" in a:
                agree = (f" {_fmt(a[f'{key}_vs_ac_pearson'], '8.4f')}"
                         f" {_fmt(a[f'{key}_vs_ac_spearman'], '8.4f')}"
                         f" {_fmt(a[f'{key}_vs_ac_top_k_overlap'], '6.2f')}")
            lines.append(f"  {label:31s} {grads:5d} {_timing_cells(a, key)}{agree}")
        if "speedup_vs_ac" in a:
            lines.append(f"  auto-circuit median / mechinterp eap-ig median = "
                         f"{a['speedup_vs_ac']:.2f}; peak memory mechinterp / auto-circuit = "
                         f"{_fmt(a['memory_ratio_vs_ac'], '.2f')}")
    b = out.get("acdc")
    if b:
        lines.append(f"\n[acdc] {b['model']}, {b['pairs']} pairs x {b['seq']} tokens, "
                     f"{b['n_edges']} edges, threshold {b['threshold']}")
        lines.append(f"  {'':14s} {'edges kept':>10s} {'fwd/edge':>8s} {'best s':>8s} "
                     f"{'median s':>9s} {'peak GiB':>9s}")
        for label, key in (("mechinterp", "ours"), ("auto-circuit", "ac")):
            if f"{key}_median_s" in b:
                lines.append(f"  {label:14s} {b[f'{key}_edges']:10d} "
                             f"{_fmt(b[f'{key}_forwards_per_edge'], '8.2f')} "
                             f"{_timing_cells(b, key)}")
        if "ours_batched_forwards" in b:
            lines.append(f"  mechinterp ran its {b['ours_edge_forwards']} edge trials in "
                         f"{b['ours_batched_forwards']} batched forwards")
        if "overlap_edges" in b:
            lines.append(f"  overlap {b['overlap_edges']} edges (Jaccard {b['jaccard']:.3f}); "
                         f"auto-circuit median / mechinterp median = {b['speedup_vs_ac']:.2f}; "
                         f"final KL ours {_fmt(b['ours_final_kl'])}, theirs (evaluated by "
                         f"mechinterp) {_fmt(b['ac_circuit_kl_by_ours'])}")
    c = out.get("llama")
    if c and "skipped" in c:
        lines.append(f"\n[llama] skipped: {c['skipped']}")
    elif c:
        lines.append(f"\n[llama] {c['model']} ({c['params'] / 1e9:.2f}B params, "
                     f"{c['weights_gib']:.2f} GiB), {c['pairs']} pairs x {c['seq']} tokens, "
                     f"{c['n_edges']} edges, batch {c['batch_size']}, steps {c['steps']}")
        lines.append(f"  eap-ig best {c['ours_best_s']:.3f} s, median {c['ours_median_s']:.3f} s, "
                     f"peak {_fmt(c['ours_peak_gib'], '.2f')} GiB above the weights; "
                     f"full graph - clean {_fmt(c['full_graph_vs_clean_max_abs'])}")
    d = out.get("bert")
    if d:
        lines.append(f"\n[bert] {d['model']} ({d['params'] / 1e6:.0f}M params, {d['dtype']}), "
                     f"{d['pairs']} pairs x {d['seq']} tokens, {d['n_edges']} edges, batch "
                     f"{d['batch_size']}, steps {d['steps']}")
        lines.append(f"  eap-ig best {d['ours_best_s']:.3f} s, median {d['ours_median_s']:.3f} s, "
                     f"peak {_fmt(d['ours_peak_gib'], '.2f')} GiB; full graph - clean "
                     f"{_fmt(d['full_graph_vs_clean_max_abs'])}, empty - corrupt "
                     f"{_fmt(d['empty_graph_vs_corrupt_max_abs'])}")
        if a and "ours_median_s" in a:
            lines.append(f"  bert median / gpt-2 small median = "
                         f"{d['ours_median_s'] / a['ours_median_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny configurations (CPU tests)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=100, help="IOI-style prompt pairs (eap-ig)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="rows per forward in eap-ig, for both (default: all pairs)")
    parser.add_argument("--steps", type=int, default=5, help="mechinterp EAP-IG steps")
    parser.add_argument("--ac-samples", type=int, default=5,
                        help="auto-circuit integrated_grad_samples (samples + 1 gradients)")
    parser.add_argument("--acdc-threshold", type=float, default=0.01)
    parser.add_argument("--ac-native-order", action="store_true",
                        help="let auto-circuit's ACDC visit edges in its own (set) order within "
                             "a layer instead of mechinterp's")
    parser.add_argument("--llama-batch", type=int, default=16)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections must be among {SECTIONS}; got {sorted(unknown)}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ac = import_auto_circuit()
    described = (f"auto-circuit {ac.version}" + (f" (placeholders for {', '.join(ac.stubbed)})"
                                                 if ac.stubbed else "")
                 if not isinstance(ac, str) else f"unavailable: {ac}")
    out = {"device": device_name(device), "torch": torch.__version__,
           "transformers": transformers.__version__, "auto_circuit": described,
           "threads": torch.get_num_threads(), "small": args.small}
    print(described, flush=True)
    runs = {"eap-ig": ("eap_ig", functools.partial(bench_eap_ig, args, device, ac)),
            "acdc": ("acdc", functools.partial(bench_acdc, args, device, ac)),
            "llama": ("llama", functools.partial(bench_llama, args, device)),
            "bert": ("bert", functools.partial(bench_bert, args, device))}
    for section in SECTIONS:
        if section in sections:
            key, run = runs[section]
            out[key] = run()
            print({k: float(f"{v:.6g}") if isinstance(v, float) else v
                   for k, v in out[key].items()}, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(table(out), flush=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
