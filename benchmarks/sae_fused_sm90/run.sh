#!/usr/bin/env bash
# Builds threshold_epilogue.cu in two cluster shapes (CUTLASS headers from the nvidia-cutlass
# package: a wheel path in $CUTLASS_WHEEL, else the package registry) and runs run.py. Needs an
# sm_90 GPU, nvcc 12.3 or later, and mechinterp importable (built with its CUDA kernels).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${FUSED_BUILD_DIR:-/tmp/sae_fused_sm90}
mkdir -p "$out"
python3 -m pip install -q --no-deps --upgrade --target "$out/cutlass" "${CUTLASS_WHEEL:-nvidia-cutlass==4.2.0.0}"
cut="$out/cutlass/cutlass_library/source"
flags=(-std=c++17 -O3 -DNDEBUG -arch=sm_90a --expt-relaxed-constexpr -shared -Xcompiler -fPIC
       -I"$cut/include" -I"$cut/tools/util/include")
# NDEBUG matters: without it a device-side assert serialises the tensor-core pipeline.
nvcc "${flags[@]}" -DFUSED_CLUSTER_M=1 -DFUSED_CLUSTER_N=2 -o "$out/c12.so" "$here/threshold_epilogue.cu" &
nvcc "${flags[@]}" -DFUSED_CLUSTER_M=2 -DFUSED_CLUSTER_N=1 -o "$out/c21.so" "$here/threshold_epilogue.cu" &
wait
python3 "$here/run.py" "c12=$out/c12.so" "c21=$out/c21.so" "$@"
