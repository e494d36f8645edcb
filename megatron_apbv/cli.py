"""Command line.

``apbv run CONFIG [key=value ...] [--compare dense]``: prefill, one JSON line.
``apbv generate CONFIG [key=value ...]``: prefill and decode, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apbv", description="APB-V long-context inference on Megatron-core")
    # Launchers may append --local_rank / --local-rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="prefill the configured model and prompt across the launched ranks")
    run.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny CPU model)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. apbv.variant=exact")
    run.add_argument("--compare", choices=["dense"], default=None, help="also run densely on one process")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    gen = sub.add_parser("generate", help="prefill, then decode over the distributed KV cache")
    gen.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny CPU model)")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. generate.max_new_tokens=32")
    gen.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may follow options (`run cfg.yaml --compare dense a.b=1`): argparse leaves them in `rest`.
    unknown = [item for item in rest if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    warnings.filterwarnings("ignore", module="megatron")  # Megatron warns at import about missing TE/apex

    # Everything that can be wrong with the config is checked here, before any collective.
    from megatron_apbv.config import ConfigError, load_config
    from megatron_apbv.distributed import LaunchEnv, init_distributed, select_device, shutdown
    from megatron_apbv.faults import install_fault_hook, report_failure

    env = LaunchEnv.from_environ()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        device = select_device(cfg, env)
        install_fault_hook()  # APBV_FAULT_INJECT (tests only): nothing is installed when unset
        init_distributed(cfg, env, device)
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        shutdown()  # the ranks-agree check fails after the process group started
        return 2
    except Exception as err:  # a peer exited, hung or never joined: one line, non-zero exit, no hang
        code = report_failure(err, env.rank, cfg.parallel.timeout_seconds if cfg else None)
        shutdown()
        return code

    from megatron_apbv.generate import apbv_generate
    from megatron_apbv.prefill import run_prefill

    try:
        if args.command == "generate":
            record = {"world_size": env.world_size, **apbv_generate(cfg, device)}
        else:
            record = run_prefill(cfg, env, device, compare=args.compare)
        if env.rank == 0:
            # One write: with several ranks on one stdout, print()'s separate newline can interleave.
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a peer rank exited or hung mid-run: one line, non-zero exit, no hang
        return report_failure(err, env.rank, cfg.parallel.timeout_seconds)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
