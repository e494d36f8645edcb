"""Reliability: bad input, ranks that disagree, failed ranks, and safe writes.

* Ranks that run different configs fail together with a message (``check_ranks_agree``).
* A rank that exits, raises or hangs mid-prefill makes the others exit non-zero with one
  line naming the failure, within ``parallel.timeout_seconds`` (plus start-up): tested with
  plain processes (no launcher to kill the survivors for us) and with torchrun.
* Atomic writes leave the old file or the new one, never half of one and never a temp file.
* Bad YAML and impossible option combinations fail on every rank with a clear message.

Multi-process tests start real gloo ranks on this machine; time limits are generous
because the test machine may have two cores shared with other jobs.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_utils import free_port, run_on_ranks
from fault_injection import FAULT_ENV, FaultSpec, maybe_inject_fault, parse_fault_spec
from rank_processes import CONFIG, FAULTY_ENTRY, ROOT, STARTUP
from rank_processes import clean_env as _env
from rank_processes import collect as _collect
from rank_processes import show as _show
from rank_processes import spawn as _spawn

from megatron_apbv.runtime.agreement import (
    agreement_extra,
    canonical_json,
    check_ranks_agree,
    fingerprint,
)
from megatron_apbv.runtime.atomic import (
    atomic_open,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
)
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.faults import failure_message, is_collective_failure
from megatron_apbv.models.resolve import load_config

# 1. Ranks agree -------------------------------------------------------------------------------


def test_fingerprint_is_canonical_and_sensitive():
    cfg = load_config(CONFIG)
    extra = agreement_extra(cfg, 2)
    assert fingerprint(cfg, extra) == fingerprint(load_config(CONFIG), dict(reversed(list(extra.items()))))
    assert fingerprint(cfg, extra) != fingerprint(load_config(CONFIG, ["apbv.window=7"]), extra)
    assert fingerprint(cfg, extra) != fingerprint(cfg, {**extra, "world_size": 3})
    assert '"megatron_apbv"' in canonical_json(cfg, extra) and '"prompt_len":468' in canonical_json(cfg, extra)


def _agree(rank, world, per_rank_overrides):
    cfg = load_config(CONFIG, per_rank_overrides.get(rank, []))
    try:
        result = ("ok", check_ranks_agree(cfg, agreement_extra(cfg, world)))
    except ConfigError as err:
        result = ("error", str(err))
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    return everyone


def test_ranks_that_agree_share_one_fingerprint():
    results = run_on_ranks(2, _agree, {})
    assert [kind for kind, _ in results] == ["ok", "ok"] and results[0][1] == results[1][1]


def test_a_rank_with_other_overrides_fails_on_every_rank():
    results = run_on_ranks(3, _agree, {1: ["apbv.window=7"], 2: ["input.video_frames=11"]})
    assert [kind for kind, _ in results] == ["error"] * 3, results
    messages = {message for _, message in results}
    assert len(messages) == 1, messages  # every rank says the same thing
    message = messages.pop()
    assert "rank(s) 1, 2 of 3 differ from rank 0" in message
    assert "apbv.window=7 (rank 0: 5)" in message and "input.video_frames=11 (rank 0: 12)" in message
    assert "must be identical on all ranks" in message


def test_cli_ranks_launched_with_different_overrides_all_fail():
    overrides = {0: [], 1: ["apbv.passing=16"]}
    procs = _spawn(2, lambda rank: ["run", CONFIG, *overrides[rank]])
    results = _collect(procs, STARTUP + 60)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 2, _show(results)
        assert f"apbv: rank {rank}: ranks disagree: rank(s) 1 of 2 differ from rank 0" in err, _show(results)
        assert "apbv.passing=16 (rank 0: 8)" in err and "must be identical on all ranks" in err


# 2. No hangs: a rank fails mid-prefill ---------------------------------------------------------------


def test_fault_spec_parsing():
    assert parse_fault_spec("rank=1,layer=2") == FaultSpec(1, 2, "exit", 17)
    assert parse_fault_spec(" rank=0 , layer=1, action=hang,code=3 ") == FaultSpec(0, 1, "hang", 3)
    for bad, why in [("rank=1", "at least"), ("rank=1,layer=x", "integers"), ("rank=1,layer=1,action=boom", "one of"),
                     ("rank=1,layer=1,when=now", "is not one of")]:
        with pytest.raises(ValueError, match=why):
            parse_fault_spec(bad)
    maybe_inject_fault(2, FaultSpec(rank=5, layer=2, action="raise"))  # another rank: nothing happens
    maybe_inject_fault(1, FaultSpec(rank=0, layer=2, action="raise"))  # another layer: nothing happens
    with pytest.raises(RuntimeError, match="injected failure on rank 0 at layer 2"):
        maybe_inject_fault(2, FaultSpec(rank=0, layer=2, action="raise"))


def test_failure_messages():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234\nmore")
    assert is_collective_failure(gloo)
    assert failure_message(gloo, 2, 20) == (
        "apbv: rank 2: collective failed (a peer rank exited): "
        "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234"
    )
    slow = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation")
    assert is_collective_failure(slow)
    assert failure_message(slow, 0, 10) == (
        "apbv: rank 0: collective failed (timed out after 10 s: a peer rank is stuck or slower than "
        "parallel.timeout_seconds): [../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv "
        "operation"
    )
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4321: Connection reset by peer")
    assert failure_message(reset, 1, 600).startswith("apbv: rank 1: collective failed (a peer rank exited): ")
    other = RuntimeError("ProcessGroupGloo: unknown failure")
    assert failure_message(other, 1, 600).startswith("apbv: rank 1: collective failed (a peer rank exited or timed")
    bug = ValueError("shapes differ")
    assert not is_collective_failure(bug)
    assert failure_message(bug, 0, 20) == "apbv: rank 0: failed: ValueError: shapes differ"


SMALL_RUN = ["run", CONFIG, "parallel.context_parallel_size=3", "model.num_layers=3"]


@pytest.mark.parametrize("action", ["exit", "raise"])
def test_survivors_exit_with_a_message_when_a_peer_dies_plain_processes(action):
    """No launcher: the survivors' own error path must end them, with one line each."""
    timeout = 20
    start = time.monotonic()
    procs = _spawn(3, lambda rank: [*SMALL_RUN, f"parallel.timeout_seconds={timeout}"],
                   lambda rank: {FAULT_ENV: f"rank=1,layer=2,action={action}"})
    results = _collect(procs, STARTUP + timeout + 60)
    seconds = time.monotonic() - start
    assert all(proc.returncode is not None for proc in procs)
    rc1, _, err1 = results[1]
    assert f"apbv: rank 1: {FAULT_ENV}: {action} at layer 2" in err1, _show(results)
    if action == "exit":
        assert rc1 == 17, _show(results)
    else:
        assert rc1 == 1 and "apbv: rank 1: failed: RuntimeError: APBV_FAULT_INJECT: injected failure" in err1
    for rank in (0, 2):
        rc, out, err = results[rank]
        assert rc == 1, _show(results)
        # The peer died 2 s in: the message says it exited, not that a timeout ran out (issue 20, case 11).
        assert f"apbv: rank {rank}: collective failed (a peer rank exited): " in err, _show(results)
        assert "Traceback" not in err, _show(results)  # one line, not a stack
        assert out.strip() == ""  # no result pretending to be complete
    assert seconds < STARTUP + timeout + 60


def test_survivors_time_out_when_a_peer_hangs_plain_processes():
    """The peer is alive but stuck (sockets open): only the collective timeout can end the others."""
    timeout = 10
    start = time.monotonic()
    procs = _spawn(3, lambda rank: [*SMALL_RUN, f"parallel.timeout_seconds={timeout}"],
                   lambda rank: {FAULT_ENV: "rank=1,layer=1,action=hang"})
    results = _collect(procs, STARTUP + timeout + 60, wait_for=[0, 2])
    seconds = time.monotonic() - start
    assert results[1][0] == -signal.SIGKILL, _show(results)  # the hung rank was still there; we killed it
    assert f"{FAULT_ENV}: hang at layer 1" in results[1][2]
    for rank in (0, 2):
        rc, _, err = results[rank]
        assert rc == 1, _show(results)
        assert f"apbv: rank {rank}: collective failed (timed out after {timeout} s: a peer rank is stuck" in err, (
            _show(results))
        # gloo words it by which side of a pair gives up first: "Timed out waiting ..." on the rank whose
        # recv expired, "Application timeout caused pair closure" on one whose pair was closed by it.
        cause = err.split("): ", 1)[-1].lower()
        assert "timed out" in cause or "timeout" in cause, _show(results)
    assert seconds < STARTUP + timeout + 60


def test_torchrun_exits_non_zero_when_a_rank_is_killed_mid_prefill():
    timeout = 20
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(free_port()),
           FAULTY_ENTRY, *SMALL_RUN, f"parallel.timeout_seconds={timeout}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(**{FAULT_ENV: "rank=1,layer=2,action=kill"}), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=STARTUP + timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung after a rank was killed:\n{err[-3000:]}")
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert f"apbv: rank 1: {FAULT_ENV}: kill at layer 2" in err, err[-3000:]
    assert "Signal 9 (SIGKILL)" in err or "SIGKILL" in err, err[-3000:]
    assert '"next_token_id"' not in out
    assert seconds < STARTUP + timeout + 60


# 3. Atomic writes ------------------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_content_and_permissions(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "première\n")
    assert path.read_text(encoding="utf-8") == "première\n"
    path.chmod(0o640)
    atomic_write_bytes(path, b"\x00\x01new")
    assert path.read_bytes() == b"\x00\x01new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # replacing keeps the old file's permissions
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    assert stat.S_IMODE(fresh.stat().st_mode) & 0o600 == 0o600
    assert _leftovers(tmp_path) == []


def test_atomic_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 6)
    tensors = {"w": w, "tied": w, "row": w[1], "t": torch.arange(6).reshape(2, 3).t(), "h": torch.ones(3).half()}
    path = tmp_path / "model.safetensors"
    atomic_save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype
    assert _leftovers(tmp_path) == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["mid-write", "fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    path = tmp_path / "state.txt"
    path.write_text("old contents")
    if where == "mid-write":
        with pytest.raises(Boom):
            with atomic_open(path, "w") as f:
                f.write("half of the new")
                f.flush()
                assert _leftovers(tmp_path), "the data should be going to a temp file"
                raise Boom()
    else:
        import megatron_apbv.runtime.atomic as atomic

        def boom(*args, **kwargs):
            raise Boom()

        monkeypatch.setattr(atomic.os, where, boom)
        with pytest.raises(Boom):
            atomic_write_text(path, "new contents")
        monkeypatch.undo()
    assert path.read_text() == "old contents"
    assert _leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise Boom()

    path = tmp_path / "new.safetensors"
    with pytest.raises(Boom):
        with atomic_open(path, "wb") as f:
            f.write(b"partial")
            raise Boom()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    # the serialiser failing is no different
    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(Boom):
        atomic_save_safetensors({"w": torch.ones(2)}, path)
    assert list(tmp_path.iterdir()) == []


# 4. Bad input through the command line ----------------------------------------------------------------


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [64\ninput:\n  query_tokens: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: line \d+, column \d+: "):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- apbv\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level is \['model', 'apbv'\], not a mapping of sections"):
        load_config(listing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match="binary.yaml: not valid YAML"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"override 'apbv.window=\[7': the value is not valid YAML: line 1"):
        load_config(None, ["apbv.window=[7"])
    with pytest.raises(ConfigError, match="apbv.variant"):
        load_config(None, ["apbv.variant={a: 1}"])  # was a TypeError (unhashable dict) before


@pytest.fixture(scope="module")
def bad_yaml_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("yaml")
    (d / "list.yaml").write_text("- model\n- apbv\n")
    (d / "syntax.yaml").write_text("model:\n  num_layers: 2\n   hidden_size: 64\n")
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare", "dense", "parallel.context_parallel_size=1", "parallel.tensor_parallel_size=2"],
         "--compare dense needs parallel.tensor_parallel_size=1"),
        ("list.yaml", "list.yaml: the top level is ['model', 'apbv'], not a mapping of sections"),
        ("syntax.yaml", "syntax.yaml: not valid YAML: line 3, column 15: "),
    ],
)
def test_torchrun_bad_input_fails_on_every_rank(bad_yaml_files, args, message):
    if isinstance(args, str):
        args = [str(bad_yaml_files / args)]
    else:
        args = [CONFIG, *args]
    # --monitor-interval 5: torchrun SIGTERMs the peers when it next finds a rank exited; on a loaded
    # machine a peer can print its own message a second after the first rank (as in test_errors.py).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--monitor-interval", "5",
           "--master_port", str(free_port()), "-m", "megatron_apbv", "run", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP + 120, cwd=ROOT, env=_env())
    assert proc.returncode != 0
    for rank in range(2):
        assert f"apbv: rank {rank}: " in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count(message) == 2, proc.stderr[-2000:]
    assert "megatron_apbv/cli.py" not in proc.stderr, proc.stderr[-2000:]  # a message, not our stack trace
    assert time.monotonic() - start < STARTUP + 60
