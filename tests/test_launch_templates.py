"""Launch scripts and SLURM templates, checked without SLURM, GPUs or the apbv CLI.

Fake ``scontrol``/``srun``/``sinfo``/``deepspeed`` executables are put first on
PATH; they record their argv and environment as JSON lines. With
FAKE_SRUN_EXEC=1 the fake ``srun`` also starts its tasks locally with the
SLURM_* variables a real srun would set, so a stand-in program (a tiny gloo
all-reduce) checks that the rank environment really forms one process group.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PY = sys.executable

_spec = importlib.util.spec_from_file_location("apbv_launch_render", LAUNCH / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

_entry_spec = importlib.util.spec_from_file_location("apbv_launch_entry", LAUNCH / "apbv_entry.py")
apbv_entry = importlib.util.module_from_spec(_entry_spec)
_entry_spec.loader.exec_module(apbv_entry)


FAKE_SCONTROL = r'''
import re, sys
def expand(nodelist):
    out = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.match(r"^(.*)\[([^\]]*)\](.*)$", part)
        if not m:
            out.append(part)
            continue
        pre, body, suf = m.groups()
        for rng in body.split(","):
            lo, _, hi = rng.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{pre}{str(i).zfill(len(lo))}{suf}")
    return out
assert sys.argv[1:3] == ["show", "hostnames"] or sys.argv[1] == "requeue", sys.argv
with open(__import__("os").environ["FAKE_LOG"], "a") as f:
    f.write(__import__("json").dumps({"tool": "scontrol", "argv": sys.argv[1:]}) + "\n")
if sys.argv[1] == "show":
    print("\n".join(expand(sys.argv[3])))
'''

FAKE_SRUN = r'''
import json, os, subprocess, sys
VALUE_OPTS = {"-n", "--ntasks", "-N", "--nodes", "--ntasks-per-node", "--gpus-per-node",
              "--nodelist", "-w", "--comment", "--export", "-c", "--cpus-per-task"}
argv = sys.argv[1:]
opts, i = {}, 0
while i < len(argv) and argv[i].startswith("-"):
    a = argv[i]
    if a.startswith("--") and "=" in a:
        k, v = a.split("=", 1); i += 1
    elif a in VALUE_OPTS:
        k, v = a, argv[i + 1]; i += 2
    else:
        k, v = a, True; i += 1
    opts[k] = v
cmd = argv[i:]
keep = ("MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NCCL_", "PYTHONPATH", "SLURM_")
env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"tool": "srun", "argv": argv, "opts": opts, "cmd": cmd, "env": env}) + "\n")
if os.environ.get("FAKE_SRUN_EXEC") != "1":
    sys.exit(0)
nodes = int(opts.get("--nodes", opts.get("-N", 1)))
ntasks = int(opts.get("--ntasks", opts.get("-n", nodes)))
per_node = int(opts.get("--ntasks-per-node", -(-ntasks // nodes)))
base = dict(os.environ)
export = opts.get("--export", "ALL").split(",")
assert export[0] == "ALL", export
for item in export[1:]:
    k, v = item.split("=", 1)
    base[k] = v.strip('"')
procs = []
for t in range(ntasks):
    env = dict(base, SLURM_PROCID=str(t), SLURM_LOCALID=str(t % per_node), SLURM_NODEID=str(t // per_node),
               SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(nodes), SLURM_STEP_NUM_TASKS=str(ntasks))
    procs.append(subprocess.Popen(cmd, env=env))
sys.exit(max(p.wait() for p in procs))
'''

FAKE_RECORDER = r'''
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "node": os.environ.get("SLURM_NODEID"),
                        "env": {k: v for k, v in os.environ.items() if k.startswith(("MASTER_", "PYTHONPATH"))}}) + "\n")
'''

# Stand-in for `python -m megatron_apbv`: gloo all-reduce over the launcher's
# rank environment; rank 0 prints one JSON line (as the real CLI does).
STANDIN = r'''
import json, os, sys
import torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
if rank == 0:
    sys.stdout.write(json.dumps({"world_size": world, "sum": t.item(), "argv": sys.argv[1:],
                                 "master_addr": os.environ["MASTER_ADDR"]}) + "\n")
    sys.stdout.flush()
dist.destroy_process_group()
'''


def _write_exe(path: Path, body: str) -> None:
    path.write_text(f"#!{PY}\n{body}")
    path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
    """A bin dir with fake SLURM tools first on PATH, a log, a stand-in module."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "scontrol", FAKE_SCONTROL)
    _write_exe(bindir / "srun", FAKE_SRUN)
    _write_exe(bindir / "sinfo", "print('fake sinfo')\n")
    _write_exe(bindir / "deepspeed", FAKE_RECORDER)
    pkg = tmp_path / "pkg" / "apbv_standin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(STANDIN)
    log = tmp_path / "log.jsonl"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "NCCL_")) and k not in {
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "CONFIG", "OVERRIDES", "EXTRA_ARGS", "NODES",
            "GPUS_PER_NODE", "HOSTFILE", "DS_MODE", "DEEPSPEED", "PYTHON", "REPO_ROOT", "APBV_MODULE"}
    }
    env.update(PATH=f"{bindir}:{env['PATH']}", FAKE_LOG=str(log), SLURM_SUBMIT_DIR=str(REPO),
               PYTHONPATH=str(tmp_path / "pkg"))

    class Fakes:
        pass

    f = Fakes()
    f.bindir, f.log, f.env, f.tmp = bindir, log, env, tmp_path

    def records(tool=None):
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in rows if tool is None or r["tool"] == tool]

    f.records = records
    return f


def _run_batch(script: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON line in stdout:\n{stdout}")


# --------------------------------------------------------------------- syntax

SHELL_FILES = sorted(LAUNCH.glob("*.sh")) + sorted((LAUNCH / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_syntax(path):
    assert path.exists()
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_expected_files_exist():
    for rel in ("deepspeed_cpu.sh", "deepspeed_gpu.sh", "torchrun.sh", "slurm/apbv.sbatch", "slurm/apbv_infer.sbatch",
                "slurm/apbv_deepspeed.sbatch", "hostfile.example", "README.md", "apbv_entry.py", "render.py"):
        assert (LAUNCH / rel).is_file(), rel
    for rel in ("deepspeed_cpu.sh", "deepspeed_gpu.sh", "torchrun.sh"):
        assert os.access(LAUNCH / rel, os.X_OK), rel


# ------------------------------------------------------------------ hostfiles

def test_render_hostfile_two_nodes():
    assert render.render_hostfile(["node1", "node2"], 4) == "node1 slots=4\nnode2 slots=4\n"
    with pytest.raises(ValueError):
        render.render_hostfile(["node1", "node1"], 4)


def test_hostfile_example_parses_with_deepspeed():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    pool = runner._parse_hostfile((LAUNCH / "hostfile.example").read_text().splitlines())
    assert list(pool.items()) == [("node1", 8), ("node2", 8)]
    rendered = render.render_hostfile(["node1", "node2"], 4)
    assert dict(runner._parse_hostfile(rendered.splitlines())) == {"node1": 4, "node2": 4}


# --------------------------------------------------------- apbv.sbatch (srun)

def _render_2x4(tmp_path, template="slurm", **kw) -> Path:
    text = render.render_slurm(template, nodes=2, gpus_per_node=4, config="configs/tiny_cpu.yaml",
                               overrides=["apbv.variant=exact", "parallel.context_parallel_size=8"],
                               extra_args=["--compare", "dense"], **kw)
    path = tmp_path / f"{template}.sbatch"
    path.write_text(text)
    return path


def test_render_sbatch_header_2x4(tmp_path):
    text = _render_2x4(tmp_path).read_text()
    lines = text.splitlines()
    assert "#SBATCH --nodes=2" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --gres=gpu:4" in lines
    assert not any(l.startswith(("#SBATCH --nodes=8", "#SBATCH --gres=gpu:8")) for l in lines)
    assert 'CONFIG="${CONFIG:-configs/tiny_cpu.yaml}"' in text
    ds = _render_2x4(tmp_path, "slurm-deepspeed", partition="gpu").read_text().splitlines()
    assert "#SBATCH --nodes=2" in ds
    assert "#SBATCH --ntasks-per-node=1" in ds  # one DeepSpeed launcher per node
    assert "#SBATCH --gres=gpu:4" in ds
    assert "#SBATCH --partition=gpu" in ds


def test_sbatch_srun_line_and_env_2x4(fakes):
    script = _render_2x4(fakes.tmp)
    env = dict(fakes.env, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="4321", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="4", NCCL_DEBUG="INFO")
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr

    (sc,) = fakes.records("scontrol")
    assert sc["argv"] == ["show", "hostnames", "node[1-2]"]
    (srun,) = fakes.records("srun")
    assert srun["opts"]["--nodes"] == "2"
    assert srun["opts"]["--ntasks-per-node"] == "4"
    assert srun["opts"]["--ntasks"] == "8"
    assert srun["opts"]["--kill-on-bad-exit"] == "1"
    assert srun["cmd"][1:] == ["-u", str(REPO / "launch" / "apbv_entry.py"), "run", "configs/tiny_cpu.yaml",
                               "apbv.variant=exact", "parallel.context_parallel_size=8", "--compare", "dense"]
    assert srun["env"]["MASTER_ADDR"] == "node1"
    assert srun["env"]["MASTER_PORT"] == str(20000 + 4321 % 20000)
    assert srun["env"]["WORLD_SIZE"] == "8"
    assert srun["env"]["NCCL_DEBUG"] == "INFO"
    assert srun["env"]["PYTHONPATH"].split(":")[0] == str(REPO)
    assert "world=8 master=node1:24321" in proc.stderr


def test_sbatch_defaults_without_slurm_shape_env(fakes):
    """Run with only the node list set: the rendered defaults (2 x 4) apply."""
    script = _render_2x4(fakes.tmp, master_port=29555)
    env = dict(fakes.env, SLURM_JOB_NODELIST="gpu-a07,gpu-b11")
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr
    (srun,) = fakes.records("srun")
    assert (srun["opts"]["--nodes"], srun["opts"]["--ntasks-per-node"], srun["opts"]["--ntasks"]) == ("2", "4", "8")
    assert srun["env"]["MASTER_ADDR"] == "gpu-a07"
    assert srun["env"]["MASTER_PORT"] == "29555"


def test_sbatch_user_overrides_from_environment(fakes):
    script = _render_2x4(fakes.tmp)
    env = dict(fakes.env, SLURM_JOB_NODELIST="n[01-04]", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="2",
               CONFIG="configs/other.yaml", OVERRIDES="a=1 b=2", EXTRA_ARGS="", MASTER_PORT="29999")
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr
    (srun,) = fakes.records("srun")
    assert srun["opts"]["--ntasks"] == "8"
    assert srun["cmd"][3:] == ["run", "configs/other.yaml", "a=1", "b=2"]
    assert (srun["env"]["MASTER_ADDR"], srun["env"]["MASTER_PORT"]) == ("n01", "29999")


def test_sbatch_executes_ranks_with_fake_srun(fakes):
    """2 'nodes' x 1 task on this machine: srun's SLURM_* become one gloo group."""
    text = render.render_slurm("slurm", nodes=2, gpus_per_node=1, config="cfg.yaml", overrides=["k=v"],
                               master_port=free_port())
    script = fakes.tmp / "exec.sbatch"
    script.write_text(text)
    env = dict(fakes.env, SLURM_JOB_NODELIST="localhost,127.0.0.1", FAKE_SRUN_EXEC="1", PYTHON=PY,
               APBV_MODULE="apbv_standin")
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _last_json(proc.stdout)
    assert out == {"world_size": 2, "sum": 3.0, "argv": ["run", "cfg.yaml", "k=v"], "master_addr": "localhost"}


# ------------------------------------------------------ apbv_infer.sbatch (jobs)

def _render_infer_2x4(tmp_path, output) -> Path:
    text = render.render_slurm("slurm-infer", nodes=2, gpus_per_node=4, config="configs/tiny_cpu.yaml",
                               overrides=["parallel.context_parallel_size=4"], requests="configs/requests_demo.jsonl",
                               output=str(output))
    path = tmp_path / "infer.sbatch"
    path.write_text(text)
    return path


def test_render_infer_sbatch_is_requeueable_2x4(tmp_path):
    lines = _render_infer_2x4(tmp_path, "/shared/answers.jsonl").read_text().splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4", "#SBATCH --requeue",
                 "#SBATCH --signal=TERM@120", "#SBATCH --open-mode=append"):
        assert line in lines
    assert any(line.startswith('OUTPUT="${OUTPUT:-/shared/answers.jsonl}"') for line in lines)
    assert any(line.startswith('REQUESTS="${REQUESTS:-configs/requests_demo.jsonl}"') for line in lines)


@pytest.mark.parametrize("remaining, requeued", [(0, False), (3, True)])
def test_infer_sbatch_srun_line_and_requeue_when_requests_remain(fakes, remaining, requeued):
    output = fakes.tmp / "answers.jsonl"
    (fakes.tmp / "answers.summary.json").write_text(json.dumps({"remaining": remaining}))
    script = _render_infer_2x4(fakes.tmp, output)
    env = dict(fakes.env, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="4", PYTHON=PY)
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr
    (srun,) = fakes.records("srun")
    assert (srun["opts"]["--ntasks"], srun["opts"]["--kill-on-bad-exit"]) == ("8", "1")
    assert srun["cmd"][1:] == ["-u", str(REPO / "launch" / "apbv_entry.py"), "infer", "configs/tiny_cpu.yaml",
                               "--requests", "configs/requests_demo.jsonl", "--output", str(output),
                               "parallel.context_parallel_size=4"]
    assert (srun["env"]["MASTER_ADDR"], srun["env"]["WORLD_SIZE"]) == ("node1", "8")
    calls = [r["argv"] for r in fakes.records("scontrol")]
    assert (["requeue", "77"] in calls) is requeued


# ------------------------------------------------- apbv_deepspeed.sbatch modes

def test_deepspeed_sbatch_no_ssh_mode_2x4(fakes):
    script = _render_2x4(fakes.tmp, "slurm-deepspeed")
    hostfile = fakes.tmp / "hosts"
    env = dict(fakes.env, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="77", FAKE_SRUN_EXEC="1",
               HOSTFILE=str(hostfile))
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text() == "node1 slots=4\nnode2 slots=4\n"
    (srun,) = fakes.records("srun")
    assert (srun["opts"]["--nodes"], srun["opts"]["--ntasks-per-node"], srun["opts"]["--ntasks"]) == ("2", "1", "2")
    launches = sorted(fakes.records("deepspeed"), key=lambda r: r["node"])
    assert [r["node"] for r in launches] == ["0", "1"]
    for node, rec in enumerate(launches):
        assert rec["argv"] == [
            "--no_ssh", f"--node_rank={node}", "--hostfile", str(hostfile), "--master_addr", "node1",
            "--master_port", str(20077), "--no_local_rank", "--module", "megatron_apbv",
            "run", "configs/tiny_cpu.yaml", "apbv.variant=exact", "parallel.context_parallel_size=8",
            "--compare", "dense"]
        assert rec["env"]["MASTER_ADDR"] == "node1"


@pytest.mark.parametrize("mode", ["slurm", "pdsh"])
def test_deepspeed_sbatch_single_launcher_modes_2x4(fakes, mode):
    script = _render_2x4(fakes.tmp, "slurm-deepspeed")
    hostfile = fakes.tmp / "hosts"
    env = dict(fakes.env, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="77", DS_MODE=mode, HOSTFILE=str(hostfile))
    proc = _run_batch(script, env)
    assert proc.returncode == 0, proc.stderr
    assert fakes.records("srun") == []  # the launcher itself would call srun / pdsh
    (rec,) = fakes.records("deepspeed")
    argv = rec["argv"]
    assert argv[:6] == ["--hostfile", str(hostfile), "--master_addr", "node1", "--master_port", "20077"]
    assert argv[argv.index("--launcher") + 1] == mode
    assert argv[argv.index("--num_nodes") + 1] == "2"
    assert argv[argv.index("--num_gpus") + 1] == "4"
    tail = ["run", "configs/tiny_cpu.yaml", "apbv.variant=exact", "parallel.context_parallel_size=8",
            "--compare", "dense"]
    if mode == "slurm":
        assert "--no_ssh_check" in argv
        assert argv[-7:] == [str(REPO / "launch" / "apbv_entry.py")] + tail
    else:
        assert argv[-9:] == ["--no_local_rank", "--module", "megatron_apbv"] + tail
    assert rec["env"]["MASTER_ADDR"] == "node1" and rec["env"]["MASTER_PORT"] == "20077"


def _real_deepspeed() -> str:
    exe = Path(PY).with_name("deepspeed")
    if not exe.exists():
        found = shutil.which("deepspeed")
        if not found:
            pytest.skip("deepspeed launcher not installed")
        exe = Path(found)
    return str(exe)


@pytest.mark.parametrize("mode", ["no_ssh", "slurm"])
def test_deepspeed_sbatch_executes_with_real_launcher(fakes, mode):
    """The real DeepSpeed launcher (CPU accelerator) under the fake srun: 2 'nodes' x 1 rank."""
    text = render.render_slurm("slurm-deepspeed", nodes=2, gpus_per_node=1, config="cfg.yaml",
                               overrides=["k=v"], master_port=free_port())
    script = fakes.tmp / "exec_ds.sbatch"
    script.write_text(text)
    env = dict(fakes.env, SLURM_JOB_NODELIST="localhost,127.0.0.1", FAKE_SRUN_EXEC="1", DS_MODE=mode,
               DEEPSPEED=_real_deepspeed(), APBV_MODULE="apbv_standin", HOSTFILE=str(fakes.tmp / "hosts"))
    proc = _run_batch(script, env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _last_json(proc.stdout)
    assert out["world_size"] == 2 and out["sum"] == 3.0
    assert out["argv"] == ["run", "cfg.yaml", "k=v"]  # no --local_rank reaches the program
    assert out["master_addr"] == "localhost"


# ------------------------------------------------------------ apbv_entry.py

def test_entry_maps_scheduler_env_without_overwriting():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert apbv_entry.normalise_env(env) == dict(env, RANK="5", LOCAL_RANK="1", WORLD_SIZE="8")
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "9", "SLURM_NTASKS": "1"}
    assert apbv_entry.normalise_env(dict(env)) == env
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}
    assert apbv_entry.normalise_env(env)["RANK"] == "3"


def test_entry_strips_local_rank_flags():
    env: dict = {}
    argv = ["--local_rank=2", "run", "c.yaml", "--local-rank", "2", "a=b", "--compare", "dense"]
    assert apbv_entry.strip_local_rank(argv, env) == ["run", "c.yaml", "a=b", "--compare", "dense"]
    assert env == {"LOCAL_RANK": "2"}
    env = {"LOCAL_RANK": "1"}
    assert apbv_entry.strip_local_rank(["--local_rank=0", "run"], env) == ["run"]
    assert env == {"LOCAL_RANK": "1"}


# ------------------------------------------------------- launcher dry runs

def _dry(script: str, env_extra: dict, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"HOSTFILE", "NODE_RANK", "GPUS_PER_NODE", "NUM_NODES", "MASTER_ADDR", "DS_LAUNCHER",
                        "NNODES", "RDZV_ENDPOINT", "APBV_MODULE", "CONFIG", "PASS_LOCAL_RANK"}}
    env.update(env_extra, DRY_RUN="1")
    out = subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    (line,) = [l for l in out.splitlines() if l.startswith("+ ")]
    return shlex.split(line[2:])


def test_deepspeed_cpu_dry_run():
    argv = _dry("deepspeed_cpu.sh", {"NPROC": "3", "MASTER_PORT": "29123"}, "--compare", "dense", "a=b")
    assert argv[1:] == ["--num_accelerators", "3", "--master_port", "29123", "--log_level", "error",
                        "--no_local_rank", "--module", "megatron_apbv", "run",
                        str(REPO / "configs" / "tiny_cpu.yaml"), "device=cpu", "--compare", "dense", "a=b"]
    argv = _dry("deepspeed_cpu.sh", {"PASS_LOCAL_RANK": "1"}, "my.yaml", "x=1 y")
    assert "--no_local_rank" not in argv and argv[-4:] == ["run", "my.yaml", "device=cpu", "x=1 y"]


def test_deepspeed_gpu_dry_runs(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    one = _dry("deepspeed_gpu.sh", {"GPUS_PER_NODE": "4"}, "c.yaml")
    assert one[1:] == ["--master_port", "29500", "--log_level", "info", "--num_gpus", "4", "--no_local_rank",
                       "--module", "megatron_apbv", "run", "c.yaml"]
    pdsh = _dry("deepspeed_gpu.sh", {"HOSTFILE": str(hf), "NUM_NODES": "2", "GPUS_PER_NODE": "4"}, "c.yaml")
    assert pdsh[pdsh.index("--master_addr") + 1] == "node1"
    assert pdsh[pdsh.index("--launcher") + 1] == "pdsh"
    assert pdsh[pdsh.index("--num_nodes") + 1] == "2"
    no_ssh = _dry("deepspeed_gpu.sh", {"HOSTFILE": str(hf), "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, "c.yaml")
    assert no_ssh[no_ssh.index("--node_rank") + 1] == "1" and "--no_ssh" in no_ssh
    assert no_ssh[no_ssh.index("--master_addr") + 1] == "10.0.0.1"
    slurm = _dry("deepspeed_gpu.sh", {"HOSTFILE": str(hf), "DS_LAUNCHER": "slurm"}, "c.yaml")
    assert slurm[-3:] == [str(LAUNCH / "apbv_entry.py"), "run", "c.yaml"] and "--module" not in slurm
    ompi = _dry("deepspeed_gpu.sh", {"HOSTFILE": str(hf), "DS_LAUNCHER": "openmpi", "GPUS_PER_NODE": "4"}, "c.yaml")
    assert "--num_gpus" not in ompi
    assert ompi[ompi.index("--launcher_args") + 1] == "-x MASTER_ADDR=node1 -x MASTER_PORT=29500"


def test_torchrun_dry_runs():
    one = _dry("torchrun.sh", {"NPROC_PER_NODE": "3", "MASTER_PORT": "29333"}, "c.yaml", "p=3")
    assert one[1:] == ["--nnodes", "1", "--nproc_per_node", "3", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                       "127.0.0.1:29333", "--rdzv_id", "apbv", "--max_restarts", "0", "-m", "megatron_apbv",
                       "run", "c.yaml", "p=3"]
    multi = _dry("torchrun.sh", {"NNODES": "2", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "node1:29400"}, "c.yaml")
    assert multi[multi.index("--rdzv_endpoint") + 1] == "node1:29400"
    assert multi[multi.index("--nnodes") + 1] == "2"
    env = {k: v for k, v in os.environ.items() if k not in {"RDZV_ENDPOINT"}}
    bad = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "c.yaml"], env=dict(env, NNODES="2", DRY_RUN="1"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "RDZV_ENDPOINT" in bad.stderr
