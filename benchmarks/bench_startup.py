"""Start-up of ``apbv infer`` at many requests: seconds from launch to the first answer record (CPU).

    PYTHONPATH=$PWD python benchmarks/bench_startup.py --label after
    PYTHONPATH=$PWD python benchmarks/bench_startup.py --label before --checkout /tmp/startup-base

Makes ``--files`` small real mp4 files with PyAV and a request file of ``--requests`` video requests
(default 10,000) cycling over them, then launches ``python -m megatron_apbv infer`` (world 1, serial
pipeline, the tiny model of bench_jobs.py's ``TINY_JOB``) from ``--checkout`` as a separate process.
The launch is timed until the first complete answer line is in ``--output``; the job is then stopped
with SIGTERM (it exits 0 keeping its records). ``startup_s`` is the launch-to-first-answer time less the
first request's own stage seconds (its ``seconds`` field): what the job spent before serving anything.
The same launch at one request (``one_request``) gives the fixed cost (imports, model build).

Prints the run's row as JSON on stdout and merges it, under ``--label``, into
``benchmarks/results/startup_cpu.json`` (``before``/``after`` rows side by side). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_jobs import CONFIG, TINY_JOB, write_synthetic_mp4  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "startup_cpu.json"
JOB = TINY_JOB + ["input.kind=video", "generate.max_new_tokens=2", "parallel.timeout_seconds=600"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def first_record(output: Path, proc: subprocess.Popen, limit_s: float) -> tuple[float, dict]:
    """Wait for the first complete line of ``output``; returns (when, the record)."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        if output.exists():
            text = output.read_text()
            if "\n" in text:
                return time.perf_counter(), json.loads(text.split("\n", 1)[0])
        if proc.poll() is not None:
            raise SystemExit(f"bench_startup: apbv infer exited {proc.returncode} before its first answer:\n"
                             + proc.stderr.read()[-4000:])
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"bench_startup: no answer within {limit_s} s")


def launch(checkout: Path, requests: Path, output: Path, limit_s: float) -> dict:
    """One ``apbv infer`` launch, stopped after its first record: its timings."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "megatron_apbv", "infer", str(CONFIG), "--requests", str(requests),
           "--output", str(output), "--quiet", "--pipeline", "serial", *JOB]
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        when, record = first_record(output, proc, limit_s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the job stops between requests and exits 0
        try:
            proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    if "error" in record:
        raise SystemExit(f"bench_startup: the first request failed: {record['error']}")
    first = when - start
    serving = sum(record["seconds"].values())
    return {"first_answer_s": round(first, 3), "first_request_stage_s": round(serving, 3),
            "startup_s": round(first - serving, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="the row's name in the results (e.g. before, after)")
    parser.add_argument("--checkout", default=str(ROOT), help="the megatron_apbv tree to run (default: this one)")
    parser.add_argument("--requests", type=int, default=10_000, help="video requests of the job (default 10000)")
    parser.add_argument("--files", type=int, default=8, help="distinct mp4 files the requests cycle over")
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds to wait for the first answer")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON (rows merged by label)")
    parser.add_argument("--workdir", default=None, help="videos, requests and answers (default: a temp dir)")
    args = parser.parse_args()
    checkout = Path(args.checkout).resolve()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_startup_"))
    workdir.mkdir(parents=True, exist_ok=True)

    videos = []
    for i in range(args.files):  # small real clips: 64x96 (or 96x64), 4 s at 4 fps
        path = workdir / f"clip{i}.mp4"
        if not path.exists():
            write_synthetic_mp4(path, 64 + 32 * (i % 2), 96 - 32 * (i % 2), 4, fps=4, seed=i)
        videos.append(path)
    rows = {}
    for name, count in (("one_request", 1), ("many_requests", args.requests)):
        requests = workdir / f"requests_{count}.jsonl"
        requests.write_text("".join(json.dumps({"id": f"r{i}", "input.video_path": str(videos[i % len(videos)])})
                                    + "\n" for i in range(count)))
        log(f"bench_startup: {args.label}: launching with {count} request(s) from {checkout}")
        rows[name] = {"requests": count, **launch(checkout, requests, workdir / f"answers_{count}.jsonl", args.limit)}
        log(f"bench_startup: {args.label}: {json.dumps(rows[name])}")
    many, one = rows["many_requests"], rows["one_request"]
    row = {
        "checkout": str(checkout), "files": args.files, **rows,
        # what the extra requests add before the first answer (imports and the model build cancel out)
        "startup_added_by_requests_s": round(many["startup_s"] - one["startup_s"], 3),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps({args.label: row}))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({"benchmark": "benchmarks/bench_startup.py", "config": str(CONFIG.relative_to(ROOT)),
                    "job_overrides": JOB, args.label: row})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
