"""The loaded model: an nnsight Envoy with a tokenizer, a site table and one-forward reads/writes."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from nnsight import NNsight
from torch import nn

from mechinterp.engine import Plan, record_execution_order, run_plan
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.image_tokens import ImageTokens
from mechinterp.interventions import Intervention, checked_edits
from mechinterp.models import SiteTable, site_table
from mechinterp.sites import Site, SiteSelector, SiteUnion


@dataclass(frozen=True)
class Tokens:
    """A tokenized batch: ids and the mask of real (non-padding) tokens, both ``[batch, pos]``,
    and any other per-row inputs of the model (``pixel_values`` of a multimodal model), each
    with the batch first."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Tokens:
        return Tokens(self.input_ids.to(device), self.attention_mask.to(device),
                      {name: value.to(device) for name, value in self.extras.items()})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def rows(self, index: slice | torch.Tensor | Sequence[int]) -> Tokens:
        """The rows ``index`` of every input."""
        if not isinstance(index, (slice, torch.Tensor)):
            index = torch.as_tensor(list(index), dtype=torch.long)

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[index] if isinstance(index, slice) else x[index.to(x.device)]

        return Tokens(take(self.input_ids), take(self.attention_mask),
                      {name: take(value) for name, value in self.extras.items()})

    def repeat(self, times: int) -> Tokens:
        """The batch repeated ``times`` times along the rows."""
        def tile(x: torch.Tensor) -> torch.Tensor:
            return x.repeat(times, *([1] * (x.dim() - 1)))

        return Tokens(tile(self.input_ids), tile(self.attention_mask),
                      {name: tile(value) for name, value in self.extras.items()})

    @staticmethod
    def cat(parts: Sequence[Tokens]) -> Tokens:
        """Batches stacked along the rows (they must carry the same inputs).

        Extra inputs of different sizes past the batch axis (the image crops or packed patches
        of prompts with images of different sizes) are padded with zeros, which the families
        that carry them read as absent (see ``InputPacking``)."""
        names = set(parts[0].extras)
        if any(set(part.extras) != names for part in parts):
            msg = "batches to concatenate must carry the same extra inputs"
            raise InputError(msg)
        widths = [part.input_ids.shape[1] for part in parts]
        if len(set(widths)) > 1:
            msg = f"batches to concatenate must have the same number of positions; got {widths}"
            raise ShapeError(msg)
        return Tokens(torch.cat([p.input_ids for p in parts]),
                      torch.cat([p.attention_mask for p in parts]),
                      {name: _cat_padded([p.extras[name] for p in parts]) for name in names})


def _cat_padded(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``values`` stacked along the rows, each zero-padded at the end of its other axes."""
    shape = [max(v.shape[axis] for v in values) for axis in range(1, values[0].dim())]
    if all(list(v.shape[1:]) == shape for v in values):
        return torch.cat(list(values))
    out = values[0].new_zeros(sum(v.shape[0] for v in values), *shape)
    row = 0
    for value in values:
        out[(slice(row, row + value.shape[0]), *(slice(0, n) for n in value.shape[1:]))] = value
        row += value.shape[0]
    return out


class ActivationCache(Mapping[Site, torch.Tensor]):
    """Tensors read at sites in one forward, keyed by the sites as requested."""

    def __init__(self, values: dict[Site, torch.Tensor], order: Sequence[Site]):
        self._values = {site: values[site] for site in order}

    def __getitem__(self, site: Site) -> torch.Tensor:
        try:
            return self._values[site]
        except KeyError:
            msg = f"site {site} was not cached; cached sites: {[str(s) for s in self._values][:8]}"
            raise SiteError(msg) from None

    def __iter__(self) -> Iterator[Site]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites)"


@dataclass(frozen=True)
class RunResult:
    """The outcome of one forward: the model's logits (if it has a head) and the cache."""

    logits: torch.Tensor | None
    cache: ActivationCache
    tokens: Tokens


Sites = Site | Sequence[Site] | SiteSelector | SiteUnion
Inputs = str | Sequence[str] | torch.Tensor | Tokens


class InterpModel(NNsight):
    """A transformers model wrapped by nnsight, with mechinterp's site table and tokenization.

    Create it with :func:`mechinterp.load`. Inside ``model.trace(...)`` everything nnsight offers
    works as usual; :meth:`cache` and :meth:`run` read and write sites in one forward without a
    trace.
    """

    def __init__(self, module: nn.Module, tokenizer: object | None = None, *, name: str | None = None):
        super().__init__(module)
        self.table: SiteTable = site_table(module)
        self.tokenizer = tokenizer
        self.name = name or type(module).__name__
        prefix = getattr(module, "base_model_prefix", "")
        self.base = f"{prefix}." if prefix and hasattr(module, prefix) else ""
        self._execution_order: tuple[str, ...] | None = None
        self._order_has_extras = False
        self._order_index: dict[str, int] | None = None
        self._resolved: dict = {}  # Site -> engine.Resolved, memoised across forwards
        self._modules: dict[str, nn.Module] = {}  # path -> submodule, memoised across forwards
        self._read_plans: dict[tuple[Site, ...], Plan] = {}  # reads without positions or edits
        self._required_inputs = _required_inputs(module)
        module.eval()

    # -- description -----------------------------------------------------------------------

    @property
    def dims(self):
        """Sizes of the model (layers, heads, d_model...), as :class:`mechinterp.models.Dims`."""
        return self.table.dims

    @property
    def family(self) -> str:
        return self.table.family

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"InterpModel({self.name}, family={self.family}, layers={d.n_layers}, "
            f"heads={d.n_heads}, d_model={d.d_model})"
        )

    def sites(self, selection: Sites, *, n_positions: int | None = None) -> list[Site]:
        """Expand a selector (or pass through sites) with this model's sizes."""
        return expand_sites(self.table, selection, n_positions=n_positions)

    @property
    def execution_order(self) -> tuple[str, ...]:
        """Module paths in the order the forward first runs them, recorded once per model."""
        if self._execution_order is None:
            probe = self._as_tokens(torch.zeros(1, 2, dtype=torch.long))
            self._execution_order = record_execution_order(self._module, self._forward_inputs(probe))
        return self._execution_order

    # -- inputs ----------------------------------------------------------------------------

    def tokenize(self, prompts: str | Sequence[str], *, prepend_bos: bool | None = None) -> Tokens:
        """Tokenize prompts into a padded batch.

        Decoders are padded on the left, encoders on the right; site positions are counted from
        each row's real tokens either way. ``prepend_bos`` defaults to True for decoders whose
        tokenizer has a BOS token and does not add it itself.
        """
        if self.tokenizer is None:
            msg = "this model was loaded without a tokenizer; pass token ids or load(..., tokenizer=...)"
            raise InputError(msg)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            msg = f"prompts must be a string or a non-empty list of strings; got {prompts!r}"
            raise InputError(msg)
        tok = self.tokenizer
        if prepend_bos is None:
            prepend_bos = self.table.causal and tok.bos_token_id is not None
        rows = tok(list(prompts))["input_ids"]
        if prepend_bos:
            rows = [row if row[:1] == [tok.bos_token_id] else [tok.bos_token_id, *row] for row in rows]
        if not all(rows):
            msg = f"prompts must each hold at least one token; got {list(prompts)!r}"
            raise InputError(msg)
        pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, 0) if i is not None)
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            # Decoders pad on the left so that every row's last token is the last column.
            columns = slice(width - len(row), width) if self.table.causal else slice(0, len(row))
            ids[i, columns] = torch.tensor(row)
            mask[i, columns] = 1
        return Tokens(ids, mask)

    def _as_tokens(self, inputs: Inputs) -> Tokens:
        if isinstance(inputs, Tokens):
            tokens = inputs
        elif isinstance(inputs, Mapping) and "input_ids" in inputs:
            tokens = self._from_features(inputs)
        elif isinstance(inputs, (str, list, tuple)) and (
                isinstance(inputs, str) or all(isinstance(p, str) for p in inputs)):
            tokens = self.tokenize(inputs)  # type: ignore[arg-type]
        elif isinstance(inputs, torch.Tensor):
            ids = inputs[None] if inputs.dim() == 1 else inputs
            if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
                msg = (
                    f"inputs as a tensor must be integer token ids of shape [batch, pos] or [pos]; "
                    f"got dtype {inputs.dtype} and shape {tuple(inputs.shape)}"
                )
                raise ShapeError(msg)
            tokens = Tokens(ids.long(), torch.ones_like(ids, dtype=torch.long))
        else:
            msg = (
                f"inputs must be a string, a list of strings, a token-id tensor, Tokens or a "
                f"processor's output (a mapping with input_ids); got {type(inputs).__name__}"
            )
            raise InputError(msg)
        ids = tokens.input_ids
        if ids.numel() == 0:
            msg = f"inputs must hold at least one token; got shape {tuple(ids.shape)}"
            raise ShapeError(msg)
        vocab = self.dims.d_vocab
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab:
            msg = f"token ids must lie in [0, {vocab}); got values in [{low}, {high}]"
            raise InputError(msg)
        if tokens.attention_mask.shape != ids.shape:
            msg = (
                f"attention_mask must have the shape of input_ids {tuple(ids.shape)}; got "
                f"{tuple(tokens.attention_mask.shape)}"
            )
            raise ShapeError(msg)
        missing = [name for name in self._required_inputs if name not in tokens.extras]
        if missing:
            msg = (f"inputs must include {', '.join(missing)} for {self.name} (pass the processor's "
                   f"output, or Tokens with extras); got "
                   f"{', '.join(['input_ids', 'attention_mask', *tokens.extras])}")
            raise InputError(msg)
        device = self.device
        if tokens.extras:
            dtype = next(self._module.parameters()).dtype
            floats = {name: value.to(device, dtype) for name, value in tokens.extras.items()
                      if value.is_floating_point() and value.dtype != dtype}
            if floats:
                tokens = Tokens(tokens.input_ids, tokens.attention_mask, {**tokens.extras, **floats})
        return tokens if ids.device == device and all(
            v.device == device for v in tokens.extras.values()) else tokens.to(device)

    def _from_features(self, features: Mapping[str, torch.Tensor]) -> Tokens:
        """Tokens from a processor's output: ids, mask, and the other inputs (pixel values...),
        which must have one row per prompt once the family has unpacked any it packs."""
        ids = torch.as_tensor(features["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = features.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        extras = {name: value for name, value in features.items()
                  if name not in ("input_ids", "attention_mask")}
        if self.table.packing is not None:
            # Inputs the model takes packed across prompts become per-prompt rows here, so that
            # Tokens can select, repeat and concatenate them like any other input.
            extras = self.table.packing.to_rows(ids, extras)
        for name, value in extras.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != ids.shape[0]:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                msg = (f"inputs[{name!r}] must be a tensor with one row per prompt "
                       f"({ids.shape[0]}); got {got}")
                raise ShapeError(msg)
        return Tokens(ids.long(), mask.long(), extras)

    def image_positions(self, inputs: Inputs) -> tuple[int, ...]:
        """Positions of the image tokens, counted from each row's first real token (the same
        in every row), for sites such as ``Site("resid_pre", layer=0, pos=...)``."""
        image = self.table.image_token_id
        if image is None:
            msg = f"this {self.family} model has no image tokens"
            raise InputError(msg)
        tokens = self._as_tokens(inputs)
        mask = tokens.attention_mask.bool().cpu()
        first = mask.to(torch.int8).argmax(dim=1)
        found = [tuple(int(c) - int(first[row]) for c in (tokens.input_ids[row].cpu() == image).nonzero().flatten())
                 for row in range(tokens.shape[0])]
        if not found[0] or any(row != found[0] for row in found):
            msg = ("inputs must hold the same image-token positions in every row (counted from "
                   f"each row's first real token); got {sorted(set(found))[:3]}")
            raise InputError(msg)
        return found[0]

    def modality_positions(self, inputs: Inputs) -> dict[str, tuple[int, ...]]:
        """Positions of all image tokens and of all other real tokens: ``{"image": ...,
        "text": ...}``, counted as :meth:`image_positions` counts them, for sites over a whole
        modality (``Site("resid_pre", layer=3, pos=groups["text"])``) and as groups of players
        (``TokenGame(model, prompt, players=list(groups.values()))``)."""
        tokens = self._as_tokens(inputs)
        image = self.image_positions(tokens)
        length = int(tokens.attention_mask[0].sum())
        taken = set(image)
        return {"image": image, "text": tuple(p for p in range(length) if p not in taken)}

    def _language_model(self) -> nn.Module:
        """The module that runs the main tower's layers (their parent): a multimodal model
        calls it with the input embeddings after the image features were merged in."""
        return self._module.get_submodule(self.table.blocks.format(base=self.base).rsplit(".", 1)[0])

    def image_tokens(self, inputs: Inputs) -> ImageTokens:
        """What each image token shows (its image, crop, grid cell and projector row), for
        choosing positions by what they cover; see :class:`~mechinterp.image_tokens.ImageTokens`.

        Raises:
            InputError: the model has no image tokens, the rows hold them at different
                positions or from images of different layouts, or the image does not fill them.
        """
        tokens = self._as_tokens(inputs)
        positions = self.image_positions(tokens)
        layout_of = self.table.image_layout
        if layout_of is None:
            msg = f"this {self.family} model does not say what its image tokens show; use image_positions"
            raise InputError(msg)
        layouts = [layout_of(self._module, tokens.rows([row])) for row in range(tokens.shape[0])]
        if any(layout != layouts[0] for layout in layouts[1:]):
            msg = ("inputs: the rows' images fill their image tokens differently (images of "
                   "different sizes); pass rows with images of one size")
            raise InputError(msg)
        layout = layouts[0]
        if len(layout.feature) != len(positions):
            msg = (f"inputs: the image fills {len(layout.feature)} image tokens, but a prompt "
                   f"holds {len(positions)}")
            raise InputError(msg)
        return ImageTokens(positions, tuple(layout.image), tuple(layout.crop), tuple(layout.row),
                           tuple(layout.col), tuple(layout.feature))

    def _forward_inputs(self, tokens: Tokens) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                  **tokens.extras}
        if self.table.position_ids:
            # Count positions from each row's first real token so left padding changes nothing.
            inputs["position_ids"] = (tokens.attention_mask.cumsum(-1) - 1).clamp(min=0)
        if self.table.causal:
            inputs["use_cache"] = False
        if self.table.packing is not None:
            inputs = self.table.packing.to_model(inputs)
        return inputs

    # -- forwards --------------------------------------------------------------------------

    def run(
        self,
        inputs: Inputs,
        *,
        edits: Sequence[Intervention] = (),
        cache: Sites = (),
        grad: bool = False,
    ) -> RunResult:
        """One forward with ``edits`` applied and ``cache`` sites read.

        Args:
            inputs: prompts, token ids ``[batch, pos]`` or :class:`Tokens`.
            edits: interventions, applied in order at each site (``Set``, ``Add``, ``Zero``,
                ``Scale``).
            cache: sites to read; each read sees the value after the edits at its site.
            grad: keep the autograd graph (off by default to save memory).

        Returns:
            RunResult with ``logits`` ``[batch, pos, vocab]`` (None for models without a head)
            and ``cache`` mapping each requested site to its tensor.

        Examples:
            >>> import mechinterp
            >>> from mechinterp import Site, Zero
            >>> model = mechinterp.load("induction-2l")
            >>> out = model.run("fuba bu fuba", edits=[Zero(Site("head", layer=1, head=0))],
            ...                 cache=[Site("resid_post", layer=1)])
            >>> tuple(out.cache[Site("resid_post", layer=1)].shape)  # <bos> is prepended
            (1, 4, 64)
        """
        edits = checked_edits(edits)
        tokens = self._as_tokens(inputs)
        reads = self.sites(cache, n_positions=tokens.shape[1])
        with torch.set_grad_enabled(grad):
            output, values = self._forward(tokens, self._plan(tokens, reads, edits))
        logits = getattr(output, "logits", None)
        return RunResult(logits, ActivationCache(values, reads), tokens)

    def _forward(
        self,
        tokens: Tokens,
        plan: Plan,
        *,
        stubs: Mapping[str, object] | None = None,
        extra_inputs: Mapping[str, object] | None = None,
        start: int = 0,
        past: object | None = None,
        embeds: torch.Tensor | None = None,
    ) -> tuple[object, dict[Site, torch.Tensor]]:
        """One forward of checked ``tokens`` under ``plan``; see :func:`engine.run_plan`.

        With ``start > 0`` (causal models only), only the positions from ``start`` on run:
        ``past`` is a key/value cache holding the first ``start`` positions of every layer, and
        the attention mask still covers the whole sequence. ``embeds`` then gives the language
        model's input embeddings of those positions instead of the token ids and the other
        inputs: a multimodal model's image has already been merged into them, so no tower runs.
        """
        if tokens.extras and not self._order_has_extras:
            # The probe forward of execution_order has no image; the towers it skipped run
            # only with one, so the order is recorded again from one row of real inputs.
            self._execution_order = record_execution_order(
                self._module, self._forward_inputs(tokens.rows(slice(0, 1))))
            self._order_has_extras, self._order_index = True, None
        if self._order_index is None:
            self._order_index = {path: i for i, path in enumerate(self.execution_order)}
        inputs = self._forward_inputs(tokens)
        if start:
            inputs["input_ids"] = inputs["input_ids"][:, start:]
            if "position_ids" in inputs:
                inputs["position_ids"] = inputs["position_ids"][:, start:]
            inputs["past_key_values"] = past
            inputs["use_cache"] = True
        if embeds is not None:
            for name in ("input_ids", *tokens.extras):
                inputs.pop(name, None)
            inputs["inputs_embeds"] = embeds
        if extra_inputs:
            inputs.update(extra_inputs)
        if self.table.packing is not None:
            # Sites of a packed tensor split it into equal shares per row; the family knows
            # whether this batch's rows hold equal shares.
            self.table.packing.check_sites(
                tokens, [site for b in plan.boundaries.values() for site in b.sites])
        return run_plan(self._module, plan, inputs, self._order_index, self._modules, stubs)

    def _plan(self, tokens: Tokens, reads: list[Site], edits: Sequence[Intervention]) -> Plan:
        # A plan that neither edits nor indexes positions does not depend on the batch, so the
        # same request (a cache of whole sites, say) is planned once.
        reusable = not edits and all(site.pos is None for site in reads)
        key = tuple(reads)
        if reusable and key in self._read_plans:
            return self._read_plans[key]
        plan = Plan(self.table, self.base, tokens.attention_mask, reads, edits, self._resolved)
        if reusable and len(self._read_plans) < 64:
            self._read_plans[key] = plan
        return plan

    def cache(self, inputs: Inputs, sites: Sites, *, grad: bool = False) -> ActivationCache:
        """Read ``sites`` in one unedited forward.

        Examples:
            >>> import mechinterp
            >>> model = mechinterp.load("induction-2l")
            >>> cache = model.cache("<bos> fuba bu", mechinterp.select("resid_pre"))
            >>> len(cache), tuple(cache[mechinterp.Site("resid_pre", layer=0)].shape)
            (2, (1, 3, 64))
        """
        return self.run(inputs, cache=sites, grad=grad).cache

    def logits(self, inputs: Inputs, *, edits: Sequence[Intervention] = ()) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` of one forward with optional edits."""
        result = self.run(inputs, edits=edits)
        if result.logits is None:
            self.table.place("logits")  # raises, naming why there is no head
        return result.logits


def expand_sites(table: SiteTable, selection: Sites, *, n_positions: int | None = None
                 ) -> list[Site]:
    """Expand a selector (or pass through sites) with the sizes of ``table``'s model."""
    if isinstance(selection, Site):
        return [selection]
    if isinstance(selection, SiteUnion):
        return [site for part in selection.parts
                for site in expand_sites(table, part, n_positions=n_positions)]
    if isinstance(selection, SiteSelector):
        sites = []
        # Each component expands with its own tower's (or units') sizes.
        for component in selection.components:
            d = table.dims_for(component)
            sites += replace(selection, components=(component,)).sites(
                n_layers=d.n_layers, n_heads=d.n_heads, n_neurons=d.d_mlp,
                n_positions=n_positions)
        return sites
    if isinstance(selection, (str, bytes)) or not isinstance(selection, Iterable):
        msg = (f"sites must be a Site, a sequence of Sites or a selector; got "
               f"{type(selection).__name__}")
        raise InputError(msg)
    sites = list(selection)
    for site in sites:
        if not isinstance(site, Site):
            msg = f"sites must be Site objects or a selector; got {type(site).__name__}"
            raise InputError(msg)
    return sites


def _required_inputs(module: nn.Module) -> tuple[str, ...]:
    """Inputs the module's forward cannot run without besides the token ids and mask, which
    every forward passes (BLIP-2 needs ``pixel_values`` even for a text-only prompt)."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a signature to read
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in parameters if p.kind in named and p.default is inspect.Parameter.empty
                 and p.name not in ("input_ids", "attention_mask"))
