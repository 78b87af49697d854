"""Typed wrappers around the compiled kernels in :mod:`mechinterp._C`.

Each wrapper validates in Python (so errors are the package's own, with readable messages),
allocates the output, picks the caller's current CUDA stream, and hands the kernel non-owning
views of the tensors. The slow pure-PyTorch twins live in :mod:`mechinterp._reference`.
"""

from __future__ import annotations

import functools
import operator

import torch

from mechinterp import _C
from mechinterp.errors import BuildError, DeviceError, DTypeError, InputError, ShapeError

__all__ = ["diagonal_score"]

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
    index = t.device.index if t.device.index is not None else 0
    return (t.data_ptr(), _DTYPE_NAMES[t.dtype], tuple(t.shape), t.stride(), t.device.type, index)


def _stream(t: torch.Tensor) -> int:
    """The calling thread's current stream on ``t``'s device, as the integer _C expects."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


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
