# shellcheck shell=bash
# Shared helpers for the launch/*.sh scripts. Source it; do not run it.
#
# Sets:
#   LAUNCH_DIR  absolute path of launch/
#   REPO_ROOT   absolute path of the repository (parent of launch/)
#   PYTHON      interpreter (env PYTHON, else REPO_ROOT/.venv/bin/python, else python3)
# and puts REPO_ROOT on PYTHONPATH so `python -m megatron_apbv` works without
# installing the package. The caller's working directory is left alone, so a
# relative CONFIG path means what it means in the caller's shell.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PYTHON="$REPO_ROOT/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi

export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Module the ranks run (`python -m $APBV_MODULE`); only tests change it.
APBV_MODULE="${APBV_MODULE:-megatron_apbv}"
# The apbv command every rank runs: run (default), generate, bench or eval.
APBV_COMMAND="${APBV_COMMAND:-run}"

# apbv_tool NAME: path of a console script, preferring the repo venv.
apbv_tool() {
  if [[ -x "$REPO_ROOT/.venv/bin/$1" ]]; then
    printf '%s\n' "$REPO_ROOT/.venv/bin/$1"
  else
    printf '%s\n' "$1"
  fi
}

# split_config_args "$@": the first argument is the YAML config unless it looks
# like an override (key=value) or an option (-x); then the default config is
# used. Sets APBV_CONFIG and the array APBV_ARGS (everything else, in order).
split_config_args() {
  APBV_CONFIG="${CONFIG:-$REPO_ROOT/configs/tiny_cpu.yaml}"
  APBV_ARGS=()
  if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then
    APBV_CONFIG="$1"
    shift
  fi
  APBV_ARGS=("$@")
}

# run_or_print CMD...: execute, or with DRY_RUN=1 print the command (one
# shell-quoted line, prefixed with "+ ") and the rank-related environment.
run_or_print() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  exec "$@"
}
