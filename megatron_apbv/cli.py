"""Command line: ``apbv COMMAND CONFIG [key=value ...] [options]``.

Every command loads and validates the YAML config (with ``key=value``
overrides) on every rank before any collective, and before the command's
module (torch, Megatron, DeepSpeed) is imported: a bad key fails in a
fraction of a second. A distributed command then starts the process groups
and runs ``command(args, cfg, env, device)`` of its module, whose returned
record rank 0 prints as one JSON line; a local command runs
``command(args, cfg)`` in one process.
A module's ``prepare(args, cfg)`` (``apbv infer``: read and validate the
request file) runs on every rank right after the config, before any
collective; what it returns is ``args.prepared``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # provides command(...) and, optionally, add_arguments(parser) and prepare(args, cfg)
    help: str
    distributed: bool = True
    data_parallel: bool = False  # serves DP > 1 replicas; the others answer one prompt with one APB-V group

    def epilog(self, name: str) -> str:
        if not self.distributed:
            return "Runs in this one process (no launcher needed)."
        return (
            "A launcher starts one process per rank, and every rank runs this command; rank 0 prints one JSON\n"
            f"line on stdout. e.g.: torchrun --nproc_per_node 2 -m megatron_apbv {name} configs/tiny_cpu.yaml\n"
            "(DeepSpeed, SLURM and many nodes: launch/README.md)"
        )


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
    "config": Command("megatron_apbv.runtime.config_command", "print the resolved config as YAML (--schema: every key)", distributed=False),
}


def _parser(selected: str | None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's module is imported (for its own options)."""
    parser = argparse.ArgumentParser(
        prog="apbv", description="APB-V long-context inference on Megatron-core",
        epilog="apbv convert-gguf [GGUF] OUT_DIR: a Llama GGUF file -> a checkpoint folder for model.checkpoint",
    )
    # Launchers may append --local_rank / --local-rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name, help=command.help, description=command.help, epilog=command.epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny CPU model)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. apbv.variant=exact")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == selected:
            module = importlib.import_module(command.module)
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
    return parser


def _emit(record: dict, out) -> None:
    from megatron_apbv.runtime.numerics import NonFiniteError, non_finite_fields

    try:  # NaN / Infinity are not JSON: a reader would choke on them, or take NaN for a number
        line = json.dumps(record, allow_nan=False)
    except ValueError:
        raise NonFiniteError(
            f"the result's {', '.join(non_finite_fields(record))} is NaN or Infinity: not printed"
        ) from None
    # One write: with several ranks on one stdout, print()'s separate newline can interleave.
    out.write(line + "\n")
    out.flush()


@contextlib.contextmanager
def _stdout_for_results_only():
    """Yield a stream on the process's stdout; meanwhile everything else written there goes to stderr.

    Libraries print to stdout (DeepSpeed's logger and its op builds, compilers run through it), so
    stdout carries only the commands' results (``apbv ... | jq`` works) when fd 1 and ``sys.stdout``
    point at stderr for the run and results are written to a duplicate of the original fd 1.
    """
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "w")
    saved_stdout = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield results
    finally:
        sys.stdout.flush()
        results.flush()
        os.dup2(results.fileno(), 1)
        sys.stdout = saved_stdout
        results.close()


def _config_args(args, rest: list[str], parser) -> None:
    """Fold the ``key=value`` items argparse left in ``rest`` into ``args.overrides``."""
    # Overrides may follow options (`run cfg.yaml --compare dense a.b=1`): argparse leaves them in `rest`.
    unknown = [item for item in rest if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None


def _early_config_args(argv: list[str]):
    """``(config, overrides)`` read without the command's own options, or None where that is ambiguous.

    The command's options come from its module, which imports torch and Megatron; a ``key=value``
    right after an option might be that option's value, so then the config waits for the full parse.
    """
    if {"-h", "--help"} & set(argv):
        return None
    args, rest = _parser(None).parse_known_args(argv)
    after_command = argv[argv.index(args.command) + 1:]
    if args.config is not None and after_command[:1] != [args.config]:
        return None  # something before it (an option's value?) was taken for the config
    if any("=" in b and not b.startswith("-") and a.startswith("-") and "=" not in a for a, b in zip(rest, rest[1:])):
        return None
    config, overrides = args.config, args.overrides + [r for r in rest if "=" in r and not r.startswith("-")]
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    """``apbv ...``; returns the exit code. Ctrl-C / SIGTERM: one line per rank, exit 130 / 143."""
    from megatron_apbv.runtime.interrupts import interrupts_as_exceptions
    from megatron_apbv.runtime.launch_env import LaunchEnv

    with interrupts_as_exceptions() as interrupt:
        try:
            return _main(argv, interrupt)
        except KeyboardInterrupt:  # interrupted, or a peer's interruption surfacing as a collective failure
            pass
    sys.stderr.write(f"apbv: rank {LaunchEnv.from_environ().rank}: interrupted\n")
    if "torch.distributed" in sys.modules:
        # A signal during start-up can stop torch's own import half way: importing more of it (or using
        # a half-made process group) then raises from deep inside torch, which is no news to the user.
        with contextlib.suppress(Exception, KeyboardInterrupt):
            from megatron_apbv.runtime.distributed import shutdown

            shutdown(wait_for_peers=False)
    return interrupt.exit_code


def _main(argv: list[str] | None, interrupt) -> int:
    warnings.filterwarnings("ignore", module="megatron")  # Megatron warns at import about missing TE/apex
    argv_given = argv is not None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert-gguf"]:  # a file conversion: no config, no ranks
        from megatron_apbv.models.gguf_convert import main as convert_main

        return convert_main(argv[1:])
    selected = next((a for a in argv if a in COMMANDS), None)

    # Everything that can be wrong with the config is checked first: before any collective, and before
    # the heavy imports (torch, Megatron, DeepSpeed), so every rank reports a bad key within milliseconds.
    from megatron_apbv.runtime.config import ConfigError
    from megatron_apbv.runtime.launch_env import LaunchEnv
    from megatron_apbv.models.resolve import load_config

    env = LaunchEnv.from_environ()
    where = "apbv: " if selected in COMMANDS and not COMMANDS[selected].distributed else f"apbv: rank {env.rank}: "
    early = _early_config_args(argv) if selected in COMMANDS else None
    cfg = None
    if early is not None and not (selected == "config" and "--schema" in argv):
        try:
            cfg = load_config(*early)
        except ConfigError as err:
            print(f"{where}{err}", file=sys.stderr)
            return 2

    parser = _parser(selected)
    args, rest = parser.parse_known_args(argv)
    _config_args(args, rest, parser)
    # The command's options may have taken an item the early parse read as an override: then load again.
    cfg = cfg if early == (args.config, args.overrides) else None
    env = LaunchEnv.from_environ(local_rank=args.local_rank)
    if argv_given:  # called as a function (tests): results go to sys.stdout, nothing is redirected
        return _run(args, cfg, env, sys.stdout, interrupt)
    with _stdout_for_results_only() as results:
        return _run(args, cfg, env, results, interrupt)


def _run(args, cfg, env, results, interrupt) -> int:
    """Import the command's module and run it (``cfg``: the config, when loaded already); rank 0's record
    goes to ``results``."""
    from megatron_apbv.runtime.config import ConfigError
    from megatron_apbv.models.resolve import load_config

    command = COMMANDS[args.command]
    module = importlib.import_module(command.module)
    if not command.distributed:
        try:
            if cfg is None and not getattr(args, "schema", False):
                cfg = load_config(args.config, args.overrides)
            result = module.command(args, cfg)
        except ConfigError as err:
            print(f"apbv: {err}", file=sys.stderr)
            return 2
        if isinstance(result, str):
            results.write(result)  # `apbv config`: YAML is the result
        else:
            _emit(result, results)
        return 0

    from megatron_apbv.runtime.distributed import (
        init_distributed,
        select_device,
        shutdown,
    )
    from megatron_apbv.runtime.faults import report_failure

    try:
        cfg = cfg or load_config(args.config, args.overrides)
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
        args.store = init_distributed(cfg, env, device)  # the job's store (apbv infer's work queue)
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        shutdown(wait_for_peers=False)  # the ranks-agree check fails after the process group started
        return 2
    except Exception as err:  # a peer exited, hung or never joined: one line, non-zero exit, no hang
        if interrupt.signum is not None:
            raise KeyboardInterrupt from None
        code = report_failure(err, env.rank, cfg.parallel.timeout_seconds if cfg else None)
        shutdown(wait_for_peers=False)
        return code

    from megatron_apbv.models.hf_config import CheckpointError
    from megatron_apbv.models.video import VideoError
    from megatron_apbv.runtime.numerics import NonFiniteError
    from megatron_apbv.runtime.outputs import OutputError

    try:
        record = module.command(args, cfg, env, device)
        if env.rank == 0:
            _emit(record, results)
        shutdown()
    except (ConfigError, CheckpointError, VideoError) as err:  # bad input, found the same way on every rank
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, OutputError) as err:  # NaN / Inf on every rank; a full disk under an output
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a peer rank exited or hung mid-run: one line, non-zero exit, no hang
        if interrupt.signum is not None:  # this rank was interrupted too: the peer left for the same reason
            raise KeyboardInterrupt from None
        return report_failure(err, env.rank, cfg.parallel.timeout_seconds)
    finally:
        shutdown(wait_for_peers=False)  # after a failure a peer may be gone: no barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
