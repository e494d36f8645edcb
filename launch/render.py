"""Render the SLURM batch templates and DeepSpeed hostfiles for a given shape.

    python launch/render.py slurm --nodes 2 --gpus-per-node 4 \\
        --config configs/my.yaml --override apbv.variant=exact --compare dense > job.sbatch
    python launch/render.py slurm-deepspeed --nodes 2 --gpus-per-node 4 > job_ds.sbatch
    python launch/render.py slurm-infer --nodes 4 --gpus-per-node 8 --config configs/my.yaml \\
        --requests requests.jsonl --output /shared/answers.jsonl > job_infer.sbatch
    python launch/render.py hostfile --slots 8 node1 node2 > hostfile

The templates in launch/slurm/ are submittable as they are; rendering only
rewrites their ``#SBATCH`` shape lines and the defaults in the user-settings
block, so the result is a plain, reviewable batch file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent / "slurm"

# template -> (file, tasks per node: "gpus" = one task per GPU, or a fixed count)
TEMPLATES = {
    "slurm": (SLURM_DIR / "apbv.sbatch", "gpus"),
    "slurm-deepspeed": (SLURM_DIR / "apbv_deepspeed.sbatch", 1),
    "slurm-infer": (SLURM_DIR / "apbv_infer.sbatch", "gpus"),
}


def _set_sbatch(text: str, option: str, value: str | None) -> str:
    """Replace the value of ``#SBATCH --option=...``; add the line if missing; drop it if value is None."""
    pattern = re.compile(rf"^#SBATCH --{re.escape(option)}=.*$", re.M)
    if value is None:
        return pattern.sub("", text).replace("\n\n#SBATCH", "\n#SBATCH")
    line = f"#SBATCH --{option}={value}"
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    last = list(re.finditer(r"^#SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + "\n" + line + text[last.end():]


def _set_default(text: str, name: str, value: str) -> str:
    """Replace the default of a settings line ``NAME="${NAME[:]-[${SLURM_X:-]DEFAULT}[}]"``."""
    if any(c in value for c in '"$`\\}'):
        raise ValueError(f"{name} value {value!r} contains a character that cannot be rendered")
    pattern = re.compile(rf'^({name}="\$\{{{name}:?-(?:\$\{{\w+:-)?)([^}}]*)(\}}+".*)$', re.M)
    if not pattern.search(text):
        raise ValueError(f"template has no settings line for {name}")
    return pattern.sub(lambda m: m.group(1) + value + m.group(3), text, count=1)


def render_slurm(
    template: str = "slurm",
    nodes: int = 2,
    gpus_per_node: int = 8,
    config: str | None = None,
    overrides: list[str] | None = None,
    extra_args: list[str] | None = None,
    job_name: str | None = None,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    master_port: int | None = None,
    requests: str | None = None,
    output: str | None = None,
) -> str:
    """Return the text of a batch file for ``nodes`` x ``gpus_per_node``."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("nodes and gpus_per_node must be >= 1")
    path, tasks = TEMPLATES[template]
    text = path.read_text()
    tasks_per_node = gpus_per_node if tasks == "gpus" else tasks
    text = _set_sbatch(text, "nodes", str(nodes))
    text = _set_sbatch(text, "ntasks-per-node", str(tasks_per_node))
    text = _set_sbatch(text, "gres", f"gpu:{gpus_per_node}")
    for option, value in (("job-name", job_name), ("time", time), ("partition", partition), ("account", account)):
        if value:
            text = _set_sbatch(text, option, value)
    text = _set_default(text, "NODES", str(nodes))
    text = _set_default(text, "GPUS_PER_NODE", str(gpus_per_node))
    if config:
        text = _set_default(text, "CONFIG", config)
    if overrides:
        text = _set_default(text, "OVERRIDES", " ".join(overrides))
    if extra_args:
        text = _set_default(text, "EXTRA_ARGS", " ".join(extra_args))
    if requests:  # slurm-infer only
        text = _set_default(text, "REQUESTS", requests)
    if output:
        text = _set_default(text, "OUTPUT", output)
    if master_port is not None:
        text = re.sub(r'^MASTER_PORT=.*$', f'MASTER_PORT="${{MASTER_PORT:-{int(master_port)}}}"', text, count=1, flags=re.M)
    return text


def render_hostfile(hosts: list[str], slots: int) -> str:
    """Return a DeepSpeed/MPI hostfile: one ``<host> slots=<slots>`` line per host."""
    if not hosts or slots < 1:
        raise ValueError("need at least one host and slots >= 1")
    if len(set(hosts)) != len(hosts):
        raise ValueError("hostnames must be unique (DeepSpeed rejects repeats)")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in TEMPLATES:
        s = sub.add_parser(name, help=f"render {TEMPLATES[name][0].name}")
        s.add_argument("--nodes", type=int, default=2)
        s.add_argument("--gpus-per-node", type=int, default=8)
        s.add_argument("--config")
        s.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
        s.add_argument("--compare", help="e.g. dense: adds --compare VALUE to the program")
        s.add_argument("--job-name")
        s.add_argument("--time")
        s.add_argument("--partition")
        s.add_argument("--account")
        s.add_argument("--master-port", type=int)
        if name == "slurm-infer":
            s.add_argument("--requests", help="request file (JSON lines)")
            s.add_argument("--output", help="answers file on a shared filesystem")
    h = sub.add_parser("hostfile", help="render a hostfile")
    h.add_argument("hosts", nargs="+")
    h.add_argument("--slots", type=int, default=8)
    args = parser.parse_args(argv)

    if args.what == "hostfile":
        sys.stdout.write(render_hostfile(args.hosts, args.slots))
        return 0
    sys.stdout.write(
        render_slurm(
            args.what,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            config=args.config,
            overrides=args.override,
            extra_args=["--compare", args.compare] if args.compare else None,
            job_name=args.job_name,
            time=args.time,
            partition=args.partition,
            account=args.account,
            master_port=args.master_port,
            requests=getattr(args, "requests", None),
            output=getattr(args, "output", None),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
