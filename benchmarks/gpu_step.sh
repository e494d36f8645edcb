# Sourced by the device scripts (gpu_kernels.sh, gpu_session.sh): `step NAME SECONDS CMD...` runs CMD under a
# timeout, logs it to $scratch/NAME.log, appends "step NAME rc=.. Ns" to $steps_file and shows the log's end.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$scratch/$name.log" 2>&1; local rc=$?
  echo "step $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$steps_file"
  tail -6 "$scratch/$name.log"
}

# Only 8 files come back from a device call's $OUT: `pack_out DIR KEEP...` leaves the named files in DIR and puts
# every other file (logs, profiles) into DIR/logs.tgz.
pack_out() {
  local dir=$1; shift
  local name keep kept rest=()
  for name in $(ls "$dir"); do
    kept=0
    for keep in "$@" logs.tgz; do [[ $name == "$keep" ]] && kept=1; done
    ((kept)) || rest+=("$name")
  done
  ((${#rest[@]})) && tar czf "$dir/logs.tgz" -C "$dir" "${rest[@]}" && (cd "$dir" && rm -rf "${rest[@]}")
  return 0
}
