#!/usr/bin/env bash
# Issue 19, second GPU run: the selection rules on the held-out needle videos through the reference-oracle
# model on one GPU, four processes at once (model x W). The first run (commit fec2baa) finished the 2-KV-head
# model at W = 2 for mean, softmax, max and recent N/256 (256 videos); this run does the rest:
#   needle     W=2: mean (again: the two runs must agree), recent, frame      256 videos
#   needle     W=4: mean, max, recent, frame + star                          128 videos
#   needle_kv4 W=2: every rule + star                                        128 videos
#   needle_kv4 W=4: mean, max, recent, frame + star                          128 videos
# (softmax, behind max and recent in the first run, is left out at W = 4 to fit the device time.)
# Each process rewrites its JSON after every batch and stops starting batches 165 s after it began, so a
# slow or killed process still leaves the examples it finished (the JSON says how many: "examples").
# Usage (device machine, repo root):  bash benchmarks/gpu_quality.sh "$OUT"      (<= 190 s wall)
# Success: $OUT/needle_rules_{needle,needle_kv4}_w{2,4}.json, each with "examples" > 0.
# CPU smoke test:  DEVICE=cpu EXAMPLES=1 RULES=mean LIMIT=60 bash benchmarks/gpu_quality.sh /tmp/q
set -uo pipefail
out="${1:-/tmp/apbv_quality}"; mkdir -p "$out"
device="${DEVICE:-cuda}"; limit="${LIMIT:-165}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
[[ $device == cuda ]] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
kv4="model.num_query_groups=4 needle.checkpoint=checkpoints/needle_kv4/needle.safetensors"
run() {  # model world examples rules port
  local extra=""; [[ $1 == needle_kv4 ]] && extra="$kv4"
  MASTER_PORT=$5 timeout $((limit + 20)) "$py" benchmarks/needle_selection_rules.py configs/needle.yaml $extra \
    --name "$1" --device "$device" --examples "${EXAMPLES:-$3}" --batch 16 --worlds "$2" --rules "${RULES:-$4}" \
    --time-limit "$limit" --no-plot --out "$out/needle_rules_$1_w$2.json" > "$out/$1_w$2.jsonl" 2> "$out/$1_w$2.log"
  echo "$1 W=$2: rc $? $(grep -c . "$out/$1_w$2.jsonl") settings printed; $(grep examples, "$out/$1_w$2.log" | tail -1)"
}
run needle 2 256 mean,recent,frame 29701 &
run needle 4 128 mean,max,recent,frame 29702 &
run needle_kv4 2 128 mean,softmax,max,recent,frame 29703 &
run needle_kv4 4 128 mean,max,recent,frame 29704 &
wait
tar -czf "$out/logs.tar.gz" -C "$out" $(cd "$out" && ls *.log *.jsonl) && rm -f "$out"/*.log "$out"/*.jsonl
ls -la "$out"
