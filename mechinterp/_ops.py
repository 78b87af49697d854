"""Typed wrappers around the compiled kernels in :mod:`mechinterp._C`.

Each wrapper validates in Python (so errors are the package's own, with readable messages),
allocates the output, picks the caller's current CUDA stream, and hands the kernel non-owning
views of the tensors. The slow pure-PyTorch twins live in :mod:`mechinterp._reference`.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mechinterp import _C
from mechinterp.errors import BuildError, DeviceError, DTypeError, InputError, ShapeError

__all__ = [
    "METRIC_KINDS",
    "MOEBIUS_KINDS",
    "NOISE_KINDS",
    "StagedBoxes",
    "diagonal_score",
    "fill_noise",
    "moebius_",
    "patch_boxes",
    "patch_metric",
    "players_of_table",
    "require_memory",
    "stage_boxes",
    "superset_weighted_sums",
]

# Names as _C spells them; the keys are every dtype _C can describe.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_View = tuple[int, str, tuple[int, ...], tuple[int, ...], str, int]


def _view(t: torch.Tensor) -> _View:
    """The (data_ptr, dtype, shape, strides, device_type, device_index) tuple _C reads.

    Strides cross as torch reports them (in elements), so non-contiguous tensors need no copy.
    """
    device = t.device  # a new object on every access: read it once
    index = device.index if device.index is not None else 0
    # torch.Size is a tuple, which is all _C asks of a shape.
    return (t.data_ptr(), _DTYPE_NAMES[t.dtype], t.shape, t.stride(), device.type, index)


# torch's raw current-stream getter (what its compiled kernels launch on): about 1 us of host
# time, where building a torch.cuda.Stream costs several, on every call into _C. Builds without
# it fall back to the public API.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t: torch.Tensor) -> int:
    """The calling thread's current stream on ``t``'s device, as the integer _C expects."""
    device = t.device
    if device.type != "cuda":
        return 0
    return _stream_on(device.index if device.index is not None else torch.cuda.current_device())


def _stream_on(index: int) -> int:
    """The calling thread's current stream on CUDA device ``index``, as the integer _C expects."""
    if _raw_current_stream is not None:
        return _raw_current_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


@functools.cache
def _has_cuda_kernels() -> bool:
    return bool(_C.build_info()["cuda"])


def _check_device(t: torch.Tensor, op: str, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        msg = f"{op}: {name} must be on a cpu or cuda device, got {t.device}"
        raise DeviceError(msg)
    if t.device.type == "cuda" and not _has_cuda_kernels():
        msg = (
            "mechinterp._C was built without CUDA kernels; rebuild with MECHINTERP_CUDA=ON "
            f"(needs nvcc) to run {op} on {t.device}"
        )
        raise BuildError(msg)


def _as_index(value: object, op: str, name: str) -> int:
    if isinstance(value, bool):
        msg = f"{op}: {name} must be an int, got bool {value!r}"
        raise InputError(msg)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        msg = f"{op}: {name} must be an int, got {type(value).__name__} {value!r}"
        raise InputError(msg) from None


def diagonal_score(pattern: torch.Tensor, *, offset: int, first_query: int = 0) -> torch.Tensor:
    """Mean attention each head puts ``offset`` positions back.

    ``out[h]`` is the mean, over batch rows ``b`` and query positions ``q`` in
    ``[max(first_query, offset), query)``, of ``pattern[b, h, q, q - offset]``. ``offset=1``
    scores previous-token heads; on a random sequence of period ``T`` repeated,
    ``offset=T - 1`` with ``first_query=T`` scores induction heads.

    Args:
        pattern: attention probabilities ``[batch, head, query, key]`` with ``key == query``;
            float64, float32, float16 or bfloat16; any strides; cpu or cuda.
        offset: how far back the scored key is (``>= 0``).
        first_query: first query position averaged over (``>= 0``), e.g. to skip the first
            repeat of a repeated sequence.

    Returns:
        ``[head]`` scores on ``pattern``'s device: float64 for float64 input, else float32
        (narrower inputs are summed in float32). Not differentiable.

    Raises:
        ShapeError: ``pattern`` is not 4-D, not square in its last two dims, or has no batch rows.
        DTypeError: ``pattern`` is not floating point.
        DeviceError: ``pattern`` is neither on cpu nor on cuda.
        BuildError: ``pattern`` is on cuda but mechinterp._C has no CUDA kernels.
        InputError: ``offset`` or ``first_query`` is negative or not an int, or no query
            position is left to average over.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import diagonal_score
        >>> pattern = torch.eye(4).expand(2, 3, 4, 4)  # every head attends to itself
        >>> diagonal_score(pattern, offset=0)
        tensor([1., 1., 1.])
        >>> diagonal_score(pattern, offset=1)
        tensor([0., 0., 0.])
    """
    op = "diagonal_score"
    if not isinstance(pattern, torch.Tensor):
        msg = f"{op}: pattern must be a torch.Tensor, got {type(pattern).__name__}"
        raise InputError(msg)
    offset = _as_index(offset, op, "offset")
    first_query = _as_index(first_query, op, "first_query")
    if pattern.dim() != 4:
        msg = (
            f"{op}: pattern must be 4-D [batch, head, query, key], got {pattern.dim()}-D "
            f"with shape {tuple(pattern.shape)}"
        )
        raise ShapeError(msg)
    if pattern.dtype not in _FLOATING:
        msg = (
            f"{op}: pattern must be float64, float32, float16 or bfloat16, got {pattern.dtype}"
        )
        raise DTypeError(msg)
    _check_device(pattern, op, "pattern")
    batch, heads, query, key = pattern.shape
    if key != query:
        msg = (
            f"{op}: pattern must be square in its last two dims (key == query, a self-attention "
            f"pattern), got query={query} and key={key} in shape {tuple(pattern.shape)}"
        )
        raise ShapeError(msg)
    if offset < 0:
        msg = f"{op}: offset must be >= 0, got {offset}"
        raise InputError(msg)
    if first_query < 0:
        msg = f"{op}: first_query must be >= 0, got {first_query}"
        raise InputError(msg)
    if max(first_query, offset) >= query:
        msg = (
            f"{op}: no query position to average over: need max(first_query, offset) < query, "
            f"got first_query={first_query}, offset={offset}, query={query}"
        )
        raise InputError(msg)
    if batch == 0:
        msg = (
            f"{op}: pattern has batch size 0, so the mean over the batch is empty "
            f"(shape {tuple(pattern.shape)})"
        )
        raise ShapeError(msg)

    out_dtype = torch.float64 if pattern.dtype == torch.float64 else torch.float32
    out = torch.empty(heads, dtype=out_dtype, device=pattern.device)
    if heads == 0:
        return out
    _C.diagonal_score(_view(pattern), _view(out), offset, first_query, _stream(pattern))
    return out


def _host_and_device(t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous cpu copy (which _C validates) and the same values on ``device``.

    The upload goes through pinned memory: from pageable memory, CUDA waits for the stream's
    queued work before copying, which would stall the host once per kernel call."""
    host = t.detach().to("cpu").contiguous()
    if device.type == "cpu":
        return host, host
    return host, host.pin_memory().to(device, non_blocking=True)


def _check_floating(t: object, op: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        msg = f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
        raise InputError(msg)
    if t.dtype not in _FLOATING:
        msg = f"{op}: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}"
        raise DTypeError(msg)
    _check_device(t, op, name)
    return t


def _check_integer_table(t: object, op: str, name: str, expected: str,
                         shape_ok: Callable[[tuple[int, ...]], bool]) -> None:
    """``t`` must be an integer tensor whose shape passes ``shape_ok`` (described by ``expected``)."""
    if not isinstance(t, torch.Tensor) or not shape_ok(tuple(t.shape)):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        msg = f"{op}: {name} must be an integer tensor {expected}, got {shape}"
        raise ShapeError(msg)
    if t.is_floating_point() or t.dtype == torch.bool:
        msg = f"{op}: {name} must hold integers, got {t.dtype}"
        raise DTypeError(msg)


@dataclass(frozen=True)
class StagedBoxes:
    """Boxes and their weights, on the host (where _C validates them) and on the device (where
    the kernel reads them), uploaded once for many :func:`patch_boxes` calls.

    A forward that patches many component tensors stages all its boxes together and hands each
    call a slice: one upload instead of one per call.
    """

    host: torch.Tensor  # [m, 6] int64, cpu, contiguous
    device: torch.Tensor  # the same on the device
    alpha_host: torch.Tensor  # [m] float64, cpu, contiguous
    alpha_device: torch.Tensor

    def __len__(self) -> int:
        return self.host.shape[0]

    @functools.cached_property
    def views(self) -> tuple[_View, _View, _View, _View]:
        """The views _C reads, made once however many calls use them."""
        return (_view(self.host), _view(self.device), _view(self.alpha_host),
                _view(self.alpha_device))

    def split(self, counts: list[int]) -> list[StagedBoxes]:
        """Consecutive slices of ``counts`` boxes each (views, no copies)."""
        parts = zip(*(t.split(counts) for t in (self.host, self.device, self.alpha_host,
                                                self.alpha_device)))
        return [StagedBoxes(*part) for part in parts]


def stage_boxes(boxes: torch.Tensor, alpha: float | torch.Tensor, device: torch.device
                ) -> StagedBoxes:
    """Boxes ``[m, 6]`` and weights (one number, or ``[m]``) staged for ``device``."""
    op = "stage_boxes"
    _check_integer_table(boxes, op, "boxes", "[m, 6]",
                         lambda shape: len(shape) == 2 and shape[1] == 6)
    n = boxes.shape[0]
    weights = torch.as_tensor(alpha, dtype=torch.float64)
    weights = weights.expand(n) if weights.dim() == 0 else weights
    if weights.shape != (n,):
        msg = f"{op}: alpha must be a number or a tensor [{n}] (one per box), got {tuple(weights.shape)}"
        raise ShapeError(msg)
    host, on_device = _host_and_device(boxes.to(torch.int64), device)
    alpha_host, alpha_device = _host_and_device(weights.to(torch.float64), device)
    return StagedBoxes(host, on_device, alpha_host, alpha_device)


def patch_boxes(
    dest: torch.Tensor,
    src: torch.Tensor,
    boxes: torch.Tensor | StagedBoxes,
    *,
    alpha: float | torch.Tensor = 1.0,
    cur: torch.Tensor | None = None,
) -> None:
    """Write many rectangular patches into ``dest`` in one pass, in place.

    Box ``i`` = ``(row, source, a_begin, a_end, f_begin, f_end)`` sets
    ``dest[row, a_begin:a_end, f_begin:f_end]`` to ``d + alpha[i] * (s - d)`` with ``s`` the same
    rectangle of ``src[source]`` and ``d`` its current value (exactly ``s`` when
    ``alpha == 1``). With ``cur`` given, ``d`` is read from ``cur`` instead while the result still
    lands on ``dest + alpha * (s - cur)``: that patches a sum through one of its summands.

    Args:
        dest: ``[rows, a, f]`` floating tensor, any strides, written in place.
        src: ``[sources, a, f]`` with ``dest``'s dtype and device.
        boxes: ``[m, 6]`` integer tensor (any device), or :class:`StagedBoxes` for ``dest``'s
            device (which carry their own weights). Boxes of one row must not overlap.
        alpha: one weight for every box, or ``[m]`` weights (with unstaged boxes).
        cur: optional ``[rows, a, f]`` tensor like ``dest``.

    Raises:
        ShapeError, DTypeError, DeviceError, BuildError, InputError: bad arguments; a box out of
            range or overlapping another box of its row raises ``ValueError`` from ``_C``.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import patch_boxes
        >>> dest, src = torch.zeros(2, 3, 4), torch.ones(1, 3, 4)
        >>> patch_boxes(dest, src, torch.tensor([[1, 0, 2, 3, 0, 2]]))  # row 1, position 2, f 0:2
        >>> dest[1]
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [1., 1., 0., 0.]])
    """
    op = "patch_boxes"
    dest = _check_floating(dest, op, "dest")
    src = _check_floating(src, op, "src")
    if dest.dim() != 3 or src.dim() != 3:
        msg = (
            f"{op}: dest and src must be 3-D [rows, a, f] and [sources, a, f], got shapes "
            f"{tuple(dest.shape)} and {tuple(src.shape)}"
        )
        raise ShapeError(msg)
    if cur is not None:
        cur = _check_floating(cur, op, "cur")
    if isinstance(boxes, StagedBoxes):
        if not (isinstance(alpha, (int, float)) and alpha == 1.0):
            msg = f"{op}: staged boxes carry their own weights; alpha must be left unset, got {alpha!r}"
            raise InputError(msg)
        if boxes.device.device != dest.device:
            msg = f"{op}: boxes were staged for {boxes.device.device}, but dest is on {dest.device}"
            raise DeviceError(msg)
        staged = boxes
    else:
        staged = stage_boxes(boxes, alpha, dest.device)
    _C.patch_boxes(_view(dest), _view(src), None if cur is None else _view(cur), *staged.views,
                   _stream(dest))


#: The reductions :func:`patch_metric` computes, by name.
METRIC_KINDS = {"logit_diff": 0, "logprob": 1, "prob": 2, "kl": 3}


def patch_metric(
    logits: torch.Tensor,
    kind: str,
    index: torch.Tensor,
    *,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """One metric value per run from its logits, without materialising a log-softmax.

    Args:
        logits: ``[rows, vocab]`` floating tensor, any strides.
        kind: ``"logit_diff"`` (``z[t] - z[o]``), ``"logprob"`` (``log p(t)``), ``"prob"``
            (``p(t)``) or ``"kl"`` (``KL(softmax(ref[r]) || softmax(z))``, with ``0 log 0 = 0``).
        index: ``[rows, 2]`` integers: ``(t, o)`` for logit_diff, ``(t, ignored)`` for logprob
            and prob, ``(r, ignored)`` for kl.
        ref: ``[refs, vocab]`` reference logits for ``"kl"``, with ``logits``' dtype.

    Returns:
        ``[rows]`` float32 (float64 for float64 logits) on ``logits``' device.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import patch_metric
        >>> z = torch.tensor([[0.0, 2.0, 1.0]])
        >>> patch_metric(z, "logit_diff", torch.tensor([[1, 2]]))
        tensor([1.])
        >>> torch.allclose(patch_metric(z, "prob", torch.tensor([[1, 0]])), z.softmax(-1)[:, 1])
        True
    """
    op = "patch_metric"
    logits = _check_floating(logits, op, "logits")
    if kind not in METRIC_KINDS:
        msg = f"{op}: kind must be one of {sorted(METRIC_KINDS)}, got {kind!r}"
        raise InputError(msg)
    if logits.dim() != 2:
        msg = f"{op}: logits must be 2-D [rows, vocab], got shape {tuple(logits.shape)}"
        raise ShapeError(msg)
    rows = logits.shape[0]
    _check_integer_table(index, op, "index", f"[{rows}, 2] (one pair per run)",
                         lambda shape: shape == (rows, 2))
    if kind == "kl":
        if ref is None:
            msg = f"{op}: kind 'kl' needs ref, the reference logits [refs, vocab]"
            raise InputError(msg)
        ref = _check_floating(ref, op, "ref")
    index_host, index_dev = _host_and_device(index.to(torch.int64), logits.device)
    out = torch.empty(rows, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                      device=logits.device)
    _C.patch_metric(
        _view(logits), METRIC_KINDS[kind], _view(index_host), _view(index_dev),
        None if ref is None or kind != "kl" else _view(ref), _view(out), _stream(logits),
    )
    return out


#: The distributions :func:`fill_noise` draws from, by name.
NOISE_KINDS = {"gaussian": 0, "uniform": 1}


def fill_noise(out: torch.Tensor, *, seed: int, kind: str = "gaussian", offset: int = 0) -> torch.Tensor:
    """Fill ``out`` in place with seeded noise and return it.

    Element ``i`` (in row-major order) is a function of ``(seed, offset + i)`` alone, computed
    by a counter-based generator (Philox4x32-10), so the same seed gives the same bits on a
    device whatever the thread count; CPU and CUDA agree to float64 rounding of the transforms.

    Args:
        out: contiguous floating tensor on cpu or cuda.
        seed: any integer in ``[0, 2**64)``.
        kind: ``"gaussian"`` (standard normal, Box-Muller) or ``"uniform"`` (on ``[-1, 1)``).
        offset: index of the first element in the stream (to draw disjoint blocks).

    Examples:
        >>> import torch
        >>> from mechinterp._ops import fill_noise
        >>> a = fill_noise(torch.empty(3, 4), seed=7)
        >>> b = fill_noise(torch.empty(12), seed=7)
        >>> torch.equal(a.reshape(-1), b)
        True
        >>> torch.equal(fill_noise(torch.empty(4), seed=7, offset=8), b[8:])
        True
    """
    op = "fill_noise"
    out = _check_floating(out, op, "out")
    if not out.is_contiguous():
        msg = f"{op}: out must be contiguous, got strides {out.stride()} for shape {tuple(out.shape)}"
        raise ShapeError(msg)
    if kind not in NOISE_KINDS:
        msg = f"{op}: kind must be one of {sorted(NOISE_KINDS)}, got {kind!r}"
        raise InputError(msg)
    seed = _as_index(seed, op, "seed")
    offset = _as_index(offset, op, "offset")
    if not 0 <= seed < 2**64:
        msg = f"{op}: seed must lie in [0, 2**64), got {seed}"
        raise InputError(msg)
    if not 0 <= offset < 2**63:
        msg = f"{op}: offset must lie in [0, 2**63), got {offset}"
        raise InputError(msg)
    _C.fill_noise(_view(out), seed, offset, NOISE_KINDS[kind], _stream(out))
    return out


# ---- interactions: exact transforms over coalition tables ----

#: The linear maps :func:`moebius_` applies, by name.
MOEBIUS_KINDS = {"moebius": 0, "zeta": 1, "moebius_adjoint": 2, "zeta_adjoint": 3}

#: Most players a coalition table may have (2**40 entries is far past any memory).
MAX_PLAYERS = 40

_TABLE_DTYPES = (torch.float64, torch.float32)


def players_of_table(table: object, op: str, name: str) -> int:
    """The number of players ``n`` of a coalition table ``[2**n]``, after checking it is one.

    The table must be a 1-D float64 or float32 tensor on cpu or cuda whose length is a power of
    two; 16-bit floats are refused, since these sums grow like ``2**n`` and cancel heavily.
    """
    if not isinstance(table, torch.Tensor):
        msg = f"{op}: {name} must be a torch.Tensor, got {type(table).__name__}"
        raise InputError(msg)
    if table.dtype not in _TABLE_DTYPES:
        msg = f"{op}: {name} must be float64 or float32, got {table.dtype}"
        raise DTypeError(msg)
    if table.dim() != 1:
        msg = (
            f"{op}: {name} must be 1-D [2**n] (one entry per coalition of n players), got shape "
            f"{tuple(table.shape)}"
        )
        raise ShapeError(msg)
    length = table.shape[0]
    if length == 0 or length & (length - 1):
        msg = (
            f"{op}: {name} must have a power-of-two length 2**n (one entry per coalition of n "
            f"players), got length {length}"
        )
        raise ShapeError(msg)
    n = length.bit_length() - 1
    if n > MAX_PLAYERS:
        msg = f"{op}: {name} covers n={n} players; at most {MAX_PLAYERS} are supported"
        raise ShapeError(msg)
    _check_device(table, op, name)
    return n


def _check_contiguous(t: torch.Tensor, op: str, name: str) -> None:
    if not t.is_contiguous():
        msg = (
            f"{op}: {name} must be contiguous, got stride {t.stride()} for shape {tuple(t.shape)}; "
            "pass .contiguous() or use the functions of mechinterp.interactions, which copy"
        )
        raise ShapeError(msg)


def _available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch's caching allocator holds but does not use is free for our tensors too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# Allocations below this size are not worth asking the system about.
_SMALL_ALLOCATION = 64 * 2**20


def require_memory(op: str, needed: int, device: torch.device, what: str) -> None:
    """Raise InputError when ``needed`` bytes (for ``what``) do not fit on ``device``."""
    if needed < _SMALL_ALLOCATION:
        return
    available = _available_bytes(device)
    if available is not None and needed > available:
        msg = (
            f"{op}: {what} needs {needed:,} bytes ({needed / 2**30:.2f} GiB) on {device}, but only "
            f"{available:,} bytes ({available / 2**30:.2f} GiB) are available"
        )
        raise InputError(msg)


def moebius_(table: torch.Tensor, *, kind: str = "moebius") -> torch.Tensor:
    """Transform a coalition table in place, in ``O(n 2**n)``, and return it.

    Entry ``S`` of ``table`` belongs to the coalition whose bitmask is ``S`` (bit ``i`` set when
    player ``i`` is in it). ``kind`` picks one of four linear maps:

    - ``"moebius"``: Harsanyi dividends ``m(S) = sum_{T subset S} (-1)**(|S|-|T|) v(T)``;
    - ``"zeta"``: its inverse, ``v(S) = sum_{T subset S} m(T)``;
    - ``"moebius_adjoint"``: the transpose of ``"moebius"``,
      ``y(T) = sum_{S superset T} (-1)**(|S|-|T|) x(S)``;
    - ``"zeta_adjoint"``: the transpose of ``"zeta"``, ``y(T) = sum_{S superset T} x(S)``.

    Args:
        table: contiguous ``[2**n]`` float64 or float32 tensor on cpu or cuda, ``n <= 40``.
        kind: one of :data:`MOEBIUS_KINDS`.

    Returns:
        ``table``, transformed. Not differentiable.

    Raises:
        ShapeError: ``table`` is not 1-D, its length is not a power of two, or it is not
            contiguous.
        DTypeError: ``table`` is neither float64 nor float32.
        InputError: unknown ``kind``.
        BuildError: ``table`` is on cuda but mechinterp._C has no CUDA kernels.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import moebius_
        >>> v = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)  # v({0, 1}) = 5
        >>> moebius_(v)
        tensor([0., 1., 2., 2.], dtype=torch.float64)
        >>> moebius_(v, kind="zeta")
        tensor([0., 1., 2., 5.], dtype=torch.float64)
    """
    op = "moebius_"
    players_of_table(table, op, "table")
    _check_contiguous(table, op, "table")
    if kind not in MOEBIUS_KINDS:
        msg = f"{op}: kind must be one of {sorted(MOEBIUS_KINDS)}, got {kind!r}"
        raise InputError(msg)
    _C.moebius(_view(table), MOEBIUS_KINDS[kind], _stream(table))
    return table


def superset_weighted_sums(dividends: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums over supersets, for every subset of at most ``order`` players.

    ``out[T] = sum_{S superset T} dividends[S] * weights[|S|, |T|]`` for every subset ``T`` of at
    most ``order = weights.shape[1] - 1`` players, listed in the canonical order of
    :mod:`mechinterp.interactions.subsets` (by size, then :func:`itertools.combinations` order).
    With Harsanyi dividends and index-specific weights this is every Shapley-type index; see
    :mod:`mechinterp.interactions.weights`. The table is read once; float64 tables accumulate in
    float64, float32 tables sum within blocks of 4096 coalitions in float32 (a butterfly tree)
    and across blocks in float64.

    Args:
        dividends: contiguous ``[2**n]`` float64 or float32 tensor on cpu or cuda.
        weights: ``[n + 1, order + 1]`` real tensor (any device), with ``0 <= order <= n``; it is
            used in float64.

    Returns:
        ``[count_up_to(n, order)]`` tensor with the dtype and device of ``dividends``.

    Raises:
        ShapeError: bad table (see :func:`moebius_`) or ``weights`` not ``[n + 1, order + 1]``
            with ``order <= n``.
        DTypeError: ``dividends`` is neither float64 nor float32, or ``weights`` is not real.
        InputError: the output and the scratch table do not fit in the device's free memory.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import superset_weighted_sums
        >>> dividends = torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
        >>> sizes = torch.arange(3, dtype=torch.float64)
        >>> shapley = torch.stack([sizes == 0, 1 / sizes.clamp(min=1)], 1)  # phi_i: m(S) / |S|
        >>> superset_weighted_sums(dividends, shapley)  # (), (0,), (1,)
        tensor([0., 2., 3.], dtype=torch.float64)
    """
    op = "superset_weighted_sums"
    n = players_of_table(dividends, op, "dividends")
    _check_contiguous(dividends, op, "dividends")
    if not isinstance(weights, torch.Tensor):
        msg = f"{op}: weights must be a torch.Tensor, got {type(weights).__name__}"
        raise InputError(msg)
    if weights.is_complex() or weights.dtype == torch.bool:
        msg = f"{op}: weights must be real numbers, got {weights.dtype}"
        raise DTypeError(msg)
    if weights.dim() != 2 or weights.shape[0] != n + 1 or not 1 <= weights.shape[1] <= n + 1:
        msg = (
            f"{op}: weights must have shape [n + 1, order + 1] = [{n + 1}, order + 1] with "
            f"0 <= order <= n={n} (one weight per coalition size and output size), got "
            f"{tuple(weights.shape)}"
        )
        raise ShapeError(msg)
    order = weights.shape[1] - 1
    outputs = sum(math.comb(n, size) for size in range(order + 1))
    scratch_size = _C.superset_scratch_size(n, order)
    item = dividends.element_size()
    require_memory(op, (outputs + scratch_size) * item, dividends.device,
                   f"n={n} players at order {order} ({outputs:,} outputs and {scratch_size:,} "
                   "scratch entries)")
    weights_host, weights_dev = _host_and_device(weights.to(torch.float64), dividends.device)
    scratch = torch.empty(scratch_size, dtype=dividends.dtype, device=dividends.device)
    out = torch.empty(outputs, dtype=dividends.dtype, device=dividends.device)
    _C.superset_weighted_sums(_view(dividends), _view(weights_host), _view(weights_dev),
                              _view(scratch), _view(out), order, _stream(dividends))
    return out


# ---- sae: the activation epilogue of a chunked encode, and the sparse decode ----

_SELECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Largest k the CUDA top-k selector takes; the encoder falls back to torch.topk above it.
TOPK_CUDA_MAX_K = 256
#: Columns one CUDA selector block covers (the selectors' segment).
SAE_CUDA_SEGMENT: int = _C.SAE_CUDA_SEGMENT


def _optional_view(t: torch.Tensor | None) -> _View | None:
    return None if t is None else _view(t)


def _check_select_input(values: object, op: str) -> torch.Tensor:
    values = _check_floating(values, op, "values")
    if values.dtype not in _SELECT_DTYPES:
        msg = f"{op}: values must be float32, float16 or bfloat16, got {values.dtype}"
        raise DTypeError(msg)
    if values.ndim != 2 or (values.shape[1] > 1 and values.stride(1) != 1):
        msg = (
            f"{op}: values must be [rows, cols] with adjacent columns, got shape "
            f"{tuple(values.shape)} and strides {values.stride()}"
        )
        raise ShapeError(msg)
    return values


def _check_columns(t: torch.Tensor | None, values: torch.Tensor, op: str, name: str) -> None:
    if t is None:
        return
    if t.dtype != torch.float32 or t.shape != (values.shape[1],) or not t.is_contiguous():
        msg = (
            f"{op}: {name} must be a contiguous float32 [{values.shape[1]}], got {t.dtype} "
            f"{tuple(t.shape)}"
        )
        raise ShapeError(msg)
    if t.device != values.device:
        msg = f"{op}: {name} must be on {values.device} with values, got {t.device}"
        raise DeviceError(msg)


def topk_segments(cols: int, device: torch.device) -> int:
    """Segments :func:`select_topk` splits ``cols`` columns into on ``device``."""
    return _C.topk_segments(cols, device.type == "cuda")


def select_topk(
    values: torch.Tensor,
    k: int,
    *,
    col_offset: int = 0,
    index: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of ``(values + bias) * scale`` per row and segment, without a sort.

    Returns ``(top_values float32, top_index int32)``, each ``[rows, segments * k]`` (one
    segment on the CPU, one per ``SAE_CUDA_SEGMENT`` columns on CUDA), sorted in descending order with ties
    to the lower index; a segment with fewer than ``k`` columns pads with ``(-inf, -1)``.

    Args:
        values: ``[rows, cols]`` float32 / float16 / bfloat16 with adjacent columns.
        k: values kept per row and segment (at most 256 on CUDA).
        col_offset: added to column numbers to give the returned indices.
        index: int32 ``[rows, cols]`` indices to return instead (merging earlier selections;
            entries ``-1`` are skipped).
        bias, scale: float32 ``[cols]`` applied before ranking (both optional).
        out: preallocated ``(values, index)`` outputs, possibly column slices of larger buffers.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import select_topk
        >>> select_topk(torch.tensor([[0.5, 2.0, -1.0, 2.0]]), 2)
        (tensor([[2., 2.]]), tensor([[1, 3]], dtype=torch.int32))
    """
    op = "select_topk"
    values = _check_select_input(values, op)
    _check_device(values, op, "values")
    k = _as_index(k, op, "k")
    if k < 1 or (values.device.type == "cuda" and k > TOPK_CUDA_MAX_K):
        limit = f"[1, {TOPK_CUDA_MAX_K}]" if values.device.type == "cuda" else ">= 1"
        msg = f"{op}: k must be {limit} on {values.device}, got {k}"
        raise InputError(msg)
    if index is not None and (
        index.dtype != torch.int32 or index.shape != values.shape or index.device != values.device
    ):
        msg = (
            f"{op}: index must be int32 {tuple(values.shape)} on {values.device}, got "
            f"{index.dtype} {tuple(index.shape)} on {index.device}"
        )
        raise ShapeError(msg)
    _check_columns(bias, values, op, "bias")
    _check_columns(scale, values, op, "scale")
    width = topk_segments(values.shape[1], values.device) * k
    if out is None:
        out = (
            torch.empty(values.shape[0], width, dtype=torch.float32, device=values.device),
            torch.empty(values.shape[0], width, dtype=torch.int32, device=values.device),
        )
    _C.select_topk(
        _view(values), _optional_view(index), _optional_view(bias), _optional_view(scale), k,
        col_offset, _view(out[0]), _view(out[1]), _stream(values),
    )
    return out


def _segment_slots(values: torch.Tensor, cap: int):
    """Empty ``(values float32, index int32) [rows, segments, cap]`` slots and int32 counts."""
    rows, device = values.shape[0], values.device
    segments = topk_segments(values.shape[1], device)
    kept = torch.empty(rows, segments, cap, dtype=torch.float32, device=device)
    index = torch.empty(rows, segments, cap, dtype=torch.int32, device=device)
    count = torch.empty(rows, segments, dtype=torch.int32, device=device)
    return kept, index, count


def select_threshold(
    values: torch.Tensor,
    *,
    cap: int,
    col_offset: int = 0,
    bias: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    mag_scale: torch.Tensor | None = None,
    mag_bias: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns whose ``values + bias`` exceed ``threshold`` (0 if absent), per row.

    Returns ``(kept float32, index int32)`` of shape ``[rows, segments, cap]`` in column order
    and ``count int32 [rows, segments]``, the true count per row and segment, which exceeds
    ``cap`` when entries were dropped. With ``mag_scale`` and ``mag_bias`` (gated SAEs), ``bias``
    is the gate bias and the kept value is ``relu(values * mag_scale + mag_bias)``; only
    positive values are kept. ``out`` takes preallocated ``(kept, index, count)``, possibly
    segment slices of buffers that hold several chunks (``cap`` is then their last dimension).

    Examples:
        >>> import torch
        >>> from mechinterp._ops import select_threshold
        >>> kept, index, count = select_threshold(torch.tensor([[0.5, -1.0, 2.0]]), cap=4)
        >>> kept[0, 0, :2], index[0, 0, :2], count
        (tensor([0.5000, 2.0000]), tensor([0, 2], dtype=torch.int32), tensor([[2]], dtype=torch.int32))
    """
    op = "select_threshold"
    values = _check_select_input(values, op)
    _check_device(values, op, "values")
    cap = _as_index(cap, op, "cap")
    if cap < 1:
        msg = f"{op}: cap must be >= 1, got {cap}"
        raise InputError(msg)
    for name, t in (("bias", bias), ("threshold", threshold), ("mag_scale", mag_scale),
                    ("mag_bias", mag_bias)):
        _check_columns(t, values, op, name)
    if (mag_scale is None) != (mag_bias is None):
        msg = f"{op}: mag_scale and mag_bias go together (gated SAEs), got only one of them"
        raise InputError(msg)
    kept, index, count = _segment_slots(values, cap) if out is None else out
    _C.select_threshold(
        _view(values), _optional_view(bias), _optional_view(threshold), _optional_view(mag_scale),
        _optional_view(mag_bias), col_offset, _view(kept), _view(index), _view(count),
        _stream(values),
    )
    return kept, index, count


def compact_slots(
    kept: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    row_start: torch.Tensor,
    nnz: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_threshold`'s filled slots as compressed rows ``(values [nnz], index int64)``.

    Row ``r``'s entries (the first ``min(count, cap)`` slots of each segment, segments in order)
    start at ``row_start[r]`` (int64 ``[rows]``); values are rounded to ``dtype`` (float32,
    float16 or bfloat16). Entries that would land past ``nnz`` are dropped.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import compact_slots, select_threshold
        >>> kept, index, count = select_threshold(torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 0.0]]),
        ...                                       cap=4)
        >>> compact_slots(kept, index, count, torch.tensor([0, 2]), 3)
        (tensor([0.5000, 2.0000, 3.0000]), tensor([0, 2, 0]))
    """
    op = "compact_slots"
    for name, t in (("kept", kept), ("index", index), ("count", count), ("row_start", row_start)):
        if not isinstance(t, torch.Tensor):
            msg = f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
            raise InputError(msg)
    _check_device(kept, op, "kept")
    nnz = _as_index(nnz, op, "nnz")
    if nnz < 0:
        msg = f"{op}: nnz must be >= 0, got {nnz}"
        raise InputError(msg)
    if dtype not in _SELECT_DTYPES:
        msg = f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}"
        raise DTypeError(msg)
    values = torch.empty(nnz, dtype=dtype, device=kept.device)
    indices = torch.empty(nnz, dtype=torch.int64, device=kept.device)
    _C.compact_slots(_view(kept), _view(index), _view(count), _view(row_start), _view(values),
                     _view(indices), _stream(kept))
    return values, indices


def topk_candidate_cap(k: int) -> int:
    """Slots per (row, segment) :func:`topk_candidates` gives a running top-k of ``k``.

    Room for about six times k: a segment's bound lets through about twice k on smooth data, and
    a segment with more (heavy ties) keeps its exact top k instead.
    """
    return min(max(6 * k, 64), _C.SAE_CUDA_CANDIDATES - k)


def topk_candidates(
    values: torch.Tensor,
    k: int,
    *,
    row_bar: torch.Tensor,
    col_offset: int = 0,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    cap: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of a running top-k on CUDA: what can still be among each row's ``k`` largest.

    Per row and segment of ``values`` (``SAE_CUDA_SEGMENT`` columns), every column whose
    ``(values + bias) * scale`` reaches a lower bound of the row's k-th largest, unordered, as
    ``(values float32, index int32)`` slots ``[rows, segments, cap]`` (indices ``col_offset +
    column``) and counts int32 ``[rows, segments]``. The bound is the larger of ``row_bar``
    (int32 ``[rows]`` order keys, zeros to start; :func:`topk_merge` raises it to the running
    k-th value) and the segment's own, which is written into ``row_bar``. Fold the result into
    the running top-k with :func:`topk_merge`.
    """
    op = "topk_candidates"
    values = _check_select_input(values, op)
    _check_device(values, op, "values")
    k = _as_index(k, op, "k")
    cap = topk_candidate_cap(k) if cap is None else _as_index(cap, op, "cap")
    _check_columns(bias, values, op, "bias")
    _check_columns(scale, values, op, "scale")
    kept, index, count = _segment_slots(values, cap)
    _C.topk_candidates(
        _view(values), _optional_view(bias), _optional_view(scale), k, col_offset, _view(kept),
        _view(index), _view(count), _view(row_bar), _stream(values),
    )
    return kept, index, count


def topk_merge(
    top_values: torch.Tensor,
    top_index: torch.Tensor,
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    row_bar: torch.Tensor,
) -> None:
    """Fold :func:`topk_candidates` output into the running top-k, in place (CUDA).

    ``top_values`` float32 / ``top_index`` int32 ``[rows, k]`` hold each row's k largest so far
    in descending order, ties to the lower index, padded with ``(-inf, -1)`` (the start);
    ``row_bar`` becomes the key of the k-th once a row holds k values.
    """
    op = "topk_merge"
    for name, t in (("top_values", top_values), ("top_index", top_index)):
        if not isinstance(t, torch.Tensor):
            msg = f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
            raise InputError(msg)
    _check_device(top_values, op, "top_values")
    kept, index, count = candidates
    _C.topk_merge(_view(top_values), _view(top_index), _view(kept), _view(index), _view(count),
                  _view(row_bar), _stream(top_values))


def topk_merge_rows(
    top_values: torch.Tensor,
    top_index: torch.Tensor,
    row_ptr: torch.Tensor,
    cand_index: torch.Tensor,
    cand_values: torch.Tensor,
    row_bar: torch.Tensor,
    *,
    col_offset: int = 0,
) -> None:
    """:func:`topk_merge` with candidates as compressed rows, in place (CUDA).

    Row ``r``'s candidates are ``cand_index`` (int32, columns counted from ``col_offset``) and
    ``cand_values`` (bfloat16 or float16) at ``row_ptr[r]:row_ptr[r + 1]`` (int64 ``[rows +
    1]``), in any order: what :func:`fused_queued_entries` gives (entries past
    ``row_ptr[rows]`` are not read). ``top_values`` / ``top_index`` /
    ``row_bar`` as for :func:`topk_merge`; ``k`` at most ``TOPK_CUDA_MAX_K``.
    """
    op = "topk_merge_rows"
    for name, t in (("top_values", top_values), ("top_index", top_index), ("row_ptr", row_ptr),
                    ("cand_index", cand_index), ("cand_values", cand_values),
                    ("row_bar", row_bar)):
        if not isinstance(t, torch.Tensor):
            msg = f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
            raise InputError(msg)
    _check_device(top_values, op, "top_values")
    col_offset = _as_index(col_offset, op, "col_offset")
    _C.topk_merge_rows(_view(top_values), _view(top_index), _view(row_ptr), _view(cand_index),
                       _view(cand_values), col_offset, _view(row_bar), _stream(top_values))


def screened_topk(
    screen: torch.Tensor,
    x: torch.Tensor,
    w_t: torch.Tensor,
    norms: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The exact float32 top ``k`` of ``(x @ W + bias) * scale`` per row, from a bf16 screen (CPU).

    ``screen`` is ``bf16(x) @ bf16(W)`` (``[rows, d_sae]`` bfloat16 from any GEMM that sums in
    float32). Around each screened value the kernel puts a proven error interval (from the norms
    of ``bf16(x)``, ``x - bf16(x)`` and ``norms``); only latents whose interval reaches the k-th
    largest lower end are computed again from ``x`` and ``w_t``, in double, rounded once to
    float32.

    Args:
        screen: bfloat16 ``[rows, d_sae]`` with adjacent columns.
        x: float32 ``[rows, d_in]`` with adjacent columns, the GEMM's left side.
        w_t: float32 ``[d_sae, d_in]`` contiguous, ``W`` transposed.
        norms: float64 ``[2, d_sae]``, the 2-norms of the columns of ``bf16(W)`` and of
            ``W - bf16(W)``, not rounded down.
        k: latents kept per row.
        bias, scale: float32 ``[d_sae]`` applied before ranking (both optional).

    Returns:
        ``(values float32, index int32)`` ``[rows, k]`` as :func:`select_topk` gives them, and
        how many latents were recomputed (every latent of a row whose bounds are not finite:
        an inf or NaN in ``x``, ``W`` or the screen).
    """
    op = "screened_topk"
    for name, t in (("screen", screen), ("x", x), ("w_t", w_t), ("norms", norms)):
        if not isinstance(t, torch.Tensor):
            msg = f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
            raise InputError(msg)
    k = _as_index(k, op, "k")
    if k < 1:
        msg = f"{op}: k must be >= 1, got {k}"
        raise InputError(msg)
    _check_columns(bias, screen, op, "bias")
    _check_columns(scale, screen, op, "scale")
    rows = screen.shape[0] if screen.ndim == 2 else 0
    values = torch.empty(rows, k, dtype=torch.float32)
    index = torch.empty(rows, k, dtype=torch.int32)
    recomputed = _C.screened_topk(_view(screen), _view(x), _view(w_t), _view(norms),
                                  _optional_view(bias), _optional_view(scale), k, _view(values),
                                  _view(index))
    return values, index, recomputed


def sparse_decode(
    index: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    *,
    row_ptr: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """``out[r] = (out[r] if accumulate else bias or 0) + sum_j values[j] * weight[index[j]]``.

    Row ``r``'s entries are ``[row_ptr[r], row_ptr[r + 1])`` of flat ``index``/``values`` when
    ``row_ptr`` is given, else row ``r`` of ``[rows, k]`` ones. Indices ``-1`` are skipped. Sums
    run in float32 (float64 for float64 ``weight``) and round once.

    Examples:
        >>> import torch
        >>> from mechinterp._ops import sparse_decode
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> sparse_decode(torch.tensor([[2, -1]]), torch.tensor([[3.0, 9.0]]), weight)
        tensor([[3., 3.]])
    """
    op = "sparse_decode"
    weight = _check_floating(weight, op, "weight")
    _check_device(weight, op, "weight")
    if weight.ndim != 2:
        msg = f"{op}: weight must be [d_sae, d_out], got shape {tuple(weight.shape)}"
        raise ShapeError(msg)
    weight = weight.contiguous()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if index.dtype not in (torch.int32, torch.int64):
        msg = f"{op}: index must be int32 or int64, got {index.dtype}"
        raise DTypeError(msg)
    index = index.to(weight.device).contiguous()
    values = values.to(device=weight.device, dtype=acc).contiguous()
    if row_ptr is not None:
        row_ptr = row_ptr.to(device=weight.device, dtype=torch.int64).contiguous()
        rows = row_ptr.shape[0] - 1
    else:
        if index.ndim != 2:
            msg = f"{op}: index must be [rows, k] without row_ptr, got {tuple(index.shape)}"
            raise ShapeError(msg)
        rows = index.shape[0]
    if bias is not None:
        bias = bias.to(device=weight.device, dtype=weight.dtype).contiguous()
    if out is None:
        if accumulate:
            msg = f"{op}: accumulate=True needs out"
            raise InputError(msg)
        out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    _C.sparse_decode(
        _view(index), _view(values), _optional_view(row_ptr), _view(weight),
        _optional_view(bias), _view(out), bool(accumulate), _stream(weight),
    )
    return out


# ---- the fused Hopper SAE encode (csrc/sae/fused_threshold.h) ----

#: Rows and latents of the fused encode's record tiles, and record regions (warps) a tile: the
#: cooperative kernels' GEMM tile; the ping-pong kernel's tiles are half as tall and fill half
#: a record tile's regions each.
SAE_FUSED_TILE_M: int = _C.SAE_FUSED_TILE_M
SAE_FUSED_TILE_N: int = _C.SAE_FUSED_TILE_N
SAE_FUSED_WARPS: int = _C.SAE_FUSED_WARPS
#: The fused GEMM's kernels: cooperative (``cluster_*``) or ping-pong, by thread-block cluster
#: shape (tiles along rows x along latents). All write the same records.
SAE_FUSED_KERNELS: tuple[str, ...] = tuple(_C.SAE_FUSED_KERNELS)
#: The kernels with a variant that keeps what reaches a floor per row (a TopK encode).
SAE_FUSED_FLOOR_KERNELS: tuple[str, ...] = tuple(_C.SAE_FUSED_FLOOR_KERNELS)
#: The orders its persistent kernel may walk the tiles in; all write the same records.
SAE_FUSED_RASTERS: tuple[str, ...] = tuple(_C.SAE_FUSED_RASTERS)
#: The widths of the bands of tiles it may walk (1: no bands).
SAE_FUSED_SWIZZLES: tuple[int, ...] = (1, 2, 4, 8)


def fused_threshold_available(device: torch.device) -> bool:
    """Whether the fused sm_90 threshold encode runs on ``device`` (built in, and a CUDA device
    of compute capability 9.0)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _fused_on_device(index)


@functools.cache
def _fused_on_device(index: int) -> bool:
    # A device's compute capability does not change while the process runs.
    return bool(_C.build_info()["sae_fused_sm90"]) and bool(_C.fused_threshold_available(index))


class FusedRecords(NamedTuple):
    """What :func:`fused_threshold_gemm` leaves on the device (int32 throughout)."""

    records: torch.Tensor  #: ``[tiles_m, tiles_n, warps, cap]`` (see fused_threshold_gemm)
    warp_count: torch.Tensor  #: survivors per region ``[tiles_m, tiles_n, warps]``
    tile_overflow: torch.Tensor  #: 1 for each tile row with a region past ``cap`` ``[tiles_m]``
    row_count: torch.Tensor  #: survivors per row ``[rows]``
    tile_total: torch.Tensor  #: survivors per tile row ``[tiles_m]``


class _FusedScratch:
    """The fused GEMM's records, counts and workspace: one int32 allocation in 16-byte aligned
    regions, passed to _C as views built from the pointer (a torch view per region would cost
    the host more than the GEMM's launch), and as torch views only where asked for."""

    # Back to back, in order, so that one launch zeroes them; the summary is the compaction's.
    _ZEROED = ("summary", "warp_count", "tile_overflow", "tile_total", "row_count")

    def __init__(self, prepared: PreparedPass):
        self.index = prepared.index
        self.dtype = prepared.dtype  # the records' values' type (the GEMM checks it)
        self.schedule, self._regions, size = prepared.layout
        self.buffer = torch.empty(size, dtype=torch.int32, device=prepared.device)
        self._base = self.buffer.data_ptr()
        self.compacted = False  # whether a compaction (which writes the summary) is queued

    def view(self, name: str) -> _View:
        offset, shape, strides, dtype = self._regions[name]
        return (self._base + 4 * offset, dtype, shape, strides, "cuda", self.index)

    def tensor(self, name: str) -> torch.Tensor:
        start, shape, _, dtype = self._regions[name]
        words = math.prod(shape) * (2 if dtype == "int64" else 1)
        return self.buffer[start:start + words].view(_VIEW_DTYPES[dtype]).view(shape)

    def counts(self) -> torch.Tensor:
        """The summary and the counts (with their padding) as one flat int32 tensor."""
        return self.buffer[self._regions[self._ZEROED[0]][0]:]

    def centered_view(self) -> _View:
        """The centred inputs' region (``centered=True``) as a ``[rows, d_in]`` view of the
        inputs' type."""
        offset, (rows, words), _, _ = self._regions["centered"]  # two 16-bit inputs a word
        return (self._base + 4 * offset, _DTYPE_NAMES[self.dtype], (rows, 2 * words),
                (2 * words, 1), "cuda", self.index)

    def centered(self) -> torch.Tensor:
        """The centred inputs as a ``[rows, d_in]`` tensor of the inputs' type."""
        start, (rows, words), _, _ = self._regions["centered"]
        return self.buffer[start:start + rows * words].view(self.dtype).view(rows, 2 * words)


_VIEW_DTYPES = {"int32": torch.int32, "int64": torch.int64}


class PreparedPass(NamedTuple):
    """What a fused pass of one problem launches with, worked out once (:func:`prepare_pass`):
    its scratch's layout and the views of its weight, bias and bound. The views hold addresses,
    not tensors: whoever queues passes with it keeps those tensors alive and unchanged."""

    layout: tuple  # (schedule, regions, int32 elements) of the scratch (_scratch_layout)
    index: int  # the device's
    device: torch.device
    dtype: torch.dtype  # the inputs'
    weight: _View
    bias: _View
    bound: _View
    # The views of its scratch's regions at the address the last pass's scratch had: a caller
    # that queues passes one after another is handed the same block by torch's allocator call
    # after call, and building them costs the host microseconds before the GEMM's launch.
    scratch_views: dict


def prepare_pass(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 bound: torch.Tensor, cap: int, kernel: str, raster: str, swizzle: int,
                 row_floor: bool = False, centered: bool = False) -> PreparedPass:
    """The :class:`PreparedPass` of inputs shaped as ``x`` (arguments as for
    :func:`fused_queue_pass`; ``centered``: the pass centres its inputs). A caller that queues
    many passes of one problem keeps it (:func:`queue_prepared`), since the host's time before
    the GEMM's launch is time the GPU waits."""
    _check_device(x, op, "x")
    if x.ndim != 2 or weight.ndim != 2:
        msg = (f"{op}: x and weight must be 2-d, got {tuple(x.shape)} and "
               f"{tuple(weight.shape)}")
        raise ShapeError(msg)
    device = x.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    layout = _scratch_layout(op, x.shape[0], x.shape[1], weight.shape[1], cap, index, kernel,
                             raster, swizzle, bool(row_floor), x.dtype == torch.float16,
                             centered)
    return PreparedPass(layout, index, device, x.dtype, _view(weight), _view(bias),
                        _view(bound), {})


@functools.lru_cache(maxsize=64)
def _scratch_layout(op: str, rows: int, d_in: int, d_sae: int, cap: int, index: int, kernel: str,
                    raster: str, swizzle: int, row_floor: bool, float16: bool,
                    centered: bool = False):
    """``(schedule, regions, int32 elements)`` of a :class:`_FusedScratch`: worked out
    once per problem, since the encode's host time before the GEMM is time the GPU waits."""
    for name, given, allowed in (("kernel", kernel, SAE_FUSED_KERNELS),
                                 ("raster", raster, SAE_FUSED_RASTERS),
                                 ("swizzle", swizzle, SAE_FUSED_SWIZZLES)):
        if given not in allowed:
            msg = f"{op}: {name} must be one of {allowed}; got {given!r}"
            raise InputError(msg)
    if row_floor and kernel not in SAE_FUSED_FLOOR_KERNELS:
        msg = (f"{op}: kernel must be one of {SAE_FUSED_FLOOR_KERNELS} with row_floor (the others "
               f"have no floor per row); got {kernel!r}")
        raise InputError(msg)
    schedule = (SAE_FUSED_KERNELS.index(kernel), SAE_FUSED_RASTERS.index(raster), swizzle,
                row_floor)
    tiles = (-(-rows // SAE_FUSED_TILE_M), -(-d_sae // SAE_FUSED_TILE_N), SAE_FUSED_WARPS)
    workspace = _C.fused_threshold_workspace(rows, d_in, d_sae, index, *schedule, float16)
    # Workspace and records start on 16-byte boundaries (TMA and vector access); the summary
    # (int64) and the counts (int32, read and written one by one) come last and back to back,
    # so that one launch zeroes them.
    shapes = {"workspace": ((-(-workspace // 4),), "int32"), "records": ((*tiles, cap), "int32"),
              "summary": ((3,), "int64"), "warp_count": (tiles, "int32"),
              "tile_overflow": ((tiles[0],), "int32"), "tile_total": ((tiles[0],), "int32"),
              "row_count": ((rows,), "int32")}
    if centered:  # 16-bit inputs minus the decoder bias (d_in is even: a multiple of 8)
        shapes = {"centered": ((rows, d_in // 2), "int32"), **shapes}
    regions, end = {}, 0
    for name, (shape, dtype) in shapes.items():
        if name not in _FusedScratch._ZEROED or name == _FusedScratch._ZEROED[0]:
            end = -(-end // 4) * 4
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        regions[name] = (end, shape, strides, dtype)
        end += math.prod(shape) * (2 if dtype == "int64" else 1)
    return schedule, regions, -(-end // 4) * 4


def fused_threshold_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bound: torch.Tensor, *, cap: int,
    kernel: str = "cluster_2x1", raster: str = "heuristic", swizzle: int = 1,
    row_floor: bool = False,
) -> FusedRecords:
    """The encoder GEMM with the threshold in its epilogue (sm_90, bfloat16 or float16).

    ``x`` ``[rows, d_in]`` and ``weight`` ``[d_in, d_sae]`` (both contiguous, 16-byte aligned,
    ``d_in`` and ``d_sae`` multiples of 8), ``bias`` and ``bound`` ``[d_sae]``, all bfloat16 or
    all float16 (call it E): column ``c`` of row ``r`` survives iff ``E(x[r] @ weight[:, c] +
    bias[c]) > bound[c]`` (a compare in E, exact for any bound: see
    :func:`mechinterp.sae.fused.threshold_params`).

    Survivors become int32 records (row in tile << 24 | column in tile << 16 | the value's 16
    bits) in regions of ``cap`` per (tile, warp); a region's count above ``cap`` means records
    were dropped, and its tile row is flagged. All counts are zeroed in one launch.
    ``kernel`` (one of :data:`SAE_FUSED_KERNELS`), ``raster`` (one of
    :data:`SAE_FUSED_RASTERS`) and ``swizzle`` (one of :data:`SAE_FUSED_SWIZZLES`) choose the
    kernel and the order it walks the tiles in; they differ in speed only. Queued on the
    current stream; nothing is synchronised.

    With ``row_floor`` (a TopK encode; kernels :data:`SAE_FUSED_FLOOR_KERNELS`), ``bound`` is
    a floor per row, E ``[rows]``: column ``c`` of row ``r`` survives iff its value is at
    least ``bound[r]`` or NaN; ``weight`` may then be a block of columns of a wider matrix
    (``W[:, c0:c1]``, ``c0`` a multiple of 8).
    """
    prepared = prepare_pass("fused_threshold_gemm", x, weight, bias, bound, cap, kernel, raster,
                            swizzle, row_floor)
    scratch = _FusedScratch(prepared)
    scratch.counts().zero_()
    _C.fused_threshold_gemm(
        _view(x), prepared.weight, prepared.bias, prepared.bound, scratch.view("records"),
        scratch.view("warp_count"), scratch.view("row_count"), scratch.view("tile_overflow"),
        scratch.view("tile_total"), scratch.view("workspace"), *scratch.schedule, _stream(x),
    )
    return FusedRecords(*(scratch.tensor(name) for name in FusedRecords._fields))


class QueuedPass(NamedTuple):
    """What :func:`fused_queue_pass` leaves: the GEMM's records and counts, and the room for
    the summary a compaction writes, all on the device."""

    scratch: _FusedScratch  #: records and counts (``tensor(name)`` gives a torch view)


def fused_queue_pass(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bound: torch.Tensor, *, cap: int,
    kernel: str = "cluster_2x1", raster: str = "heuristic", swizzle: int = 1,
    row_floor: bool = False, center: torch.Tensor | None = None,
) -> QueuedPass:
    """:func:`fused_threshold_gemm`, queued from one call into _C.

    The counts are zeroed and the GEMM queued, and the call returns at once, so that the host
    can queue the compaction (:func:`fused_queued_rows`, :func:`fused_queued_entries`) while
    the GEMM runs, then wait for its summary (:func:`fused_wait_summary`). Arguments as for
    :func:`fused_threshold_gemm`; with ``center`` (``[d_in]``, x's type), the GEMM reads
    ``x - center`` (as torch rounds it), written to the scratch first (``scratch.centered()``),
    so that ``x`` need only be contiguous.
    """
    prepared = prepare_pass("fused_queue_pass", x, weight, bias, bound, cap, kernel, raster,
                            swizzle, row_floor, centered=center is not None)
    return queue_prepared(prepared, x, center)


def fused_wait_summary(queued: QueuedPass) -> tuple[int, int, int]:
    """Waits for the summary of a :class:`QueuedPass`'s compaction (queued first, by
    :func:`fused_queued_rows` or :func:`fused_queued_entries`): ``(entries, overflowed tile
    rows, widest row)``."""
    if not queued.scratch.compacted:
        msg = ("fused_wait_summary: the summary is the compaction's; queue one first "
               "(fused_queued_rows or fused_queued_entries)")
        raise InputError(msg)
    return _C.fused_summary(queued.scratch.view("summary"), _stream_on(queued.scratch.index))


def queue_prepared(prepared: PreparedPass, x: torch.Tensor,
                   center: torch.Tensor | None = None) -> QueuedPass:
    """:func:`fused_queue_pass` of ``x`` (shaped as the inputs it was prepared for; the
    compiled call checks it) with a :class:`PreparedPass`."""
    scratch = _FusedScratch(prepared)
    views = prepared.scratch_views.get(scratch._base)
    if views is None:
        centered = scratch.centered_view() if "centered" in scratch._regions else None
        prepared.scratch_views.clear()
        views = prepared.scratch_views[scratch._base] = (
            centered, *(scratch.view(name) for name in _PASS_REGIONS))
    centering = (None, None) if center is None else (_view(center), views[0])
    _C.fused_encode_pass(_view(x), *centering, prepared.weight, prepared.bias, prepared.bound,
                         *views[1:], *scratch.schedule, _stream_on(prepared.index))
    return QueuedPass(scratch)


# The scratch regions fused_encode_pass takes, in its order.
_PASS_REGIONS = ("records", "summary", "warp_count", "tile_overflow", "tile_total", "row_count",
                 "workspace")


def fused_queued_entries(
    queued: QueuedPass,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A :class:`QueuedPass`'s records as compressed rows in arrival order, queued without a
    host sync: ``(row_ptr int64, index int32, values)`` (the pass's element type), row ``r``'s
    entries at ``row_ptr[r]:row_ptr[r + 1]``, the rows of overflowed tile rows empty. The arrays
    hold as many entries as the records have slots; the entries number ``row_ptr[-1]``, and
    what lies past them is not written."""
    slots = queued.scratch.tensor("records").numel()
    work, out = _compact(queued.scratch, slots, False, _ORDER_ALL)
    return (_row_ptr_view(out, queued.scratch), *_arrival_views(work, slots,
                                                                 queued.scratch.dtype))


class QueuedRows(NamedTuple):
    """:func:`fused_queued_rows`' arrays: the row pointers, and the entries, ``[capacity]``
    each, whose first ``row_ptr[-1]`` hold the rows when that many fit."""

    row_ptr: torch.Tensor  #: int64 ``[rows + 1]``, the rows of overflowed tile rows empty
    index: torch.Tensor  #: int64, each row's columns ascending (rows left to a sort unwritten)
    values: torch.Tensor  #: in the same order, the pass's element type
    arrival_index: torch.Tensor  #: int32, each row's entries in arrival order
    arrival_values: torch.Tensor  #: in the same order


def fused_queued_rows(queued: QueuedPass, capacity: int, *, order_max: int) -> QueuedRows:
    """A :class:`QueuedPass`'s records as compressed rows, queued before the number of entries
    is known, into arrays of ``capacity`` entries (0: the row pointers and the summary alone).

    Once the summary is read (:func:`fused_wait_summary`): with entries up to ``capacity``,
    ``index`` / ``values`` hold the ordered rows, but for rows of more than ``order_max``
    entries (where the summary's widest row exceeds it, sort the arrival-order arrays instead);
    with more, entries past ``capacity`` were dropped and the rows must be compacted again.
    """
    work, out = _compact(queued.scratch, capacity, True, order_max)
    dtype = queued.scratch.dtype
    row_ptr = _row_ptr_view(out, queued.scratch)
    return QueuedRows(row_ptr, *_ordered_views(out, row_ptr.shape[0], capacity, dtype),
                      *_arrival_views(work, capacity, dtype))


# No row is too wide for the compaction's ordering.
_ORDER_ALL = 2**62


def _compact(scratch: _FusedScratch, nnz: int, order: bool,
             order_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the compaction of a pass's records into arrays of ``nnz`` entries: ``(work,
    out)``, as :func:`_compact_records`; it also writes the pass's summary."""
    view = scratch.view
    work_out = _compact_records(
        tuple(view(name) for name in ("records", "warp_count", "row_count", "tile_overflow",
                                      "tile_total")),
        view("summary"), scratch.dtype, scratch.buffer.device, nnz, order, order_max)
    scratch.compacted = True
    return work_out


def _compact_records(counts: tuple[_View, ...], summary: _View, dtype: torch.dtype,
                     device: torch.device, nnz: int, order: bool,
                     order_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the compaction of records into arrays of ``nnz`` entries: ``(work, out)``,
    int16 allocations holding the arrival-order arrays (int32 columns, then 16-bit values of
    ``dtype``) and the row pointers (int64 ``[rows + 1]``) followed by the ordered arrays (int64
    columns, then 16-bit values; none without ``order``). ``counts`` are the views of the
    records, warp_count, row_count, tile_overflow and tile_total. Torch views are cut only of
    what the caller returns, after the launch, so that the GPU starts it while the host makes
    them."""
    kind, index = counts[0][4], counts[0][5]  # the records' device
    rows = counts[2][2][0]
    dtype_name = _DTYPE_NAMES[dtype]
    work = torch.empty(3 * nnz, dtype=torch.int16, device=device)
    base = work.data_ptr()
    work_index = (base, "int32", (nnz,), (1,), kind, index)
    work_values = (base + 4 * nnz, dtype_name, (nnz,), (1,), kind, index)
    size = nnz if order else 0
    out = torch.empty(4 * (rows + 1) + 5 * size, dtype=torch.int16, device=device)
    out_base = out.data_ptr()
    row_ptr = (out_base, "int64", (rows + 1,), (1,), kind, index)
    ordered = out_base + 8 * (rows + 1)
    out_index = (ordered, "int64", (size,), (1,), kind, index)
    out_values = (ordered + 8 * size, dtype_name, (size,), (1,), kind, index)
    _C.fused_records_to_rows(*counts, row_ptr, summary, work_index, work_values, out_index,
                             out_values, bool(order), order_max, _stream(work))
    return work, out


def _row_ptr_view(out: torch.Tensor, scratch: _FusedScratch) -> torch.Tensor:
    rows = scratch._regions["row_count"][1][0]
    return out[:4 * (rows + 1)].view(torch.int64)


def _arrival_views(work: torch.Tensor, nnz: int, dtype: torch.dtype):
    return work[:2 * nnz].view(torch.int32), work[2 * nnz:].view(dtype)


def _ordered_views(out: torch.Tensor, pointers: int, nnz: int, dtype: torch.dtype):
    start = 4 * pointers  # past the row pointers
    return (out[start:start + 4 * nnz].view(torch.int64),
            out[start + 4 * nnz:].view(dtype))


def fused_gated_magnitudes_(index: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor) -> torch.Tensor:
    """A gated SAE's fused-encode survivors turned into activations, in place, in one launch.

    ``values`` bfloat16 or float16 ``[n]`` (the survivors' ``h = x W_enc``) become ``relu(h *
    scale[index] + bias[index])`` in float32, rounded to their type, with the multiply rounded
    before the add, exactly as torch computes it one operation at a time. ``index`` int64
    ``[n]`` holds their latents, which must lie in ``[0, d_sae)`` (the compaction's columns; the
    device does not check), and ``scale`` / ``bias`` are float32 ``[d_sae]``. CUDA, fused builds
    only. Returns ``values``.
    """
    op = "fused_gated_magnitudes"
    _check_device(values, op, "values")
    _C.fused_gated_magnitudes(_view(index), _view(values), _view(scale), _view(bias),
                              _stream(values))
    return values


class FusedRows(NamedTuple):
    """:func:`fused_records_to_rows`' compressed rows."""

    row_ptr: torch.Tensor  #: int64 ``[rows + 1]``, the rows of overflowed tile rows empty
    index: torch.Tensor  #: int64 ``[nnz]``
    values: torch.Tensor  #: ``[nnz]``, the records' element type
    summary: torch.Tensor  #: int64 ``[3]``: entries, overflowed tile rows, widest row


def fused_records_to_rows(found: FusedRecords, nnz: int, *, order: bool = True,
                          dtype: torch.dtype = torch.bfloat16) -> FusedRows:
    """:func:`fused_threshold_gemm`'s records as compressed rows, the values of type ``dtype``
    (the GEMM's element type: bfloat16 or float16). Queued on the current stream; nothing is
    synchronised.

    The row pointers count each row's survivors, with the rows of overflowed tile rows empty;
    the entries fill arrays of ``nnz`` (the summary's entries: with fewer, those past ``nnz``
    are dropped, and 0 gives the row pointers and summary alone). With ``order``, each row's
    columns ascend (the kernel ranks a row's entries in ``O(l0^2 / 32)``; the caller sorts wide
    rows instead); without it, they are in arrival order.
    """
    op = "fused_records_to_rows"
    _check_device(found.records, op, "records")
    if dtype not in (torch.bfloat16, torch.float16):
        msg = f"{op}: dtype must be torch.bfloat16 or torch.float16, got {dtype}"
        raise InputError(msg)
    summary = torch.zeros(3, dtype=torch.int64, device=found.records.device)
    counts = tuple(_view(t) for t in (found.records, found.warp_count, found.row_count,
                                      found.tile_overflow, found.tile_total))
    work, out = _compact_records(counts, _view(summary), dtype, found.records.device, nnz, order,
                                 _ORDER_ALL)
    pointers = found.row_count.shape[0] + 1
    row_ptr = out[:4 * pointers].view(torch.int64)
    if not order:
        index, values = _arrival_views(work, nnz, dtype)
        return FusedRows(row_ptr, index.to(torch.int64), values, summary)
    return FusedRows(row_ptr, *_ordered_views(out, pointers, nnz, dtype), summary)


