"""Command line: ``apbv run CONFIG [key=value ...] [--compare dense]``."""

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

    env = LaunchEnv.from_environ()
    try:
        cfg = load_config(args.config, args.overrides)
        device = select_device(cfg, env)
        init_distributed(cfg, env, device)
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 2

    from megatron_apbv.prefill import run_prefill

    try:
        record = run_prefill(cfg, env, device, compare=args.compare)
        if env.rank == 0:
            # One write: with several ranks on one stdout, print()'s separate newline can interleave.
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
    except ConfigError as err:
        print(f"apbv: rank {env.rank}: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
