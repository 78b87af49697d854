"""Type stubs for the compiled module mechinterp._C. Call it through mechinterp._ops."""

from typing import TypedDict

# (data_ptr, dtype name such as "float32", shape, strides in elements, "cpu" | "cuda",
#  device index); built by mechinterp._ops._view.
_View = tuple[int, str, tuple[int, ...], tuple[int, ...], str, int | None]

class _BuildInfo(TypedDict):
    version: str
    cuda: bool
    cuda_archs: list[str]
    cuda_version: str | None
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
