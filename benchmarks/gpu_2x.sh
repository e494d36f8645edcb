#!/usr/bin/env bash
# Device calls on one host with 2 GPUs (NCCL): the DeepSpeed-launcher run, `apbv bench`, PyTorch's native
# context parallelism, the needle benchmark. Each step has its own time limit and log; a failed step does not
# stop the next.
# Usage (device machine, repo root, wheels in .whl/):  bash benchmarks/gpu_2x.sh "$OUT" STEP[,STEP...]
# Logs and results go to a scratch folder and come back as one archive, $OUT/gpu_2x.tgz (the device tool
# returns at most 8 files).
#   steps: launch (DeepSpeed launcher, apbv run --compare dense, exact and apbv, 32K),
#          layer (apbv bench --level layer, 32K/64K/128K), native (torch_native_cp.py),
#          model (apbv bench --level model, 28 layers), eval (apbv eval configs/needle.yaml, W=2),
#          decode (apbv generate, 64 tokens after 128K, W=2 and W=1), profile_decode (profile_decode.py, W=2 and 1),
#          needle_kv4 (train the needle model with 4 KV heads, then apbv eval W=2), tests (GPU tests)
set -uo pipefail
dest="${1:-/tmp/apbv_gpu2_out}"; steps=",${2:-launch,layer,native},"
out=/tmp/apbv_gpu2; rm -rf "$out"; mkdir -p "$out" "$dest"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
# NVLink multicast stays off on these shared hosts (device/KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
trap 'tar czf "$dest/gpu_2x.tgz" -C "$out" .' EXIT
has() { [[ "$steps" == *",$1,"* ]]; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "step $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvidia-smi topo -m
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "nccl", torch.cuda.nccl.version())'
} >"$out/device.txt" 2>&1

if has launch; then
  for variant in exact apbv; do
    DEEPSPEED=deepspeed GPUS_PER_NODE=2 step "launch_$variant" 240 launch/deepspeed_gpu.sh configs/gpu_1x.yaml \
      parallel.context_parallel_size=2 apbv.variant=$variant --compare dense
    grep '^{' "$out/launch_$variant.log" | tail -1 >>"$out/launch.jsonl"
  done
fi
if has layer; then
  step bench_layer 420 torchrun --nproc_per_node 2 -m megatron_apbv bench configs/qwen25vl_7b_lm.yaml --level layer \
    --lengths 32768,65536,131072 --out "$out/layer"
fi
if has native; then
  for rotate in alltoall allgather; do
    step "native_$rotate" 150 torchrun --nproc_per_node 2 benchmarks/torch_native_cp.py --rotate $rotate \
      --out "$out/native_$rotate.jsonl"
  done
fi
if has model; then
  # all 28 layers of the 7B shape; more CPU threads for Megatron's seeded CPU initialisation of 7.6B weights
  OMP_NUM_THREADS=8 step bench_model 560 torchrun --nproc_per_node 2 -m megatron_apbv bench configs/qwen25vl_7b_lm.yaml \
    --level model --warmup 1 --lengths 32768,65536,131072 --out "$out/model"
fi
if has eval; then
  step eval_w2 180 torchrun --nproc_per_node 2 -m megatron_apbv eval configs/needle.yaml \
    parallel.context_parallel_size=2 --out "$out/needle_w2_gpu.json"
fi
if has decode; then  # 64 greedy tokens after a 128K-token prefill, the cache split over 2 GPUs and on 1 GPU
  for w in 2 1; do
    step "decode_w$w" 110 torchrun --nproc_per_node $w -m megatron_apbv generate configs/gpu_1x.yaml \
      parallel.context_parallel_size=$w input.video_frames=512 generate.max_new_tokens=64
    grep '^{' "$out/decode_w$w.log" | tail -1 >>"$out/decode.jsonl"
  done
fi
if has profile_decode; then  # operator tables of `apbv generate` (32K prompt, 64 tokens) on 2 GPUs and on 1
  for w in 2 1; do
    step "profile_decode_w$w" 120 torchrun --nproc_per_node $w benchmarks/profile_decode.py configs/gpu_1x.yaml \
      parallel.context_parallel_size=$w generate.max_new_tokens=64 --out "$out/profile_decode_w$w"
  done
fi
if has needle_kv4; then  # issue 8 experiment: the needle model with 4 KV heads (as Qwen2.5-VL-7B), dense training
  CUDA_VISIBLE_DEVICES=0 step train_kv4 260 python3 -m megatron_apbv.eval.train configs/needle.yaml \
    model.num_query_groups=4 --out "$out/needle_kv4" --steps 4000 --batch 32 --workers 12 --lr 1.5e-3 \
    --warmup 100 --aux-weight 0.5 --max-minutes 3.3 --curriculum 16:500,32:1000,64:1600 --eval-examples 512 \
    --log-every 250
  step eval_kv4_w2 120 torchrun --nproc_per_node 2 -m megatron_apbv eval configs/needle.yaml model.num_query_groups=4 \
    needle.checkpoint="$out/needle_kv4/needle.safetensors" parallel.context_parallel_size=2 --out "$out/needle_kv4_w2.json"
fi
if has tests; then
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gpu_integration.py
fi
cat "$out/steps.txt"
for f in "$out"/*.log; do echo "== $f"; tail -n 25 "$f"; done
