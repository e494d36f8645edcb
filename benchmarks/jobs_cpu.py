"""apbv infer on CPU ranks: requests/s of one request file at DP 1 vs DP 2 (CP 2 each), and the stage times.

    .venv/bin/python benchmarks/jobs_cpu.py [--requests configs/requests_demo.jsonl] [--out benchmarks/results/jobs_cpu.json]

Each setting is one launch of gloo ranks (RANK/WORLD_SIZE set directly, as srun does) answering every
request of the file into a fresh answer file; the JSON holds each run's summary (requests/s, tokens/s,
stage seconds summed over requests) and its per-request stage seconds. Process start and model build
are outside the timed loop. Prints the JSON; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from distributed_utils import free_port  # noqa: E402


def run_job(world: int, requests: Path, config: Path, workdir: Path, overrides: list[str]) -> dict:
    output = workdir / f"answers_w{world}.jsonl"
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "megatron_apbv", "infer", str(config), "--requests", str(requests),
               "--output", str(output), "--quiet", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, results):
        if p.returncode != 0:
            raise SystemExit(f"world {world}: a rank exited {p.returncode}:\n{err[-3000:]}")
    sys.stderr.write(results[0][1].strip().splitlines()[-1] + "\n")
    summary = json.loads(results[0][0].strip().splitlines()[-1])
    summary.pop("output")  # a temporary path
    records = [json.loads(line) for line in output.read_text().splitlines()]
    summary["per_request"] = {r["id"]: {"replica": r["replica"], "prompt_tokens": r["prompt_tokens"],
                                        "generated": len(r["generated_ids"]), "seconds": r["seconds"]}
                              for r in records}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny_cpu.yaml"))
    parser.add_argument("--requests", default=str(ROOT / "configs/requests_demo.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/jobs_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {f"dp{w // 2}_cp2": run_job(w, Path(args.requests), Path(args.config), Path(tmp), [])
                for w in (2, 4)}
    result = {
        "what": "apbv infer, configs/requests_demo.jsonl on configs/tiny_cpu.yaml, CPU gloo ranks, OMP_NUM_THREADS=1",
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    Path(args.out).write_text(text + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
