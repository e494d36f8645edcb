#!/usr/bin/env bash
# Issue 34 on one GPU: APB-V's accuracy-cost sweep on SmolLM2-135M-Instruct (benchmarks/quality_budget.py),
# the default it implies (megatron_apbv/eval/budget_choice.py), and the real-model table
# (benchmarks/quality_real.py) at a given default.
#
# The model travels as its GGUF (98.4 MB: more than one call's 64 MiB), cut in three parts, one part a call;
# each call adds its part to .gguf/store on the (warm) device machine, and the call that completes the file
# runs the work. Here, in the repository root, once:
#   echo /.gguf/ >> .git/info/exclude; mkdir -p .gguf/a .gguf/b .gguf/c
#   split -n 3 -d "$(.venv/bin/python -c 'from megatron_apbv.models.gguf_convert import smollm2_gguf as f; print(f())')" .gguf/part_
#   mv .gguf/part_00 .gguf/a/; mv .gguf/part_01 .gguf/b/; mv .gguf/part_02 .gguf/c/
# The wheels it needs (megatron_core, pydantic, pydantic_core, annotated_types, typing_inspection, gguf: 5.3 MB)
# go in an ignored folder of their own, e.g. .whl_q (.whl with av and deepspeed is too big beside a part).
# Device calls, each `WHEELS=.whl_q bash benchmarks/gpu_quality_budget.sh sweep "$OUT"` (tree ~11 MB + a part
# 31.3 MiB + wheels):
#   1. carry [".gguf/a", ".whl_q"]   exits 3: part 1 of 3
#   2. carry [".gguf/b", ".whl_q"]   exits 3: part 2 of 3
#   3. carry [".gguf/c", ".whl_q"]   assembles (sha256), converts, sweeps (stops new points after LIMIT=420 s), chooses
#   4. after setting the default: `WHEELS=.whl_q bash benchmarks/gpu_quality_budget.sh table "$OUT"`, carry
#      [".whl_q"] (~3 min; the GGUF stays in .gguf/store on the warm machine)
# Success: $OUT/quality_budget_smollm2.json (+ .png), $OUT/budget_choice.json; table: $OUT/quality_smollm2.json.
# CPU smoke test: DEVICE=cpu N=2 LENGTHS=2048 WORLDS=2 GRID=small TASKS=passkey bash benchmarks/gpu_quality_budget.sh sweep /tmp/q
set -uo pipefail
mode="${1:?usage: gpu_quality_budget.sh sweep|table OUT}"; out="${2:-/tmp/apbv_quality_budget}"; mkdir -p "$out"
device="${DEVICE:-cuda}"; py="${PYTHON:-python3}"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# The parts gather in the repository's ignored .gguf/store, which the device keeps between warm calls.
store="${GGUF_STORE:-$PWD/.gguf/store}"; ckpt=/tmp/apbv_smollm2; mkdir -p "$store"
wheels="${WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
# The torch path of the selection (the same math as the Triton kernels, tested equal): no compile time.
export APBV_DISABLE_KERNELS=1
gguf="${GGUF:-}"
if [[ -z $gguf ]]; then
  for part in .gguf/[abc]/part_*; do [[ -f $part ]] && cp "$part" "$store/"; done
  parts=$(ls "$store"/part_* 2>/dev/null | wc -l)
  gguf="$store/smollm2.gguf"
  if [[ ! -f $gguf ]] || [[ $(sha256sum "$gguf" | cut -d' ' -f1) != "$sha" ]]; then
    if [[ $parts -lt 3 ]]; then echo "GGUF: part $parts of 3 on the device ($(ls "$store" | tr '\n' ' ')); carry the next"; exit 3; fi
    cat "$store"/part_00 "$store"/part_01 "$store"/part_02 > "$gguf"
    [[ $(sha256sum "$gguf" | cut -d' ' -f1) == "$sha" ]] || { echo "GGUF: the three parts do not make the file (sha256)"; exit 4; }
  fi
fi
[[ $device == cuda ]] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [[ ! -f $ckpt/model.safetensors ]]; then
  "$py" -m megatron_apbv convert-gguf "$gguf" "$ckpt" || exit 5
fi
if [[ $mode == sweep ]]; then
  "$py" benchmarks/quality_budget.py --device "$device" --checkpoint "$ckpt" --n "${N:-50}" \
    --tasks "${TASKS:-passkey,multikey}" --lengths "${LENGTHS:-4096,8000}" --worlds "${WORLDS:-2,4,8}" \
    --grid "${GRID:-full}" --dtype "${DTYPE:-bfloat16}" --time-limit "${LIMIT:-420}" \
    --out "$out/quality_budget_smollm2.json" > "$out/quality_budget.jsonl" 2> "$out/quality_budget.log"
  echo "sweep rc=$?"; tail -8 "$out/quality_budget.log"
  "$py" -m megatron_apbv.eval.budget_choice "$out/quality_budget_smollm2.json" > "$out/budget_choice.json"
  echo "choice rc=$? (0 chosen, 1 nothing within 2 points, 2 no data)"
  [[ -s $out/budget_choice.json ]] && "$py" -c "import json; c = json.load(open('$out/budget_choice.json')); print('chosen:', c['chosen']); print('best incl. oracle-only:', c['best_including_oracle_only'])"
elif [[ $mode == table ]]; then
  "$py" benchmarks/quality_real.py --device "$device" --checkpoint "$ckpt" --batched --batch "${N:-50}" --n "${N:-50}" \
    --lengths "${LENGTHS:-2048,4096,8000}" --worlds "${WORLDS:-2,4,8}" --no-exact --dtype "${DTYPE:-bfloat16}" \
    --anchor "${ANCHOR:-auto}" --passing "${PASSING:-auto}" \
    --out "$out/quality_smollm2.json" > "$out/quality_real.jsonl" 2> "$out/quality_real.log"
  echo "table rc=$?"; tail -4 "$out/quality_real.log"
else
  echo "mode must be sweep or table"; exit 2
fi
tar -czf "$out/logs.tar.gz" -C "$out" $(cd "$out" && ls *.log *.jsonl 2>/dev/null) && rm -f "$out"/*.log "$out"/*.jsonl
ls -la "$out"
