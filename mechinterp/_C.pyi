"""Type stubs for the compiled module mechinterp._C. Call it through mechinterp._ops."""

from typing import TypeAlias, TypedDict

# (data_ptr, dtype name such as "float32", shape, strides in elements, "cpu" | "cuda",
#  device index); built by mechinterp._ops._view.
_View: TypeAlias = tuple[int, str, tuple[int, ...], tuple[int, ...], str, int | None]

class _BuildInfo(TypedDict):
    version: str
    cuda: bool
    cuda_archs: list[str]
    cuda_version: str | None
    sae_fused_sm90: bool
    openmp: bool
    cpu_threads: int
    compiler: str

def diagonal_score(
    pattern: _View, out: _View, offset: int, first_query: int, stream: int
) -> None:
    """Write into ``out`` [head] the mean of ``pattern[b, h, q, q - offset]`` over batch rows and
    query positions ``q >= max(first_query, offset)``; ``pattern`` is [batch, head, query, query].
    ``stream`` is a cudaStream_t as int (ignored for cpu views)."""

def build_info() -> _BuildInfo:
    """What this build contains."""

def patch_boxes(
    dest: _View, src: _View, cur: _View | None, boxes_host: _View, boxes: _View,
    alpha_host: _View, alpha: _View, stream: int,
) -> None:
    """Write boxes (row, source, a_begin, a_end, f_begin, f_end) of ``src`` [sources, a, f] into
    ``dest`` [rows, a, f] in place: ``dest + alpha (src - dest)``, or ``dest + alpha (src - cur)``
    when ``cur`` is given. ``boxes`` int64 [m, 6] and ``alpha`` float64 [m] come as a host copy
    (validated) and a copy on ``dest``'s device (read by the kernel)."""

def patch_metric(
    logits: _View, kind: int, index_host: _View, index: _View, ref: _View | None, out: _View,
    stream: int,
) -> None:
    """One value per run from ``logits`` [rows, vocab]: kind 0 ``z[t] - z[o]``, 1 log p(t),
    2 p(t), 3 KL(softmax(ref[r]) || softmax(z)). ``index`` int64 [rows, 2] holds (t, o) or
    (r, unused), as a host and a device copy; ``out`` [rows] float32 (float64 for float64)."""

def fill_noise(out: _View, seed: int, offset: int, kind: int, stream: int) -> None:
    """Fill the contiguous ``out`` with seeded noise: element ``i`` depends on
    ``(seed, offset + i)`` only (Philox4x32-10). kind 0: standard normal, 1: uniform [-1, 1)."""

def moebius(table: _View, kind: int, stream: int) -> None:
    """Transform the contiguous float64/float32 ``table`` [2^n] over coalitions in place.
    kind 0: Moebius ``m(S) = sum_{T subset S} (-1)^{|S|-|T|} v(T)``; 1: its inverse (zeta)
    ``v(S) = sum_{T subset S} m(T)``; 2: the transpose of 0 (sums over supersets); 3: the
    transpose of 1."""

def superset_weighted_sums(
    dividends: _View, weights_host: _View, weights: _View, scratch: _View, out: _View,
    order: int, stream: int,
) -> None:
    """``out[T] = sum_{S superset T} dividends[S] * weights[|S|, |T|]`` for every subset ``T``
    of at most ``order`` players, in canonical order (by size, then combinations order).
    ``weights`` float64 [n + 1, order + 1] as a host copy (validated) and a copy on the device of
    ``dividends``; ``scratch`` [superset_scratch_size(n, order)] with the dtype of
    ``dividends``; ``out`` [count_up_to(n, order)] likewise."""

def superset_scratch_size(n: int, order: int) -> int:
    """Elements of the scratch table ``superset_weighted_sums`` needs for n players and
    ``order``."""
