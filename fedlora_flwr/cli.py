"""The ``fedlora-flwr`` console command: one subcommand per tool (``grid``, ``report``, ``bench``), each with ``--help``.

Single runs use Flower's own ``flwr run``; this command drives many of them and their outputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fedlora_flwr import bench, grid, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora-flwr",
        description="FedLoRA on Flower: experiment grids, reports and benchmarks (single runs: `flwr run .`).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (grid, report, bench):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run the subcommand and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error (argparse already printed it)
        return exit_.code if isinstance(exit_.code, int) else 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
