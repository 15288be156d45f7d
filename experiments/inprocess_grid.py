"""Run a grid spec (``experiments/grids/*.toml``) in this process, without Ray or a SuperLink.

The same run configs, run names and run folders as ``fedlora-flwr grid`` (the spec is expanded
and validated by :func:`fedlora_flwr.grid.load_spec`), but every run goes through the real
ServerApp and ClientApp functions over ``tests/inprocess.py``'s in-process Grid: clients train one
after the other in this process, which on a small CPU avoids Ray's start-up and per-message cost.
Finished runs are skipped; ``fedlora-flwr report OUT/<name>`` reads the folders as usual.
``--select REGEX`` runs a subset (e.g. two processes on disjoint subsets, ``--threads 1`` each).

Usage (from the repository root)::

    python experiments/inprocess_grid.py experiments/grids/robust-scaled-cpu.toml --out outputs/grids
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a grid spec (experiments/grids/*.toml)")
    parser.add_argument("--out", default="outputs/grids", help="folder of the experiment folders")
    parser.add_argument("--select", default="", help="only the runs whose name matches this regular expression")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(REPO / "tests"))
    from flwr.app import Context, RecordDict
    from flwr.common.logger import FLOWER_LOGGER
    from inprocess import InProcessGrid

    from fedlora_flwr import client_app, server_app
    from fedlora_flwr.grid import expand, load_spec

    spec = load_spec(args.spec)
    runs = [run for run in expand(spec, out_dir=args.out) if re.search(args.select, run.run_name)]
    for handler in FLOWER_LOGGER.handlers:
        handler.setLevel(logging.ERROR)
    failed = 0
    for number, run in enumerate(runs, 1):
        if run.finished:
            print(f"[{number}/{len(runs)}] skip {run.run_name} (finished)", flush=True)
            continue
        started = time.monotonic()
        grid = InProcessGrid(client_app.app, spec.experiment.num_clients, run.config)
        context = Context(run_id=number, node_id=0, node_config={}, state=RecordDict(), run_config=run.config)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                server_app.main(grid, context)
            status = "done"
        except Exception as err:  # noqa: BLE001 - a failed run is reported, the grid goes on
            status, failed = f"failed: {type(err).__name__}: {err}", failed + 1
        print(f"[{number}/{len(runs)}] {run.run_name} {status} in {time.monotonic() - started:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
