# Sourced by the device scripts (gpu_kernels.sh, gpu_session.sh): `step NAME SECONDS CMD...` runs CMD under a
# timeout, logs it to $scratch/NAME.log, appends "step NAME rc=.. Ns" to $steps_file and shows the log's end.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$scratch/$name.log" 2>&1; local rc=$?
  echo "step $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$steps_file"
  tail -6 "$scratch/$name.log"
}
