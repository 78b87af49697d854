"""Attribution patching (AtP and AtP*): every cell of a sweep from a few forwards and backwards.

The effect of patching a site is estimated to first order around the corrupted run:
``m(patched) ~ m(corrupt) + sum over the site's elements of (a_clean - a_corrupt) * dm/da``,
with the gradient taken on the corrupted run. One clean forward, one corrupted forward and one
backward give every cell at once, instead of one forward per cell. The estimate is exact for a
metric linear in the site and degrades where the model saturates (attention softmax, LayerNorm);
:func:`agreement` measures it against exact patching.

AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour
to components") repairs AtP's two sources of false negatives:

- The QK fix. A query or key acts through a softmax, whose gradient vanishes where attention is
  saturated: a patch that moves attention from one position to another can be estimated at
  zero. For ``q`` and ``k`` sites the patched attention probabilities are computed exactly, from
  the clean query (key) and the corrupted keys (queries), and the estimate is
  ``sum over the probabilities of (p_patched - p_corrupt) * dm/dp``: first order in the
  probabilities instead of the query or key.
- GradDrop. A site's direct and indirect effects can cancel in the gradient. For each layer
  ``l`` the backward pass is run again with the gradient through layer ``l``'s attention and
  MLP branches dropped (the block passes its output gradient to its input through the skip
  connection alone, and gives the sites inside the branches none); GradDrop scores a site by the
  mean magnitude of these per-layer estimates, which cancel differently.

All of it comes from one clean forward, one corrupted forward, one backward and, for GradDrop,
one partial backward per layer over the same graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from tqdm.auto import tqdm

from mechinterp.attention import AttentionInputs, exposing_inputs
from mechinterp.engine import Plan
from mechinterp.errors import InputError, UnsupportedModelError
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, RunResult, Sites, Tokens
from mechinterp.models import gpt2, gpt_neox, llama
from mechinterp.patching.boxes import as_rows
from mechinterp.patching.metrics import Metric, as_metric
from mechinterp.patching.result import PatchingResult
from mechinterp.patching.sweep import _Sweep

METHODS = ("atp", "atp+qkfix", "atp*")
_DESCRIPTIONS = {"atp": "AtP", "atp+qkfix": "AtP+QKfix", "atp*": "AtP*"}

# GradDrop hands a block's output gradient to its input through the skip connection, which is an
# identity only where the normalisation sits inside the branches (pre-norm blocks).
_PRE_NORM = (*gpt2.MODEL_TYPES, *llama.MODEL_TYPES, *gpt_neox.MODEL_TYPES)
# Components computed inside a layer's attention or MLP branch: dropping that layer's branches
# from the backward pass leaves them no gradient.
_BRANCH = ("attn_out", "mlp_out", "head", "q", "k", "v", "pattern", "neuron")
_QK = ("q", "k")

Group = tuple[str, int]


def attribution_patch(
    model: InterpModel,
    clean: Inputs,
    corrupt: Inputs,
    sites: Sites,
    metric: Metric | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    method: str = "atp",
    position: int = -1,
    batch_size: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Estimate :func:`activation_patch` for every site from gradients (AtP or AtP*).

    Takes the arguments of :func:`activation_patch` (with ``source="clean"``). ``batch_size``
    bounds the prompt pairs per forward and backward.

    Args:
        method: ``"atp"``: ``e = sum (a_clean - a_corrupt) * dm/da``. ``"atp+qkfix"``: the same,
            except for ``q`` and ``k`` sites, whose ``e`` is the QK fix
            ``sum (p_patched - p_corrupt) * dm/dp`` over the attention probabilities they move,
            recomputed exactly. A site over several heads or query positions sums its heads' and
            positions' fixes (their softmax rows change independently); a site over several key
            positions of one key head recomputes each softmax row with all of them patched.
            ``"atp*"``: the QK fix and GradDrop, for pre-norm residual models (GPT-2, Llama,
            Mistral, Qwen2, GPT-NeoX) of at least two layers.

    Returns:
        :class:`PatchingResult` whose ``values [pair, site]`` are estimated metrics of the
        patched runs, so it compares cell by cell with the exact sweep (see :func:`agreement`).
        For ``"atp"`` and ``"atp+qkfix"`` they are ``corrupt + e``. For ``"atp*"`` they are
        ``corrupt + sign(e) * g``, per pair, with ``e`` the ``"atp+qkfix"`` estimate and ``g``
        GradDrop's magnitude ``g = (1 / n) * sum over layers l of |e_l|``: ``e_l`` is the
        ``"atp+qkfix"`` estimate with layer ``l``'s attention and MLP branches dropped from the
        backward pass (0 when the site lies inside them), and ``n`` the number of layers whose
        branches do not hold the site: ``L - 1`` for attention and MLP sites (the paper's
        ``1 / (L - 1)``), ``L`` for ``embed`` and the residual stream. So
        ``(values - corrupt).abs().mean(0)`` is the paper's GradDrop score, and the sign is the
        direction the QK-fixed gradient gives.

    Examples:
        >>> import mechinterp
        >>> from mechinterp import select
        >>> from mechinterp.patching import LogitDiff, attribution_patch
        >>> model = mechinterp.load("induction-2l")
        >>> approx = attribution_patch(model, "fuba bu mabi fuba", "fuba fafi mabi fuba",
        ...                            select("head").layers().heads(), LogitDiff("bu", "fafi"),
        ...                            progress=False)
        >>> approx.values.shape
        torch.Size([1, 8])
        >>> star = attribution_patch(model, "fuba bu mabi fuba", "fuba fafi mabi fuba",
        ...                          select("q").layers().heads(), LogitDiff("bu", "fafi"),
        ...                          method="atp*", progress=False)
        >>> star.metric.startswith("AtP* estimate of LogitDiff")
        True
    """
    if method not in METHODS:
        msg = f"method must be one of {list(METHODS)}; got {method!r}"
        raise InputError(msg)
    sweep = _Sweep(model, clean, corrupt, sites, as_metric(metric), "clean", 1.0, position, 0)
    if method == "atp*":
        _check_graddrop(model)
    rects = sweep._rects()
    n_pairs = sweep.n_pairs
    per_forward = n_pairs if batch_size is None else max(1, batch_size)
    estimates = torch.zeros(n_pairs, len(sweep.cells), dtype=torch.float64)
    magnitudes = torch.zeros_like(estimates)
    clean_metric, corrupt_metric = [], []
    bar = tqdm(total=n_pairs, desc="attribution patching", unit="pair", disable=not progress,
               leave=False)
    for start in range(0, n_pairs, per_forward):
        rows = slice(start, min(start + per_forward, n_pairs))
        part = _part(sweep, rows)
        part_rects = [cell[rows] for cell in rects]
        if method == "atp":
            clean_m, corrupt_m, products = _gradients(sweep, part, rows)
            estimates[rows] = _cell_sums(sweep, products, part_rects)
        else:
            clean_m, corrupt_m, estimates[rows], magnitude = _star(
                sweep, part, rows, part_rects, graddrop=method == "atp*")
            if magnitude is not None:
                magnitudes[rows] = magnitude
        clean_metric.append(clean_m)
        corrupt_metric.append(corrupt_m)
        bar.update(rows.stop - rows.start)
    bar.close()
    corrupt_all = torch.cat(corrupt_metric)
    effects = estimates.sign() * magnitudes if method == "atp*" else estimates
    values = corrupt_all[:, None].to(torch.float64) + effects
    dtype = corrupt_all.dtype
    return PatchingResult(sweep.cells, values.to(dtype), torch.cat(clean_metric), corrupt_all,
                          f"{_DESCRIPTIONS[method]} estimate of {sweep.metric!r}")


def _check_graddrop(model: InterpModel) -> None:
    """GradDrop needs skip connections that carry the gradient unchanged, and a layer to spare."""
    if model.family not in _PRE_NORM:
        msg = (
            f"method='atp*' needs a pre-norm residual model ({', '.join(_PRE_NORM)}), whose "
            f"blocks pass their output gradient to their input through the skip connection "
            f"(GradDrop); got a {model.family!r} model, which normalises after the residual "
            f"add. method='atp+qkfix' works for it"
        )
        raise UnsupportedModelError(msg)
    n_layers = model.dims.n_layers
    if n_layers < 2:
        msg = (
            f"method='atp*' needs a model of at least 2 layers (GradDrop averages over the layers "
            f"other than a site's own); got {n_layers}"
        )
        raise InputError(msg)


def _part(sweep: _Sweep, rows: slice) -> tuple[Tokens, Tokens]:
    clean, corrupt = sweep.clean, sweep.corrupt
    return clean.rows(rows), corrupt.rows(rows)


class _Probe(TensorEdit):
    """Keeps a component's value and adds a zero tensor whose gradient is the gradient of the
    metric with respect to that component."""

    def __init__(self, site, store: dict, key):
        super().__init__(site)
        self.store, self.key = store, key

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        whole = tensor if current is None else current
        delta = torch.zeros_like(tensor, requires_grad=True)
        self.store[self.key] = (whole.detach().clone(), delta)
        tensor.add_(delta)  # in place, so the model's own tensor carries the gradient


def _clean_pass(sweep: _Sweep, clean: Tokens, rows: slice
                ) -> tuple[RunResult, torch.Tensor, torch.Tensor]:
    """The clean run of the pairs in ``rows`` (caching every probed component), its scored
    logits laid out by pair ``[n_pairs, vocab]``, and its metric."""
    model = sweep.model
    with torch.no_grad():
        clean_run = model.run(clean, cache=[_Sweep._site(g) for g in sweep.groups])
    if clean_run.logits is None:
        model.table.place("logits")  # raises, naming why there is no head
    scored = sweep._scored(clean_run.logits, clean.shape[0])
    clean_logits = torch.zeros((sweep.n_pairs, scored.shape[-1]), dtype=scored.dtype,
                               device=scored.device)
    clean_logits[rows] = scored
    pairs = torch.arange(rows.start, rows.stop).to(clean_logits.device)
    return clean_run, clean_logits, sweep.metric(scored, pairs, clean_logits).cpu()


def _probed_forward(sweep: _Sweep, corrupt: Tokens, rows: slice, clean_logits: torch.Tensor
                    ) -> tuple[torch.Tensor, dict]:
    """The corrupted run with a zero probe on every (component, layer): its differentiable
    metric ``[pairs]``, and per group the component's value and its probe."""
    model = sweep.model
    store: dict = {}
    edits = [_Probe(_Sweep._site(g), store, g) for g in sweep.groups]
    plan = Plan(model.table, model.base, corrupt.attention_mask, [], edits, model._resolved)
    pairs = torch.arange(rows.start, rows.stop).to(clean_logits.device)
    with torch.enable_grad():
        output, _ = model._forward(corrupt, plan)
        logits = sweep._scored(output.logits, corrupt.shape[0])
        scores = sweep.metric.differentiable(logits, pairs, clean_logits)
    return scores, store


def _differences(sweep: _Sweep, clean_run: RunResult, store: dict, groups: list[Group]
                 ) -> dict[Group, torch.Tensor]:
    """Per group, ``a_clean - a_corrupt`` as ``[pair, a, f]`` float64."""
    return {group: as_rows(clean_run.cache[_Sweep._site(group)]).double()
            - as_rows(store[group][0]).double() for group in groups}


def _gradients(sweep: _Sweep, part: tuple[Tokens, Tokens], rows: slice):
    """Clean and corrupted metrics of the pairs in ``rows``, and per (component, layer) the
    products ``(a_clean - a_corrupt) * dm/da`` as ``[pair, a, f]`` float64."""
    clean, corrupt = part
    clean_run, clean_logits, clean_m = _clean_pass(sweep, clean, rows)
    scores, store = _probed_forward(sweep, corrupt, rows, clean_logits)
    grads = torch.autograd.grad(scores.sum(), [store[g][1] for g in sweep.groups],
                                allow_unused=True)
    differences = _differences(sweep, clean_run, store, sweep.groups)
    products = {}
    for group, grad in zip(sweep.groups, grads):
        difference = differences[group]
        grad = torch.zeros_like(difference) if grad is None else as_rows(grad).double()
        products[group] = difference * grad
    return clean_m, scores.detach().cpu(), products


def _cell_boxes(rects: list) -> dict[Group, torch.Tensor]:
    """Per (component, layer), every rectangle of every cell as int64 ``[n, 6]``: pair, cell,
    a_begin, a_end, f_begin, f_end."""
    boxes: dict[Group, list[tuple[int, int, int, int, int, int]]] = {}
    for c, per_pair in enumerate(rects):
        for p, writes in enumerate(per_pair):
            for group, _, (a0, a1, f0, f1) in writes:
                boxes.setdefault(group, []).append((p, c, a0, a1, f0, f1))
    return {group: torch.tensor(items) for group, items in boxes.items()}


def _sum_boxes(products: dict[Group, torch.Tensor], boxes: dict[Group, torch.Tensor],
               n_pairs: int, n_cells: int) -> torch.Tensor:
    """``[pair, cell]``: each cell's product summed over its rectangles, by 2-D prefix sums, for
    the groups in ``products`` (cells of other groups get 0).

    Every rectangle of a (component, layer) is gathered in one indexing operation, so a GPU is
    synchronised once per component and layer, not once per cell.
    """
    out = torch.zeros(n_pairs, n_cells, dtype=torch.float64)
    for group, items in boxes.items():
        product = products.get(group)
        if product is None:
            continue
        pairs, extent_a, extent_f = product.shape
        prefix = torch.zeros(pairs, extent_a + 1, extent_f + 1, dtype=torch.float64,
                             device=product.device)
        prefix[:, 1:, 1:] = product.cumsum(1).cumsum(2)
        p, c, a0, a1, f0, f1 = items.to(product.device).unbind(1)
        sums = prefix[p, a1, f1] - prefix[p, a0, f1] - prefix[p, a1, f0] + prefix[p, a0, f0]
        flat = torch.zeros(n_pairs * n_cells, dtype=torch.float64, device=product.device)
        flat.index_add_(0, p * n_cells + c, sums)
        out += flat.reshape(n_pairs, n_cells).cpu()
    return out


def _cell_sums(sweep: _Sweep, products: dict, rects: list) -> torch.Tensor:
    """``[pair, cell]``: each cell's product summed over its rectangles (see :func:`_sum_boxes`)."""
    n_pairs = len(rects[0]) if rects else 0
    return _sum_boxes(products, _cell_boxes(rects), n_pairs, len(rects))


# -- AtP*: the QK fix ----------------------------------------------------------------------


class _Attention:
    """The attention inputs of some layers in one forward, read from :func:`pattern_attention`."""

    def __init__(self, model: InterpModel, layers: list[int]):
        place = model.table.place("pattern")
        self.root = model._module
        self.modules = {layer: self.root.get_submodule(place.path.format(base=model.base,
                                                                           layer=layer))
                        for layer in layers}
        self.inputs: dict[int, AttentionInputs] = {}

    def _keep(self, layer: int, inputs: AttentionInputs) -> None:
        self.inputs[layer] = inputs

    def reading(self) -> contextlib.AbstractContextManager:
        """Read the layers' inputs in the enclosed forward; without layers, change nothing (the
        model keeps its own attention implementation)."""
        if not self.modules:
            return contextlib.nullcontext()
        callbacks = {id(module): partial(self._keep, layer) for layer, module in self.modules.items()}
        return exposing_inputs(self.root, callbacks)


def _scores(query: torch.Tensor, key: torch.Tensor, like: AttentionInputs) -> torch.Tensor:
    """Scaled, masked attention scores ``[batch, head, query, key]`` in float64, with the
    scaling and mask of ``like``."""
    groups = query.shape[1] // key.shape[1]
    key = key.detach().double().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.detach().double(), key.transpose(-1, -2)) * like.scaling
    if like.mask is not None:
        scores = scores + like.mask.double()
    return scores


def _others(x: torch.Tensor) -> torch.Tensor:
    """Per entry, the sum of the other entries along the last axis, added up from the entries
    before and after it: no subtraction, so a dominant entry does not swamp the rest."""
    before = torch.nn.functional.pad(x.cumsum(-1)[..., :-1], (1, 0))
    after = torch.nn.functional.pad(x.flip(-1).cumsum(-1)[..., :-1], (1, 0)).flip(-1)
    return before + after


def _sigmoid_difference(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``sigmoid(new) - sigmoid(old)``; near 1 from the complements, which keep their digits."""
    high = (new + old) > 0
    return torch.where(high, torch.sigmoid(-old) - torch.sigmoid(-new),
                       torch.sigmoid(new) - torch.sigmoid(old))


class _Softmaxes:
    """One layer's corrupted attention in float64, and how it moves when a single query or key
    is patched from the clean run: the parts of the QK fix that the gradient does not enter.

    Patching query ``t`` changes row ``t`` alone, to row ``t`` of the softmax of the scores of
    the clean queries against the corrupted keys. Patching key ``s`` changes column ``s`` of
    every row's scores, to column ``s`` of the scores of the corrupted queries against the
    clean keys; with ``X`` the log-sum-exp of the row's other scores, ``p_ts`` moves from
    ``sigmoid(l_ts - X)`` to ``sigmoid(l'_ts - X)`` and the other entries keep their ratios, so
    ``sum_u (p'_tu - p_tu) g_tu = (p'_ts - p_ts) (g_ts - r_ts)`` with ``r_ts`` the mean of the
    row's other gradients weighted by their probabilities.
    """

    def __init__(self, clean: AttentionInputs, corrupt: AttentionInputs):
        self.groups = corrupt.query.shape[1] // corrupt.key.shape[1]
        self.logits = _scores(corrupt.query, corrupt.key, corrupt)
        self.probs = torch.softmax(self.logits, dim=-1)
        queried = _scores(clean.query, corrupt.key, corrupt)
        self.query_change = torch.softmax(queried, dim=-1) - self.probs
        self.keyed = _scores(corrupt.query, clean.key, corrupt)
        top = self.logits.amax(-1, keepdim=True)
        self.weights = torch.exp(self.logits - top)  # masked scores give exactly 0
        self.rest = _others(self.weights)
        rest_logit = top + torch.log(self.rest)  # -inf where the other keys carry no weight
        self.key_change = _sigmoid_difference(self.keyed - rest_logit, self.logits - rest_logit)

    def query_estimates(self, grad: torch.Tensor) -> torch.Tensor:
        """``[batch, query, head]``: the QK fix of each single query, for ``grad = dm/dp``."""
        return (self.query_change * grad).sum(-1).transpose(1, 2)

    def key_estimates(self, grad: torch.Tensor) -> torch.Tensor:
        """``[batch, key, kv_head]``: the QK fix of each single key, summed over the query rows
        and the query heads that share the key."""
        others = _others(self.weights * grad)
        rest_mean = torch.where(self.rest > 0, others / self.rest, 0.0)
        per_head = (self.key_change * (grad - rest_mean)).sum(2)
        batch, heads, keys = per_head.shape
        per_kv = per_head.view(batch, heads // self.groups, self.groups, keys).sum(2)
        return per_kv.transpose(1, 2)

    def keys_change(self, pair: int, kv_head: int, positions: tuple[int, ...]) -> torch.Tensor:
        """``[groups, query, key]``: the probabilities' change when keys ``positions`` of one key
        head are patched together (every row recomputed whole: several columns move)."""
        heads = slice(kv_head * self.groups, (kv_head + 1) * self.groups)
        columns = list(positions)
        logits = self.logits[pair, heads].clone()
        logits[..., columns] = self.keyed[pair, heads][..., columns]
        return torch.softmax(logits, dim=-1) - self.probs[pair, heads]


def _spread(values: torch.Tensor, d_head: int) -> torch.Tensor:
    """``[rows, a, head]`` -> ``[rows, a, head * d_head]`` with each value in its head's first
    feature, so that the rectangles of whole heads sum the values of their heads."""
    out = values.new_zeros(*values.shape, d_head)
    out[..., 0] = values
    return out.flatten(2)


def _joint_keys(sweep: _Sweep, rects: list) -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    """``(cell, pair, layer, kv_head, key positions)`` for every key head of the ``k`` cells that
    patch several positions of one key head in a pair: those rows are recomputed whole."""
    d_head = sweep.model.dims.d_head
    joint = []
    for c, per_pair in enumerate(rects):
        for p, writes in enumerate(per_pair):
            positions: dict[tuple[int, int], set[int]] = {}
            for (component, layer), _, (a0, a1, f0, f1) in writes:
                if component != "k":
                    continue
                for head in range(f0 // d_head, -(-f1 // d_head)):
                    positions.setdefault((layer, head), set()).update(range(a0, a1))
            if any(len(columns) > 1 for columns in positions.values()):
                joint.extend((c, p, layer, head, tuple(sorted(columns)))
                             for (layer, head), columns in positions.items())
    return joint


class _Estimator:
    """Every cell's estimate for the pairs of one pass, from one gradient of the metric: AtP's
    product for most components, the QK fix for queries and keys."""

    def __init__(self, sweep: _Sweep, rects: list, differences: dict[Group, torch.Tensor],
                 softmaxes: dict[int, _Softmaxes]):
        self.d_head = sweep.model.dims.d_head
        self.n_pairs, self.n_cells = (len(rects[0]) if rects else 0), len(rects)
        self.boxes = _cell_boxes(rects)
        self.differences, self.softmaxes = differences, softmaxes
        self.qk_groups = [g for g in sweep.groups if g[0] in _QK]
        self.joint = _joint_keys(sweep, rects)
        self.joint_changes: dict[int, torch.Tensor] = {}  # reused by every gradient

    def estimate(self, grads: dict[Group, torch.Tensor | None],
                 pattern_grads: dict[int, torch.Tensor | None]) -> torch.Tensor:
        """``[pair, cell]`` from ``dm/da`` of the groups in ``grads`` and ``dm/dp`` of the
        attention layers in ``pattern_grads`` (their ``q`` and ``k`` cells); other cells get 0."""
        products = {}
        for group, grad in grads.items():
            difference = self.differences[group]
            products[group] = difference * (0.0 if grad is None else as_rows(grad).double())
        pattern = {layer: self._pattern_grad(layer, grad) for layer, grad in pattern_grads.items()}
        for component, layer in self.qk_groups:
            if layer not in pattern:
                continue
            softmaxes = self.softmaxes[layer]
            if component == "q":
                per_head = softmaxes.query_estimates(pattern[layer])
            else:
                per_head = softmaxes.key_estimates(pattern[layer])
            products[(component, layer)] = _spread(per_head, self.d_head)
        out = _sum_boxes(products, self.boxes, self.n_pairs, self.n_cells)
        self._recompute_joint(out, pattern)
        return out

    def _pattern_grad(self, layer: int, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            return torch.zeros_like(self.softmaxes[layer].probs)
        return grad.detach().double()

    def _recompute_joint(self, out: torch.Tensor, pattern: dict[int, torch.Tensor]) -> None:
        """Replace the sums of one-key fixes by whole recomputed rows where a cell moves several
        keys of one head."""
        totals: dict[tuple[int, int], float] = {}
        for i, (c, p, layer, kv_head, positions) in enumerate(self.joint):
            if layer not in pattern:
                continue
            if i not in self.joint_changes:
                self.joint_changes[i] = self.softmaxes[layer].keys_change(p, kv_head, positions)
            change = self.joint_changes[i]
            groups = change.shape[0]
            grad = pattern[layer][p, kv_head * groups:(kv_head + 1) * groups]
            totals[(p, c)] = totals.get((p, c), 0.0) + float((change * grad).sum())
        for (p, c), total in totals.items():
            out[p, c] = total


# -- AtP*: GradDrop ------------------------------------------------------------------------


class _Blocks:
    """Each block's input, as the block received it (after any edit of ``resid_pre``), and its
    output, before any edit of ``resid_post``, in one forward.

    The hooks are registered before the forward's own, so they run first on the output, and
    after every input edit (forward hooks see the inputs the pre-hooks left).
    """

    def __init__(self, model: InterpModel):
        path = model.table.blocks.format(base=model.base)
        self.modules = [model._module.get_submodule(f"{path}.{layer}")
                        for layer in range(model.dims.n_layers)]
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _keep(self, layer: int, _module, args: tuple, kwargs: dict, output: object) -> None:
        self.inputs[layer] = args[0] if args else kwargs["hidden_states"]
        self.outputs[layer] = output[0] if isinstance(output, tuple) else output

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [module.register_forward_hook(partial(self._keep, layer), with_kwargs=True)
                   for layer, module in enumerate(self.modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _grad(output: torch.Tensor, inputs: list[torch.Tensor],
          grad_outputs: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Gradients of ``output`` with respect to ``inputs`` (None where none flows), keeping the
    graph for the next pass."""
    found: list[torch.Tensor | None] = [None] * len(inputs)
    wanted = [i for i, tensor in enumerate(inputs) if tensor.requires_grad]
    if not wanted or not output.requires_grad:
        return found
    grads = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_outputs=grad_outputs,
                                retain_graph=True, allow_unused=True)
    for i, grad in zip(wanted, grads):
        found[i] = grad
    return found


def _role(group: Group, layer: int) -> str:
    """What dropping layer ``layer``'s branches does to a group's gradient: ``"inside"`` (none
    left), ``"dropped"`` (it flows through that layer, or is the residual stream between its
    branches) or ``"kept"`` (unchanged)."""
    component, at = group
    if at == layer and component in _BRANCH:
        return "inside"
    if at < layer or (at == layer and component in ("resid_pre", "resid_mid")):
        return "dropped"
    return "kept"


def _dropped_gradients(layer: int, probes: dict[Group, torch.Tensor],
                       probs: dict[int, torch.Tensor], blocks: _Blocks,
                       post: torch.Tensor | None
                       ) -> tuple[dict[Group, torch.Tensor | None], dict[int, torch.Tensor | None]]:
    """``dm/da`` and ``dm/dp`` of the groups whose gradient changes when layer ``layer``'s
    branches are dropped from the backward pass.

    The block's input gradient is then its output gradient ``post``, so everything below it
    gets ``post`` pulled back from the block's input. The residual stream between its branches
    (``resid_mid``) reaches the output through the skip connection alone: its gradient is
    ``post`` too.
    """
    below = [g for g in probes if _role(g, layer) == "dropped" and g != ("resid_mid", layer)]
    below_layers = [at for at in probs if at < layer]
    tensors = [probes[g] for g in below] + [probs[at] for at in below_layers]
    grads = [None] * len(tensors) if post is None else _grad(blocks.inputs[layer], tensors, post)
    plain = dict(zip(below, grads[:len(below)]))
    if ("resid_mid", layer) in probes:
        plain[("resid_mid", layer)] = post
    return plain, dict(zip(below_layers, grads[len(below):]))


def _graddrop(sweep: _Sweep, estimator: _Estimator, estimate: torch.Tensor,
              probes: dict[Group, torch.Tensor], probs: dict[int, torch.Tensor],
              blocks: _Blocks, post: list[torch.Tensor | None]) -> torch.Tensor:
    """``[pair, cell]`` GradDrop's magnitude: the mean over the layers whose branches do not hold
    a cell of ``|estimate with that layer's branches dropped|``."""
    n_layers = sweep.model.dims.n_layers
    groups = [sweep._group(site) for site in sweep.cells]
    total = torch.zeros_like(estimate)
    for layer in range(n_layers):
        roles = [_role(group, layer) for group in groups]
        grads, pattern_grads = _dropped_gradients(layer, probes, probs, blocks, post[layer])
        dropped = estimator.estimate(grads, pattern_grads)
        kept = torch.tensor([role == "kept" for role in roles])
        changed = torch.tensor([role == "dropped" for role in roles])
        total += torch.where(kept, estimate.abs(), torch.where(changed, dropped.abs(), 0.0))
    layers = torch.tensor([n_layers - 1 if g[0] in _BRANCH else n_layers for g in groups])
    return total / layers


def _star(sweep: _Sweep, part: tuple[Tokens, Tokens], rows: slice, rects: list, *,
          graddrop: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clean and corrupted metrics of the pairs in ``rows``, the QK-fixed estimate
    ``[pair, cell]`` and, with ``graddrop``, GradDrop's magnitude ``[pair, cell]``."""
    model = sweep.model
    clean, corrupt = part
    layers = sorted({layer for component, layer in sweep.groups if component in _QK})
    clean_attention, attention = _Attention(model, layers), _Attention(model, layers)
    with clean_attention.reading():
        clean_run, clean_logits, clean_m = _clean_pass(sweep, clean, rows)
    blocks = _Blocks(model)
    with attention.reading(), blocks.recording() if graddrop else contextlib.nullcontext():
        scores, store = _probed_forward(sweep, corrupt, rows, clean_logits)
    plain = [g for g in sweep.groups if g[0] not in _QK]
    probes = {g: store[g][1] for g in plain}
    probs = {layer: attention.inputs[layer].probs for layer in layers}
    outputs = [blocks.outputs[layer] for layer in range(model.dims.n_layers)] if graddrop else []
    grads = _grad(scores.sum(), [*probes.values(), *probs.values(), *outputs])
    softmaxes = {layer: _Softmaxes(clean_attention.inputs[layer], attention.inputs[layer])
                 for layer in layers}
    estimator = _Estimator(sweep, rects, _differences(sweep, clean_run, store, plain), softmaxes)
    n_plain, n_probs = len(plain), len(layers)
    estimate = estimator.estimate(dict(zip(plain, grads[:n_plain])),
                                  dict(zip(layers, grads[n_plain:n_plain + n_probs])))
    magnitude = None
    if graddrop:
        magnitude = _graddrop(sweep, estimator, estimate, probes, probs, blocks,
                              grads[n_plain + n_probs:])
    return clean_m, scores.detach().cpu(), estimate, magnitude


def agreement(exact: PatchingResult, estimate: PatchingResult) -> dict[str, float]:
    """How well an estimate (AtP) ranks and matches exact patching, over cells' means.

    Returns Pearson and Spearman correlations of the per-cell mean effects and the fraction of
    the top 10% cells by exact effect that the estimate also puts in its top 10%.
    """
    if [str(s) for s in exact.sites] != [str(s) for s in estimate.sites]:
        msg = "exact and estimate must cover the same sites in the same order"
        raise ValueError(msg)
    x = (exact.mean() - exact.corrupt.mean()).double()
    y = (estimate.mean() - estimate.corrupt.mean()).double()
    k = max(1, len(x) // 10)
    top_exact = set(torch.topk(x.abs(), k).indices.tolist())
    top_estimate = set(torch.topk(y.abs(), k).indices.tolist())
    return {"pearson": pearson(x, y), "spearman": spearman(x, y),
            "top10_overlap": len(top_exact & top_estimate) / k}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two equally long vectors (NaN when either is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (ties broken by position)."""

    def ranks(a: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(a.flatten())).double()

    return pearson(ranks(x), ranks(y))


__all__ = ["agreement", "attribution_patch", "pearson", "spearman"]
