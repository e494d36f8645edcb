#!/usr/bin/env bash
# One device call (one H200, ~4 minutes): GPU tests of the decode kernel and of graphed / batched decoding,
# then benchmarks/bench_decode.py (28-layer 7B shape, W = 1: 32K and 128K batch 1, 32K batch 8, graphed and
# eager, a 15 GB checkpoint written to local disk and built + loaded), with torch.profiler tables of one step.
# Usage (device machine, repo root, wheels in .whl/):  bash benchmarks/gpu_decode.sh "$OUT"
# $OUT receives decode_h200.json, gpu_decode.tgz (logs, profiles) and steps.txt.
set -uo pipefail
dest="${1:-/tmp/apbv_decode_out}"; out=/tmp/apbv_decode; rm -rf "$out"; mkdir -p "$out" "$dest"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
trap 'cp -f "$out/steps.txt" "$dest/" 2>/dev/null; tar czf "$dest/gpu_decode.tgz" -C "$out" .' EXIT
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "step $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gpu.py -x -rs
tail -15 "$out/tests.log"
step bench 300 torchrun --nproc_per_node 1 benchmarks/bench_decode.py configs/qwen25vl_7b_lm.yaml \
  --out "$out/decode_h200.json" --profile-dir "$out"
tail -25 "$out/bench.log"
cp -f "$out/decode_h200.json" "$dest/" 2>/dev/null
exit 0
