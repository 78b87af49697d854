#!/bin/sh
# On a machine with a CUDA GPU: build with CUDA kernels, run the cuda-marked tests, the
# benchmarks, compute-sanitizer over the kernels, then the whole suite. Assumes torch and
# the other dependencies (TransformerLens, causal-tracer and captum for the peers) are installed
# in `python3`. Prints everything; benchmark rows also go
# as JSON into the folder named by $1 (default: the current folder).
set -u
out=${1:-.}
step() { echo; echo "== $*"; }
step build
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c 'import json, mechinterp; print(json.dumps(mechinterp.build_info()))'
step cuda tests
python3 -m pytest -q -m cuda -p no:cacheprovider -rs 2>&1 | tail -8
step benchmarks
python3 benchmarks/bench_patching.py --json "$out/bench_patching.json" 2>&1 \
  | grep -v -E '^\[transformers\]|it/s\]|Warning|warn\(|tl = Hooked'
python3 benchmarks/bench_tracing.py --json "$out/bench_tracing.json" 2>&1 \
  | grep -v -E '^\[transformers\]|it/s\]|Warning|warn\('
python3 benchmarks/bench_multimodal.py --json "$out/bench_multimodal.json" 2>&1 | grep -v 'it/s\]'
python3 benchmarks/bench_unet.py --attribution --json "$out/bench_unet.json" 2>&1 | grep -v 'it/s\]'
python3 benchmarks/bench_unet_games.py --json "$out/bench_unet_games.json" 2>&1 | grep -v 'it/s\]'
python3 benchmarks/bench_sites.py --device cuda --json "$out/bench_sites.json" 2>&1 \
  | grep -v '^\[transformers\]'
python3 benchmarks/bench_interactions.py --device cuda --json "$out/bench_interactions.json" 2>&1
python3 benchmarks/bench_model_games.py --device cuda --json "$out/bench_model_games.json" 2>&1 \
  | grep -v '^\[transformers\]'
python3 benchmarks/bench_andor.py --device cuda --dense-max 13 --sizes 10 12 13 16 20 24 \
  --json "$out/bench_andor.json" 2>&1
python3 benchmarks/bench_sae.py --cpu --cpu-tokens 2048 --json "$out/bench_sae.json" 2>&1
step compute-sanitizer
for tool in memcheck racecheck initcheck synccheck; do
  log=$(compute-sanitizer --tool $tool --error-exitcode 1 python3 benchmarks/sanitize_kernels.py 2>&1)
  echo "$tool: exit $? | $(echo "$log" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases match" | tr '\n' ' ')"
done
if [ -f mechinterp/zoo/induction-2l/model.safetensors ]; then
  step demo on cuda
  python3 -m mechinterp.cli demo --device cuda --out /tmp/gpu-demo-report 2>&1 | tail -2
fi
step whole suite
HYPOTHESIS_PROFILE=ci python3 -m pytest -q -p no:cacheprovider 2>&1 | tail -8
