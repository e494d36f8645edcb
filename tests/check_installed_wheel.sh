#!/usr/bin/env bash
# Installed as users install it: build the wheel, install it with its dependencies into a fresh venv, and run
# the commands from an empty folder (no repository on sys.path). Fails on an import error or a missing file.
# Usage: bash tests/check_installed_wheel.sh [PYTHON]        (make test-wheel; part of make test)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${1:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/apbv-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
pip_quiet=(-q --disable-pip-version-check)

echo "== build the wheel (in a copy of the tree: nothing is written into the checkout)" >&2
git ls-files -z | tar --null -T - -cf - | (mkdir "$work/src" && tar -xf - -C "$work/src")
"$python" -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install "${pip_quiet[@]}" --upgrade pip setuptools wheel
"$work/build-venv/bin/pip" wheel "${pip_quiet[@]}" --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/megatron_apbv-*.whl)

echo "== the wheel's files: every package of the tree, nothing else at the top level" >&2
"$python" - "$wheel" "$repo" <<'PY'
import pathlib, sys, zipfile
wheel, repo = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
top = {n.split("/")[0] for n in names}
extra = sorted(t for t in top if t != "megatron_apbv" and not t.endswith(".dist-info"))
assert not extra, f"the wheel installs more than megatron_apbv at the top level: {extra}"
shipped_dirs = {str(pathlib.PurePosixPath(n).parent) for n in names}
root = repo / "megatron_apbv"
missing = []
for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
    rel = "megatron_apbv" / folder.relative_to(root)
    sources = [f.name for f in folder.iterdir() if f.suffix in (".py", ".yaml", ".json", ".jsonl") and f.is_file()]
    if sources and str(rel.as_posix()) not in shipped_dirs:
        missing.append(str(rel))
    for name in sources:
        if f"{rel.as_posix()}/{name}" not in names:
            missing.append(f"{rel.as_posix()}/{name}")
assert not missing, f"the wheel lacks: {missing}"
print(f"wheel {wheel.name}: {len(names)} files, every package and data file of megatron_apbv/", file=sys.stderr)
PY

echo "== install it with its dependencies into a fresh venv" >&2
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install "${pip_quiet[@]}" --upgrade pip
"$work/venv/bin/pip" install "${pip_quiet[@]}" torch==2.13.0   # CPU build; GPU images bring their own torch
"$work/venv/bin/pip" install "${pip_quiet[@]}" "$wheel[vision]"
bin=$work/venv/bin

echo "== run it from an empty folder" >&2
mkdir "$work/empty" && cd "$work/empty"
export PYTHONPATH= PYTHONNOUSERSITE=1
"$bin/python" - <<'PY'
import importlib, pathlib, sys
import megatron_apbv
assert "site-packages" in megatron_apbv.__file__, megatron_apbv.__file__
for name in ("megatron_apbv.jobs.infer", "megatron_apbv.kernels.apb_attention", "megatron_apbv.costmodel.plan"):
    importlib.import_module(name)
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # imports PyPI's `kernels` package
print("imports from the installed wheel: ok", file=sys.stderr)
PY
"$bin/apbv" config --schema > schema.txt
grep -q '^apbv.variant:' schema.txt
"$bin/apbv" config --examples examples > examples.json
test -f examples/tiny_cpu.yaml && test -f examples/requests_demo.jsonl
"$bin/apbv" plan examples/qwen25vl_7b_lm.yaml --gpus 8 --tokens 131072 > plan.json
"$bin/python" -c "import json; r = json.load(open('plan.json')); assert r['methods'], r" 2>/dev/null \
  || { echo "apbv plan printed no prediction:" >&2; cat plan.json >&2; exit 1; }
"$bin/torchrun" --nproc_per_node 2 --master_port "${APBV_WHEEL_PORT:-29531}" -m megatron_apbv infer \
  examples/tiny_cpu.yaml --requests examples/requests_demo.jsonl --output answers.jsonl --quiet > summary.json
"$bin/python" - <<'PY'
import json
records = [json.loads(line) for line in open("answers.jsonl")]
requests = [json.loads(line) for line in open("examples/requests_demo.jsonl")]
assert sorted(r["id"] for r in records) == sorted(r["id"] for r in requests), records
assert not [r for r in records if "error" in r], records
PY
echo "installed wheel: apbv config, plan and a 2-rank infer ran from an empty folder" >&2
