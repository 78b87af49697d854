"""``build_info``: what this installation of mechinterp is made of."""

from __future__ import annotations

from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, object]:
    """Version, compiled-core capabilities and the versions of torch and nnsight.

    Keys: ``version``, ``cuda`` (CUDA kernels compiled), ``cuda_archs`` (their SM targets),
    ``cuda_version`` (toolkit used to build them), ``cuda_available`` (a CUDA device is usable
    now), ``sae_fused_sm90`` (the SAE encode fused into a Hopper GEMM is compiled), ``openmp``, ``cpu_threads`` (threads the CPU kernels use), ``torch_threads``,
    ``compiler``, ``torch``, ``transformers``, ``nnsight``.

    Examples:
        >>> import mechinterp
        >>> info = mechinterp.build_info()
        >>> sorted(info)[:3]
        ['compiler', 'cpu_threads', 'cuda']
    """
    import torch

    from mechinterp import _C

    native = dict(_C.build_info())
    return {
        "version": native["version"],
        "cuda": bool(native["cuda"]),
        "cuda_archs": list(native["cuda_archs"]),
        "cuda_version": native["cuda_version"],
        "cuda_available": bool(native["cuda"]) and torch.cuda.is_available(),
        "sae_fused_sm90": bool(native["sae_fused_sm90"]),
        "openmp": bool(native["openmp"]),
        "cpu_threads": int(native["cpu_threads"]),
        "torch_threads": torch.get_num_threads(),
        "compiler": native["compiler"],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "nnsight": _version("nnsight"),
    }
