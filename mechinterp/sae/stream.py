"""Stream SAE features of a whole dataset to disk, and read them back as a :class:`FeatureStore`.

:func:`stream_features` runs the model over the prompts a batch at a time, reads the SAE's site,
encodes every real (non-padding) token with :func:`~mechinterp.sae.encode_sparse` and writes one
shard per batch: compressed rows (``row_ptr`` / ``indices`` / ``values``) plus, for every row,
its token id, prompt and position. A JSON manifest names the model, the SAE (a hash of its
weights), the site and the dataset (a hash of its prompts or ids), and lists the finished
shards. Shards and manifest are written under a temporary name and renamed, so a crash leaves
only whole files; a later call with the same arguments continues after the last finished shard.

Folder layout::

    manifest.json
    shard-00000.safetensors   row_ptr [rows + 1], indices [nnz], values [nnz],
    shard-00001.safetensors   token_ids [rows], prompts [rows], positions [rows]
    ...

Examples:
    >>> import tempfile
    >>> import mechinterp
    >>> from mechinterp.zoo import zoo_sae
    >>> model = mechinterp.load("induction-2l")
    >>> sae = zoo_sae("induction-2l-sae")
    >>> with tempfile.TemporaryDirectory() as out:
    ...     store = stream_features(model, sae, ["fuba bu mabi", "bu fuba"], out=out,
    ...                             progress=False)
    ...     top = store.top_activations(33, k=2)
    ...     store.rows, store.features(range(3)).l0.tolist(), top.positions.tolist()
    (7, [8, 8, 8], [1, 2])
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.sae.encode import SparseFeatures, encode_sparse
from mechinterp.sae.sae import _TENSOR_FIELDS, SAE
from mechinterp.sites import COMPONENT_AXES, GLOBAL_COMPONENTS, Site

if TYPE_CHECKING:
    from mechinterp.model import InterpModel, Tokens

__all__ = ["FeatureStore", "RowLocations", "TopActivations", "resolve_site", "stream_features"]

FORMAT = "mechinterp.FeatureStore/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"shard-\d{5}\.safetensors")
# Shards kept in memory by a FeatureStore: reads tend to come in runs over nearby rows.
_CACHED_SHARDS = 4
# SAELens / TransformerLens hook names, mapped to components.
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)")


@dataclass(frozen=True)
class RowLocations:
    """Where rows of a store come from.

    Attributes:
        prompts: int64 ``[n]``, the prompt (dataset index) of each row.
        positions: int64 ``[n]``, the position among the prompt's real tokens (0 is the first).
        token_ids: int64 ``[n]``, the token at that position.
    """

    prompts: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor


@dataclass(frozen=True)
class TopActivations:
    """The strongest activations of one latent, in descending order of value.

    Attributes:
        latent: the latent.
        values: ``[n]`` activations (all positive).
        rows: int64 ``[n]``, rows of the store.
        prompts: int64 ``[n]``, the prompt of each row.
        positions: int64 ``[n]``, the position of each row in its prompt.
        token_ids: int64 ``[n]``, the token at each row.
    """

    latent: int
    values: torch.Tensor
    rows: torch.Tensor
    prompts: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor

    def __len__(self) -> int:
        return self.values.shape[0]

    def to_records(self) -> list[dict[str, float | int]]:
        """One dict per activation: ``value``, ``row``, ``prompt``, ``pos``, ``token_id``."""
        return [
            {"value": float(v), "row": int(r), "prompt": int(p), "pos": int(q), "token_id": int(t)}
            for v, r, p, q, t in zip(self.values, self.rows, self.prompts, self.positions,
                                     self.token_ids)
        ]


class FeatureStore:
    """SAE features written by :func:`stream_features`, read back from their folder.

    Rows are tokens, in dataset order and then position order. Shards are loaded when a call
    needs them (a few are kept in memory); the statistics make one pass over the store and are
    cached.

    Args:
        path: the folder :func:`stream_features` wrote.

    Raises:
        InputError: ``path`` holds no manifest, or one in another format.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> import mechinterp
        >>> from mechinterp.zoo import zoo_sae
        >>> model = mechinterp.load("induction-2l")
        >>> with tempfile.TemporaryDirectory() as out:
        ...     _ = stream_features(model, zoo_sae("induction-2l-sae"), torch.tensor([[3, 4, 5]]),
        ...                         out=out, progress=False)
        ...     store = FeatureStore(out)
        ...     store.rows, store.complete, store.locate([2]).token_ids.tolist()
        (3, True, [5])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        manifest = _read_manifest(self.path)
        if manifest is None:
            msg = f"path must be a folder written by stream_features (with {MANIFEST}); got {str(path)!r}"
            raise InputError(msg)
        self.manifest: dict = manifest
        self.d_sae: int = int(manifest["d_sae"])
        counts = [int(shard["rows"]) for shard in manifest["shards"]]
        self._starts = torch.zeros(len(counts) + 1, dtype=torch.int64)
        if counts:
            torch.cumsum(torch.tensor(counts, dtype=torch.int64), dim=0, out=self._starts[1:])
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        identity = self.manifest["identity"]
        state = "complete" if self.complete else "incomplete"
        return (f"FeatureStore({str(self.path)!r}, rows={self.rows}, d_sae={self.d_sae}, "
                f"site={identity['site']}, {state})")

    # -- description ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Number of rows (tokens) stored."""
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.rows

    @property
    def complete(self) -> bool:
        """Whether every prompt of the dataset has been encoded."""
        return bool(self.manifest["complete"])

    @property
    def site(self) -> Site:
        """The site the features were read at."""
        return resolve_site(None, self.manifest["identity"]["site"])

    # -- rows ----------------------------------------------------------------------------------

    def features(self, rows: int | slice | Sequence[int] | torch.Tensor) -> SparseFeatures:
        """The features of ``rows`` (in the order given), as compressed rows on the CPU.

        Args:
            rows: a row, a slice, a sequence of rows or an int tensor; negative rows count from
                the end.

        Raises:
            InputError: a row outside ``[-rows, rows)`` or of a non-integer type.
        """
        index = self._row_index(rows)
        if index.numel() == 0:
            return self._empty_features()
        shard_of = torch.searchsorted(self._starts[1:], index, right=True)
        order = torch.argsort(shard_of, stable=True)
        lengths, indices, values = [], [], []
        for shard in torch.unique_consecutive(shard_of[order]).tolist():
            chosen = order[shard_of[order] == shard]
            data = self._shard(shard)
            ptr, ind, val = _take_rows(data["row_ptr"], data["indices"], data["values"],
                                       index[chosen] - self._starts[shard])
            lengths.append(ptr[1:] - ptr[:-1])
            indices.append(ind)
            values.append(val)
        # Rows are now grouped by shard; put them back in the order asked for.
        grouped_ptr = _row_ptr(torch.cat(lengths))
        row_ptr, ind, val = _take_rows(grouped_ptr, torch.cat(indices), torch.cat(values),
                                       torch.argsort(order))
        return SparseFeatures(row_ptr, ind.to(torch.int64), val, self.d_sae, (index.numel(),))

    def locate(self, rows: int | slice | Sequence[int] | torch.Tensor) -> RowLocations:
        """The prompt, position and token of ``rows`` (same argument as :meth:`features`)."""
        index = self._row_index(rows)
        columns = {name: torch.empty(index.numel(), dtype=torch.int64)
                   for name in ("prompts", "positions", "token_ids")}
        if index.numel():
            shard_of = torch.searchsorted(self._starts[1:], index, right=True)
            for shard in torch.unique(shard_of).tolist():
                where = (shard_of == shard).nonzero().flatten()
                data = self._shard(shard)
                local = index[where] - self._starts[shard]
                for name, column in columns.items():
                    column[where] = data[name][local]
        return RowLocations(**columns)

    def prompt_rows(self, prompt: int) -> torch.Tensor:
        """The rows of one prompt, in position order, int64 ``[tokens]``.

        Raises:
            InputError: ``prompt`` is not an int among the prompts encoded so far.
        """
        shards = self.manifest["shards"]
        encoded = shards[-1]["prompts"][1] if shards else 0
        prompt = _check_int("prompt", prompt, low=0, high=encoded)
        shard = next(i for i, s in enumerate(shards) if s["prompts"][0] <= prompt < s["prompts"][1])
        local = (self._shard(shard)["prompts"] == prompt).nonzero().flatten()
        return local + self._starts[shard]

    # -- statistics ----------------------------------------------------------------------------

    def frequency(self) -> torch.Tensor:
        """Fraction of rows on which each latent is positive, float64 ``[d_sae]``."""
        fired, _ = self._statistics()
        return fired / max(self.rows, 1)

    def mean_activation(self) -> torch.Tensor:
        """Mean activation of each latent over every row (zeros included), float64 ``[d_sae]``.

        The mean over the rows where a latent fires is ``mean_activation() / frequency()``.
        """
        _, total = self._statistics()
        return total / max(self.rows, 1)

    def mean_l0(self) -> float:
        """Mean number of positive latents per row."""
        fired, _ = self._statistics()
        return float(fired.sum()) / max(self.rows, 1)

    def top_activations(self, latent: int, k: int) -> TopActivations:
        """The ``k`` largest activations of ``latent`` over the whole store.

        Only positive activations count, so a latent that fires on fewer than ``k`` rows gives
        fewer. Equal values keep row order.

        Args:
            latent: a latent in ``[0, d_sae)``.
            k: how many activations, a positive int.

        Raises:
            InputError: ``latent`` or ``k`` out of range or not an int.
        """
        latent = _check_int("latent", latent, low=0, high=self.d_sae)
        k = _check_int("k", k, low=1)
        best_values = torch.empty(0, dtype=torch.float64)
        best_rows = torch.empty(0, dtype=torch.int64)
        for shard in range(len(self.manifest["shards"])):
            data = self._shard(shard)
            hit = (data["indices"] == latent) & (data["values"] > 0)
            if not hit.any():
                continue
            rows = _entry_rows(data["row_ptr"])[hit] + self._starts[shard]
            values = data["values"][hit].to(torch.float64)
            best_values = torch.cat([best_values, values])
            best_rows = torch.cat([best_rows, rows])
            # Rows ascend, so a stable sort on descending values keeps ties in row order.
            keep = torch.sort(best_values, descending=True, stable=True).indices[:k]
            best_values, best_rows = best_values[keep], best_rows[keep]
        where = self.locate(best_rows)
        dtype = getattr(torch, self.manifest["dtype"])
        return TopActivations(latent, best_values.to(dtype), best_rows, where.prompts,
                              where.positions, where.token_ids)

    # -- internals -----------------------------------------------------------------------------

    def _row_index(self, rows: object) -> torch.Tensor:
        n = self.rows
        if isinstance(rows, slice):
            return torch.arange(n, dtype=torch.int64)[rows]
        if isinstance(rows, range):
            rows = list(rows)
        try:
            if isinstance(rows, torch.Tensor):
                if rows.is_floating_point() or rows.dtype == torch.bool:
                    raise TypeError
                index = rows.to(torch.int64).reshape(-1).cpu()
            elif isinstance(rows, (str, bytes)):
                raise TypeError
            elif isinstance(rows, Sequence):
                index = torch.tensor([_as_row(r) for r in rows], dtype=torch.int64)
            else:
                index = torch.tensor([_as_row(rows)], dtype=torch.int64)
        except (TypeError, ValueError):
            msg = f"rows must be an int, a slice, a sequence of ints or an int tensor; got {rows!r}"
            raise InputError(msg) from None
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            msg = (f"rows must lie in [-{n}, {n}) for a store of {n} rows; got values in "
                   f"[{int(index.min())}, {int(index.max())}]")
            raise InputError(msg)
        return torch.where(index < 0, index + n, index)

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        entry = self.manifest["shards"][number]
        data = load_file(str(self.path / entry["file"]))
        data["indices"] = data["indices"].to(torch.int64)
        self._cache[number] = data
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return data

    def _empty_features(self) -> SparseFeatures:
        dtype = getattr(torch, self.manifest["dtype"])
        return SparseFeatures(torch.zeros(1, dtype=torch.int64),
                              torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=dtype),
                              self.d_sae, (0,))

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            fired = torch.zeros(self.d_sae, dtype=torch.float64)
            total = torch.zeros(self.d_sae, dtype=torch.float64)
            for shard in range(len(self.manifest["shards"])):
                data = self._shard(shard)
                on = data["values"] > 0
                fired += torch.bincount(data["indices"][on], minlength=self.d_sae)
                total.index_add_(0, data["indices"], data["values"].to(torch.float64))
            self._stats = fired, total
        return self._stats


def stream_features(
    model: InterpModel,
    sae: SAE,
    dataset: Sequence[str] | torch.Tensor | Tokens,
    *,
    out: str | os.PathLike[str],
    site: Site | str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FeatureStore:
    """Encode the SAE features of every token of ``dataset`` and write them to ``out`` in shards.

    Each batch of ``batch_size`` prompts is one forward, one :func:`encode_sparse` and one shard.
    With ``resume``, a folder that already holds shards of the same run (same model, SAE, site
    and dataset) continues after its last finished shard, and a finished run is returned as it
    is; the batch size may differ between the calls.

    Args:
        model: an :class:`mechinterp.model.InterpModel`.
        sae: the autoencoder.
        dataset: prompts (a list of strings), token ids ``[prompts, pos]`` (every token real), or
            ``Tokens`` (ids with a padding mask).
        out: the folder to write (created if missing).
        site: where to read the activations, a :class:`Site` or a name such as ``"resid_post.0"``
            or ``"blocks.0.hook_resid_post"`` (default: the SAE's ``hook_name``). It must hold
            one vector per token: a whole ``[batch, pos, d]`` component at one layer.
        batch_size: prompts per forward and per shard.
        device: where the SAE encodes (default: the model's device); the model is not moved.
        resume: continue a run of the same arguments from ``out``; if False, any store in
            ``out`` is deleted first.
        progress: show a progress bar over the prompts.

    Returns:
        The store, read from ``out``.

    Raises:
        InputError: ``batch_size`` is not a positive int, ``dataset`` is empty or of another
            type, ``out`` is a file, or ``out`` holds a store of other arguments and ``resume``
            is True.
        SiteError: ``site`` cannot be parsed, or the model has no such site.
        ShapeError: the site does not hold one vector per token, or its width is not ``d_in``.

    Examples:
        >>> import tempfile
        >>> import mechinterp
        >>> from mechinterp.zoo import zoo_sae
        >>> model = mechinterp.load("induction-2l")
        >>> with tempfile.TemporaryDirectory() as out:
        ...     store = stream_features(model, zoo_sae("induction-2l-sae"), ["fuba bu", "bu"],
        ...                             out=out, batch_size=1, progress=False)
        ...     store.rows, len(store.manifest["shards"]), round(store.mean_l0(), 1)
        (5, 2, 8.0)
    """
    if not isinstance(sae, SAE):
        msg = f"sae must be an SAE; got {type(sae).__name__}"
        raise InputError(msg)
    batch_size = _check_int("batch_size", batch_size, low=1)
    site = resolve_site(sae, site)
    n_layers = model.dims.n_layers
    if site.layer is not None and -n_layers <= site.layer < 0:
        # One name per site in the manifest: layer -1 and layer n_layers - 1 are one run.
        site = site.at(layer=site.layer + n_layers)
    data = _Dataset.make(dataset)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        msg = f"out must be a folder; got the file {str(out)!r}"
        raise InputError(msg)
    encoder = sae.to(device=model.device if device is None else device)
    # One short forward checks the site and its width before anything is written.
    _read_rows(model, data.batch(0, 1), site, encoder)
    identity = {
        "model": {"name": model.name, "family": model.family, "dims": repr(model.dims)},
        "sae": _sae_identity(sae),
        "site": str(site),
        "dataset": {"kind": data.kind, "prompts": data.size, "sha256": data.fingerprint()},
    }
    manifest = _start(out, identity, sae, data.size, resume=resume)
    done = manifest["shards"][-1]["prompts"][1] if manifest["shards"] else 0
    with tqdm(total=data.size, initial=done, desc="encoding features", unit="prompt",
              disable=not progress, leave=False) as bar:
        while done < data.size:
            stop = min(done + batch_size, data.size)
            x, where = _read_rows(model, data.batch(done, stop), site, encoder)
            with torch.no_grad():
                features = encode_sparse(encoder, x)
            name = f"shard-{len(manifest['shards']):05d}.safetensors"
            tensors = {
                "row_ptr": features.row_ptr,
                # int32 halves the indices on disk; no SAE has 2**31 latents.
                "indices": features.indices.to(torch.int32),
                "values": features.values,
                "token_ids": where.token_ids,
                "prompts": where.prompts + done,
                "positions": where.positions,
            }
            _write_atomic(out / name, lambda tmp, t=tensors: save_file(
                {k: v.detach().cpu().contiguous() for k, v in t.items()}, str(tmp)))
            manifest["shards"].append({"file": name, "prompts": [done, stop],
                                       "rows": features.rows})
            done = stop
            manifest["complete"] = done == data.size
            _write_manifest(out, manifest)
            bar.update(stop - manifest["shards"][-1]["prompts"][0])
    return FeatureStore(out)


def resolve_site(sae: SAE | None, site: Site | str | None) -> Site:
    """The site to read: ``site`` itself, parsed from a name, or the SAE's ``hook_name``.

    Names are ``"component.layer"`` (``"resid_post.0"``, ``"mlp_out.3"``), a global component
    (``"embed"``), or a TransformerLens hook (``"blocks.0.hook_resid_post"``).

    Raises:
        SiteError: the name cannot be parsed, or neither ``site`` nor a ``hook_name`` is given.

    Examples:
        >>> resolve_site(None, "blocks.3.hook_mlp_out")
        Site('mlp_out', layer=3)
    """
    if isinstance(site, Site):
        return site
    if site is None:
        site = None if sae is None else sae.hook_name
        if site is None:
            msg = "site is required: the SAE has no hook_name to read it from; got site=None"
            raise SiteError(msg)
    if not isinstance(site, str):
        msg = f"site must be a Site, a site name or None; got {type(site).__name__}"
        raise SiteError(msg)
    hook = _HOOK.fullmatch(site)
    if hook:
        return Site(hook.group(2), layer=int(hook.group(1)))
    component, _, layer = site.rpartition(".")
    if component in COMPONENT_AXES and layer.lstrip("-").isdigit():
        return Site(component, layer=int(layer))
    if site in GLOBAL_COMPONENTS:
        return Site(site)
    msg = (
        f"site must be 'component.layer' (e.g. 'resid_post.0'), 'embed', or a hook name like "
        f"'blocks.0.hook_resid_post'; got {site!r}"
    )
    raise SiteError(msg)


# ---- internals ----


@dataclass(frozen=True)
class _Dataset:
    """The prompts of a run, cut into batches on demand."""

    kind: str  # "prompts", "token_ids" or "tokens"
    prompts: Sequence[str] | None
    ids: torch.Tensor | None
    mask: torch.Tensor | None

    @staticmethod
    def make(dataset: object) -> _Dataset:
        from mechinterp.model import Tokens

        if isinstance(dataset, str):
            dataset = [dataset]
        if isinstance(dataset, Tokens):
            ids, mask = dataset.input_ids, dataset.attention_mask
            result = _Dataset("tokens", None, ids.cpu(), mask.cpu())
        elif isinstance(dataset, torch.Tensor):
            ids = dataset[None] if dataset.ndim == 1 else dataset
            if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
                msg = (f"dataset as a tensor must be int token ids [prompts, pos]; got dtype "
                       f"{dataset.dtype} and shape {tuple(dataset.shape)}")
                raise InputError(msg)
            result = _Dataset("token_ids", None, ids.cpu(), None)
        elif isinstance(dataset, Sequence) and all(isinstance(p, str) for p in dataset):
            result = _Dataset("prompts", list(dataset), None, None)
        else:
            msg = (f"dataset must be a list of prompts, int token ids [prompts, pos] or Tokens; "
                   f"got {type(dataset).__name__}")
            raise InputError(msg)
        if result.size == 0 or (result.ids is not None and result.ids.shape[1] == 0):
            msg = f"dataset must hold at least one prompt with one token; got {dataset!r}"
            raise InputError(msg)
        return result

    @property
    def size(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.ids.shape[0]

    def batch(self, start: int, stop: int):
        from mechinterp.model import Tokens

        if self.prompts is not None:
            return list(self.prompts[start:stop])
        if self.mask is None:
            return self.ids[start:stop]
        return Tokens(self.ids[start:stop], self.mask[start:stop])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        if self.prompts is not None:
            for prompt in self.prompts:
                text = prompt.encode("utf-8", "surrogatepass")
                digest.update(len(text).to_bytes(8, "little") + text)
            return digest.hexdigest()
        for tensor in (self.ids, self.mask):
            if tensor is not None:
                digest.update(repr(tuple(tensor.shape)).encode())
                digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()


def _read_rows(model, batch, site: Site, sae: SAE) -> tuple[torch.Tensor, RowLocations]:
    """Activations of the batch's real tokens ``[rows, d_in]`` on the SAE's device, with where
    each row comes from (prompts counted from the batch's first)."""
    axes = site.axes
    if len(axes) != 3 or axes[:2] != ("batch", "pos"):
        msg = (f"site must hold one vector per token (axes [batch, pos, d]); {site} has axes "
               f"{axes}")
        raise ShapeError(msg)
    result = model.run(batch, cache=[site])
    x = result.cache[site]
    if x.shape[-1] != sae.d_in:
        msg = (f"the SAE reads d_in={sae.d_in} features, but the activation at {site} has "
               f"{x.shape[-1]} (shape {tuple(x.shape)})")
        raise ShapeError(msg)
    mask = result.tokens.attention_mask.bool()
    rows = x[mask.to(x.device)].to(device=sae.device, dtype=sae.dtype)
    mask = mask.cpu()
    prompts = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
    positions = (mask.cumsum(dim=1) - 1)[mask]
    token_ids = result.tokens.input_ids.cpu()[mask]
    return rows, RowLocations(prompts, positions, token_ids)


def _sae_identity(sae: SAE) -> dict:
    digest = hashlib.sha256()
    for name in _TENSOR_FIELDS:
        tensor = getattr(sae, name)
        if tensor is None:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = (sae.architecture, sae.k, sae.apply_b_dec_to_input, sae.normalize_activations,
                sae.rescale_acts_by_decoder_norm)
    digest.update(repr(settings).encode())
    return {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
            "hook_name": sae.hook_name, "sha256": digest.hexdigest()}


def _start(out: Path, identity: dict, sae: SAE, n_prompts: int, *, resume: bool) -> dict:
    """The manifest to continue from, after clearing whatever in ``out`` it does not list."""
    # Without resume the old manifest is not even read: a broken one is replaced too.
    old = _read_manifest(out) if resume and out.is_dir() else None
    if old is not None and old["identity"] != identity:
        differ = [key for key in identity if old["identity"].get(key) != identity[key]]
        msg = (
            f"out {str(out)!r} holds features of other arguments ({', '.join(differ)} differ); "
            f"pass resume=False (--overwrite) to replace them, or another out"
        )
        raise InputError(msg)
    kept = []
    if old is not None:
        # Continue after the longest run of shards whose files are all there.
        for shard in old["shards"]:
            if not (out / shard["file"]).is_file():
                break
            kept.append(shard)
    out.mkdir(parents=True, exist_ok=True)
    keep = {shard["file"] for shard in kept}
    for path in out.iterdir():
        stale_shard = _SHARD.fullmatch(path.name) and path.name not in keep
        leftover = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (stale_shard or leftover):
            path.unlink()
    manifest = {
        "format": FORMAT,
        "identity": identity,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "shards": kept,
        "complete": bool(kept) and kept[-1]["prompts"][1] == n_prompts,
    }
    _write_manifest(out, manifest)
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{str(path)!r} must be a JSON manifest written by stream_features; {error}"
        raise InputError(msg) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        msg = f"{str(path)!r} must be a manifest of format {FORMAT!r}; got {got!r}"
        raise InputError(msg)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    _write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary name in the same folder and rename, so ``path`` is either the
    old file or the whole new one, never part of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _row_ptr(lengths: torch.Tensor) -> torch.Tensor:
    ptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, dim=0, out=ptr[1:])
    return ptr


def _take_rows(row_ptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
               rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed rows ``rows`` (in that order) of a CSR matrix."""
    starts = row_ptr[rows]
    lengths = row_ptr[rows + 1] - starts
    ptr = _row_ptr(lengths)
    total = int(ptr[-1])
    offsets = torch.arange(total) - torch.repeat_interleave(ptr[:-1], lengths, output_size=total)
    source = torch.repeat_interleave(starts, lengths, output_size=total) + offsets
    return ptr, indices[source], values[source]


def _entry_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    lengths = row_ptr[1:] - row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths,
                                   output_size=int(row_ptr[-1]))


def _as_row(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)


def _check_int(name: str, value: object, *, low: int, high: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        bound = f"[{low}, {high})" if high != math.inf else f">= {low}"
        msg = f"{name} must be an int {bound}; got {value!r}"
        raise InputError(msg)
    return value
