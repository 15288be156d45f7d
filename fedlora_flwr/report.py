"""Reports: finished run folders -> the paper's table layout (Markdown + CSV) and PNG plots.

``fedlora-flwr report ROOT [--spec SPEC.toml] [--out DIR]`` reads every run folder under ROOT
(DESIGN.md §4: ``config.json``, ``metrics.jsonl``, ``summary.json``; folders without
``summary.json`` are unfinished and skipped) and writes to ``--out`` (default ``ROOT/report``):

- ``table.md`` / ``table.csv``: one row per configuration, mean ± std over its seeds of
  ``best_acc_mean`` × 100 (the paper's metric: best mean client accuracy), the paper's number
  beside it and ``diff = ours − paper``; ``table.md`` adds the accuracy per client group
  (``acc_per_group``: per architecture of a ``model-family`` run) when runs recorded it;
- ``curves.png`` (mean client accuracy per round), ``per_client.png`` (the paper's Fig. 7),
  ``partition.png`` (Fig. 5, recomputed from ``config.json``), ``distance.png`` (Fig. 6:
  distance of the clients' σ_i to σ̄), ``bytes.png`` (bytes uploaded per round), ``privacy.png``
  (ε per round, ``dp_epsilon``; only when a run used DP).

Rows: runs are grouped by their ``config.json`` without the keys of :data:`IGNORED_KEYS`
(seed, names, paths, device), plus ``num-clients`` from ``summary.json`` (the simulation size
is not a run-config key). A row is labelled by method, dataset and alpha, and by every other
key that differs between the rows.

Paper numbers: the ``[[paper]]`` tables of an experiment spec (``--spec``), each a few config
keys plus ``acc`` and ``std`` (%), e.g. ``{method = "fedlora", dataset = "cifar10", alpha = 0.1,
acc = 85.47, std = 2.06}``. An entry matches a row when every config key it names equals the
row's value (the most specific match wins); rows no spec entry matches fall back to the
built-in Table 1 numbers (:data:`PAPER_TABLE1`, matched on method, dataset and alpha only).
``dataset = "npz"`` with a ``cifar10*.npz`` data file counts as ``cifar10`` for matching.

Plotting uses matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no display.
Not here: TensorBoard export of the per-round metrics (``torch.utils.tensorboard`` needs the
``tensorboard`` package, which is not a dependency).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
import textwrap
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_flwr.config import OPERATIONAL_KEYS

__all__ = [
    "IGNORED_KEYS",
    "PAPER_SOURCE",
    "PAPER_TABLE1",
    "Group",
    "Report",
    "ReportError",
    "Run",
    "find_runs",
    "group_runs",
    "load_paper_spec",
    "load_runs",
    "main",
    "make_report",
    "register",
]


class ReportError(ValueError):
    """The report cannot be made (missing folder, no finished runs, bad spec): one line."""


# --------------------------------------------------------------------------- #
# The paper's numbers: the one place they live.
# --------------------------------------------------------------------------- #

PAPER_SOURCE = (
    "FedLoRA paper (../shared/papers/fedlora.txt), Table 1: Dirichlet non-IID, N = 40 clients, "
    "T = 300 rounds, E = 5, ResNet-8 (CIFAR-10) / ResNet-10 (CIFAR-100, Tiny ImageNet), FedLoRA at its best "
    "(R_c, R_l); mean ± std over 3 seeds"
)

#: Table 1 of the FedLoRA paper (best mean client accuracy, %, mean and std over 3 seeds),
#: keyed on (method, dataset, alpha). The extracted text garbles two row labels ("To JA" is the
#: FedAvg row, "Lagal" is "Local"); each row is a line of means followed by a line of "± std".
PAPER_TABLE1: dict[tuple[str, str, float], tuple[float, float]] = {
    ("fedavg", "cifar10", 0.1): (60.39, 1.46),
    ("fedavg", "cifar10", 0.5): (60.41, 1.36),
    ("fedavg", "cifar10", 1.0): (60.91, 0.72),
    ("local", "cifar10", 0.1): (81.91, 3.09),
    ("local", "cifar10", 0.5): (60.15, 0.86),
    ("local", "cifar10", 1.0): (52.24, 0.41),
    ("fedlora", "cifar10", 0.1): (85.47, 2.06),
    ("fedlora", "cifar10", 0.5): (72.78, 1.23),
    ("fedlora", "cifar10", 1.0): (69.09, 1.14),
    ("fedavg", "cifar100", 0.1): (34.91, 0.86),
    ("fedavg", "cifar100", 0.5): (32.78, 0.23),
    ("fedavg", "cifar100", 1.0): (33.94, 0.39),
    ("local", "cifar100", 0.1): (47.61, 0.96),
    ("local", "cifar100", 0.5): (22.65, 0.51),
    ("local", "cifar100", 1.0): (18.76, 0.63),
    ("fedlora", "cifar100", 0.1): (63.65, 0.53),
    ("fedlora", "cifar100", 0.5): (45.96, 1.19),
    ("fedlora", "cifar100", 1.0): (42.98, 0.64),
    ("fedavg", "tiny-imagenet", 0.1): (21.26, 1.28),
    ("fedavg", "tiny-imagenet", 0.5): (20.32, 0.91),
    ("fedavg", "tiny-imagenet", 1.0): (17.20, 0.54),
    ("local", "tiny-imagenet", 0.1): (24.07, 0.62),
    ("local", "tiny-imagenet", 0.5): (8.75, 0.30),
    ("local", "tiny-imagenet", 1.0): (6.87, 0.28),
    ("fedlora", "tiny-imagenet", 0.1): (44.22, 0.55),
    ("fedlora", "tiny-imagenet", 0.5): (28.25, 1.24),
    ("fedlora", "tiny-imagenet", 1.0): (25.55, 0.13),
    ("fedamp", "cifar10", 0.1): (84.99, 1.82),
    ("fedamp", "cifar10", 0.5): (68.26, 0.79),
    ("fedamp", "cifar10", 1.0): (64.87, 0.95),
    ("fedamp", "cifar100", 0.1): (46.68, 1.06),
    ("fedamp", "cifar100", 0.5): (24.74, 0.58),
    ("fedamp", "cifar100", 1.0): (18.22, 0.41),
    ("fedamp", "tiny-imagenet", 0.1): (27.85, 0.71),
    ("fedamp", "tiny-imagenet", 0.5): (10.70, 0.32),
    ("fedamp", "tiny-imagenet", 1.0): (7.13, 0.21),
    ("fedrep", "cifar10", 0.1): (84.59, 1.58),
    ("fedrep", "cifar10", 0.5): (67.69, 0.86),
    ("fedrep", "cifar10", 1.0): (60.52, 0.72),
    ("fedrep", "cifar100", 0.1): (51.25, 1.37),
    ("fedrep", "cifar100", 0.5): (26.97, 0.33),
    ("fedrep", "cifar100", 1.0): (20.63, 0.42),
    ("fedrep", "tiny-imagenet", 0.1): (30.83, 1.05),
    ("fedrep", "tiny-imagenet", 0.5): (12.14, 0.28),
    ("fedrep", "tiny-imagenet", 1.0): (8.37, 0.25),
    ("fedbn", "cifar10", 0.1): (83.55, 2.32),
    ("fedbn", "cifar10", 0.5): (66.79, 1.08),
    ("fedbn", "cifar10", 1.0): (62.20, 0.67),
    ("fedbn", "cifar100", 0.1): (54.35, 0.63),
    ("fedbn", "cifar100", 0.5): (36.94, 0.94),
    ("fedbn", "cifar100", 1.0): (33.67, 0.12),
    ("fedbn", "tiny-imagenet", 0.1): (33.34, 0.71),
    ("fedbn", "tiny-imagenet", 0.5): (19.61, 0.35),
    ("fedbn", "tiny-imagenet", 1.0): (16.57, 0.44),
    ("fedper", "cifar10", 0.1): (84.43, 0.47),
    ("fedper", "cifar10", 0.5): (68.80, 0.49),
    ("fedper", "cifar10", 1.0): (64.92, 0.66),
    ("fedper", "cifar100", 0.1): (51.38, 0.94),
    ("fedper", "cifar100", 0.5): (28.25, 1.03),
    ("fedper", "cifar100", 1.0): (21.53, 0.50),
    ("fedper", "tiny-imagenet", 0.1): (32.33, 0.31),
    ("fedper", "tiny-imagenet", 0.5): (12.69, 0.42),
    ("fedper", "tiny-imagenet", 1.0): (8.67, 0.40),
    ("fedrod", "cifar10", 0.1): (86.23, 2.12),
    ("fedrod", "cifar10", 0.5): (72.34, 1.77),
    ("fedrod", "cifar10", 1.0): (68.45, 1.94),
    ("fedrod", "cifar100", 0.1): (60.19, 0.64),
    ("fedrod", "cifar100", 0.5): (38.54, 1.12),
    ("fedrod", "cifar100", 1.0): (33.67, 0.48),
    ("fedrod", "tiny-imagenet", 0.1): (44.25, 0.40),
    ("fedrod", "tiny-imagenet", 0.5): (27.02, 0.64),
    ("fedrod", "tiny-imagenet", 1.0): (22.07, 0.79),
    ("pfedsd", "cifar10", 0.1): (86.34, 2.61),
    ("pfedsd", "cifar10", 0.5): (71.97, 2.07),
    ("pfedsd", "cifar10", 1.0): (67.21, 1.89),
    ("pfedsd", "cifar100", 0.1): (54.14, 0.77),
    ("pfedsd", "cifar100", 0.5): (41.06, 0.83),
    ("pfedsd", "cifar100", 1.0): (38.27, 0.20),
    ("pfedsd", "tiny-imagenet", 0.1): (39.31, 0.19),
    ("pfedsd", "tiny-imagenet", 0.5): (19.25, 1.80),
    ("pfedsd", "tiny-imagenet", 1.0): (15.91, 0.33),
    ("pfedgate", "cifar10", 0.1): (87.25, 1.91),
    ("pfedgate", "cifar10", 0.5): (71.98, 1.61),
    ("pfedgate", "cifar10", 1.0): (67.85, 0.87),
    ("pfedgate", "cifar100", 0.1): (48.54, 0.39),
    ("pfedgate", "cifar100", 0.5): (27.47, 0.79),
    ("pfedgate", "cifar100", 1.0): (22.98, 0.03),
    ("pfedgate", "tiny-imagenet", 0.1): (37.59, 0.39),
    ("pfedgate", "tiny-imagenet", 0.5): (24.09, 0.67),
    ("pfedgate", "tiny-imagenet", 1.0): (19.69, 0.14),
    ("fedcac", "cifar10", 0.1): (86.82, 1.18),
    ("fedcac", "cifar10", 0.5): (69.83, 0.46),
    ("fedcac", "cifar10", 1.0): (65.39, 0.51),
    ("fedcac", "cifar100", 0.1): (57.22, 1.52),
    ("fedcac", "cifar100", 0.5): (38.64, 0.63),
    ("fedcac", "cifar100", 1.0): (32.59, 0.32),
    ("fedcac", "tiny-imagenet", 0.1): (40.19, 1.20),
    ("fedcac", "tiny-imagenet", 0.5): (23.70, 0.28),
    ("fedcac", "tiny-imagenet", 1.0): (18.58, 0.62),
}

#: Keys of a ``[[paper]]`` entry that are not config keys.
PAPER_META_KEYS = frozenset({"acc", "std", "source", "note", "table"})

#: config.json keys that do not define an experiment: runs that differ only here are seeds of one
#: row. The seed, ``run-dir`` (written by the recorder) and the keys the config marks as not
#: changing results (``fedlora_flwr.config.OPERATIONAL_KEYS``: where a run writes, how long it
#: waits, what it logs, resume, fused evaluation).
IGNORED_KEYS = frozenset({"seed", "run-dir", *OPERATIONAL_KEYS})

#: Always part of a row's label, in this order.
LABEL_KEYS = ("method", "dataset", "alpha")

#: The paper's column order of methods; others follow alphabetically.
METHOD_ORDER = ("fedavg", "fedavg-lora", "local", "local-lora", "fedlora")

REQUIRED_FILES = ("config.json", "metrics.jsonl", "summary.json")


# --------------------------------------------------------------------------- #
# Loading runs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class Run:
    """One finished run folder."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("method", self.summary.get("method")))

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.summary.get("seed"))

    @property
    def best_acc(self) -> float | None:
        value = self.summary.get("best_acc_mean")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def num_clients(self) -> int:
        return int(self.summary.get("num_clients") or 0)

    def series(self, key: str) -> dict[int, float]:
        """``key`` per round from metrics.jsonl (missing and null values left out)."""
        out = {}
        for record in self.metrics:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[int(record["round"])] = float(value)
        return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_run(path: Path) -> Run:
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise ValueError("config.json and summary.json must hold JSON objects")
    metrics = []
    for number, line in enumerate((path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"metrics.jsonl line {number}: {exc}") from None
            if not isinstance(record, dict) or "round" not in record:
                raise ValueError(f"metrics.jsonl line {number}: not an object with a 'round'")
            metrics.append(record)
    # Older or hand-made folders: the summary names what the config may lack.
    for key in ("method", "dataset", "alpha", "seed"):
        if key not in config and key in summary:
            config[key] = summary[key]
    return Run(path=path, config=config, summary=summary, metrics=sorted(metrics, key=lambda r: r["round"]))


def find_runs(root: str | Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run folder under ``root`` (recursively, ``root`` included): the finished runs, and
    the skipped folders with why (unfinished: no summary.json; failed: its summary.json says so;
    or unreadable).

    A folder is a run folder when it holds ``summary.json`` or both ``config.json`` and
    ``metrics.jsonl``; its subfolders (``clients/``) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder")
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        names = set(filenames)
        if "summary.json" not in names and not {"config.json", "metrics.jsonl"} <= names:
            dirnames.sort()
            continue
        dirnames[:] = []  # a run folder's subfolders are its clients' state
        path = Path(dirpath)
        missing = [name for name in REQUIRED_FILES if name not in names]
        if missing:
            why = "unfinished (no summary.json)" if missing == ["summary.json"] else f"missing {', '.join(missing)}"
            skipped.append((path, why))
            continue
        try:
            run = _read_run(path)
        except (OSError, ValueError) as exc:
            skipped.append((path, f"unreadable ({exc})"))
            continue
        status = run.summary.get("status", "finished")  # fedlora_flwr.results: no status = finished before it existed
        if status != "finished":
            skipped.append((path, f"{status} ({run.summary.get('failure')}: {run.summary.get('reason')})"))
            continue
        runs.append(run)
    runs.sort(key=lambda run: str(run.path))
    skipped.sort(key=lambda item: str(item[0]))
    return runs, skipped


def load_runs(root: str | Path, echo: Callable[[str], None] = print) -> list[Run]:
    """The finished runs under ``root``; says (through ``echo``) how many folders were skipped."""
    runs, skipped = find_runs(root)
    _echo_skipped(skipped, echo)
    return runs


def _echo_skipped(skipped: Sequence[tuple[Path, str]], echo: Callable[[str], None]) -> None:
    if skipped:
        echo(f"skipped {len(skipped)} run folder(s) that are not finished runs:")
        for path, why in skipped:
            echo(f"  {path}: {why}")


# --------------------------------------------------------------------------- #
# Groups (table rows) and paper numbers
# --------------------------------------------------------------------------- #


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def experiment_config(run: Run) -> dict[str, Any]:
    """What defines ``run``'s row: config.json minus :data:`IGNORED_KEYS`, plus num-clients;
    ``model`` is shown as the family in a ``model-family`` run (where it is unused)."""
    config = {key: value for key, value in run.config.items() if key not in IGNORED_KEYS}
    if config.get("model-family"):
        config["model"] = config["model-family"]
    config.setdefault("num-clients", run.num_clients)
    return config


def paper_dataset(config: Mapping[str, Any]) -> str:
    """The paper's name for a run's dataset: ``npz`` with a ``cifar10*.npz`` file is CIFAR-10."""
    dataset = str(config.get("dataset", ""))
    if dataset == "npz":
        stem = Path(str(config.get("data-dir", ""))).stem.lower().replace("-", "").replace("_", "")
        if stem.startswith("cifar100"):
            return "cifar100"
        if stem.startswith("cifar10"):
            return "cifar10"
    return dataset


@dataclass(eq=False)
class Group:
    """One table row: the runs (seeds) of one configuration."""

    config: dict[str, Any]
    runs: list[Run]
    paper: dict[str, Any] | None = None
    paper_datasets: set[str] = field(default_factory=set)

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def accs(self) -> list[float]:
        """``best_acc_mean`` × 100 of the runs that have one, in seed order."""
        return [run.best_acc * 100.0 for run in self.runs if run.best_acc is not None]

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.accs)) if self.accs else None

    @property
    def std(self) -> float | None:
        """Population standard deviation (numpy ``ddof=0``) over the seeds."""
        return float(np.std(self.accs, ddof=0)) if self.accs else None

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.paper is None:
            return None
        return self.mean - float(self.paper["acc"])

    @property
    def first_run(self) -> Run:
        return self.runs[0]


def _sort_value(value: Any) -> tuple:
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0, str(value))


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def group_runs(runs: Iterable[Run]) -> tuple[list[Group], list[str]]:
    """Runs grouped into rows (sorted: dataset, alpha, other label keys, method in the paper's
    order; runs in a row by seed), and the label keys: method, dataset, alpha and every other
    key whose value differs between rows."""
    by_key: dict[tuple, Group] = {}
    for run in runs:
        config = experiment_config(run)
        key = tuple(sorted((k, _hashable(v)) for k, v in config.items()))
        group = by_key.setdefault(key, Group(config=config, runs=[]))
        group.runs.append(run)
        group.paper_datasets.add(paper_dataset(run.config))
    groups = list(by_key.values())
    for group in groups:
        group.runs.sort(key=lambda run: (_sort_value(run.seed), str(run.path)))
    keys = sorted({k for group in groups for k in group.config})
    varying = [
        k for k in keys
        if k not in LABEL_KEYS and len({_hashable(group.config.get(k, "—")) for group in groups}) > 1
    ]
    label_keys = [*LABEL_KEYS, *varying]
    groups.sort(
        key=lambda g: (
            _sort_value(g.config.get("dataset")),
            _sort_value(g.config.get("alpha")),
            *(_sort_value(g.config.get(k)) for k in varying),
            _method_rank(g.method),
        )
    )
    return groups, label_keys


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _entry_matches(entry: Mapping[str, Any], group: Group) -> bool:
    for key, want in entry.items():
        if key in PAPER_META_KEYS:
            continue
        if key == "dataset":
            if not (_same(want, group.config.get("dataset")) or want in group.paper_datasets):
                return False
        elif key not in group.config or not _same(want, group.config[key]):
            return False
    return True


def builtin_paper_entries() -> list[dict[str, Any]]:
    """:data:`PAPER_TABLE1` as ``[[paper]]``-style entries."""
    return [
        {"method": m, "dataset": d, "alpha": a, "acc": acc, "std": std, "source": "paper Table 1"}
        for (m, d, a), (acc, std) in PAPER_TABLE1.items()
    ]


def load_paper_spec(path: str | Path) -> list[dict[str, Any]]:
    """The ``[[paper]]`` entries of an experiment spec (TOML); other tables are ignored."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ReportError(f"--spec: cannot read {path} ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"--spec: {path} is not valid TOML ({exc})") from None
    entries = data.get("paper", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ReportError(f"--spec: {path}: 'paper' must be an array of tables ([[paper]])")
    for number, entry in enumerate(entries, 1):
        acc, std = entry.get("acc"), entry.get("std")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool):
            raise ReportError(f"--spec: {path}: [[paper]] entry {number} needs a number 'acc' (in %)")
        if std is not None and (not isinstance(std, (int, float)) or isinstance(std, bool)):
            raise ReportError(f"--spec: {path}: [[paper]] entry {number}: 'std' must be a number (in %)")
        if not set(entry) - PAPER_META_KEYS:
            raise ReportError(f"--spec: {path}: [[paper]] entry {number} names no config key to match")
        entry["source"] = f"spec {path.name}"
    return entries


def attach_paper(groups: Sequence[Group], spec_entries: Sequence[Mapping[str, Any]] = ()) -> None:
    """Set each group's ``paper`` entry: the most specific matching spec entry, else the
    built-in Table 1 entry for its (method, dataset, alpha), else None."""
    builtin = builtin_paper_entries()
    for group in groups:
        group.paper = None
        for entries in (spec_entries, builtin):
            matches = [e for e in entries if _entry_matches(e, group)]
            if matches:
                group.paper = dict(max(matches, key=lambda e: len(set(e) - PAPER_META_KEYS)))
                break


# --------------------------------------------------------------------------- #
# Table and ordering
# --------------------------------------------------------------------------- #


def _fmt_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(group: Group, key: str) -> str:
    """A row's value of ``key`` for people: ``npz (cifar10)`` when the npz file is CIFAR-10."""
    text = _fmt_value(group.config.get(key))
    if key == "dataset" and len(group.paper_datasets) == 1:
        (alias,) = group.paper_datasets
        if alias != text:
            text += f" ({alias})"
    return text


def _fmt_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _fmt_num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table_rows(groups: Sequence[Group], label_keys: Sequence[str]) -> list[dict[str, str]]:
    """One CSV row per group (numbers in %, 4 decimals; empty where unknown)."""
    rows = []
    for group in groups:
        row = {key: _fmt_value(group.config.get(key)) for key in label_keys}
        paper = group.paper or {}
        row.update(
            n=str(len(group.accs)),
            seeds=" ".join(str(seed) for seed in group.seeds),
            values=" ".join(f"{acc:.4f}" for acc in group.accs),
            mean=_fmt_num(group.mean),
            std=_fmt_num(group.std),
            paper=_fmt_num(paper.get("acc"), 2),
            paper_std=_fmt_num(paper.get("std"), 2),
            diff=_fmt_num(group.diff),
            paper_source=str(paper.get("source", "")),
            runs=" ".join(run.name for run in group.runs),
        )
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def markdown_table(groups: Sequence[Group], label_keys: Sequence[str]) -> str:
    header = [*label_keys, "n", "ours (%)", "paper (%)", "diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for group in groups:
        paper = group.paper
        cells = [_cell(group, key) for key in label_keys]
        cells += [
            str(len(group.accs)),
            _fmt_pm(group.mean, group.std),
            _fmt_pm(float(paper["acc"]), paper.get("std")) if paper else "—",
            f"{group.diff:+.2f}" if group.diff is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_accuracies(run: Run) -> dict[str, float]:
    """``acc_per_group`` × 100 (e.g. per architecture of a ``model-family`` run) at the run's best round."""
    best_round = run.summary.get("best_round")
    record = next((r for r in run.metrics if r.get("round") == best_round), None)
    return {str(k): float(v) * 100 for k, v in ((record or {}).get("acc_per_group") or {}).items() if v is not None}


def group_accuracy_table(groups: Sequence[Group], label_keys: Sequence[str]) -> str | None:
    """Mean ± std over seeds of each client group's accuracy at the best round, one column per
    group; None when no run recorded groups."""
    per_row = [[group_accuracies(run) for run in g.runs] for g in groups]
    names = sorted({name for runs in per_row for accs in runs for name in accs})
    if not names:
        return None
    header = [*label_keys, *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for group, runs in zip(groups, per_row, strict=True):
        cells = [_cell(group, key) for key in label_keys]
        for name in names:
            values = [accs[name] for accs in runs if name in accs]
            cells.append(_fmt_pm(float(np.mean(values)), float(np.std(values))) if values else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def common_settings(groups: Sequence[Group], label_keys: Sequence[str]) -> str:
    """The keys every row shares, as ``key=value`` (the setup behind the whole table)."""
    keys = sorted({k for g in groups for k in g.config} - set(label_keys))
    return ", ".join(f"{k}={_fmt_value(groups[0].config.get(k))}" for k in keys)


def _cluster_key(group: Group) -> tuple:
    return tuple(sorted((k, _hashable(v)) for k, v in group.config.items() if k != "method"))


def method_clusters(groups: Sequence[Group]) -> list[list[Group]]:
    """Groups that differ by method alone, in row order."""
    clusters: dict[tuple, list[Group]] = {}
    for group in groups:
        clusters.setdefault(_cluster_key(group), []).append(group)
    return list(clusters.values())


def _cluster_label(cluster: Sequence[Group], label_keys: Sequence[str]) -> str:
    return " ".join(f"{k}={_cell(cluster[0], k)}" for k in label_keys if k != "method")


def _order(items: Sequence[tuple[str, float]]) -> str:
    ranked = sorted(items, key=lambda item: -item[1])
    text = ranked[0][0]
    for (_, prev), (name, value) in itertools.pairwise(ranked):
        text += (" = " if round(prev, 2) == round(value, 2) else " > ") + name
    return text


def ordering_lines(groups: Sequence[Group], label_keys: Sequence[str]) -> list[str]:
    """For each set of rows that differ by method alone: our ranking of the methods by mean,
    the paper's ranking where it has every one of them, and whether the two agree."""
    lines = []
    for cluster in method_clusters(groups):
        ours = [(g.method, g.mean) for g in cluster if g.mean is not None]
        if len(ours) < 2:
            continue
        line = f"ordering [{_cluster_label(cluster, label_keys)}]: {_order(ours)}"
        papers = [(g.method, float(g.paper["acc"])) for g in cluster if g.mean is not None and g.paper]
        if len(papers) == len(ours):
            theirs = _order(papers)
            verdict = "holds" if theirs == _order(ours) else "differs"
            line += f" (paper: {theirs}) -> {verdict}"
        else:
            line += " (paper: n/a)"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #

MAX_PANELS = 6


def _figure(n_panels: int, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


@dataclass
class _Layout:
    """How rows become panels and lines: ``panels`` is [(panel title, rows)]."""

    color: Callable[[Group], Any]
    label: Callable[[Group], str]
    panels: list[tuple[str, list[Group]]]
    one_panel: bool

    def legend(self, ax, **kwargs) -> None:
        if self.one_panel:  # many lines: beside the plot, not over it
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize="small", **kwargs)


def _layout(groups: Sequence[Group], label_keys: Sequence[str]) -> _Layout:
    """One panel per set of rows that differ by method alone (a line per method, one color per
    method across panels), or, when there are more such sets than :data:`MAX_PANELS`, one
    panel with a line per row, labelled by the keys that differ between rows."""
    from matplotlib import colormaps

    clusters = method_clusters(groups)
    if len(clusters) <= MAX_PANELS:
        methods = sorted({g.method for g in groups}, key=_method_rank)
        cmap = colormaps["tab10"]
        color_of = {m: cmap(i % 10) for i, m in enumerate(methods)}
        panels = [(_cluster_label(c, label_keys), c) for c in clusters]
        return _Layout(lambda g: color_of[g.method], lambda g: g.method, panels, one_panel=False)
    cmap = colormaps["tab20"]
    index = {id(g): i for i, g in enumerate(groups)}
    shared = [k for k in label_keys if len({_cell(g, k) for g in groups}) == 1]
    differing = [k for k in label_keys if k not in shared]
    title = " ".join(f"{k}={_cell(groups[0], k)}" for k in shared) or "all rows"

    def label(g: Group) -> str:
        return " ".join(f"{k}={_cell(g, k)}" for k in differing)

    return _Layout(lambda g: cmap(index[id(g)] % 20), label, [(title, list(groups))], one_panel=True)


def _per_round(group: Group, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rounds, mean and std over the group's runs of ``key`` (NaN where no run has it)."""
    series = [run.series(key) for run in group.runs]
    rounds = np.array(sorted({r for s in series for r in s}), dtype=int)
    if not len(rounds):
        return rounds, np.array([]), np.array([]), 0
    values = np.array([[s.get(int(r), np.nan) for r in rounds] for s in series], dtype=float)
    with warnings.catch_warnings():  # all-NaN rounds stay NaN (a gap in the line)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
    return rounds, mean, std, len(series)


MARKERS = "os^Dv<>ph*"


def _style(index: int, n_points: int) -> dict[str, Any]:
    """A distinct marker per line (lines that coincide stay visible), about 15 marks per line."""
    return {"marker": MARKERS[index % len(MARKERS)], "markersize": 4, "markevery": max(1, n_points // 15)}


def _log_helps(values: Iterable[float], ratio: float = 20.0) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) > 1 and max(positive) / min(positive) > ratio


def _title(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch)."""
    fig.suptitle(textwrap.fill(text, width=max(30, int(fig.get_figwidth() * 11))))


def _rounds_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def plot_curves(groups, label_keys, path: Path) -> Path:
    layout = _layout(groups, label_keys)
    color, label, panels = layout.color, layout.label, layout.panels
    fig, axes = _figure(len(panels))
    for ax, (title, members) in zip(axes, panels):
        for i, g in enumerate(members):
            rounds, mean, std, n = _per_round(g, "acc_mean")
            if not len(rounds):
                continue
            ax.plot(rounds, mean * 100, color=color(g), label=f"{label(g)} (n={n})", **_style(i, len(rounds)))
            if n > 1:
                ax.fill_between(rounds, (mean - std) * 100, (mean + std) * 100, color=color(g), alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="round", ylabel="mean client test accuracy (%)")
        _rounds_axis(ax)
        ax.grid(alpha=0.3)
        layout.legend(ax)
    _title(fig, "Mean client accuracy per round (line: mean over seeds, band: ± std)")
    return _save(fig, path)


def plot_per_client(groups, label_keys, path: Path) -> Path:
    layout = _layout(groups, label_keys)
    color, label, panels = layout.color, layout.label, layout.panels
    fig, axes = _figure(len(panels), width=7.0)
    for ax, (title, members) in zip(axes, panels):
        shown = []
        for g in members:
            run = g.first_run
            best = run.summary.get("best_round")
            record = next((r for r in run.metrics if r.get("round") == best), None)
            per_client = (record or {}).get("acc_per_client") or {}
            if per_client:
                shown.append((g, run, best, {int(k): float(v) * 100 for k, v in per_client.items() if v is not None}))
        clients = sorted({c for *_, acc in shown for c in acc})
        width = 0.8 / max(1, len(shown))
        bars = len(clients) * len(shown) <= 240
        for i, (g, run, best, acc) in enumerate(shown):
            xs = np.array([c for c in clients if c in acc])
            ys = np.array([acc[c] for c in xs])
            name = f"{label(g)} (seed {run.seed}, round {best})"
            if bars:
                ax.bar(xs + (i - (len(shown) - 1) / 2) * width, ys, width=width, color=color(g), label=name)
            else:
                ax.plot(xs, ys, linewidth=0.8, color=color(g), label=name, **_style(i, len(xs)))
            ax.axhline(float(np.mean(ys)), color=color(g), linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="client (partition id)", ylabel="test accuracy at the best round (%)", ylim=(0, 120))
        if clients and len(clients) <= 50:
            ax.set_xticks(clients)
            ax.tick_params(axis="x", labelsize="x-small")
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
        layout.legend(ax, loc="upper center", ncols=min(3, max(1, len(shown))))  # above the 100% line
    _title(fig, "Per-client test accuracy at each run's best round, first seed (paper Fig. 7; dashed: mean)")
    return _save(fig, path)


def _series_figure(
    groups, label_keys, path: Path, key: str, scale: float, ylabel: str, title: str, total_unit: str | None = None
) -> Path:
    layout = _layout(groups, label_keys)
    color, label, panels = layout.color, layout.label, layout.panels
    fig, axes = _figure(len(panels))
    for ax, (panel_title, members) in zip(axes, panels):
        plotted = []
        for i, g in enumerate(members):
            rounds, mean, _, _ = _per_round(g, key)
            name = label(g)
            if not len(rounds) or not np.isfinite(mean).any():
                ax.plot([], [], color=color(g), label=f"{name} (not logged)")
                continue
            values = mean * scale
            finite = values[np.isfinite(values)]
            if np.all(finite == 0):
                name += " (all 0)"
            elif total_unit:
                name += f" (total {np.nansum(values):,.1f} {total_unit})"
            ax.plot(rounds, values, color=color(g), label=name, **_style(i, len(rounds)))
            plotted.extend(finite.tolist())
        if _log_helps(plotted):
            ax.set_yscale("log")
        elif plotted:
            ax.set_ylim(bottom=0, top=max(plotted) * 1.1 or 1.0)
        ax.set(title=panel_title, xlabel="round", ylabel=ylabel)
        _rounds_axis(ax)
        ax.grid(alpha=0.3, which="both")
        layout.legend(ax)
    _title(fig, title)
    return _save(fig, path)


def plot_distance(groups, label_keys, path: Path) -> Path:
    return _series_figure(
        groups, label_keys, path, "shared_distance", 1.0, r"mean L2 distance $\|\sigma_i - \bar{\sigma}\|$",
        "Distance of the clients' shared parameters to their average per round (paper Fig. 6; mean over seeds)",
    )


def plot_bytes(groups, label_keys, path: Path) -> Path:
    return _series_figure(
        groups, label_keys, path, "bytes_up", 1e-6, "bytes uploaded per round (MB)",
        "Bytes uploaded per round, all clients (mean over seeds)", total_unit="MB",
    )


def plot_epsilon(groups, label_keys, path: Path) -> Path:
    """ε at δ spent after each round (``dp_epsilon``, runs with dp-clip-norm > 0 and noise)."""
    return _series_figure(
        groups, label_keys, path, "dp_epsilon", 1.0, r"privacy spent $\varepsilon$ (at dp-delta)",
        "User-level DP of the shared update: ε after each round (RDP accountant; mean over seeds)",
    )


def _partition_config(run: Run):
    from fedlora_flwr.data import PartitionConfig

    c = run.config
    return PartitionConfig(
        num_clients=run.num_clients,
        scheme=str(c.get("partition", "dirichlet")),
        alpha=float(c.get("alpha", 0.5)),
        classes_per_client=int(c.get("classes-per-client", 2)),
        train_per_client=int(c.get("train-per-client", 500)),
        test_per_client=int(c.get("test-per-client", 100)),
        seed=int(c.get("seed", 1)),
    )


#: What torchvision needs under data-dir (the extracted folder or its archive), per dataset.
TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
}


def _missing_data(dataset: str, data_dir: str) -> str | None:
    """Why the data of a run cannot be read without downloading it (the report never downloads)."""
    names = TORCHVISION_FILES.get(dataset)
    if names and not any((Path(data_dir) / name).exists() for name in names):
        return f"neither {names[0]} nor {names[1]} under {data_dir} (the report does not download data)"
    if dataset == "npz" and not Path(data_dir).is_file():
        return f"no npz file at {data_dir}"
    return None


def plot_partition(groups, path: Path, echo: Callable[[str], None] = print) -> Path | None:
    """Fig. 5: samples per (client, class) of the training partition, recomputed with
    :func:`fedlora_flwr.data.partition_dataset` from the first seed's config of each distinct
    partition; None (and the reason echoed) when no dataset could be read."""
    from fedlora_flwr.data import load_dataset, partition_dataset

    wanted: dict[tuple, Run] = {}
    for g in groups:
        run = g.first_run
        c = run.config
        key = (c.get("dataset"), c.get("data-dir"), c.get("partition"), c.get("alpha"), c.get("classes-per-client"),
               c.get("train-per-client"), c.get("test-per-client"), run.num_clients)
        if key not in wanted or _sort_value(run.seed) < _sort_value(wanted[key].seed):
            wanted[key] = run
    panels = []
    for run in list(wanted.values()):
        if len(panels) == MAX_PANELS:
            echo(f"partition.png: only the first {MAX_PANELS} of {len(wanted)} distinct partitions are drawn")
            break
        c = run.config
        missing = _missing_data(str(c.get("dataset")), str(c.get("data-dir", "")))
        if missing:
            echo(f"partition.png: cannot recompute the partition of {run.name}: {missing}")
            continue
        try:
            cfg = _partition_config(run)
            ds = load_dataset(str(c.get("dataset")), str(c.get("data-dir", "")))
            splits = partition_dataset(str(c.get("dataset")), str(c.get("data-dir", "")), cfg)
        except Exception as exc:  # noqa: BLE001 -- DatasetError, OSError, ValueError...: say why, draw nothing fake
            echo(f"partition.png: cannot recompute the partition of {run.name} ({type(exc).__name__}: {exc})")
            continue
        counts = np.stack([np.bincount(ds.y_train[s.train], minlength=ds.num_classes) for s in splits])
        panels.append((run, cfg, counts))
    if not panels:
        echo("partition.png: skipped (no partition could be recomputed)")
        return None
    fig, axes = _figure(len(panels), width=5.0, height=max(3.5, 0.22 * max(p[2].shape[0] for p in panels) + 1.5))
    for ax, (run, cfg, counts) in zip(axes, panels):
        clients, classes = np.nonzero(counts)
        sizes = counts[clients, classes] / counts.max() * 250
        ax.scatter(classes, clients, s=sizes, color="tab:red", alpha=0.7, edgecolors="none")
        scheme = f"Dir(α={cfg.alpha:g})" if cfg.scheme == "dirichlet" else cfg.scheme
        dataset = str(run.config.get("dataset"))
        if paper_dataset(run.config) != dataset:
            dataset += f" ({paper_dataset(run.config)})"
        title = f"{dataset} {scheme}, seed {cfg.seed}\n{cfg.num_clients} clients, ≤{cfg.train_per_client} train samples each"
        ax.set(
            title=title,
            xlabel="class label", ylabel="client (partition id)",
            xlim=(-0.7, counts.shape[1] - 0.3), ylim=(counts.shape[0] - 0.3, -0.7),
        )
        if counts.shape[1] <= 20:
            ax.set_xticks(range(counts.shape[1]))
        if counts.shape[0] <= 50:
            ax.set_yticks(range(counts.shape[0]))
            ax.tick_params(axis="y", labelsize="x-small")
        ax.grid(alpha=0.2)
    _title(fig, "Training samples per client and class (paper Fig. 5; dot area ∝ count)")
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


@dataclass
class Report:
    groups: list[Group]
    label_keys: list[str]
    markdown: str
    ordering: list[str]
    files: list[Path]
    skipped_runs: list[tuple[Path, str]]
    notes: list[str]


def make_report(
    root: str | Path,
    out: str | Path | None = None,
    spec: str | Path | None = None,
    echo: Callable[[str], None] = print,
    plots: bool = True,
) -> Report:
    """Read the runs under ``root``, write the table and plots to ``out`` (default
    ``root/report``) and echo the table, the ordering lines and what was written."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    spec_entries = load_paper_spec(spec) if spec else []
    runs, skipped = find_runs(root)
    _echo_skipped(skipped, echo)
    if not runs:
        raise ReportError(f"no finished runs under {root} (a finished run folder holds {', '.join(REQUIRED_FILES)})")
    groups, label_keys = group_runs(runs)
    attach_paper(groups, spec_entries)
    notes = []
    for g in groups:
        missing = [run.name for run in g.runs if run.best_acc is None]
        if missing:
            notes.append(f"runs without any accuracy, left out of their row: {', '.join(missing)}")
        seeds = [str(s) for s in g.seeds]
        if len(set(seeds)) < len(seeds):
            notes.append(f"row {' '.join(_cell(g, k) for k in label_keys)} holds repeated seeds: {', '.join(seeds)}")

    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    ordering = ordering_lines(groups, label_keys)
    sources = sorted({str(g.paper.get("source")) for g in groups if g.paper})
    described = [
        f"built-in numbers from the {PAPER_SOURCE}, matched on method, dataset and alpha only, so "
        "our setup (the settings above) may differ from the paper's" if source == "paper Table 1"
        else f"[[paper]] entries of {source}"
        for source in sources
    ]
    footer = [
        (
            "ours: best mean client accuracy (`best_acc_mean` × 100) of each run; mean ± std over the n seeds "
            "of a row; std is the population standard deviation (numpy `ddof=0`; the paper does not say which "
            "it uses)."
        ),
        (
            f"rows: runs whose config.json agree on every key but {', '.join(sorted(IGNORED_KEYS))}; "
            "num-clients from summary.json."
        ),
        f"common to all rows: {common_settings(groups, label_keys)}.",
    ]
    if any(g.paper for g in groups):
        footer.append("paper: " + "; ".join(described) + ".")
        footer.append("diff = ours − paper (percentage points).")
    markdown = markdown_table(groups, label_keys) + "\n\n" + "\n\n".join(footer) + "\n"  # one paragraph each
    if ordering:
        markdown += "\n" + "\n".join(f"- {line}" for line in ordering) + "\n"
    per_group = group_accuracy_table(groups, label_keys)
    if per_group:
        markdown += ("\nAccuracy per client group (architecture of a `model-family` run; %, mean client accuracy of "
                     "the group at each run's best round, mean ± std over seeds):\n\n" + per_group + "\n")
    (out / "table.md").write_text(markdown, encoding="utf-8")
    write_csv(out / "table.csv", table_rows(groups, label_keys))
    files = [out / "table.md", out / "table.csv"]

    echo(markdown_table(groups, label_keys))
    for line in footer:
        echo(line)
    for line in ordering:
        echo(line)
    if per_group:
        echo(per_group)
    for note in notes:
        echo(f"note: {note}")

    if plots:
        files += [
            plot_curves(groups, label_keys, out / "curves.png"),
            plot_per_client(groups, label_keys, out / "per_client.png"),
            plot_distance(groups, label_keys, out / "distance.png"),
            plot_bytes(groups, label_keys, out / "bytes.png"),
        ]
        if any(run.series("dp_epsilon") for group in groups for run in group.runs):
            files.append(plot_epsilon(groups, label_keys, out / "privacy.png"))
        elif (out / "privacy.png").exists():
            (out / "privacy.png").unlink()  # a stale plot of other runs would mislead
        partition_png = plot_partition(groups, out / "partition.png", echo=echo)
        if partition_png is not None:
            files.append(partition_png)
        elif (out / "partition.png").exists():
            (out / "partition.png").unlink()  # a stale plot of other runs would mislead
    echo(f"wrote {', '.join(path.name for path in files)} to {out}")
    return Report(groups, label_keys, markdown, ordering, files, skipped, notes)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

DESCRIPTION = (
    "Turn finished run folders into the paper's table (mean ± std over seeds of the best mean "
    "client accuracy, with the paper's numbers and the difference) as table.md and table.csv, "
    "and plots: curves.png, per_client.png (Fig. 7), partition.png (Fig. 5), distance.png "
    "(Fig. 6), bytes.png, and privacy.png (ε per round) when runs used DP."
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="folder holding run folders (searched recursively)")
    parser.add_argument(
        "--spec", metavar="SPEC.toml",
        help="experiment spec whose [[paper]] entries (config keys + acc, std in %%) give the paper "
        "column; rows it does not match fall back to the built-in Table 1 numbers",
    )
    parser.add_argument("--out", metavar="DIR", help="where to write the table and plots (default: ROOT/report)")


def run(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: 0 on success, 2 (and one line on stderr) on an error."""
    try:
        make_report(args.root, out=args.out, spec=args.spec)
    except ReportError as exc:
        print(f"fedlora-flwr report: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report ROOT [--spec SPEC.toml] [--out DIR]`` to an argparse subparsers object;
    its ``func`` is :func:`run`."""
    parser = subparsers.add_parser("report", help="tables and plots from finished runs", description=DESCRIPTION)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlora_flwr.report ROOT ...`` (the same as ``fedlora-flwr report``)."""
    parser = argparse.ArgumentParser(prog="fedlora-flwr report", description=DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
