#!/usr/bin/env bash
# Issue 19: every passing-selection rule x budget (N/256, N/128, N/64) x W (2, 4) on 256 held-out needle
# videos, both needle models, through the reference-oracle model on one GPU (4 processes: model x W).
# Usage (device machine, repo root):  bash benchmarks/gpu_quality.sh "$OUT"      (<= ~230 s)
# Success: $OUT/needle_rules_needle.json and $OUT/needle_rules_needle_kv4.json with "examples": 256.
set -uo pipefail
out="${1:-/tmp/apbv_quality}"; mkdir -p "$out"
scratch=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
kv4="model.num_query_groups=4 needle.checkpoint=checkpoints/needle_kv4/needle.safetensors"
port=29700
for model in needle needle_kv4; do
  for w in 2 4; do
    extra=""; [[ $model == needle_kv4 ]] && extra="$kv4"
    port=$((port + 1))
    MASTER_PORT=$port timeout 225 python3 benchmarks/needle_selection_rules.py configs/needle.yaml $extra \
      --name $model --device cuda --examples 256 --batch 32 --worlds $w --time-limit 190 --no-plot \
      --out "$scratch/${model}_w$w.json" > "$scratch/${model}_w$w.jsonl" 2> "$scratch/${model}_w$w.log" &
  done
done
wait
for model in needle needle_kv4; do
  python3 benchmarks/needle_selection_rules.py merge "$out/needle_rules_$model.json" \
    "$scratch/${model}_w2.json" "$scratch/${model}_w4.json"
done
tail -n 3 "$scratch"/*.log
tar -czf "$out/logs.tar.gz" -C "$scratch" .
