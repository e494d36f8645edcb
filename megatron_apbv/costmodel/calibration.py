"""Profiles of GPUs and links (``profiles.yaml``) and their calibration on measured points.

The measured points live in ``benchmarks/results`` of the repository (kernel
benchmarks, a whole-model run) and in the profiles' own ``facts``. The files the
profiles name are also packaged (``calibration_points.json`` beside this file,
written from the committed results by ``benchmarks/package_calibration.py``), so an
installed ``apbv plan`` calibrates without the repository; ``--calibration-dir``
reads a folder of results instead.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import yaml

from megatron_apbv.costmodel.pairs import causal_pairs
from megatron_apbv.costmodel.predict import predict
from megatron_apbv.costmodel.shapes import Cluster, ModelShape
from megatron_apbv.methods import REFERENCE, get_method

DEFAULT_PROFILES = Path(__file__).with_name("profiles.yaml")  # package data
PACKAGED_RESULTS = Path(__file__).with_name("calibration_points.json")  # package data, see package_results


class Profiles:
    """The YAML profiles (``profiles.yaml`` beside this file) as a plain nested dict, plus accessors."""

    def __init__(self, data: dict, source: Optional[Path] = None):
        self.data = data
        self.source = source

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> "Profiles":
        path = Path(path) if path else DEFAULT_PROFILES
        return cls(yaml.safe_load(path.read_text()), path)

    @property
    def gpu_names(self) -> list[str]:
        return list(self.data["gpus"])

    @property
    def interconnect_names(self) -> list[str]:
        return list(self.data["interconnects"])

    def get(self, key: str):
        node = self.data
        for part in key.split("."):
            node = node[part]
        return node

    def with_value(self, key: str, value) -> "Profiles":
        data = copy.deepcopy(self.data)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        return Profiles(data, self.source)

    def cluster(self, gpu: str, interconnect: str, gpus: int, gpus_per_node: int = 8) -> Cluster:
        if gpu not in self.data["gpus"]:
            raise ValueError(f"unknown GPU {gpu!r}; profiles: {', '.join(self.gpu_names)}")
        if interconnect not in self.data["interconnects"]:
            raise ValueError(f"unknown interconnect {interconnect!r}; profiles: {', '.join(self.interconnect_names)}")
        if gpus < 1 or gpus_per_node < 1:
            raise ValueError(f"gpus={gpus} and gpus_per_node={gpus_per_node} must be >= 1")
        return Cluster(gpu, self.data["gpus"][gpu], interconnect, self.data["interconnects"][interconnect],
                       self.data["software"], gpus, gpus_per_node)


@dataclass
class Point:
    """One measured time and how the model predicts it."""

    name: str
    parameter: str  # the profile key this point's group fits ("" = shown, not fitted)
    measured_s: float
    predict: Callable[[Profiles], float]
    used: bool = True
    note: str = ""


def calibration_files(profiles: "Profiles") -> list[str]:
    """The result files (relative to a results folder) that the profiles' ``calibration`` names."""
    cal = profiles.data.get("calibration", {})
    files = list(cal.get("kernel_benchmarks", []))
    if cal.get("whole_model"):
        files.append(cal["whole_model"]["file"])
    return files


def _read(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def read_results(profiles: "Profiles", results_dir: Optional[str | Path] = None) -> dict:
    """``{file: parsed content}`` of the calibration files: from ``results_dir``, or the packaged copy when None.

    A file the profiles name but the folder lacks is left out (its points are not fitted), as before.
    """
    if results_dir is None:
        return json.loads(PACKAGED_RESULTS.read_text())["files"]
    folder = Path(results_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration results folder {str(results_dir)!r} does not exist")
    return {rel: _read(folder / rel) for rel in calibration_files(profiles) if (folder / rel).is_file()}


def package_results(profiles: "Profiles", results_dir: str | Path) -> dict:
    """The content of ``calibration_points.json``: the calibration files of ``results_dir``, parsed."""
    return {"made_from": "benchmarks/results (benchmarks/package_calibration.py)",
            "files": read_results(profiles, results_dir)}


def calibration_points(profiles: Profiles, results: dict) -> list[Point]:
    """The measured points named in ``calibration`` of the profiles, in fitting order.

    ``results`` maps each file name to its parsed content (:func:`read_results`).
    """
    cal = profiles.data.get("calibration", {})
    points: list[Point] = []
    gemm, apb, sdpa = [], [], []
    for rel in cal.get("kernel_benchmarks", []):
        bench = results.get(rel)
        if bench is None:
            continue
        tag = Path(rel).stem
        s = bench["shapes"]
        shape = ModelShape.attention(s["hq"], s["hkv"], s["d"])
        if "matmul_bf16_tflops" in bench:  # the benchmark's GEMM: time of 1 PFLOP at the measured rate
            gemm.append(Point(f"{tag}: bf16 GEMM rate", "gpus.h100.matmul_tflops",
                              1e15 / (bench["matmul_bf16_tflops"] * 1e12),
                              lambda p: 1e15 / (p.get("gpus.h100.matmul_tflops") * 1e12)))
        for row in bench["lengths"]:
            L, n_keys = row["L"], row["n_pass"] + row["anchor"]

            def kernel_time(p, pairs=row["visible_pairs"], kernel="apb"):
                return shape.attention_flops(pairs) / (p.get(f"gpus.h100.attention_tflops.{kernel}") * 1e12)

            apb.append(Point(f"{tag}: APB-V kernel, L={L // 1024}K", "gpus.h100.attention_tflops.apb",
                             row["ours_ms"] / 1e3, kernel_time))
            sdpa.append(Point(f"{tag}: SDPA causal L x L, L={L // 1024}K", "gpus.h100.attention_tflops.sdpa",
                              row["sdpa_causal_ms"] / 1e3,
                              lambda p, L=L: kernel_time(p, causal_pairs(L), "sdpa")))
            sdpa.append(Point(f"{tag}: SDPA dense L x {n_keys}, L={L // 1024}K", "gpus.h100.attention_tflops.sdpa",
                              row["sdpa_dense_ms"] / 1e3,
                              lambda p, L=L, k=n_keys: kernel_time(p, L * k, "sdpa")))
    points += gemm + apb + sdpa

    for fact in cal.get("facts", []):
        shape = ModelShape.attention(fact["heads"], fact["kv_heads"], fact["head_dim"])
        fitted = get_method(fact["method"]).fitted
        if fitted is None:
            raise ValueError(f"profiles facts {fact['name']!r}: a measured {fact['method']!r} time fits no "
                             "cost-model parameter (methods.py `fitted`): give a dense or ring measurement")
        parameter = fitted.format(gpu=fact["gpu"])

        def fact_time(p, f=fact, shape=shape):
            cl = p.cluster(f["gpu"], f.get("interconnect", "nvlink"), f.get("gpus", 1))
            return predict(f["method"], shape, cl, f["tokens"]).seconds

        points.append(Point(fact["name"], parameter, fact["seconds"], fact_time))

    whole = cal.get("whole_model")
    runs = results.get(whole["file"]) if whole else None
    if runs:
        shape = ModelShape(**whole["shape"])
        for i, run in enumerate(runs, start=1):
            def model_time(p, n=run["prompt_tokens"]):
                return predict(REFERENCE, shape, p.cluster(whole["gpu"], "nvlink", 1), n).seconds

            used = i not in whole.get("exclude_lines", [])
            points.append(Point(
                f"whole model dense, {shape.layers} layers, {run['prompt_tokens']} tokens (line {i})",
                "software.elementwise_factor", run["dense_seconds"], model_time, used,
                "" if used else "excluded: 7x slower than the other runs",
            ))
    return points


def _fit_scalar(loss: Callable[[float], float], lo: float, hi: float, iters: int = 100) -> float:
    """Minimise ``loss`` over ``[lo, hi]`` by golden-section search in log space."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(math.exp(c)), loss(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(math.exp(d))
    return math.exp((a + b) / 2)


FIT_RANGES = {  # bounds of each free parameter (the fit must land strictly inside)
    "matmul_tflops": (50.0, 2000.0),
    "attention_tflops": (20.0, 2000.0),
    "ring_efficiency": (0.05, 2.0),
    "elementwise_factor": (0.01, 200.0),
}


@dataclass
class Calibration:
    profiles: Profiles  # fitted
    fitted: dict  # parameter -> value
    rows: list[dict]  # one per point: measured, predicted before / after the fit, error

    @property
    def max_abs_error_pct(self) -> float:
        return max((abs(r["error_pct"]) for r in self.rows if r["used_in_fit"]), default=0.0)

    def table(self) -> str:
        head = f"{'point':<62} {'parameter':<34} {'meas ms':>9} {'uncal ms':>9} {'pred ms':>9} {'err %':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "" if r["used_in_fit"] else "  (not fitted: " + r["note"] + ")"
            lines.append(f"{r['point'][:62]:<62} {r['parameter']:<34} {r['measured_ms']:>9.2f} "
                         f"{r['uncalibrated_ms']:>9.2f} {r['predicted_ms']:>9.2f} {r['error_pct']:>+7.1f}{mark}")
        lines.append("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in self.fitted.items()))
        return "\n".join(lines)


def calibrate(profiles: Optional[Profiles] = None, points: Optional[list[Point]] = None,
              results_dir: Optional[str | Path] = None) -> Calibration:
    """Fit each free parameter to its group of measured points, in order.

    For each parameter ``theta`` (in the order the groups appear: GEMM rate,
    attention rates, ring efficiency, non-matmul factor) minimise
    ``sum_i (log t_pred_i(theta) - log t_meas_i)^2`` over the points of its
    group, holding the parameters fitted before it. Rates enter as
    ``t = FLOPs / rate``, so for them the optimum is the geometric mean of the
    measured rates; the other two are found by the same 1-D search. Then
    ``same_as_after_fit`` copies fits to GPUs that have no measurement. The
    points come from ``results_dir`` (a folder of results) or, when None, from
    the packaged copy of the committed ones.
    """
    base = profiles or Profiles.load()
    if points is None:
        points = calibration_points(base, read_results(base, results_dir))
    fitted_profiles = base
    fitted: dict = {}
    for parameter in dict.fromkeys(p.parameter for p in points if p.used and p.parameter):
        group = [p for p in points if p.used and p.parameter == parameter]
        lo, hi = next(v for k, v in FIT_RANGES.items() if k in parameter)

        def loss(theta, group=group, parameter=parameter, prof=fitted_profiles):
            trial = prof.with_value(parameter, theta)
            return sum((math.log(p.predict(trial)) - math.log(p.measured_s)) ** 2 for p in group)

        value = _fit_scalar(loss, lo, hi)
        fitted[parameter] = value
        fitted_profiles = fitted_profiles.with_value(parameter, value)
        # copy right away, so that later groups (e.g. the whole model on another GPU) use it
        for gpu, spec in fitted_profiles.data["gpus"].items():
            for key, source in (spec.get("same_as_after_fit") or {}).items():
                if f"gpus.{source}.{key}" == parameter:
                    fitted_profiles = fitted_profiles.with_value(f"gpus.{gpu}.{key}", value)
    rows = []
    for p in points:
        pred, uncal = p.predict(fitted_profiles), p.predict(base)
        rows.append({
            "point": p.name, "parameter": p.parameter, "measured_ms": 1e3 * p.measured_s,
            "uncalibrated_ms": 1e3 * uncal, "predicted_ms": 1e3 * pred,
            "error_pct": 100.0 * (pred / p.measured_s - 1.0), "used_in_fit": p.used, "note": p.note,
        })
    return Calibration(fitted_profiles, fitted, rows)


@lru_cache(maxsize=4)
def calibrated_profiles(path: Optional[str], results_dir: Optional[str]) -> Calibration:
    """Load the profiles (default: the packaged ones) and calibrate them on ``results_dir`` (default: the
    packaged results), once per process."""
    return calibrate(Profiles.load(path), results_dir=results_dir)
