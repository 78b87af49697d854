"""mechinterp._C imports and describes itself truthfully."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys

import pytest

from mechinterp import _C


def test_build_info_fields():
    info = _C.build_info()
    assert set(info) == {
        "version",
        "cuda",
        "cuda_archs",
        "cuda_version",
        "sae_fused_sm90",
        "openmp",
        "cpu_threads",
        "compiler",
    }
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cpu_threads"], int) and info["cpu_threads"] >= 1
    assert isinstance(info["compiler"], str) and info["compiler"]


def test_cuda_flag_matches_build_environment():
    info = _C.build_info()
    if os.environ.get("MECHINTERP_CUDA", "").upper() == "OFF":
        assert info["cuda"] is False
    else:
        nvcc_found = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
        assert info["cuda"] is nvcc_found


def test_cuda_archs_iff_cuda():
    info = _C.build_info()
    assert bool(info["cuda_archs"]) is info["cuda"]
    assert (info["cuda_version"] is not None) is info["cuda"]
    assert all(arch.rstrip("af").isdigit() for arch in info["cuda_archs"])


def test_fused_sae_encode_is_built_where_it_can_be():
    # nvidia-cutlass is a build requirement on Linux, so a CUDA build for sm_90 has the fused
    # encode unless it was turned off.
    info = _C.build_info()
    can = info["cuda"] and any(arch.startswith("90") for arch in info["cuda_archs"])
    if not can or os.environ.get("MECHINTERP_FUSED_SM90", "").upper() == "OFF":
        assert info["sae_fused_sm90"] is False
    elif sys.platform == "linux":
        assert info["sae_fused_sm90"] is True


def test_version_matches_package_metadata():
    assert _C.build_info()["version"] == importlib.metadata.version("mechinterp")


@pytest.mark.skipif(_C.build_info()["cuda"], reason="this build has CUDA kernels")
def test_cuda_view_on_cpu_only_build_names_the_rebuild_flag():
    # The pointer is never dereferenced: the build refuses before touching it.
    pattern = (0x1000, "float32", (1, 2, 4, 4), (32, 16, 4, 1), "cuda", 0)
    out = (0x2000, "float32", (2,), (1,), "cuda", 0)
    expected = (
        r"built without CUDA kernels; rebuild with MECHINTERP_CUDA=ON \(needs nvcc\) "
        r"to run diagonal_score on cuda:0"
    )
    with pytest.raises(ValueError, match=expected):
        _C.diagonal_score(pattern, out, 1, 0, 0)
