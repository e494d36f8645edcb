"""Bad input fails on every rank, before any collective, with a message naming the field."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_utils import free_port

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc, *args, timeout=120):
    # torchrun SIGTERMs the peers when it next finds a rank exited (every --monitor-interval seconds).
    # A config error is reported before the heavy imports, so all ranks report within about the same
    # start-up time; on a loaded 2-core machine ranks still drift apart by a second or more, so the
    # interval leaves a slower peer 0-5 s to print its own message.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--monitor-interval", "5",
           "--master_port", str(free_port()), "-m", "megatron_apbv", "run", str(ROOT / "configs/tiny_cpu.yaml"), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, time.monotonic() - start


@pytest.mark.parametrize(
    "nproc, args, message",
    [
        (2, ["apbv.windw=3"], "apbv.windw: unknown key"),
        (2, ["model.num_query_groups=3"], "not divisible by model.num_query_groups=3"),
        (2, ["apbv.anchor=5000"], "exceeds the prompt"),
        (3, [], "launched with 3 ranks but parallel.context_parallel_size=2"),
        (2, ["dtype=float16", "device=cpu"], "float16 is not supported on the CPU"),
    ],
)
def test_every_rank_reports_and_nobody_hangs(nproc, args, message):
    proc, seconds = _torchrun(nproc, *args)
    assert proc.returncode != 0
    for rank in range(nproc):
        assert f"apbv: rank {rank}: " in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count(message) == nproc, proc.stderr[-2000:]
    assert seconds < 90


def test_undecodable_video_fails_every_rank(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    proc, seconds = _torchrun(2, "input.kind=video", f"input.video_path={bad}")
    assert proc.returncode != 0
    for rank in range(2):
        assert f"apbv: rank {rank}: " in proc.stderr and str(bad) in proc.stderr, proc.stderr[-2000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert seconds < 90
