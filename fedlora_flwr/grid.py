"""The experiment grid runner: ``fedlora-flwr grid SPEC`` runs configurations × seeds, resumably.

A *spec* is a TOML file (``experiments/grids/`` holds one per experiment of the paper; its README
gives the format): ``[experiment]`` (``name``, ``description``, ``seeds``, ``num-clients``,
``client-cpus``, ``client-gpus``), ``[base]`` (run-config keys shared by every run), ``[grid]``
(a list of values per key: the runs are the cartesian product × seeds) and optional ``[[paper]]``
rows (config keys + ``acc``, ``std`` in %, matched to the runs by :mod:`fedlora_flwr.paper`).

Every run's full run config is the app's defaults (``[tool.flwr.app.config]`` of the app folder's
``pyproject.toml``) + ``[base]`` + the grid point + ``seed`` + ``output-dir``/``run-name`` (set by
the runner: ``<out>/<name>/<run name>``); each is validated with :func:`fedlora_flwr.config.load_config`
before anything runs, and a bad spec stops with one line naming the key.

Relative paths in a spec (``data-dir``) and ``--out`` resolve against the **working directory of
the ``fedlora-flwr grid`` command** (run it from the repository root for the shipped specs); the
runs get absolute paths.

Run names are ``<name>__<key>_<value>__…__seed_<seed>`` with every [grid] key in spec order (keys are
kebab-case, values never hold ``_``, so ``__`` and the first ``_`` split a name unambiguously).

Run folders are read with :func:`fedlora_flwr.runs.load_runs`. A run whose folder holds a finished
run's ``summary.json`` is skipped, so re-running the command resumes an interrupted grid. An
interrupted run (``config.json``, no ``summary.json``) resumes from its checkpoint (``resume = true``,
README "Checkpoint and resume"). Any other run folder (failed: its ``summary.json`` says ``"status":
"failed"``; or no ``config.json``) is renamed aside to ``<run name>.incomplete-<UTC time>`` (never
deleted) and the run starts again. Each run goes through ``fedlora-flwr run``'s
:class:`~fedlora_flwr.runner.FlwrRun`, so its exit code is the run's status. A failed run (non-zero
exit status, or no finished ``summary.json``) leaves the tail of its log in ``<run dir>.log`` and is
listed with its reason at the end; the grid goes on and the command exits 1. Progress (runs
done/total, each running run's round read from its folder, an ETA) is a tqdm bar on stderr.
``<out>/<name>/grid.json`` lists every planned run with its grid values, seed, full config, the
matching paper numbers and a status: ``skipped`` (finished before this invocation), ``done``,
``failed``, ``planned`` (not run yet), ``running`` or ``interrupted`` (Ctrl-C; resumed on the next
invocation).
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import re
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from fedlora_flwr.config import ConfigError, flower_run_config, load_config
from fedlora_flwr.paper import META_KEYS, entry_problem, matches
from fedlora_flwr.runs import RunsError, load_runs
from fedlora_flwr.store import write_atomic

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the repository for an editable install
DEFAULT_OUT = Path("outputs") / "grids"
GRID_FILE = "grid.json"
LOCK_FILE = ".grid.lock"  # held while a `fedlora-flwr grid` runs this grid
LOG_TAIL_LINES = 400
# keys the runner sets itself: not allowed in [base] / [grid]
RUNNER_KEYS = {
    "seed": "set by [experiment] seeds",
    "output-dir": "set by the grid runner (--out)",
    "run-name": "set by the grid runner",
}


class SpecError(ValueError):
    """The spec is invalid (or cannot run here); the message is one line naming the key."""


# --------------------------------------------------------------------------- spec


def _kebab(name: str) -> str:
    return name.replace("_", "-")


Scalar = str | int | float | bool


class Experiment(BaseModel):
    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$", max_length=100)
    description: str = ""
    seeds: list[int] = Field(min_length=1)
    num_clients: int = Field(ge=1, description="num-supernodes of the simulation")
    client_cpus: int = Field(1, ge=1, description="client-resources-num-cpus")
    client_gpus: float = Field(0.0, ge=0, description="client-resources-num-gpus")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat")
        if any(not 0 <= seed < 2**32 for seed in seeds):
            raise ValueError("seeds must lie in [0, 2**32)")
        return seeds


class ExperimentSpec(BaseModel):
    """A parsed spec. Use :func:`load_spec`, which also validates every run's config."""

    model_config = ConfigDict(extra="forbid")

    experiment: Experiment
    base: dict[str, Scalar] = {}
    grid: dict[str, list[Scalar]] = {}
    paper: list[dict[str, Scalar]] = []

    @field_validator("grid")
    @classmethod
    def _non_empty_distinct(cls, grid: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: give at least one value")
            if len({(type(v), v) for v in values}) != len(values):
                raise ValueError(f"{key}: values repeat")
        return grid

    @field_validator("paper")
    @classmethod
    def _paper_numbers(cls, rows: list[dict[str, Scalar]]) -> list[dict[str, Scalar]]:
        for number, row in enumerate(rows, start=1):
            if entry_problem(row):
                raise ValueError(f"row {number}: {entry_problem(row)}")
        return rows


def _where(loc: tuple) -> str:
    """A pydantic error location as the spec's words: ``[experiment] seeds[0]``, ``[grid] alpha``,
    ``[[paper]] row 2 acc``."""
    if not loc:
        return "spec"
    section, rest = str(loc[0]), list(loc[1:])
    if section == "paper":
        head = "[[paper]]"
        if rest and isinstance(rest[0], int):
            rest[0] = f"row {rest[0] + 1}"
    else:
        head = f"[{section}]"
        if section in ("base", "grid"):
            rest = rest[:1]  # [grid] alpha.0.str -> [grid] alpha
    words: list[str] = []
    for part in rest:
        if isinstance(part, int) and words:
            words[-1] += f"[{part}]"
        else:
            words.append(str(part))
    return " ".join([head, *words])


def parse_spec(text: str, source: str = "spec") -> ExperimentSpec:
    """Parse and type-check a spec (without the run-config checks of :func:`load_spec`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None
    grid = data.get("grid")
    if isinstance(grid, dict):
        for key, value in grid.items():
            if not isinstance(value, list):
                raise SpecError(f"{source}: [grid] {key}: must be a list of values, e.g. {key} = [{_toml_value(value)}]")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        problems: dict[str, str] = {}
        for error in err.errors():
            loc = error["loc"]
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key" if len(loc) > 1 else "unknown section"
            elif loc and loc[0] in ("base", "grid", "paper") and str(loc[-1]) in ("str", "int", "float", "bool"):
                message = "must be a single string, number or boolean"
            where = _where(loc)
            if len(loc) == 1 and error["type"] == "value_error":  # a section's own check names the key
                where, message = f"{where} {message}", ""
            problems.setdefault(where, message)  # a union reports each alternative: keep one
        raise SpecError(f"{source}: " + "; ".join(f"{where}: {message}" if message else where
                                                  for where, message in problems.items())) from None


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def load_spec(path: str | Path, app_dir: str | Path | None = None, cwd: str | Path | None = None) -> ExperimentSpec:
    """Read a spec file and validate it completely: its structure, every [base]/[grid]/[[paper]] key
    against the app's run config, and every run's full config (so nothing runs if any is bad).

    ``cwd`` (default: the working directory) is where relative paths resolve. Raises
    :class:`SpecError` with one line naming the bad key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec: {err.strerror or err}") from None
    spec = parse_spec(text, source=str(path))
    expand(spec, app_dir=app_dir, cwd=cwd, source=str(path))
    return spec


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: a grid point and a seed."""

    run_name: str
    run_dir: Path
    params: dict[str, Any]  # the grid point ([grid] key -> value)
    seed: int
    config: dict[str, Any]  # the full run config (every [tool.flwr.app.config] key, absolute paths)
    paper: dict[str, Any] | None = None  # the matching [[paper]] row

    def recorded(self) -> pd.Series | None:
        """The last :func:`~fedlora_flwr.runs.load_runs` row of the run folder (its status, last
        round, summary), or None when the folder holds no ``config.json``."""
        if not (self.run_dir / "config.json").is_file():
            return None
        return load_runs(self.run_dir).iloc[-1]

    def state(self) -> tuple[str, int]:
        """(``absent`` — no ``config.json`` — or the folder's status, the rounds it recorded)."""
        last = self.recorded()
        return ("absent", 0) if last is None else (last.status, 0 if pd.isna(last["round"]) else int(last["round"]))

    @property
    def finished(self) -> bool:
        return self.state()[0] == "finished"

    @property
    def log_path(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")


def default_app_dir() -> Path:
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        return PACKAGE_ROOT
    raise SpecError(f"no pyproject.toml beside the package ({PACKAGE_ROOT}); pass --app-dir (the Flower app's folder)")


def app_defaults(app_dir: str | Path | None = None) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's ``pyproject.toml``: every run-config key and default."""
    pyproject = Path(app_dir or default_app_dir()) / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise SpecError(f"{pyproject}: no readable [tool.flwr.app.config] table ({type(err).__name__}); "
                        "is --app-dir the Flower app's folder?") from None


def _name_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text) or "empty"


def run_name(spec: ExperimentSpec, params: Mapping[str, Any], seed: int) -> str:
    """``<name>__<key>_<value>__…__seed_<seed>`` (every [grid] key, spec order): a plain folder name."""
    parts = [spec.experiment.name, *(f"{key}_{_name_value(params[key])}" for key in spec.grid), f"seed_{seed}"]
    return "__".join(parts)


def expand(
    spec: ExperimentSpec,
    out_dir: str | Path = DEFAULT_OUT,
    app_dir: str | Path | None = None,
    cwd: str | Path | None = None,
    source: str | None = None,
) -> list[PlannedRun]:
    """Every run of the grid (grid points in spec order, seeds innermost), each config validated.

    Raises :class:`SpecError` (one line naming the key) for a key the app does not have, a key the
    runner sets itself, an invalid value, a [[paper]] row that matches no run or two rows that match
    the same run.
    """
    source = source or f"spec {spec.experiment.name}"
    cwd = Path(cwd or Path.cwd()).resolve()
    experiment_dir = (cwd / Path(out_dir).expanduser()).resolve() / spec.experiment.name
    defaults = app_defaults(app_dir)
    known = f"not a key of [tool.flwr.app.config] (choose from: {', '.join(defaults)})"
    for section, keys in (("base", spec.base), ("grid", spec.grid)):
        for key in keys:
            if key in RUNNER_KEYS:
                raise SpecError(f"{source}: [{section}] {key}: {RUNNER_KEYS[key]}; remove it here")
            if key not in defaults:
                raise SpecError(f"{source}: [{section}] {key}: {known}")
    for key in set(spec.base) & set(spec.grid):
        raise SpecError(f"{source}: [grid] {key}: also set in [base]; keep it in one of them")
    for number, row in enumerate(spec.paper, start=1):
        for key in row:
            if key not in META_KEYS and key not in defaults:
                raise SpecError(f"{source}: [[paper]] row {number} {key}: {known[:-1]}, or {'/'.join(sorted(META_KEYS))})")

    runs: list[PlannedRun] = []
    paper_hits = [0] * len(spec.paper)
    for values in itertools.product(*spec.grid.values()):
        # an integer for a float key (alpha = [1]) is that float: one run name per value
        params = {key: float(value) if isinstance(defaults[key], float) and type(value) is int else value
                  for key, value in zip(spec.grid, values, strict=True)}
        matched: list[int] | None = None
        for seed in spec.experiment.seeds:
            name = run_name(spec, params, seed)
            raw = {**defaults, **spec.base, **params, "seed": seed,
                   "output-dir": str(experiment_dir), "run-name": name}
            try:
                config = flower_run_config(load_config(raw, base=cwd), defaults)
            except ConfigError as err:
                origin = _origin(str(err), spec)
                message = str(err).removeprefix("invalid run config: ") if origin else str(err)
                raise SpecError(f"{source}: {origin}{message}") from None
            if matched is None:  # a [[paper]] row names no seed: the first seed's config decides
                matched = [number for number, row in enumerate(spec.paper) if matches(row, config)]
                if len(matched) > 1:
                    raise SpecError(f"{source}: [[paper]] rows {matched[0] + 1} and {matched[1] + 1} both match "
                                    f"{_describe(params)}; give them distinct values")
                for number in matched:
                    paper_hits[number] += 1
            paper = dict(spec.paper[matched[0]]) if matched else None
            runs.append(PlannedRun(name, experiment_dir / name, params, seed, config, paper))
    for number, hits in enumerate(paper_hits, start=1):
        if not hits:
            row = {key: value for key, value in spec.paper[number - 1].items() if key not in META_KEYS}
            raise SpecError(f"{source}: [[paper]] row {number}: matches no run of the grid ({_describe(row)})")
    names = [run.run_name for run in runs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise SpecError(f"{source}: [grid]: two grid points give the same run name {duplicate!r}; the values "
                        "of a key must differ (as numbers, and in their letters, digits, '.' and '-')")
    return runs


def _describe(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _origin(message: str, spec: ExperimentSpec) -> str:
    """'[grid] ' / '[base] ' when the first key named by a ConfigError comes from there."""
    match = re.match(r"invalid run config: ([A-Za-z0-9-]+)=", message)
    key = match.group(1) if match else None
    if key in spec.grid:
        return "[grid] "
    if key in spec.base:
        return "[base] "
    return ""


# --------------------------------------------------------------------------- execution


Executor = Callable[[PlannedRun, Callable[[str], None]], tuple[int, str]]
"""Runs one planned run to completion: ``execute(run, on_line) -> (exit code, output)``. It must write
the run folder ``run.run_dir`` (``summary.json`` when it succeeds) and may call ``on_line`` with each
output line (kept as the log tail of a run that raised)."""


class SuperLinkExecutor:
    """The real executor: each run gets its own private :class:`~fedlora_flwr.superlink.LocalSuperLink`
    (stopped, with every process below it, when the run ends) and ``flwr run <app> --run-config <file>``
    with the run's full config."""

    def __init__(
        self,
        app_dir: str | Path,
        num_supernodes: int,
        client_cpus: int = 1,
        client_gpus: float = 0.0,
        timeout: float | None = None,
        ray_cpus: int | None = None,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.num_supernodes = num_supernodes
        self.client_cpus = client_cpus
        self.client_gpus = client_gpus
        self.timeout = timeout
        self.ray_cpus = ray_cpus
        self._links: set[Any] = set()
        self._lock = threading.Lock()
        self._cancelled = False

    def __call__(self, run: PlannedRun, on_line: Callable[[str], None]) -> tuple[int, str]:
        from fedlora_flwr.superlink import (
            LocalSuperLink,  # psutil and subprocess machinery: only here
        )

        with LocalSuperLink() as link:
            with self._lock:
                if self._cancelled:  # interrupted while this SuperLink was starting
                    return 130, "cancelled before the run started\n"
                self._links.add(link)
            try:
                return link.run(
                    self.app_dir, run.config, num_supernodes=self.num_supernodes,
                    client_cpus=self.client_cpus, client_gpus=self.client_gpus,
                    timeout=self.timeout, on_line=on_line, ray_cpus=self.ray_cpus,
                )
            finally:
                with self._lock:
                    self._links.discard(link)

    def cancel(self) -> None:
        """Stop every SuperLink (and its simulation) now: the grid was interrupted."""
        with self._lock:
            self._cancelled = True
            links = list(self._links)

        def stop(link: Any) -> None:
            try:
                link.stop()
            except Exception:  # best effort: the run's own `with` stops it again
                pass

        stoppers = [threading.Thread(target=stop, args=(link,), daemon=True) for link in links]
        for thread in stoppers:  # side by side: each stop may wait out its processes' SIGTERM grace
            thread.start()
        for thread in stoppers:
            thread.join()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ray_cpus_for(parallel: int, cpus: int | None = None) -> int | None:
    """CPUs each run's Ray instance may use: all (None) for one run at a time, else cpus // parallel."""
    if parallel <= 1:
        return None
    return max(1, (cpus or available_cpus()) // parallel)


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def move_aside(run: PlannedRun, log_only: bool = False) -> Path | None:
    """Rename a run folder that cannot be resumed (failed, or without ``config.json``) to
    ``<name>.incomplete-<UTC time>``, and a stale ``<name>.log`` beside it to ``<that>.log`` (only
    the log with ``log_only``). Returns the new folder path, or None."""
    if not run.run_dir.exists() and not run.log_path.exists():
        return None
    stamp = _utc_stamp()
    aside = run.run_dir.with_name(f"{run.run_name}.incomplete-{stamp}")
    suffix = 1
    while aside.exists() or aside.with_name(aside.name + ".log").exists():
        suffix += 1
        aside = run.run_dir.with_name(f"{run.run_name}.incomplete-{stamp}-{suffix}")
    moved = None
    if run.run_dir.exists() and not log_only:
        os.rename(run.run_dir, aside)
        moved = aside
    if run.log_path.exists():
        os.rename(run.log_path, aside.with_name(aside.name + ".log"))
    return moved


def prepare(run: PlannedRun) -> tuple[PlannedRun, int, Path | None]:
    """How a pending run starts: an interrupted one (``config.json``, no ``summary.json``) resumes
    from its checkpoint (``resume = true``; returns the rounds it recorded), any other folder is
    moved aside (returns where) and the run starts afresh."""
    status, recorded = run.state()
    if status == "unfinished":
        move_aside(run, log_only=True)
        return replace(run, config={**run.config, "resume": True}), recorded, None
    return run, 0, move_aside(run)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class Progress:
    """The grid's progress on ``stream``: a tqdm bar of runs done/total, each running run's round
    (read from its run folder, :meth:`poll`) and an ETA; starts and ends as lines.

    The ETA is the rounds left (over every unfinished run) × the seconds per round measured in
    this invocation (runs' wall time, start-up included, over the rounds they ran) / ``parallel``.
    """

    def __init__(self, total: int, finished: int, parallel: int, stream: TextIO) -> None:
        self.parallel, self.stream = parallel, stream
        self.left: dict[str, int] = {}  # run name -> rounds it has still to run
        self.running: dict[str, list] = {}  # run name -> [run, started, first round, last round seen]
        self.spent = [0.0, 0]  # seconds and rounds of the runs that ended in this invocation
        self.failed = 0
        self.lock = threading.RLock()
        self.bar = tqdm(total=total, initial=finished, file=stream, mininterval=0, dynamic_ncols=True,
                        bar_format="[grid] {n_fmt}/{total_fmt} runs |{bar:16}| {desc}")

    def pending(self, run: PlannedRun, recorded: int) -> None:
        self.left[run.run_name] = int(run.config["num-server-rounds"]) - recorded

    def eta(self) -> float | None:
        seconds, rounds = self.spent
        for _, started, first, current in self.running.values():
            seconds, rounds = seconds + time.monotonic() - started, rounds + current - first
        return sum(self.left.values()) * seconds / rounds / self.parallel if rounds else None

    def _refresh(self) -> None:
        parts = [f"{run.run_name} round {current}/{run.config['num-server-rounds']}"
                 for run, _, _, current in self.running.values()]
        eta = self.eta()
        # to the minute (to 10 s under 90 s), so a log file gets a new bar only when it says something new
        eta = None if eta is None else 10 * int(eta / 10 + 0.5) if eta < 90 else 60 * int(eta / 60 + 0.5)
        parts.append(f"ETA {_duration(eta) if eta is not None else 'n/a'}")
        parts += [f"{self.failed} failed"] if self.failed else []
        text = " | ".join(parts)
        if text != self.bar.desc:  # unchanged: no redraw (a log file would get the same bar every poll)
            self.bar.set_description_str(text)

    def _line(self, text: str) -> None:
        self.bar.write(f"[grid] {text}", file=self.stream)

    def started(self, run: PlannedRun, recorded: int, moved: Path | None) -> None:
        with self.lock:
            self.running[run.run_name] = [run, time.monotonic(), recorded, recorded]
            why = f" (resuming from its checkpoint after round {recorded})" if run.config.get("resume") else ""
            why += f" (its earlier folder moved aside to {moved.name})" if moved else ""
            self._line(f"start {run.run_name}{why}")
            self._refresh()

    def poll(self) -> None:
        """Read each running run's last recorded round from its folder."""
        with self.lock:
            for name, state in self.running.items():
                try:
                    state[3] = max(state[3], state[0].state()[1])
                except RunsError:  # a row being appended right now: the next poll reads it
                    continue
                self.left[name] = int(state[0].config["num-server-rounds"]) - state[3]
            self._refresh()

    def finished(self, run: PlannedRun, status: str, wall: float, reason: str = "") -> None:
        with self.lock:
            self.poll()
            _, _, first, current = self.running.pop(run.run_name)
            if status != "interrupted":
                self.left.pop(run.run_name, None)
                self.spent = [self.spent[0] + wall, self.spent[1] + current - first]
                self.bar.update(1)
            self.failed += status == "failed"
            word = {"done": "done", "failed": "FAILED", "interrupted": "interrupted"}[status]
            total = run.config["num-server-rounds"]
            self._line(f"{word} {run.run_name} at round {current}/{total} in {_duration(wall)}"
                       + (f": {reason}" if reason else ""))
            self._refresh()

    def note(self, text: str) -> None:
        with self.lock:
            self._line(text)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Outcome:
    code: int | None
    output: str
    error: str | None
    wall: float
    interrupt: BaseException | None = None


@dataclass
class GridResult:
    """What :func:`run_grid` did: each run's entry as written to grid.json."""

    experiment_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for run in self.runs if run["status"] == status)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0


def _entry(run: PlannedRun, status: str) -> dict[str, Any]:
    return {"run_name": run.run_name, "run_dir": str(run.run_dir), "status": status, "params": run.params,
            "seed": run.seed, "paper": run.paper, "config": run.config, "wall_seconds": None, "exit_code": None,
            "error": None, "log": None, "moved_aside": None, "resumed_after_round": None, "started": None,
            "finished": None}


def _print_plan(spec: ExperimentSpec, runs: list[PlannedRun], experiment_dir: Path, parallel: int,
                ray_cpus: int | None, stream: TextIO) -> None:
    points = len(runs) // max(1, len(spec.experiment.seeds))
    e = spec.experiment
    print(f"grid {e.name}: {len(runs)} runs ({points} configurations × {len(e.seeds)} seeds) -> {experiment_dir}", file=stream)
    if e.description:
        print(f"  {' '.join(e.description.split())}", file=stream)
    cap = f", Ray capped at {ray_cpus} CPUs per run" if ray_cpus else ""
    print(f"  each run: {e.num_clients} clients, client-cpus {e.client_cpus}, client-gpus {e.client_gpus}; "
          f"{parallel} at a time{cap}", file=stream)
    counts = {"run": 0, "skip": 0, "resume": 0, "redo": 0}
    for run in runs:
        status, rounds = run.state()
        action, why = {
            "finished": ("skip", "(finished: summary.json)"),
            "unfinished": ("resume", f"(interrupted after round {rounds}: resumes from its checkpoint)"),
            "absent": ("redo", f"(no config.json: would move it to {run.run_name}.incomplete-<UTC time>)")
            if run.run_dir.exists() else ("run", ""),
        }.get(status, ("redo", f"({status}: would move it to {run.run_name}.incomplete-<UTC time>)"))
        counts[action] += 1
        paper = ""
        if run.paper:
            std = run.paper.get("std")
            paper = f"  paper {run.paper['acc']}" + (f"±{std}" if std is not None else "")
        print(f"  {action:<6}  {run.run_name}{paper}  {why}".rstrip(), file=stream)
    print(f"would run {counts['run'] + counts['resume'] + counts['redo']} ({counts['resume']} to resume, "
          f"{counts['redo']} to redo), skip {counts['skip']}", file=stream)


def run_grid(
    spec: ExperimentSpec,
    out_dir: str | Path = DEFAULT_OUT,
    app_dir: str | Path | None = None,
    parallel: int = 1,
    dry_run: bool = False,
    timeout: float | None = None,
    *,
    execute: Executor | None = None,
    cwd: str | Path | None = None,
    stream: TextIO | None = None,
    plan_stream: TextIO | None = None,
) -> GridResult:
    """Run every unfinished run of ``spec`` (``parallel`` at a time) and write ``grid.json``.

    ``execute`` runs one run (default: :class:`SuperLinkExecutor`, each run through its own private
    SuperLink, with ``timeout`` seconds per run and, for ``parallel > 1``, Ray capped at
    ``cpus // parallel`` CPUs per run). ``dry_run`` prints the plan to ``plan_stream`` (stdout) and
    writes nothing. Progress goes to ``stream`` (stderr). A KeyboardInterrupt stops the running runs,
    records them as ``interrupted`` and propagates; running the grid again resumes it.
    """
    if parallel < 1:
        raise SpecError(f"--parallel {parallel}: must be at least 1")
    stream = stream or sys.stderr
    app_dir = Path(app_dir or default_app_dir()).resolve()
    runs = expand(spec, out_dir=out_dir, app_dir=app_dir, cwd=cwd)
    experiment_dir = (Path(cwd or Path.cwd()).resolve() / Path(out_dir).expanduser()).resolve() / spec.experiment.name
    e = spec.experiment
    ray_cpus = ray_cpus_for(parallel)
    if dry_run:
        _print_plan(spec, runs, experiment_dir, parallel, ray_cpus, plan_stream or sys.stdout)
        return GridResult(experiment_dir, [_entry(run, "skipped" if run.finished else "planned") for run in runs])

    if execute is None:
        cpus = ray_cpus or available_cpus()
        if e.client_cpus > cpus:
            raise SpecError(f"[experiment] client-cpus={e.client_cpus}: more than the {cpus} CPUs a run may use "
                            f"here (--parallel {parallel}); lower it (--client-cpus) or --parallel")
        if e.client_gpus > 0:
            import torch

            if not torch.cuda.is_available():
                raise SpecError(f"[experiment] client-gpus={e.client_gpus}: no CUDA GPU is visible; "
                                "pass --client-gpus 0 to run on CPU")
        execute = SuperLinkExecutor(app_dir, e.num_clients, e.client_cpus, e.client_gpus, timeout, ray_cpus)

    entries = {run.run_name: _entry(run, "skipped" if run.finished else "planned") for run in runs}
    result = GridResult(experiment_dir, list(entries.values()))
    grid_lock = threading.Lock()

    def save() -> None:
        with grid_lock:
            counts = {status: result.count(status) for status in
                      ("done", "skipped", "failed", "planned", "running", "interrupted")}
            payload = {"name": e.name, "description": e.description, "experiment": e.model_dump(by_alias=True),
                       "base": spec.base, "grid": spec.grid, "paper": spec.paper, "app_dir": str(app_dir),
                       "parallel": parallel, "updated": _now(), "counts": counts, "runs": result.runs}
            write_atomic(experiment_dir / GRID_FILE, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))

    tails: dict[str, deque[str]] = {}

    def on_line_for(run: PlannedRun) -> Callable[[str], None]:
        return tails.setdefault(run.run_name, deque(maxlen=LOG_TAIL_LINES)).append

    def finish(run: PlannedRun, outcome: _Outcome, interrupted: bool) -> None:
        entry = entries[run.run_name]
        entry.update(wall_seconds=round(outcome.wall, 3), exit_code=outcome.code, finished=_now())
        try:
            last, unreadable = run.recorded(), None
        except RunsError as err:
            last, unreadable = None, str(err)
        if outcome.code == 0 and last is not None and last.status == "finished":
            entry.update(status="done", error=None)
            progress.finished(run, "done", outcome.wall)
        elif interrupted or outcome.interrupt is not None:
            entry.update(status="interrupted", error="interrupted")
            progress.finished(run, "interrupted", outcome.wall)
        else:
            reason = outcome.error or f"exit status {outcome.code}"
            if unreadable:
                reason += f"; {unreadable}"
            elif last is None:
                reason += f"; no config.json in {run.run_dir}"
            elif last.status == "failed":
                reason += f"; summary.json: failed ({last.get('failure')}: {last.get('reason')})"
            elif last.status != "finished":
                reason += f"; no summary.json in {run.run_dir}"
            lines = outcome.output.splitlines()[-LOG_TAIL_LINES:] if outcome.output else list(tails.get(run.run_name, ()))
            run.log_path.parent.mkdir(parents=True, exist_ok=True)
            header = f"# {run.run_name}: {reason} ({_now()}); last {len(lines)} lines of its output\n"
            write_atomic(run.log_path, (header + "\n".join(lines) + "\n").encode("utf-8"))
            entry.update(status="failed", error=reason, log=str(run.log_path))
            progress.finished(run, "failed", outcome.wall, f"{reason}; log: {run.log_path}")
            for line in lines[-8:]:
                print(f"    | {line}", file=stream, flush=True)
        save()

    pending = deque(run for run in runs if entries[run.run_name]["status"] == "planned")
    experiment_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(experiment_dir)
    progress = Progress(len(runs), len(runs) - len(pending), parallel, stream)
    try:
        for run in pending:
            status, recorded = run.state()
            progress.pending(run, recorded if status == "unfinished" else 0)
        progress.note(f"{e.name}: {len(runs)} runs, {len(runs) - len(pending)} finished before, {len(pending)} to run, "
                      f"{parallel} at a time -> {experiment_dir}")
        save()
        _execute_all(pending, parallel, execute, entries, progress, on_line_for, finish, save)
    finally:
        progress.close()
        lock.close()
    for entry in result.runs:
        if entry["status"] == "failed":
            print(f"[grid] FAILED {entry['run_name']}: {entry['error']} (log: {entry['log']})", file=stream)
    print(f"[grid] {e.name} finished: {result.count('done')} done, {result.count('skipped')} skipped, "
          f"{result.count('failed')} failed; grid.json in {experiment_dir}", file=stream, flush=True)
    return result


def _worker(execute: Executor, on_line_for: Callable[[PlannedRun], Callable[[str], None]]) -> Callable[[PlannedRun], _Outcome]:
    def work(run: PlannedRun) -> _Outcome:
        started = time.monotonic()
        try:
            code, output = execute(run, on_line_for(run))
            return _Outcome(code, output, None, time.monotonic() - started)
        except Exception as err:  # a failed run must not stop the grid
            return _Outcome(None, "", f"{type(err).__name__}: {err}", time.monotonic() - started)
        except BaseException as err:  # KeyboardInterrupt / SystemExit inside the executor
            return _Outcome(None, "", f"interrupted ({type(err).__name__})", time.monotonic() - started, err)

    return work


def _lock(experiment_dir: Path):
    """An exclusive lock on the grid folder, so two invocations never run (or move aside) the same runs."""
    handle = (experiment_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise SpecError(f"{experiment_dir}: another `fedlora-flwr grid` (pid {holder}) is running this grid; "
                        "wait for it or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _execute_all(pending, parallel, execute, entries, progress, on_line_for, finish, save) -> None:
    """Keep ``parallel`` runs going until none is pending; on Ctrl-C (or any error of the runner)
    cancel the running ones, record them as interrupted, and re-raise."""
    work = _worker(execute, on_line_for)
    active: dict[Future, PlannedRun] = {}
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fedlora-grid")
    interrupt: BaseException | None = None
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run, recorded, moved = prepare(pending.popleft())
                entries[run.run_name].update(status="running", started=_now(), resumed_after_round=recorded
                                             if run.config.get("resume") else None,
                                             moved_aside=str(moved) if moved else None)
                progress.started(run, recorded, moved)
                save()
                active[pool.submit(work, run)] = run
            done, _ = wait(list(active), timeout=1.0, return_when=FIRST_COMPLETED)
            progress.poll()
            for future in done:
                run = active.pop(future)
                outcome = future.result()
                finish(run, outcome, interrupted=False)
                if outcome.interrupt is not None:
                    raise outcome.interrupt
    except BaseException as err:  # KeyboardInterrupt (Ctrl-C) or an error of the runner itself
        interrupt = err
        cancel = getattr(execute, "cancel", None)
        if callable(cancel):
            cancel()
        for future, run in list(active.items()):
            finish(run, future.result(), interrupted=True)  # work() never raises
        active.clear()
        for entry in entries.values():  # started, but Ctrl-C came between submit() and `active`
            if entry["status"] == "running":
                entry.update(status="interrupted", error="interrupted")
        save()
        raise
    finally:
        pool.shutdown(wait=interrupt is None)


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``grid`` subcommand; its ``func(args)`` returns the exit code."""
    parser = subparsers.add_parser(
        "grid",
        help="run an experiment grid (configurations × seeds); resumable",
        description=(
            "Run every configuration × seed of an experiment spec (experiments/grids/*.toml) through a "
            "private Flower SuperLink each, skipping runs whose folder already holds a finished summary.json and "
            "resuming interrupted runs from their checkpoint (so an interrupted grid resumes). Relative paths in the spec and --out resolve against the current "
            "working directory. Writes <out>/<name>/<run name>/ and <out>/<name>/grid.json. Exit code: "
            "0 when every run finished, 1 when a run failed, 2 for an invalid spec, 130 when interrupted."
        ),
    )
    parser.add_argument("spec", type=Path, help="the experiment spec (TOML)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"grid output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                        help="runs at once, each with its own SuperLink and Ray capped at cpus // N CPUs (default: 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (and which runs would be skipped); run nothing")
    parser.add_argument("--app-dir", type=Path, default=None,
                        help="the Flower app's folder (default: the folder holding this package's pyproject.toml)")
    parser.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                        help="seconds per run before it is killed and marked failed")
    parser.add_argument("--client-cpus", type=_positive_int, default=None, metavar="N",
                        help="override [experiment] client-cpus")
    parser.add_argument("--client-gpus", type=float, default=None, metavar="F",
                        help="override [experiment] client-gpus (e.g. 0 on a CPU machine)")
    parser.add_argument("--seeds", type=_seed_list, default=None, metavar="S[,S...]",
                        help="run only these of the spec's [experiment] seeds (e.g. 1: one seed of every "
                             "configuration first; the same command with the other seeds adds them)")
    parser.set_defaults(func=command)
    return parser


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds repeat")
    return seeds


def command(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec, app_dir=args.app_dir)
        overrides = {key: value for key, value in (("client_cpus", args.client_cpus), ("client_gpus", args.client_gpus))
                     if value is not None}
        if args.seeds is not None:
            unknown = [seed for seed in args.seeds if seed not in spec.experiment.seeds]
            if unknown:
                raise SpecError(f"--seeds {','.join(map(str, args.seeds))}: {unknown} not among the spec's seeds "
                                f"{spec.experiment.seeds}")
            overrides["seeds"] = args.seeds
        if overrides:
            if overrides.get("client_gpus", 0) < 0:
                raise SpecError(f"--client-gpus {overrides['client_gpus']}: must be at least 0")
            spec = spec.model_copy(update={"experiment": spec.experiment.model_copy(update=overrides)})
        result = run_grid(spec, out_dir=args.out, app_dir=args.app_dir, parallel=args.parallel,
                          dry_run=args.dry_run, timeout=args.timeout)
    except (SpecError, RunsError) as err:
        print(f"fedlora-flwr grid: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora-flwr grid: interrupted; run the same command again to resume (interrupted runs go on "
              "from their checkpoint)", file=sys.stderr)
        return 130
    return result.exit_code


__all__ = [
    "ExperimentSpec", "GridResult", "PlannedRun", "SpecError", "SuperLinkExecutor", "command", "expand",
    "load_spec", "move_aside", "parse_spec", "register", "run_grid",
]
