"""Load run folders into pandas: the one way report, grid and bench read results.

The folders follow the output contract (docs/concepts/outputs.md).

>>> from fedlora_flwr import load_runs, load_client_accuracies
>>> df = load_runs("outputs/grids/table1-cpu")           # a run, a grid, or a folder of grids
>>> df[df.status == "finished"].groupby(["method", "round"]).acc_mean.mean()

A *run folder* is a folder holding ``config.json``; its subfolders (clients' state) are not
searched. ``metrics.jsonl`` holds one row per recorded round (absent: none yet) and
``summary.json`` is written when the run ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["RunsError", "find_run_dirs", "load_client_accuracies", "load_runs", "read_run"]

#: Columns of :func:`load_runs` that are neither config keys nor metrics.
META_COLUMNS = ("run", "run_dir", "status")
#: summary.json fields repeated from config.json (the config's value is the column).
SUMMARY_DUPLICATES = frozenset({"method", "dataset", "alpha", "seed", "model", "partition", "run_dir", "status"})
#: metrics.jsonl fields that are not one number per round: ``acc_per_client`` is
#: :func:`load_client_accuracies`'s; ``acc_per_group`` becomes ``acc_per_group.<group>`` columns.
NESTED_METRICS = ("acc_per_client", "acc_per_group", "participants")


class RunsError(ValueError):
    """A run folder cannot be read; the message is one line naming the file."""


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunsError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise RunsError(f"{path}: not a JSON object")
    return value


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``config.json``, ``summary.json`` (None if absent) and ``metrics.jsonl`` rows of a run folder.

    Raises
    ------
    RunsError
        A file is unreadable or malformed (a row that is not a JSON object with an integer ``round``).
    """
    run_dir = Path(run_dir)
    config = _json_object(run_dir / "config.json")
    summary = _json_object(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    path = run_dir / "metrics.jsonl"
    rows = []
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunsError(f"{path} line {number}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RunsError(f"{path} line {number}: not an object with an integer 'round'")
        rows.append(row)
    return config, summary, rows


def find_run_dirs(path: str | Path) -> list[Path]:
    """Every run folder under ``path`` (``path`` itself included), sorted.

    Raises
    ------
    RunsError
        ``path`` is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunsError(f"{path}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        if "config.json" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a run folder's subfolders are its clients' state
        dirnames.sort()
    return sorted(found)


def _status(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "unfinished"
    return str(summary.get("status", "finished"))  # no status: written by a finished run before it existed


def _records(run_dir: Path, config: dict[str, Any], summary: dict[str, Any] | None,
             rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    meta = {"run": run_dir.name, "run_dir": str(run_dir.resolve()), "status": _status(summary)}
    fields = {key: value for key, value in config.items() if key != "run-dir"}
    fields.update({key: value for key, value in (summary or {}).items() if key not in SUMMARY_DUPLICATES})
    out = []
    for row in rows or [{"round": None}]:
        record = {**meta, **fields}
        record.update({key: value for key, value in row.items() if key not in NESTED_METRICS})
        for group, acc in (row.get("acc_per_group") or {}).items():
            record[f"acc_per_group.{group}"] = acc
        out.append(record)
    return out


def load_runs(path: str | Path) -> pd.DataFrame:
    """Every run under ``path``: one row per run × recorded round.

    Parameters
    ----------
    path
        A run folder, a grid folder or any folder above them (searched recursively).

    Returns
    -------
    pandas.DataFrame
        Columns: ``run`` (folder name), ``run_dir`` (absolute path), ``status`` (``finished``,
        ``failed`` or ``unfinished``: no ``summary.json`` yet); every ``config.json`` key under its
        kebab-case name (``method``, ``seed``, ``num-server-rounds``, …); the ``summary.json`` fields
        (``num_clients``, ``best_acc_mean``, ``best_round``, ``final_acc_mean``, ``wall_seconds``,
        ``failure``, ``reason``, … ; missing before the run ends); and the ``metrics.jsonl`` fields
        of the round (``round``, ``acc_mean``, ``bytes_up``, … ; ``acc_per_group.<group>`` for a
        ``model-family`` run; ``participants`` is left out). Per-client accuracies (``acc_per_client``):
        :func:`load_client_accuracies`. A run that
        recorded no round has one row with ``round`` missing. Sorted by ``run_dir`` and ``round``;
        ``attrs["config_columns"]`` lists the config keys.

    Raises
    ------
    RunsError
        ``path`` is not a folder, or a file of a run folder is unreadable (one line naming it).
    """
    records: list[dict[str, Any]] = []
    config_keys: set[str] = set()
    for run_dir in find_run_dirs(path):
        config, summary, rows = read_run(run_dir)
        config_keys.update(key for key in config if key != "run-dir")
        records += _records(run_dir, config, summary, rows)
    frame = pd.DataFrame.from_records(records, columns=None if records else [*META_COLUMNS, "round"])
    frame["round"] = frame["round"].astype("Int64")
    frame = frame.sort_values(["run_dir", "round"], kind="stable", ignore_index=True)
    frame.attrs["config_columns"] = sorted(config_keys)
    return frame


def load_client_accuracies(path: str | Path) -> pd.DataFrame:
    """Per-client test accuracy in long form: one row per run × round × client.

    Returns
    -------
    pandas.DataFrame
        Columns ``run``, ``run_dir``, ``round``, ``client`` (partition id, int) and ``acc`` (0..1;
        missing for a client that did not answer), from ``acc_per_client`` of ``metrics.jsonl``.
    """
    records = [
        {"run": run_dir.name, "run_dir": str(run_dir.resolve()), "round": row["round"], "client": int(client), "acc": acc}
        for run_dir in find_run_dirs(path)
        for row in read_run(run_dir)[2]
        for client, acc in (row.get("acc_per_client") or {}).items()
    ]
    frame = pd.DataFrame.from_records(records, columns=["run", "run_dir", "round", "client", "acc"])
    return frame.astype({"acc": float}).sort_values(["run_dir", "round", "client"], ignore_index=True)
