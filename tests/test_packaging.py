"""Installed as users install it: no top-level name of ours can shadow another distribution, and
everything a command needs at run time ships inside the package.

The wheel itself is built, installed into a fresh venv and run from an empty folder by
``tests/check_installed_wheel.sh`` (``make test-wheel``, part of ``make test``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apbv.costmodel.calibration import PACKAGED_RESULTS, Profiles, calibrate, package_results
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.config_command import shipped_examples, write_examples
from megatron_apbv.models.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]


def _python_in(cwd: Path, code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with ``cwd`` first on ``sys.path``, as ``python -m`` from that folder has it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_repository_root_does_not_shadow_pypi_kernels():
    """transformers (5.x) imports PyPI's `kernels`; from the repository root it must get that one, not kernels/."""
    pytest.importorskip("kernels", reason="PyPI's kernels package (a test extra) is not installed")
    proc = _python_in(ROOT, (
        "import sys, kernels\n"
        "print(kernels.__file__)\n"
        "from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl\n"
        "print(modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel.__name__)\n"
    ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, tower = proc.stdout.split()
    assert Path(kernels_file).resolve().parent != (ROOT / "kernels").resolve(), kernels_file
    assert "site-packages" in kernels_file
    assert tower == "Qwen2_5_VisionTransformerPretrainedModel"


def test_triton_kernels_import_as_megatron_apbv_kernels_from_the_root():
    pytest.importorskip("triton")
    proc = _python_in(ROOT, (
        "import megatron_apbv.kernels.apb_attention as a, megatron_apbv.kernels.lse_merge as m\n"
        "print(a.__file__, callable(a.apb_attention), callable(m.merge_partials))\n"
    ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, *flags = proc.stdout.split()
    assert Path(path).resolve() == (ROOT / "kernels" / "apb_attention.py").resolve()
    assert flags == ["True", "True"]


def test_packaged_calibration_is_the_committed_results():
    """calibration_points.json is made from benchmarks/results: rerun benchmarks/package_calibration.py if stale."""
    packaged = json.loads(PACKAGED_RESULTS.read_text())
    assert packaged == package_results(Profiles.load(), ROOT / "benchmarks" / "results"), (
        "megatron_apbv/costmodel/calibration_points.json is stale: python benchmarks/package_calibration.py")
    assert set(packaged["files"]) == {"kernels_h100_run1.json", "kernels_h100.json", "kernels_h100_check.json",
                                      "gpu_check_h100_apbv_run.jsonl"}


def test_packaged_calibration_fits_the_same_profiles_as_the_folder():
    packaged, folder = calibrate(), calibrate(results_dir=ROOT / "benchmarks" / "results")
    assert packaged.fitted == folder.fitted and len(packaged.fitted) >= 4
    assert packaged.rows == folder.rows


def test_calibration_dir_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate(results_dir=tmp_path / "missing")


def test_examples_ship_and_load_outside_the_repository(tmp_path, monkeypatch):
    names = [f.name for f in shipped_examples()]
    assert {"tiny_cpu.yaml", "requests_demo.jsonl", "qwen25vl_7b_lm.yaml"} <= set(names)
    assert sorted(names) == sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".jsonl"))
    written = write_examples(tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for path in written:
        assert Path(path).read_bytes() == (ROOT / "configs" / Path(path).name).read_bytes()
        if path.endswith(".yaml"):
            load_config(path)  # every shipped config is valid on its own


def test_examples_never_replace_a_file(tmp_path):
    (tmp_path / "tiny_cpu.yaml").write_text("mine")
    with pytest.raises(ConfigError, match="already exist"):
        write_examples(tmp_path)
    assert (tmp_path / "tiny_cpu.yaml").read_text() == "mine"
    assert not (tmp_path / "requests_demo.jsonl").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        write_examples(tmp_path / "afile")
