"""The ``fedlora-flwr`` console command: one subcommand per tool (``run``, ``grid``, ``report``,
``bench``), each with ``--help``.

``run`` is ``flwr run`` exiting with the run's status (``flwr run`` itself exits 0 whatever the
run did); the others drive many runs and their outputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fedlora_flwr import bench, grid, report, runner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora-flwr",
        description="FedLoRA on Flower: single runs with their exit status, experiment grids, reports, benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (runner, grid, report, bench):
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
