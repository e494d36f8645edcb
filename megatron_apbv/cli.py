"""Command line: ``apbv COMMAND CONFIG [key=value ...] [options]``.

Every command loads and validates the YAML config (with ``key=value``
overrides) on every rank before any collective. A distributed command then
starts the process groups and runs ``command(args, cfg, env, device)`` of its
module, whose returned record rank 0 prints as one JSON line; a local command
runs ``command(args, cfg)`` in one process. A module's ``prepare(args, cfg)``
(``apbv infer``: read and validate the request file) runs on every rank right
after the config, before any collective; what it returns is ``args.prepared``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # provides command(...) and, optionally, add_arguments(parser) and prepare(args, cfg)
    help: str
    distributed: bool = True
    data_parallel: bool = False  # serves DP > 1 replicas; the others answer one prompt with one APB-V group


COMMANDS = {
    "run": Command("megatron_apbv.inference.prefill", "prefill the configured model and prompt across the launched ranks"),
    "generate": Command("megatron_apbv.inference.generate", "prefill, then decode over the distributed KV cache"),
    "eval": Command("megatron_apbv.eval.evaluate", "needle benchmark: dense vs exact, APB-V, APB-like, Star accuracy"),
    "bench": Command("megatron_apbv.bench.benchmark", "time dense, ring, Ulysses, Star, APB-like and APB-V side by side"),
    "infer": Command(
        "megatron_apbv.jobs.infer", "answer a file of requests with data-parallel APB-V groups (resumable)",
        data_parallel=True,
    ),
    "plan": Command("megatron_apbv.costmodel.plan", "predict prefill time per method and pick APB-V budgets (cost model)", distributed=False),
}


def _parser(selected: str | None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's module is imported (for its own options)."""
    parser = argparse.ArgumentParser(prog="apbv", description="APB-V long-context inference on Megatron-core")
    # Launchers may append --local_rank / --local-rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny CPU model)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. apbv.variant=exact")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == selected:
            module = importlib.import_module(command.module)
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
    return parser


def _emit(record: dict) -> None:
    # One write: with several ranks on one stdout, print()'s separate newline can interleave.
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="megatron")  # Megatron warns at import about missing TE/apex
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(next((a for a in argv if a in COMMANDS), None))
    args, rest = parser.parse_known_args(argv)
    # Overrides may follow options (`run cfg.yaml --compare dense a.b=1`): argparse leaves them in `rest`.
    unknown = [item for item in rest if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None

    # Everything that can be wrong with the config is checked here, before any collective.
    from megatron_apbv.runtime.config import ConfigError
    from megatron_apbv.runtime.distributed import (
        LaunchEnv,
        init_distributed,
        select_device,
        shutdown,
    )
    from megatron_apbv.runtime.faults import install_fault_hook, report_failure
    from megatron_apbv.runtime.loading import load_config

    command = COMMANDS[args.command]
    module = importlib.import_module(command.module)
    env = LaunchEnv.from_environ()
    cfg = None
    if not command.distributed:
        try:
            _emit(module.command(args, load_config(args.config, args.overrides)))
            return 0
        except ConfigError as err:
            print(f"apbv: {err}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, args.overrides)
        replicas = cfg.check_world_size(env.world_size)
        if replicas > 1 and not command.data_parallel:
            raise ConfigError(
                f"apbv {args.command} answers one prompt with one APB-V group, but {env.world_size} ranks make "
                f"{replicas} data-parallel replicas: launch {env.world_size // replicas} ranks, or use apbv infer "
                "to answer many requests"
            )
        if hasattr(module, "prepare"):
            args.prepared = module.prepare(args, cfg)
        device = select_device(cfg, env)
        install_fault_hook()  # APBV_FAULT_INJECT (tests only): nothing is installed when unset
        init_distributed(cfg, env, device)
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        shutdown(wait_for_peers=False)  # the ranks-agree check fails after the process group started
        return 2
    except Exception as err:  # a peer exited, hung or never joined: one line, non-zero exit, no hang
        code = report_failure(err, env.rank, cfg.parallel.timeout_seconds if cfg else None)
        shutdown(wait_for_peers=False)
        return code

    from megatron_apbv.models.checkpoint import CheckpointError
    from megatron_apbv.models.video import VideoError

    try:
        record = module.command(args, cfg, env, device)
        if env.rank == 0:
            _emit(record)
        shutdown()
    except (ConfigError, CheckpointError, VideoError) as err:  # bad input, found the same way on every rank
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a peer rank exited or hung mid-run: one line, non-zero exit, no hang
        return report_failure(err, env.rank, cfg.parallel.timeout_seconds)
    finally:
        shutdown(wait_for_peers=False)  # after a failure a peer may be gone: no barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
