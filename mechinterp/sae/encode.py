"""Sparse encode and decode: SAE features without the ``[tokens, d_sae]`` matrix.

``encode_sparse`` runs the encoder GEMM (cuBLAS or the CPU BLAS, through torch) on chunks of
latents and hands each chunk's pre-activations to a compiled selector that keeps only what the
activation lets through: the top ``k`` per token (TopK) or the latents above their threshold
(ReLU, JumpReLU, BatchTopK at inference, gated). Only one chunk of pre-activations exists at a
time, and the result is compressed rows (:class:`SparseFeatures`). ``decode_sparse`` gathers the
decoder rows of the active latents and sums them in float32.

On Hopper GPUs, bfloat16 and float16 ReLU / JumpReLU / BatchTopK / gated SAEs skip the chunks:
the threshold runs in the GEMM's epilogue (:mod:`mechinterp.sae.fused`), so no pre-activation
reaches memory. TopK SAEs of those dtypes there encode one chunk, a sample of their latents, and
the fused GEMM keeps from the others only what reaches each row's k-th of the sample.

On CUDA the top ``k`` is a running one: each chunk keeps only the values that reach a lower
bound of the token's k-th largest (the k-th of the chunks merged so far, or the chunk's own
bound), and a per-token bitonic merge folds those few into the running top ``k``, whose k-th
value becomes the next chunk's bound.

Examples:
    >>> import torch
    >>> from mechinterp.sae import SAE, decode_sparse, encode_sparse
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> sae = SAE(W_enc=torch.randn(8, 32), b_enc=torch.zeros(32), W_dec=torch.randn(32, 8),
    ...           b_dec=torch.zeros(8), architecture="topk", k=4)
    >>> x = torch.randn(5, 8)
    >>> features = encode_sparse(sae, x)
    >>> features.indices.shape, features.l0.tolist()
    (torch.Size([20]), [4, 4, 4, 4, 4])
    >>> torch.allclose(features.to_dense(), sae.encode(x), atol=1e-5)
    True
    >>> torch.allclose(decode_sparse(sae, features), sae.decode(sae.encode(x)), atol=1e-4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from mechinterp import _ops
from mechinterp.errors import InputError, ShapeError
from mechinterp.sae import fused as _fused
from mechinterp.sae import screen as _screen
from mechinterp.sae.derived import derived as _derived
from mechinterp.sae.sae import SAE

__all__ = ["SparseFeatures", "decode_sparse", "encode_sparse", "encode_subset", "reconstruct"]

# Pre-activations held at once: enough for the GEMM to run at full speed, a small fraction of
# the [tokens, d_sae] matrix at realistic sizes. The CPU keeps its chunk nearer its caches.
# On an H100 (bf16, 16,384 tokens) chunked GEMMs ran at 1.02-1.04x one GEMM's time with 64-128
# MiB chunks and 1.02-1.12x with 256 MiB; the threshold selector was fastest with 256 MiB.
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}
# The running top k's merge costs the same per chunk whatever its width, so wider chunks are
# faster, but the peak memory grows with them: at 768 x 32768, 1.47x the GEMM with 512 MiB,
# 1.53x with 256 MiB and 1.58-1.69x with 128 MiB, peaks of 0.62, 0.32 and 0.18 GiB against
# SAELens's 2.0 GiB. 128 MiB keeps it under an eighth of SAELens's. Chunks small enough to
# stay in the L2 cache between the GEMM's write and the selector's read did not read faster:
# with 32 MiB chunks (2,048 rows x 8,192 latents) the selector's kernels took 0.74 ms a 768 x
# 32768 encode against 0.50 ms with 256 MiB (H100, kernel time alone, 16,384 tokens).
_TOPK_CUDA_CHUNK_BYTES = 128 << 20
# A fused TopK encode holds a sixteenth of the [tokens, d_sae] pre-activations' size at once
# (its sample's chunk, then the GEMM's records, and its survivors in arrays as long as the
# records, sized without waiting for their count), within these bounds. Its peak (1.3-2.5x the
# budget: 0.16 / 0.31 / 0.60 GiB at 768 x 32768, 2304 x 65536 and 4096 x 131072 with 16,384
# tokens) is then a sixth of that size or less wherever the lower bound does not apply: under
# an eighth of a dense encode's, which holds the whole matrix at least twice (the
# pre-activations and the scattered output). At 4096 x 131072 (three interleaved rounds on
# each of two machines) that is 256 MiB, one block of rows where 128 MiB made two: 1.05-1.16x
# the GEMM against 1.09-1.21x. The chunked encode ran no faster with 256 MiB there
# (1.10-1.17x against 1.09-1.17x) and keeps 128 MiB.
_TOPK_FUSED_CHUNK_BYTES = (128 << 20, 512 << 20)
# Latents a CUDA selector block covers.
_SEGMENT = _ops.SAE_CUDA_SEGMENT
# Threshold selectors start with this many slots per segment (a density of 0.4%); rows that
# overflow are encoded again with room for all of their latents.
_FIRST_CAP_PER_SEGMENT = 64


@dataclass(frozen=True)
class SparseFeatures:
    """Feature activations of ``N`` inputs as compressed rows.

    Row ``r`` holds latents ``indices[row_ptr[r]:row_ptr[r + 1]]`` with activations ``values[...]``
    at the same positions: for TopK SAEs its ``k`` latents in descending order of pre-activation
    (a ReLU'd value may be 0), for threshold SAEs its active latents in ascending order.

    Attributes:
        row_ptr: int64 ``[N + 1]``.
        indices: int64 ``[nnz]``.
        values: ``[nnz]`` in the SAE's dtype.
        d_sae: number of latents.
        shape: leading shape of the encoded input (``N`` is its product).
    """

    row_ptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    d_sae: int
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Number of encoded inputs ``N``."""
        return self.row_ptr.shape[0] - 1

    @property
    def l0(self) -> torch.Tensor:
        """Stored latents per row, int64 ``[N]`` (for TopK, ``k`` every row)."""
        return self.row_ptr[1:] - self.row_ptr[:-1]

    def row_index(self) -> torch.Tensor:
        """The row of every stored entry, int64 ``[nnz]``."""
        rows = torch.arange(self.rows, device=self.row_ptr.device)
        return torch.repeat_interleave(rows, self.l0, output_size=self.indices.shape[0])

    def to_dense(self) -> torch.Tensor:
        """The dense activations ``[*shape, d_sae]`` (materialises ``N × d_sae``)."""
        dense = torch.zeros(self.rows, self.d_sae, dtype=self.values.dtype,
                            device=self.values.device)
        dense[self.row_index(), self.indices] = self.values
        return dense.reshape(*self.shape, self.d_sae)

    def to(self, device: str | torch.device) -> SparseFeatures:
        """The same features on ``device``."""
        return SparseFeatures(self.row_ptr.to(device), self.indices.to(device),
                              self.values.to(device), self.d_sae, self.shape)


def encode_sparse(sae: SAE, x: torch.Tensor, *, chunk_bytes: int | None = None,
                  screen: bool | None = None, fused: bool | None = None) -> SparseFeatures:
    """Sparse feature activations of ``x [..., d_in]``; equals ``sae.encode(x)`` densified.

    The encoder runs in chunks of latents, so peak extra memory is one chunk of
    pre-activations (``chunk_bytes``; on CUDA 128 MiB for a chunked TopK encode and 256 MiB
    otherwise, 16 MiB on the CPU) plus the output.
    float32 / float16 / bfloat16 SAEs use the compiled selectors; float64 SAEs, TopK with
    ``k > 256`` on CUDA, and devices without kernels use the same chunking with torch
    operations. On CPUs without AVX-512, 16-bit SAEs multiply in float32 (torch has no fast
    16-bit GEMM there), which is more precise than the dense reference.

    float32 TopK SAEs on the CPU can be screened (:mod:`mechinterp.sae.screen`): a bfloat16 GEMM
    bounds every pre-activation and only the latents that can reach the top ``k`` are computed
    in float32; the result is the exact float32 top-k, values rounded once.

    bfloat16 and float16 ReLU, JumpReLU, BatchTopK and gated SAEs on Hopper GPUs encode in one
    GEMM with the threshold in its epilogue (:mod:`mechinterp.sae.fused`); ``chunk_bytes`` then
    bounds its survivor records (``d_sae / 8`` bytes a row) instead of a chunk. TopK SAEs there
    (``k`` up to 256, not ranked by decoder norms) take the same GEMM past a sample of their
    latents, keeping what reaches each row's k-th of the sample, with ``fused=True``.

    Args:
        sae: the autoencoder.
        x: activations ``[..., d_in]`` on the SAE's device.
        chunk_bytes: budget for one chunk of pre-activations.
        screen: screen a float32 TopK encode on the CPU. Default: where the CPU has bfloat16
            instructions (AVX512-BF16 or AMX), on which the bf16 GEMM is the faster one.
        fused: encode through the fused GEMM. Default: wherever it applies (see
            :func:`mechinterp.sae.fused.unsupported_reason`) but for TopK SAEs, whose chunked
            encode is as fast or faster (:func:`mechinterp.sae.fused.default_reason`);
            ``False`` takes the chunked path.

    Raises:
        ShapeError: ``x`` does not end in ``d_in``.
        InputError: ``x`` is not a tensor, ``chunk_bytes`` is not a positive int, or ``screen``
            or ``fused`` is asked for where it does not apply.
    """
    if not isinstance(sae, SAE):
        msg = f"sae must be an SAE; got {type(sae).__name__}"
        raise InputError(msg)
    x = sae._check_input(x)
    if x.device != sae.device:
        msg = f"x must be on the SAE's device {sae.device}; got {x.device}"
        raise InputError(msg)
    shape = tuple(x.shape[:-1])
    x_n, _ = sae._normalize(x if x.ndim == 2 else x.reshape(-1, sae.d_in))
    if chunk_bytes is None and (screen is None or screen is False) and \
            (fused is None or fused is True):
        whole = _fused_whole(sae, x_n)
        if whole is not None:
            return SparseFeatures(*whole, sae.d_sae, shape)
    if sae.apply_b_dec_to_input:
        x_n = x_n - sae.b_dec
    plan = _Plan.make(sae, x_n, chunk_bytes, screen, fused)
    if sae.architecture == "topk":
        row_ptr, indices, values = _encode_topk(sae, plan)
    else:
        row_ptr, indices, values = _encode_threshold(sae, plan)
    return SparseFeatures(row_ptr, indices, values, sae.d_sae, shape)


def decode_sparse(sae: SAE, features: SparseFeatures) -> torch.Tensor:
    """Reconstruction ``[*shape, d_out]`` (in the normalised space) of sparse features.

    Equals ``sae.decode(features.to_dense())`` up to summation order; the gather-and-sum costs
    ``O(nnz · d_out)`` and runs in float32 (float64 for float64 SAEs).
    """
    if not isinstance(features, SparseFeatures):
        msg = f"features must be SparseFeatures; got {type(features).__name__}"
        raise InputError(msg)
    if features.d_sae != sae.d_sae:
        msg = f"features have d_sae={features.d_sae} but the SAE has d_sae={sae.d_sae}"
        raise ShapeError(msg)
    values = features.values
    if sae.rescale_acts_by_decoder_norm:
        values = values / sae.W_dec.norm(dim=-1)[features.indices]
    out = _ops.sparse_decode(features.indices, values, sae.W_dec, row_ptr=features.row_ptr,
                             bias=sae.b_dec)
    return out.reshape(*features.shape, sae.d_out)


def reconstruct(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """``sae.forward(x)`` through the sparse path: ``[..., d_out]`` in the input's scale."""
    x = sae._check_input(x)
    _, undo = sae._normalize(x)
    out = undo(decode_sparse(sae, encode_sparse(sae, x)))
    if sae.W_skip is not None:
        out = out + x @ sae.W_skip.T
    return out


def encode_subset(sae: SAE, x: torch.Tensor, latents: Sequence[int] | torch.Tensor,
                  *, normalized: bool = False) -> torch.Tensor:
    """Activations ``[..., len(latents)]`` of the chosen latents only.

    Threshold SAEs multiply only the chosen encoder columns (``O(len(latents) · d_in)`` per
    token). Whether a TopK latent survives depends on every other latent, so TopK encodes
    sparsely in full and reads the chosen latents out.

    Args:
        sae: the autoencoder.
        x: activations ``[..., d_in]``.
        latents: latent numbers in ``[0, d_sae)``.
        normalized: ``x`` is already normalised (``sae._normalize``).
    """
    index = torch.as_tensor(latents, dtype=torch.long, device=sae.device).reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= sae.d_sae):
        msg = f"latents must lie in [0, d_sae={sae.d_sae}); got {index.tolist()}"
        raise InputError(msg)
    x = sae._check_input(x)
    x_n = x if normalized else sae._normalize(x)[0]
    if sae.architecture == "topk":
        return _gather_latents(encode_sparse(_unnormalized(sae), x_n), index)
    if sae.apply_b_dec_to_input:
        x_n = x_n - sae.b_dec
    h = x_n @ sae.W_enc[:, index]
    if sae.architecture == "gated":
        gate = (h + sae.b_gate[index] > 0).to(h.dtype)
        return gate * torch.relu(h * torch.exp(sae.r_mag[index]) + sae.b_mag[index])
    h = h + sae.b_enc[index]
    if sae.architecture == "relu":
        return torch.relu(h)
    # jumprelu and batchtopk at inference: a strict threshold per latent.
    return torch.relu(h) * (h > sae.threshold[index]).to(h.dtype)


# ---- internals ----


@dataclass(frozen=True)
class _Plan:
    """How to cut one encode into (row block, latent chunk) pieces."""

    x: torch.Tensor  # normalised, centred inputs [N, d_in]
    block_rows: int
    chunk_cols: int
    compiled: bool  # the selectors run in _C
    gemm_dtype: torch.dtype
    screen: bool  # whole rows, screened by a bf16 GEMM (float32 TopK on the CPU)
    fused: bool = False  # whole rows through the fused GEMM (chunks only for rows encoded again)
    chunk_bytes: int = 0  # the budget the chunks were cut to

    @staticmethod
    def make(sae: SAE, x: torch.Tensor, chunk_bytes: int | None, screen: bool | None,
             fused: bool | None = None) -> _Plan:
        device = x.device.type
        use_fused = _wants_fused(sae, x.device, fused)
        if chunk_bytes is None:
            chunk_bytes = _CHUNK_BYTES.get(device, _CHUNK_BYTES["cuda"])
            if device == "cuda" and sae.architecture == "topk" and use_fused:
                low, high = _TOPK_FUSED_CHUNK_BYTES
                dense = max(x.shape[0], 1) * sae.d_sae * sae.dtype.itemsize
                chunk_bytes = min(max(dense // 16, low), high)
            elif device == "cuda" and sae.architecture == "topk":
                chunk_bytes = _TOPK_CUDA_CHUNK_BYTES
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            msg = f"chunk_bytes must be a positive int; got {chunk_bytes!r}"
            raise InputError(msg)
        compiled = (
            sae.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and device in ("cpu", "cuda")
            and (device == "cpu" or _ops._has_cuda_kernels())
            and not (sae.architecture == "topk" and device == "cuda"
                     and sae.k > _ops.TOPK_CUDA_MAX_K)
        )
        gemm_dtype = sae.dtype
        if device == "cpu" and sae.dtype in (torch.float16, torch.bfloat16) and \
                torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            # Without AVX-512 torch's 16-bit CPU GEMM is hundreds of times slower than float32.
            gemm_dtype = torch.float32
        screen = _wants_screen(sae, device, compiled, screen)
        if screen:
            # The kernel ranks whole rows, so blocks of rows with every latent.
            block_rows = max(1, min(max(x.shape[0], 1), chunk_bytes // (sae.d_sae * 2)))
            return _Plan(x.contiguous(), block_rows, sae.d_sae, compiled, gemm_dtype, True)
        item = gemm_dtype.itemsize
        rows = max(x.shape[0], 1)
        # Whole rows when they fit; else chunks of latents (whole selector segments on CUDA), and
        # row blocks only when even the narrowest chunk is too big.
        step = _SEGMENT if device == "cuda" else 1024
        cols = sae.d_sae
        if rows * cols * item > chunk_bytes:
            cols = max(step, chunk_bytes // (rows * item) // step * step)
            cols = min(cols, sae.d_sae)
        block_rows = max(1, min(rows, chunk_bytes // (cols * item)))
        x = x if x.dtype == gemm_dtype else x.to(gemm_dtype)
        x = x.contiguous()
        if use_fused:
            return _Plan(_fused.aligned(x), min(rows, _fused_block_rows(sae, chunk_bytes)), cols,
                         compiled, gemm_dtype, False, fused=True, chunk_bytes=chunk_bytes)
        return _Plan(x, block_rows, cols, compiled, gemm_dtype, False)

    def blocks(self):
        if self.block_rows >= self.x.shape[0]:
            yield self.x  # one block: no slice
            return
        for r0 in range(0, self.x.shape[0], self.block_rows):
            yield self.x[r0:r0 + self.block_rows]

    def chunks(self, d_sae: int):
        for c0 in range(0, d_sae, self.chunk_cols):
            yield c0, min(d_sae, c0 + self.chunk_cols)


def _fused_block_rows(sae: SAE, chunk_bytes: int) -> int:
    """Rows a block of the fused encode: whole tile rows whose survivor records fit the
    budget, at least one."""
    tile = _ops.SAE_FUSED_TILE_M
    fit = chunk_bytes // _fused.record_bytes_per_row(sae.d_sae) // tile * tile
    return max(tile, fit)


def _wants_fused(sae: SAE, device: torch.device, fused: bool | None) -> bool:
    if fused is not None and not isinstance(fused, bool):
        msg = f"fused must be True, False or None; got {fused!r}"
        raise InputError(msg)
    if fused is False:
        return False
    if fused is None:
        return _fused.default_reason(sae, device) is None
    why_not = _fused.unsupported_reason(sae, device)
    if why_not is not None:
        msg = f"fused=True cannot encode this SAE: {why_not}"
        raise InputError(msg)
    return True


def _wants_screen(sae: SAE, device: str, compiled: bool, screen: bool | None) -> bool:
    applies = (device == "cpu" and compiled and sae.architecture == "topk"
               and sae.dtype == torch.float32)
    if screen is None:
        return applies and _screen.fast_bf16_cpu()
    if not isinstance(screen, bool):
        msg = f"screen must be True, False or None; got {screen!r}"
        raise InputError(msg)
    if screen and not applies:
        msg = (f"screen=True needs a float32 TopK SAE on the CPU; got a {sae.dtype} "
               f"{sae.architecture} SAE on {device}")
        raise InputError(msg)
    return screen


def _cut(t: torch.Tensor, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``[c0, c1)`` (of the last dim) of ``t`` in ``dtype``. Each torch call costs the
    host microseconds before the first GEMM can start, so none is made where none is needed."""
    if c0 != 0 or c1 != t.shape[-1]:
        t = t[..., c0:c1]
    return t if t.dtype == dtype else t.to(dtype)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _encode_topk(sae: SAE, plan: _Plan):
    k = sae.k
    weight = sae.W_enc
    bias = _cut(sae.b_enc, 0, sae.d_sae, plan.gemm_dtype)
    scale = sae.W_dec.norm(dim=-1) if sae.rescale_acts_by_decoder_norm else None
    if scale is not None and plan.compiled:
        scale = _f32(scale)
    chunks = list(plan.chunks(sae.d_sae))
    index_blocks, value_blocks = [], []
    screen = _screen.screen_weights(sae) if plan.screen else None
    if screen is not None:
        bias, scale = _f32(sae.b_enc), _f32(scale)
    if plan.fused:
        bias = _fused.aligned(bias)

        def sample(xb: torch.Tensor, cols: int):
            # The sample's pre-activations are one chunk: of fewer rows, where all would not fit
            # (each block's running top k is made after its GEMM is queued, then joined).
            step = max(1, plan.chunk_bytes // (cols * xb.element_size()))
            if step >= xb.shape[0]:
                return _topk_block_running(xb, weight, bias, None, k, [(0, cols)])
            parts = [_topk_block_running(xb[r0:r0 + step], weight, bias, None, k, [(0, cols)])
                     for r0 in range(0, xb.shape[0], step)]
            return tuple(torch.cat(part) for part in zip(*parts))

    again_blocks = []  # fused: per row, whether it must be encoded again
    for xb in plan.blocks():
        if screen is not None:
            top_v, top_i = _screen.screened_topk_block(xb, screen, bias, scale, k)
        elif plan.fused:
            top_v, top_i, again = _fused.encode_topk_block(xb, weight, bias, k, sample)
            again_blocks.append(again)
        elif plan.compiled:
            top_v, top_i = _topk_block_compiled(xb, weight, bias, scale, k, chunks)
        else:
            top_v, top_i = _topk_block_torch(xb, weight, bias, scale, k, chunks)
        values, indices = _topk_activations(top_v, top_i, sae.dtype)
        value_blocks.append(values)
        index_blocks.append(indices)
    n = plan.x.shape[0]
    values = _joined(value_blocks).reshape(-1) if value_blocks else sae.W_enc.new_empty(0)
    indices = (_joined(index_blocks).reshape(-1) if index_blocks
               else torch.empty(0, dtype=torch.int64, device=sae.device))
    row_ptr = torch.arange(n + 1, dtype=torch.int64, device=sae.device) * k
    if again_blocks:
        # The fused encode's one host sync, once everything else is queued: the rows whose
        # GEMM tile ran out of record slots, encoded again by the chunked path.
        again = torch.cat(again_blocks).nonzero().flatten()
        if again.numel():
            top_v, top_i = _topk_block_running(plan.x[again], weight, bias, None, k, chunks)[:2]
            values.view(n, k)[again], indices.view(n, k)[again] = _topk_activations(
                top_v, top_i, sae.dtype)
    return row_ptr, indices, values


def _topk_activations(top_v: torch.Tensor, top_i: torch.Tensor, dtype: torch.dtype):
    """A running top k's ``(values float32, index int32)`` as the encode's ``(activations in
    the SAE's dtype, through a ReLU, int64 latents)``."""
    return torch.relu(top_v).to(dtype), top_i.to(torch.int64)


def _topk_block_compiled(xb, weight, bias, scale, k, chunks):
    device = xb.device
    if device.type == "cuda":
        return _topk_block_running(xb, weight, bias, scale, k, chunks)[:2]
    widths = [_ops.topk_segments(c1 - c0, device) * k for c0, c1 in chunks]
    cand_v = torch.empty(xb.shape[0], sum(widths), dtype=torch.float32, device=device)
    cand_i = torch.empty(xb.shape[0], sum(widths), dtype=torch.int32, device=device)
    start = 0
    for (c0, c1), width in zip(chunks, widths):
        h = torch.addmm(_cut(bias, c0, c1, xb.dtype), xb, _cut(weight, c0, c1, xb.dtype))
        _ops.select_topk(h, k, col_offset=c0, scale=None if scale is None else scale[c0:c1],
                         out=(cand_v[:, start:start + width], cand_i[:, start:start + width]))
        start += width
        del h  # free this chunk before the next one is allocated
    # Merge the chunks' candidates (each row's k best of every chunk) in one more pass.
    if cand_v.shape[1] > k:
        cand_v, cand_i = _ops.select_topk(cand_v, k, index=cand_i)
    return cand_v, cand_i


def _topk_block_running(xb, weight, bias, scale, k, chunks):
    """CUDA: after each chunk's GEMM, keep what can still be in a row's top k, then merge it.

    The row's bar (its running k-th value) rises as chunks are merged, so later chunks let
    through few values; the exact ranking happens once per row and chunk, on those few.
    Returns ``(top_values, top_index, row_bar)``.
    """
    top_v = top_i = row_bar = None
    for c0, c1 in chunks:
        h = torch.addmm(_cut(bias, c0, c1, xb.dtype), xb, _cut(weight, c0, c1, xb.dtype))
        if row_bar is None:
            # Allocated once the first GEMM is queued, so that the GPU starts sooner.
            top_v, top_i, row_bar = _running_start(xb.shape[0], k, xb.device)
        candidates = _ops.topk_candidates(h, k, row_bar=row_bar, col_offset=c0,
                                          scale=None if scale is None else scale[c0:c1])
        del h  # free this chunk before the next one is allocated
        _ops.topk_merge(top_v, top_i, candidates, row_bar)
    return top_v, top_i, row_bar


def _running_start(rows: int, k: int, device: torch.device):
    """An empty running top k: ``(-inf values, -1 indices, zero bars)``."""
    return (torch.full((rows, k), -math.inf, dtype=torch.float32, device=device),
            torch.full((rows, k), -1, dtype=torch.int32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device))


def _topk_block_torch(xb, weight, bias, scale, k, chunks):
    cand_v, cand_i = [], []
    for c0, c1 in chunks:
        h = torch.addmm(_cut(bias, c0, c1, xb.dtype), xb, _cut(weight, c0, c1, xb.dtype))
        if scale is not None:
            h = h * scale[c0:c1].to(h.dtype)
        v, i = h.topk(min(k, c1 - c0), dim=-1)
        cand_v.append(v)
        cand_i.append(i + c0)
    values, where = torch.cat(cand_v, dim=1).topk(k, dim=-1)
    return values, torch.cat(cand_i, dim=1).gather(1, where)


def _selector_params(sae: SAE, dtype: torch.dtype):
    """(bias, threshold, mag_scale, mag_bias) of the threshold selector, in ``dtype``.

    The encoder bias goes into the GEMM (cuBLAS adds it before rounding), except for gated
    SAEs, whose magnitude path needs the product without the gate bias.
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous()

    if sae.architecture == "gated":
        if dtype == torch.float32:
            # The very tensors the fused encode's bounds are worked out from.
            gate, scale, shift = _fused.gated_params(sae)
            return gate, None, scale, shift
        return cast(sae.b_gate), None, cast(torch.exp(sae.r_mag)), cast(sae.b_mag)
    if sae.architecture == "relu":
        return None, None, None, None
    # relu(h) * 1[h > theta] is non-zero exactly where h > max(theta, 0).
    return None, cast(sae.threshold.clamp_min(0)), None, None


class _FusedLane(NamedTuple):
    """What a threshold SAE's fused encode of one block of all its rows launches with, worked
    out once while its parameters stand (:func:`_fused_lane`)."""

    # A gated SAE's zeros, or an aligned copy of b_enc; None: b_enc itself (a source, not kept)
    bias: torch.Tensor | None
    bound: torch.Tensor
    finish: _fused.Finish | None
    rows: int  # the most rows one block holds (the default record budget)
    # (rows, centred) -> the pass's _ops.PreparedPass: the views it holds stay valid as long as
    # the lane does (its sources are the same tensors, in place and unchanged).
    passes: dict


# Problem sizes whose prepared passes a lane keeps (the batch sizes a caller encodes).
_LANE_PASSES_KEPT = 16


def _fused_lane(sae: SAE) -> _FusedLane | None:
    """The SAE's :class:`_FusedLane`, or None where the default encode is not the fused one."""
    if sae.architecture == "gated":
        sources = (sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag)
    else:
        sources = (sae.W_enc, sae.b_enc) + (() if sae.threshold is None else (sae.threshold,))

    def make() -> _FusedLane | None:
        if _fused.default_reason(sae, sae.device) is not None:
            return None
        bias, bound, finish = _fused.threshold_params(sae)
        # b_enc itself is a source, which the lane must not keep; an aligned copy is its own.
        return _FusedLane(None if bias is sae.b_enc else bias, bound, finish,
                          _fused_block_rows(sae, _CHUNK_BYTES["cuda"]), {})

    return _derived(f"fused_lane_{sae.architecture}", sources, make)


def _fused_whole(sae: SAE, x: torch.Tensor):
    """``(row_ptr, indices, values)`` of the default encode of normalised ``x [N, d_in]`` where
    it is the fused threshold encode of one block of rows, else None.

    The general path's plan, block loop and torch centring cost the host time before the
    GEMM's launch while the GPU waits (128-row encodes at 768 x 32768 took 257 us against 211
    here, on an H100): here the SAE's part is worked out once, the pass of each batch size is
    prepared once (its schedule, scratch layout and parameter views), and ``x - b_dec`` is
    written by the GEMM's own launch.
    """
    rows = x.shape[0]
    if sae.architecture == "topk" or x.device.type != "cuda" or rows == 0:
        return None
    lane = _fused_lane(sae)
    if lane is None or rows > lane.rows:
        return None
    if sae.apply_b_dec_to_input:
        center, x = sae.b_dec, x.contiguous()
    else:
        center, x = None, _fused.aligned(x)
    prepared = lane.passes.get((rows, center is not None))
    if prepared is None:
        prepared = _lane_pass(sae, lane, x, center is not None)

    def encode_again(rows: torch.Tensor):  # centred rows whose tile ran out of records
        return _threshold_chunked(sae, _Plan.make(sae, rows, None, None, False))(rows)

    row_ptr, indices, values, _ = _fused.encode_block(x, sae.W_enc, None, None, encode_again,
                                                      lane.finish, center, prepared)
    return row_ptr, indices, values


def _lane_pass(sae: SAE, lane: _FusedLane, x: torch.Tensor, centered: bool):
    """The lane's prepared pass for inputs shaped as ``x``, made and kept."""
    if len(lane.passes) >= _LANE_PASSES_KEPT:
        lane.passes.clear()
    schedule = _fused.schedule_for(x.shape[0], sae.d_in, sae.d_sae)
    bias = sae.b_enc if lane.bias is None else lane.bias
    prepared = _ops.prepare_pass("fused_queue_pass", x, sae.W_enc, bias, lane.bound,
                                 _fused.RECORDS_PER_WARP, *schedule, centered=centered)
    lane.passes[(x.shape[0], centered)] = prepared
    return prepared


def _threshold_chunked(sae: SAE, plan: _Plan):
    """The chunked encode of a threshold SAE's rows under ``plan``: rows -> ``(row_ptr,
    indices, values, nnz)``."""
    gemm_bias = None if sae.architecture == "gated" else sae.b_enc
    # The selector's parameters are derived on first use, after the first GEMM is queued, so
    # that the GPU starts while the host prepares them (and once for the overflow retry too);
    # the fused path needs them only for rows encoded again.
    params = []

    def selector():
        if not params:
            params.append(_selector_params(
                sae, torch.float32 if plan.compiled else plan.gemm_dtype))
        return params[0]

    def chunked(xb: torch.Tensor):
        return _threshold_rows(xb, sae, gemm_bias, selector, list(plan.chunks(sae.d_sae)), plan)

    return chunked


def _encode_threshold(sae: SAE, plan: _Plan):
    chunked = _threshold_chunked(sae, plan)
    if plan.fused:
        bias, bound, finish = _fused.threshold_params(sae)
    device = sae.device
    ptr_blocks, index_blocks, value_blocks = [], [], []
    start = 0  # entries of the earlier blocks
    for xb in plan.blocks():
        if plan.fused:
            block_ptr, indices, values, nnz = _fused.encode_block(xb, sae.W_enc, bias, bound,
                                                                  chunked, finish)
        else:
            block_ptr, indices, values, nnz = chunked(xb)
        ptr_blocks.append(block_ptr if not ptr_blocks else block_ptr[1:] + start)
        start += nnz
        value_blocks.append(values)
        index_blocks.append(indices)
    row_ptr = (_joined(ptr_blocks) if ptr_blocks
               else torch.zeros(1, dtype=torch.int64, device=device))
    values = _joined(value_blocks) if value_blocks else sae.W_enc.new_empty(0)
    indices = (_joined(index_blocks) if index_blocks
               else torch.empty(0, dtype=torch.int64, device=device))
    return row_ptr, indices, values


def _threshold_rows(xb, sae: SAE, gemm_bias, selector, chunks, plan: _Plan):
    """Compressed rows ``(row_ptr, indices, values, nnz)`` of one row block, chunk by chunk."""
    device = xb.device
    kept, index, count = _threshold_block(xb, sae.W_enc, gemm_bias, selector, chunks, plan,
                                          _FIRST_CAP_PER_SEGMENT)
    # Everything the usual case needs after the host sync is queued before it (the row
    # pointers included), so that the GPU has work while the host waits and only the
    # compaction is launched afterwards.
    overflow = (count > kept.shape[2]).any(dim=1)
    block_ptr = torch.zeros(xb.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(count.sum(dim=1), dim=0, out=block_ptr[1:])
    # One host sync a block: whether any row overflowed, and how many entries there are.
    overflowed, nnz = torch.stack([overflow.sum(), block_ptr[-1]]).tolist()
    if not overflowed:
        values, indices = _compacted(kept, index, count, block_ptr[:-1], nnz, sae.dtype, plan)
        return block_ptr, indices, values, nnz
    values, indices, rows = _live_entries(kept, index, _live_slots(kept, count))
    overflow = overflow.nonzero().flatten()
    # Rows with more active latents in a segment than there were slots: encode just those
    # rows again with room for all, and put their entries back in row order.
    widest = int(count[overflow].max())
    again, again_index, again_count = _threshold_block(
        xb[overflow], sae.W_enc, gemm_bias, selector, chunks, plan, widest)
    more_v, more_i, more_rows = _live_entries(again, again_index,
                                              _live_slots(again, again_count))
    ok = ~torch.isin(rows, overflow)
    values = torch.cat([values[ok], more_v])
    indices = torch.cat([indices[ok], more_i])
    rows = torch.cat([rows[ok], overflow[more_rows]])
    order = torch.sort(rows, stable=True).indices
    values, indices = values[order].to(sae.dtype), indices[order].to(torch.int64)
    return block_ptr, indices, values, nnz


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    # One block (the usual case) needs no copy.
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _compacted(kept, index, count, row_start, nnz: int, dtype: torch.dtype, plan: _Plan):
    """The filled slots of [rows, segments, cap] selector output as (values, int64 indices)."""
    if plan.compiled:
        return _ops.compact_slots(kept, index, count, row_start, nnz, dtype)
    where = torch.nonzero_static(_live_slots(kept, count).reshape(-1), size=nnz).squeeze(1)
    return kept.reshape(-1)[where].to(dtype), index.reshape(-1)[where].to(torch.int64)


def _live_slots(kept, count):
    """Which slots of [rows, segments, cap] selector output are filled."""
    return torch.arange(kept.shape[2], device=kept.device) < count.unsqueeze(-1)


def _live_entries(kept, index, live):
    """The filled slots of [rows, segments, cap] selector output, in row-major order, with rows."""
    rows = torch.arange(kept.shape[0], device=kept.device)
    return kept[live], index[live], rows.repeat_interleave(live.sum(dim=(1, 2)))


def _cap(plan: _Plan, chunk_cols: int, per_segment: int) -> int:
    # A CPU selector sees a whole chunk as one segment; scale the slots to its width.
    if plan.x.device.type == "cuda":
        return per_segment
    return min(chunk_cols, per_segment * math.ceil(chunk_cols / _SEGMENT))


def _threshold_block(xb, weight, gemm_bias, selector, chunks, plan: _Plan, per_segment: int):
    """Selector output ``(kept, index, count)`` of one row block, every chunk's segments side
    by side in one ``[rows, segments, cap]`` buffer."""
    kept = index = count = None
    s0 = 0
    for c0, c1 in chunks:
        w = _cut(weight, c0, c1, xb.dtype)
        if gemm_bias is None:
            h = xb @ w
        else:
            h = torch.addmm(_cut(gemm_bias, c0, c1, xb.dtype), xb, w)
        if kept is None:
            # Allocated once the first GEMM is queued, so that the GPU starts sooner.
            kept, index, count = _slot_buffers(xb, chunks, plan, per_segment)
        bias, threshold, mag_scale, mag_bias = selector()
        n = _segments(c1 - c0, plan)
        cut = slice(c0, c1)
        out = (kept[:, s0:s0 + n], index[:, s0:s0 + n], count[:, s0:s0 + n])
        if plan.compiled:
            _ops.select_threshold(
                h, cap=kept.shape[2], col_offset=c0, out=out,
                bias=None if bias is None else bias[cut],
                threshold=None if threshold is None else threshold[cut],
                mag_scale=None if mag_scale is None else mag_scale[cut],
                mag_bias=None if mag_bias is None else mag_bias[cut])
        else:
            _threshold_torch(h, c0, bias, threshold, mag_scale, mag_bias, out)
        s0 += n
        del h, w  # free this chunk before the next one is allocated
    return kept, index, count


def _segments(cols: int, plan: _Plan) -> int:
    # The compiled selectors' segments; the torch path sees a chunk as one.
    return _ops.topk_segments(cols, plan.x.device) if plan.compiled else 1


def _slot_buffers(xb, chunks, plan: _Plan, per_segment: int):
    """Empty ``(kept, index, count)`` with every chunk's segments side by side."""
    width = max(_cap(plan, c1 - c0, per_segment) for c0, c1 in chunks)
    segments = sum(_segments(c1 - c0, plan) for c0, c1 in chunks)
    kept_dtype = torch.float32 if plan.compiled else torch.promote_types(xb.dtype, torch.float32)
    kept = torch.empty(xb.shape[0], segments, width, dtype=kept_dtype, device=xb.device)
    index = torch.empty(kept.shape, dtype=torch.int32, device=xb.device)
    count = torch.empty(kept.shape[:2], dtype=torch.int32, device=xb.device)
    return kept, index, count


def _threshold_torch(h, c0, bias, threshold, mag_scale, mag_bias, out):
    """The selector's contract in torch: one segment, slots in column order, into ``out``."""
    kept, index, count = out
    cap = kept.shape[2]
    cut = slice(c0, c0 + h.shape[1])
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    pre = h + bias[cut] if bias is not None else h
    keep = pre > (threshold[cut] if threshold is not None else 0.0)
    value = torch.relu(h * mag_scale[cut] + mag_bias[cut]) if mag_scale is not None else pre
    keep &= value > 0
    count[:, 0] = keep.sum(dim=1)
    # Columns in order: rank each kept column among the kept ones of its row.
    slot = torch.cumsum(keep, dim=1) - 1
    fits = keep & (slot < cap)
    r, c = fits.nonzero(as_tuple=True)
    kept[r, 0, slot[r, c]] = value[r, c].to(kept.dtype)
    index[r, 0, slot[r, c]] = (c + c0).to(torch.int32)


def _unnormalized(sae: SAE) -> SAE:
    """The SAE with normalisation off, for inputs already normalised."""
    if sae.normalize_activations == "none":
        return sae
    return replace(sae, normalize_activations="none")


def _gather_latents(features: SparseFeatures, index: torch.Tensor) -> torch.Tensor:
    # A latent may be asked for twice: fill one column per distinct latent, then repeat.
    distinct, inverse = torch.unique(index, return_inverse=True)
    column_of = torch.full((features.d_sae,), -1, dtype=torch.long, device=index.device)
    column_of[distinct] = torch.arange(distinct.numel(), device=index.device)
    out = torch.zeros(features.rows, distinct.numel(), dtype=features.values.dtype,
                      device=features.values.device)
    where = column_of[features.indices]
    hit = where >= 0
    out[features.row_index()[hit], where[hit]] = features.values[hit]
    return out[:, inverse].reshape(*features.shape, index.numel())
