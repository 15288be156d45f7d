"""The experiment grid runner (fedlora_flwr.grid) and the ``fedlora-flwr`` command.

Everything but the last test uses a fake executor (no training): spec validation, expansion,
skip/resume, rename-aside of interrupted runs, failures, Ctrl-C, grid.json, progress, --dry-run, the
shipped specs. The e2e test runs a tiny grid for real through private SuperLinks.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from conftest import REAL_NPZ, REPO

from fedlora_flwr import grid
from fedlora_flwr.cli import main
from fedlora_flwr.config import RunConfig
from fedlora_flwr.grid import SpecError, expand, load_spec, parse_spec, run_grid
from fedlora_flwr.report import make_report
from fedlora_flwr.runs import load_runs

SPECS = sorted((REPO / "experiments" / "grids").glob("*.toml"))

TINY = """\
[experiment]
name = "tiny"
description = "a test grid"
seeds = [1, 2]
num-clients = 2

[base]
dataset = "synthetic"
model = "cnn"
num-server-rounds = 2
local-epochs = 1
lora-epochs = 1
train-per-client = 50
test-per-client = 20
data-dir = "data/here"

[grid]
method = ["fedavg", "local"]
alpha = [0.1, 0.5]

[[paper]]
method = "local"
dataset = "synthetic"
alpha = 0.5
acc = 60.15
std = 0.86
"""

TINY_NAMES = [
    f"tiny__method_{method}__alpha_{alpha}__seed_{seed}"
    for method in ("fedavg", "local") for alpha in ("0.1", "0.5") for seed in (1, 2)
]


def _spec_file(tmp_path: Path, text: str = TINY, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class FakeExecutor:
    """Stands in for SuperLinkExecutor: writes a run folder like the ServerApp does (a resumed run
    goes on after its recorded rows); ``fail`` maps run names to (exit code, summary status or None
    for no summary), ``interrupt_at`` raises KeyboardInterrupt on that call (after round 1)."""

    def __init__(self, fail: dict[str, tuple[int, str | None]] | None = None, interrupt_at: int | None = None,
                 delay: float = 0.0):
        self.fail = fail or {}
        self.interrupt_at = interrupt_at
        self.delay = delay
        self.calls: list[str] = []
        self.resumed: list[str] = []
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def __call__(self, run: grid.PlannedRun, on_line) -> tuple[int, str]:
        with self.lock:
            self.calls.append(run.run_name)
            number = len(self.calls)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            metrics = run.run_dir / "metrics.jsonl"
            if run.config["resume"]:
                self.resumed.append(run.run_name)
                assert (run.run_dir / "config.json").is_file(), "a resumed run keeps its folder"
            else:
                assert not run.run_dir.exists(), "the runner must move an existing folder aside first"
                run.run_dir.mkdir(parents=True)
                metrics.write_text("")
            (run.run_dir / "config.json").write_text(json.dumps(run.config))
            rounds = run.config["num-server-rounds"]
            for current in range(len(metrics.read_text().splitlines()) + 1, rounds + 1):
                time.sleep(self.delay)
                with metrics.open("a") as handle:
                    handle.write(json.dumps({"round": current, "acc_mean": 0.5}) + "\n")
                if number == self.interrupt_at:
                    raise KeyboardInterrupt
            code, status = self.fail.get(run.run_name, (0, "finished"))
            if status:
                summary = {"status": status, "best_acc_mean": 0.5, "seed": run.seed}
                if status == "failed":
                    summary.update(failure="no-valid-replies", reason="round 2: no client sent a valid reply")
                (run.run_dir / "summary.json").write_text(json.dumps(summary))
            output = "".join(f"line {i}\n" for i in range(1000)) + f"boom in {run.run_name}\n"
            return code, output
        finally:
            with self.lock:
                self.running -= 1


def _grid_json(experiment_dir: Path) -> dict:
    return json.loads((experiment_dir / "grid.json").read_text())


def _statuses(experiment_dir: Path) -> dict[str, str]:
    return {run["run_name"]: run["status"] for run in _grid_json(experiment_dir)["runs"]}


def _run(spec_path: Path, tmp_path: Path, execute, **kwargs) -> grid.GridResult:
    spec = load_spec(spec_path, cwd=tmp_path)
    stream = kwargs.pop("stream", io.StringIO())
    return run_grid(spec, out_dir="out", execute=execute, cwd=tmp_path, stream=stream, **kwargs)


# --------------------------------------------------------------------------- spec validation

GOOD_EXPERIMENT = '[experiment]\nname = "t"\nseeds = [1]\nnum-clients = 2\n'


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (GOOD_EXPERIMENT + "[base]\nfoo = 1\n", "[base] foo"),
        (GOOD_EXPERIMENT + "[grid]\nalpha = [0.1, -1.0]\n", "[grid] alpha=-1.0"),
        (GOOD_EXPERIMENT + '[base]\nmodel = "vgg"\n', "[base] model='vgg'"),
        (GOOD_EXPERIMENT + "[grid]\nalpha = 0.1\n", "[grid] alpha: must be a list"),
        (GOOD_EXPERIMENT + "[grid]\nalpha = []\n", "[grid] alpha"),
        (GOOD_EXPERIMENT + "[grid]\nalpha = [[0.1]]\n", "[grid] alpha"),
        (GOOD_EXPERIMENT + "[grid]\nseed = [1, 2]\n", "[grid] seed"),
        (GOOD_EXPERIMENT + '[base]\noutput-dir = "x"\n', "[base] output-dir"),
        (GOOD_EXPERIMENT + '[base]\nrun-name = "x"\n', "[base] run-name"),
        (GOOD_EXPERIMENT + "[base]\nalpha = 0.5\n[grid]\nalpha = [0.1]\n", "[grid] alpha"),
        (GOOD_EXPERIMENT + "[base]\nlocal-epochs = 1\n[grid]\nlora-epochs = [0, 2]\n", "[grid] lora-epochs=2"),
        (GOOD_EXPERIMENT + '[base]\ndataset = "npz"\ndata-dir = "missing.npz"\n', "[base] data-dir="),
        (GOOD_EXPERIMENT + "[bogus]\nx = 1\n", "[bogus]"),
        (GOOD_EXPERIMENT + "clients = 3\n", "[experiment] clients"),
        ('[experiment]\nname = "t"\nseeds = [1]\nnum-clients = 0\n', "[experiment] num-clients"),
        ('[experiment]\nseeds = [1]\nnum-clients = 2\n', "[experiment] name"),
        ('[experiment]\nname = "a b"\nseeds = [1]\nnum-clients = 2\n', "[experiment] name"),
        ('[experiment]\nname = "t"\nseeds = []\nnum-clients = 2\n', "[experiment] seeds"),
        ('[experiment]\nname = "t"\nseeds = [1, 1]\nnum-clients = 2\n', "[experiment] seeds"),
        ('[experiment]\nname = "t"\nseeds = ["1"]\nnum-clients = 2\n', "[experiment] seeds[0]"),
        (GOOD_EXPERIMENT + "client-gpus = -1.0\n", "[experiment] client-gpus"),
        (GOOD_EXPERIMENT + '[grid]\nmethod = ["fedavg"]\n[[paper]]\nmethod = "fedavg"\n', "[[paper]] row 1: acc"),
        (GOOD_EXPERIMENT + '[grid]\nmethod = ["fedavg"]\n[[paper]]\nmethod = "fedavg"\nacc = "high"\n', "[[paper]] row 1: acc"),
        (GOOD_EXPERIMENT + '[grid]\nmethod = ["fedavg"]\n[[paper]]\nmethod = "fedavg"\nacc = 1\nfoo = 2\n',
         "[[paper]] row 1 foo"),
        (GOOD_EXPERIMENT + '[grid]\nmethod = ["fedavg"]\n[[paper]]\nmethod = "local"\nacc = 1\n',
         "[[paper]] row 1: matches no run"),
        (GOOD_EXPERIMENT + '[grid]\nmethod = ["fedavg"]\n[[paper]]\nmethod = "fedavg"\nacc = 1\n'
         '[[paper]]\nmethod = "fedavg"\nacc = 2\n', "[[paper]] rows 1 and 2"),
        (GOOD_EXPERIMENT + "[grid]\nalpha = [1, 1.0]\n", "same run name"),
        (GOOD_EXPERIMENT + "[grid\n", "not valid TOML"),
    ],
)
def test_invalid_spec_names_the_key(tmp_path, text, names):
    path = _spec_file(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, cwd=tmp_path)
    message = str(info.value)
    assert "\n" not in message, f"one line: {message!r}"
    assert message.startswith(f"{path}: ")
    assert names in message


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.toml")


def test_parse_spec_defaults():
    spec = parse_spec(GOOD_EXPERIMENT)
    assert spec.experiment.client_cpus == 1 and spec.experiment.client_gpus == 0.0
    assert spec.base == {} and spec.grid == {} and spec.paper == []


# --------------------------------------------------------------------------- expansion


def test_expand_names_configs_and_order(tmp_path):
    spec = load_spec(_spec_file(tmp_path), cwd=tmp_path)
    runs = expand(spec, out_dir="out", cwd=tmp_path)
    assert [run.run_name for run in runs] == TINY_NAMES  # 2 methods × 2 α × 2 seeds, seeds innermost
    assert expand(spec, out_dir="out", cwd=tmp_path) == runs  # deterministic
    defaults = grid.app_defaults(REPO)
    for run in runs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run.run_name)  # RunConfig's run-name rule
        assert run.run_dir == (tmp_path / "out" / "tiny" / run.run_name)
        # the core keys and the method's own, all [tool.flwr.app.config] keys (Flower refuses others)
        assert RunConfig.keys() <= set(run.config) <= set(defaults)
        assert run.config["run-name"] == run.run_name
        assert run.config["output-dir"] == str(tmp_path / "out" / "tiny")
        assert run.config["data-dir"] == str(tmp_path / "data" / "here")  # relative to cwd, made absolute
        assert run.config["seed"] == run.seed and run.config["method"] == run.params["method"]
        assert run.config["alpha"] == run.params["alpha"] and run.config["model"] == "cnn"
        assert run.config["round-timeout"] == defaults["round-timeout"]
        assert tomllib.loads(tomli_w.dumps(run.config)) == run.config  # what the executor writes
    papers = {run.run_name: run.paper for run in runs}
    assert papers["tiny__method_local__alpha_0.5__seed_2"]["acc"] == 60.15
    assert sum(paper is not None for paper in papers.values()) == 2


def test_expand_without_grid_and_value_names(tmp_path):
    text = GOOD_EXPERIMENT.replace("seeds = [1]", "seeds = [3, 1]") + "[grid]\ndata-dir = [\"a/b c\"]\nalpha = [1]\n"
    spec = load_spec(_spec_file(tmp_path, text), cwd=tmp_path)
    runs = expand(spec, cwd=tmp_path)
    assert [run.run_name for run in runs] == ["t__data-dir_a-b-c__alpha_1.0__seed_3", "t__data-dir_a-b-c__alpha_1.0__seed_1"]
    assert runs[0].params == {"data-dir": "a/b c", "alpha": 1.0}
    assert runs[0].config["data-dir"] == str(tmp_path / "a" / "b c")
    only_seeds = load_spec(_spec_file(tmp_path, GOOD_EXPERIMENT, "s.toml"), cwd=tmp_path)
    assert [run.run_name for run in expand(only_seeds, cwd=tmp_path)] == ["t__seed_1"]


# --------------------------------------------------------------------------- running (fake executor)


def test_grid_runs_all_then_skips_finished(tmp_path):
    path = _spec_file(tmp_path)
    fake = FakeExecutor()
    stream = io.StringIO()
    result = _run(path, tmp_path, fake, stream=stream)
    experiment_dir = tmp_path / "out" / "tiny"
    assert fake.calls == TINY_NAMES and result.exit_code == 0
    assert set(_statuses(experiment_dir).values()) == {"done"}
    document = _grid_json(experiment_dir)
    assert document["name"] == "tiny" and document["counts"]["done"] == 8
    entry = document["runs"][0]
    assert entry["params"] == {"method": "fedavg", "alpha": 0.1} and entry["seed"] == 1
    assert entry["config"]["run-name"] == entry["run_name"] and entry["exit_code"] == 0
    assert entry["wall_seconds"] >= 0
    log = stream.getvalue()
    assert f"done {TINY_NAMES[0]} at round 2/2" in log and "8/8 runs" in log and "ETA" in log

    again = FakeExecutor()
    result = _run(path, tmp_path, again)
    assert again.calls == [] and result.exit_code == 0
    assert set(_statuses(experiment_dir).values()) == {"skipped"}


def test_interrupted_run_resumes_and_other_folders_are_moved_aside(tmp_path):
    """An interrupted run (config.json, no summary.json) resumes in its folder with resume = true;
    a failed run's folder and one without config.json are moved aside and run again; a finished
    run (its status, or none from before the status existed) is skipped."""
    path = _spec_file(tmp_path)
    experiment_dir = tmp_path / "out" / "tiny"
    finished, partial, failed, old_finished, empty = (experiment_dir / name for name in TINY_NAMES[:5])
    for folder in (finished, partial, failed, old_finished):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (finished / "summary.json").write_text('{"status": "finished"}')
    (old_finished / "summary.json").write_text("{}")
    (partial / "metrics.jsonl").write_text('{"round": 1, "acc_mean": 0.25}\n')
    failed_summary = '{"status": "failed", "failure": "no-valid-replies"}'
    (failed / "summary.json").write_text(failed_summary)
    empty.mkdir()
    (empty / "stray").write_text("x")
    fake = FakeExecutor()
    stream = io.StringIO()
    result = _run(path, tmp_path, fake, stream=stream)
    assert fake.calls == [TINY_NAMES[1], TINY_NAMES[2], *TINY_NAMES[4:]] and fake.resumed == [TINY_NAMES[1]]
    statuses = _statuses(experiment_dir)
    assert statuses[TINY_NAMES[0]] == statuses[TINY_NAMES[3]] == "skipped" and result.count("done") == 6
    rows = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["acc_mean"]) for row in rows] == [(1, 0.25), (2, 0.5)]  # round 1 kept
    assert not list(experiment_dir.glob(f"{TINY_NAMES[1]}.incomplete-*"))
    entries = {entry["run_name"]: entry for entry in _grid_json(experiment_dir)["runs"]}
    assert entries[TINY_NAMES[1]]["resumed_after_round"] == 1 and entries[TINY_NAMES[1]]["config"]["resume"] is False
    assert f"start {TINY_NAMES[1]} (resuming from its checkpoint after round 1)" in stream.getvalue()
    (failed_aside,) = experiment_dir.glob(f"{TINY_NAMES[2]}.incomplete-*")
    assert (failed_aside / "summary.json").read_text() == failed_summary  # nothing lost
    (empty_aside,) = experiment_dir.glob(f"{TINY_NAMES[4]}.incomplete-*")
    assert re.fullmatch(rf"{re.escape(TINY_NAMES[4])}\.incomplete-\d{{8}}T\d{{6}}Z", empty_aside.name)
    assert (empty_aside / "stray").read_text() == "x"
    assert entries[TINY_NAMES[4]]["moved_aside"] == str(empty_aside)
    assert (failed / "summary.json").is_file() and (empty / "summary.json").is_file()  # the redone runs


def test_failed_runs_are_logged_and_the_grid_goes_on(tmp_path):
    path = _spec_file(tmp_path)
    crashed, silent = TINY_NAMES[2], TINY_NAMES[5]
    fake = FakeExecutor(fail={crashed: (1, None), silent: (0, None)})
    stream = io.StringIO()
    result = _run(path, tmp_path, fake, stream=stream)
    experiment_dir = tmp_path / "out" / "tiny"
    assert fake.calls == TINY_NAMES and result.exit_code == 1
    statuses = _statuses(experiment_dir)
    assert [name for name, status in statuses.items() if status == "failed"] == [crashed, silent]
    assert result.count("done") == 6
    log = (experiment_dir / f"{crashed}.log").read_text()
    assert "exit status 1; no summary.json in" in log.splitlines()[0] and f"boom in {crashed}" in log
    assert len(log.splitlines()) <= grid.LOG_TAIL_LINES + 1  # the tail, not everything
    assert "exit status 0; no summary.json" in (experiment_dir / f"{silent}.log").read_text().splitlines()[0]
    entries = {run["run_name"]: run for run in _grid_json(experiment_dir)["runs"]}
    assert entries[crashed]["exit_code"] == 1 and entries[crashed]["log"] == str(experiment_dir / f"{crashed}.log")
    printed = stream.getvalue()
    assert f"FAILED {crashed} at round 2/2" in printed and "2 failed" in printed
    assert printed.splitlines()[-3].startswith(f"[grid] FAILED {crashed}: exit status 1")  # listed at the end

    fixed = FakeExecutor()
    result = _run(path, tmp_path, fixed)  # no summary.json: they resume, after their 2 recorded rounds
    assert fixed.calls == fixed.resumed == [crashed, silent] and result.exit_code == 0
    assert not (experiment_dir / f"{crashed}.log").exists()  # the old log is moved aside
    assert len(list(experiment_dir.glob(f"{crashed}.incomplete-*.log"))) == 1


def test_a_run_whose_summary_says_failed_fails_the_grid(tmp_path):
    """Exit status 0 but summary.json says failed: a failed run, its reason from the summary."""
    path = _spec_file(tmp_path)
    fake = FakeExecutor(fail={TINY_NAMES[1]: (0, "failed")})
    stream = io.StringIO()
    result = _run(path, tmp_path, fake, stream=stream)
    assert result.exit_code == 1 and result.count("failed") == 1
    reason = "exit status 0; summary.json: failed (no-valid-replies: round 2: no client sent a valid reply)"
    assert f"[grid] FAILED {TINY_NAMES[1]}: {reason}" in stream.getvalue()
    again = FakeExecutor()
    assert _run(path, tmp_path, again).exit_code == 0 and again.calls == [TINY_NAMES[1]] and again.resumed == []


def test_executor_exception_is_a_failed_run(tmp_path):
    def broken(run, on_line):
        on_line("starting")
        raise RuntimeError("flower-superlink did not start")

    result = _run(_spec_file(tmp_path), tmp_path, broken)
    assert result.exit_code == 1 and result.count("failed") == 8
    log = (tmp_path / "out" / "tiny" / f"{TINY_NAMES[0]}.log").read_text()
    assert "RuntimeError: flower-superlink did not start" in log and "starting" in log


def test_keyboard_interrupt_then_resume_runs_only_the_rest(tmp_path):
    path = _spec_file(tmp_path)
    experiment_dir = tmp_path / "out" / "tiny"
    first = FakeExecutor(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _run(path, tmp_path, first)
    assert first.calls == TINY_NAMES[:3]
    statuses = _statuses(experiment_dir)
    assert [statuses[name] for name in TINY_NAMES] == ["done", "done", "interrupted", *["planned"] * 5]

    second = FakeExecutor()
    result = _run(path, tmp_path, second)
    assert second.calls == TINY_NAMES[2:] and second.resumed == [TINY_NAMES[2]] and result.exit_code == 0
    assert [run["status"] for run in _grid_json(experiment_dir)["runs"]] == ["skipped"] * 2 + ["done"] * 6
    assert not list(experiment_dir.glob("*.incomplete-*"))
    rows = (experiment_dir / TINY_NAMES[2] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [1, 2]  # round 1 from before the interrupt


def test_ctrl_c_while_waiting_cancels_running_runs(tmp_path):
    """Ctrl-C in the main thread: the executor's cancel() stops the running runs, which end as
    'interrupted' (not 'failed', no log), and the KeyboardInterrupt propagates."""

    class Blocking:
        def __init__(self):
            self.cancelled = threading.Event()
            self.calls = []
            self.lock = threading.Lock()

        def __call__(self, run, on_line):
            run.run_dir.mkdir(parents=True)
            with self.lock:
                self.calls.append(run.run_name)
                if len(self.calls) == 2:
                    _thread.interrupt_main()
            assert self.cancelled.wait(10), "cancel() was not called"
            return -15, "killed"

        def cancel(self):
            self.cancelled.set()

    fake = Blocking()
    # Python's own handler: a shell's background job starts with SIGINT ignored, and then
    # interrupt_main() does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(_spec_file(tmp_path), tmp_path, fake, parallel=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    experiment_dir = tmp_path / "out" / "tiny"
    statuses = _statuses(experiment_dir)
    assert sorted(fake.calls) == sorted(TINY_NAMES[:2])
    assert [statuses[name] for name in TINY_NAMES] == ["interrupted"] * 2 + ["planned"] * 6
    assert not list(experiment_dir.glob("*.log"))


def test_a_second_invocation_of_the_same_grid_is_refused(tmp_path):
    path = _spec_file(tmp_path)
    experiment_dir = tmp_path / "out" / "tiny"
    experiment_dir.mkdir(parents=True)
    held = grid._lock(experiment_dir)  # as a running `fedlora-flwr grid` holds it
    try:
        fake = FakeExecutor()
        with pytest.raises(SpecError, match="another `fedlora-flwr grid`"):
            _run(path, tmp_path, fake)
        assert fake.calls == []
    finally:
        held.close()
    assert _run(path, tmp_path, FakeExecutor()).count("done") == 8


def test_parallel_runs_at_once(tmp_path):
    fake = FakeExecutor(delay=0.05)
    result = _run(_spec_file(tmp_path), tmp_path, fake, parallel=3)
    assert sorted(fake.calls) == sorted(TINY_NAMES) and result.count("done") == 8
    assert fake.max_running == 3


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    path = _spec_file(tmp_path)
    experiment_dir = tmp_path / "out" / "tiny"
    for name in TINY_NAMES[:3]:
        (experiment_dir / name).mkdir(parents=True)
    (experiment_dir / TINY_NAMES[0] / "config.json").write_text("{}")
    (experiment_dir / TINY_NAMES[0] / "summary.json").write_text("{}")
    (experiment_dir / TINY_NAMES[2] / "config.json").write_text("{}")
    (experiment_dir / TINY_NAMES[2] / "metrics.jsonl").write_text('{"round": 1}\n')
    before = sorted(p.name for p in experiment_dir.iterdir())
    plan = io.StringIO()

    def never(run, on_line):
        raise AssertionError("a dry run must not execute")

    result = run_grid(load_spec(path, cwd=tmp_path), out_dir="out", dry_run=True, execute=never, cwd=tmp_path, plan_stream=plan)
    text = plan.getvalue()
    assert f"grid tiny: 8 runs (4 configurations × 2 seeds) -> {experiment_dir}" in text
    assert re.search(rf"skip\s+{TINY_NAMES[0]}", text) and re.search(rf"redo\s+{TINY_NAMES[1]}", text)
    assert re.search(rf"resume\s+{TINY_NAMES[2]}\s+\(interrupted after round 1: resumes from its checkpoint\)", text)
    assert all(re.search(rf"run\s+{name}", text) for name in TINY_NAMES[3:])
    assert "paper 60.15±0.86" in text
    assert "would run 7 (1 to resume, 1 to redo), skip 1" in text
    assert sorted(p.name for p in experiment_dir.iterdir()) == before  # nothing written or moved
    assert result.count("skipped") == 1 and result.count("planned") == 7


def test_progress_reads_rounds_from_run_folders_and_estimates_from_rounds(tmp_path, monkeypatch):
    runs = expand(load_spec(_spec_file(tmp_path), cwd=tmp_path), out_dir="out", cwd=tmp_path)[:3]
    stream = io.StringIO()
    clock = [1000.0]
    monkeypatch.setattr(grid.time, "monotonic", lambda: clock[0])
    progress = grid.Progress(total=4, finished=1, parallel=1, stream=stream)
    for run in runs:
        progress.pending(run, 0)  # 2 rounds each
    progress.started(runs[0], 0, None)
    assert progress.eta() is None
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "config.json").write_text(json.dumps(runs[0].config))
    (runs[0].run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    clock[0] += 30.0
    progress.poll()  # 1 round in 30 s, 5 rounds left
    assert progress.eta() == pytest.approx(150.0)
    assert f"{runs[0].run_name} round 1/2 | ETA 3m 00s" in stream.getvalue()  # shown to the minute
    assert "1/4 runs" in stream.getvalue()
    (runs[0].run_dir / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    clock[0] += 30.0
    progress.finished(runs[0], "done", 60.0)
    assert progress.eta() == pytest.approx(120.0) and "2/4 runs" in stream.getvalue()
    assert f"done {runs[0].run_name} at round 2/2 in 60s" in stream.getvalue()
    progress.close()


def test_ray_cpus_per_parallel_run():
    assert grid.ray_cpus_for(1, 2) is None
    assert grid.ray_cpus_for(2, 2) == 1
    assert grid.ray_cpus_for(3, 2) == 1
    assert grid.ray_cpus_for(2, 16) == 8


def test_resources_are_checked_before_running(tmp_path):
    path = _spec_file(tmp_path, TINY.replace("num-clients = 2", "num-clients = 2\nclient-cpus = 4096"))
    with pytest.raises(SpecError, match=r"client-cpus=4096"):
        run_grid(load_spec(path, cwd=tmp_path), out_dir="out", cwd=tmp_path, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_superlink_executor_passes_the_full_config(tmp_path, monkeypatch):
    """The real executor: a private SuperLink per run, the run's full config (LocalSuperLink.run
    hands it to Flower as one TOML file), the simulation size/resources and the Ray CPU cap."""
    seen = {}

    class FakeLink:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen["stopped"] = True

        def run(self, app_dir, run_config, **kwargs):
            seen.update(app_dir=app_dir, run_config=run_config, **kwargs)
            return 0, "ok"

        def stop(self):
            pass

    import fedlora_flwr.superlink

    monkeypatch.setattr(fedlora_flwr.superlink, "LocalSuperLink", FakeLink)
    run = expand(load_spec(_spec_file(tmp_path), cwd=tmp_path), cwd=tmp_path)[0]
    executor = grid.SuperLinkExecutor(REPO, num_supernodes=7, client_cpus=1, client_gpus=0.5, timeout=60, ray_cpus=1)
    assert executor(run, print) == (0, "ok")
    assert seen["run_config"] == run.config
    assert (seen["num_supernodes"], seen["client_cpus"], seen["client_gpus"]) == (7, 1, 0.5)
    assert seen["ray_cpus"] == 1 and seen["timeout"] == 60 and seen["stopped"]


# --------------------------------------------------------------------------- command line


def test_cli_dry_run(tmp_path, capsys):
    path = _spec_file(tmp_path)
    assert main(["grid", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "grid tiny: 8 runs" in out and TINY_NAMES[-1] in out
    assert not (tmp_path / "out").exists()


def test_cli_seeds_runs_a_subset_of_the_spec_seeds(tmp_path, capsys):
    path = _spec_file(tmp_path)
    assert main(["grid", str(path), "--dry-run", "--seeds", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "grid tiny: 4 runs (4 configurations × 1 seeds)" in out
    assert "seed_2" in out and "seed_1" not in out
    assert main(["grid", str(path), "--dry-run", "--seeds", "3"]) == 2
    assert capsys.readouterr().err.strip() == "fedlora-flwr grid: --seeds 3: [3] not among the spec's seeds [1, 2]"


def test_cli_invalid_spec_exits_2_with_one_line(tmp_path, capsys):
    path = _spec_file(tmp_path, GOOD_EXPERIMENT + "[grid]\nalpha = [0.0]\n")
    assert main(["grid", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedlora-flwr grid: ") and "[grid] alpha=0.0" in err


def test_cli_a_corrupt_run_folder_exits_2_with_one_line_naming_the_file(tmp_path, capsys):
    run_dir = tmp_path / "out" / "tiny" / TINY_NAMES[0]
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "acc\n')
    assert main(["grid", str(_spec_file(tmp_path)), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedlora-flwr grid: {run_dir / 'metrics.jsonl'} line 2: not JSON (Unterminated string starting at: " \
                  "line 1 column 14 (char 13))"


def test_cli_usage(capsys):
    assert main(["grid", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out
    assert main([]) == 2  # a subcommand is required


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.name)
def test_shipped_spec_validates(path):
    text = path.read_text()
    spec = parse_spec(text, str(path))
    assert spec.experiment.name == path.stem
    if spec.base.get("dataset") == "npz" and not REAL_NPZ.is_file():
        pytest.skip(f"{REAL_NPZ} absent: {path.name} reads the real CIFAR-10 subset from ../shared/data")
    spec = load_spec(path, cwd=REPO)  # relative paths resolve against the repository root
    runs = expand(spec, cwd=REPO)
    assert runs and len(runs) % len(spec.experiment.seeds) == 0
    if spec.paper:
        assert all(run.paper is not None for run in runs), "every run of a spec with paper numbers has one"


def test_shipped_specs_cover_the_paper():
    names = {path.stem for path in SPECS}
    assert {"table1-cpu", "table1-cifar10", "table1-cifar100", "table1-tiny-imagenet", "table2-ranks",
            "fig4-lora-epochs", "table3-alternating", "table3-alternating-cifar100",
            "table3-alternating-tiny-imagenet", "table4-cpu", "table4-capacity-cifar10",
            "table4-capacity-cifar100", "table5-participation", "table6-agnews", "table6-agnews-cpu"} <= names


def test_cpu_table1_spec(real_npz):
    spec = load_spec(REPO / "experiments" / "grids" / "table1-cpu.toml", cwd=REPO)
    runs = expand(spec, cwd=REPO)
    methods = {"fedavg", "local", "fedper", "fedrep", "fedbn", "fedrod", "fedamp", "pfedsd", "pfedgate", "fedcac", "fedlora"}
    assert len(runs) == 33 and {run.params["method"] for run in runs} == methods
    assert all(run.config["data-dir"] == str(real_npz.resolve()) and run.config["model"] == "cnn" for run in runs)
    assert {run.params["method"]: run.paper["acc"] for run in runs} == {
        "fedavg": 60.39, "local": 81.91, "fedper": 84.43, "fedrep": 84.59, "fedbn": 83.55, "fedrod": 86.23,
        "fedamp": 84.99, "pfedsd": 86.34, "pfedgate": 87.25, "fedcac": 86.82, "fedlora": 85.47,
    }


def test_table6_agnews_specs():
    full, cpu = (expand(load_spec(REPO / "experiments" / "grids" / f"{name}.toml", cwd=REPO), cwd=REPO)
                 for name in ("table6-agnews", "table6-agnews-cpu"))
    assert all(run.config["model"] == "transformer-small" and run.config["alpha"] == 1.0 for run in full + cpu)
    assert {run.params["method"]: run.paper["acc"] for run in full} == {
        "fedavg": 89.36, "fedper": 90.76, "fedrod": 91.38, "fedlora": 91.79}
    assert len(full) == 12 and all(run.config["train-per-client"] == 3000 for run in full)
    assert {run.params["method"] for run in cpu} == {"fedavg", "local", "fedlora"}


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_real_grid_runs_then_skips(tmp_path):
    """Two tiny real runs side by side (parallel 2: a private SuperLink each, Ray capped at
    cpus // 2), then the same grid again: both skipped."""
    text = """\
[experiment]
name = "e2e"
seeds = [1]
num-clients = 2
client-cpus = 1

[base]
dataset = "synthetic"
model = "cnn"
num-server-rounds = 1
local-epochs = 1
lora-epochs = 1
train-per-client = 50
test-per-client = 20
device = "cpu"

[grid]
method = ["fedavg", "local"]
"""
    spec = load_spec(_spec_file(tmp_path, text), cwd=tmp_path)
    stream = io.StringIO()
    started = time.monotonic()
    result = run_grid(spec, out_dir="out", parallel=2, timeout=300, cwd=tmp_path, stream=stream)
    print(f"e2e grid of 2 runs, parallel 2: {time.monotonic() - started:.1f}s")
    experiment_dir = tmp_path / "out" / "e2e"
    assert result.exit_code == 0, stream.getvalue() + "".join(p.read_text() for p in experiment_dir.glob("*.log"))
    for method in ("fedavg", "local"):
        summary = json.loads((experiment_dir / f"e2e__method_{method}__seed_1" / "summary.json").read_text())
        assert summary["method"] == method and summary["rounds"] == 1 and summary["num_clients"] == 2
    assert "round 1/1" in stream.getvalue()

    again = run_grid(spec, out_dir="out", parallel=2, cwd=tmp_path, stream=io.StringIO())
    assert again.count("skipped") == 2 and again.exit_code == 0
    assert set(_statuses(experiment_dir).values()) == {"skipped"}


RESUME_SPEC = """\
[experiment]
name = "{name}"
seeds = {seeds}
num-clients = 2
client-cpus = 1

[base]
dataset = "synthetic"
model = "cnn"
num-server-rounds = 2
local-epochs = 2
lora-epochs = 1
train-per-client = 200
test-per-client = 40
device = "cpu"

[grid]
method = {methods}
"""
WALL_CLOCK = {"elapsed_s", "train_elapsed_s", "wall_seconds", "run_dir", "run-dir"}


def _grid_process(spec: Path, out: Path) -> subprocess.Popen:
    """``fedlora-flwr grid SPEC --out OUT`` in its own process group, with Python's Ctrl-C handler
    (a shell's background job would start it with SIGINT ignored)."""
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from fedlora_flwr.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen(
        [sys.executable, "-c", code, "grid", str(spec), "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> str:
    """Wait for the grid process (Ctrl-C first, then its process group killed by id) and return its output."""
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    return output


def _rows_without_clock(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_real_grid_interrupted_mid_run_resumes_it_from_its_checkpoint(tmp_path):
    """`fedlora-flwr grid` on 2 methods × 2 rounds, Ctrl-C (SIGINT to its pid) once the first run
    checkpointed round 1; the same command again resumes that run (not from round 1) and it ends
    with the metrics and summary of an uninterrupted grid of that run. load_runs on the grid gives
    one row per run × round; the report gives one row per method. (One seed: the report's mean over
    seeds is tests/test_report.py's.)"""
    started = time.monotonic()
    spec = tmp_path / "e2e.toml"
    spec.write_text(RESUME_SPEC.format(name="e2e", seeds="[1]", methods='["fedlora", "fedavg"]'))
    experiment_dir = tmp_path / "out" / "e2e"
    first_run = experiment_dir / "e2e__method_fedlora__seed_1"
    process = _grid_process(spec, tmp_path / "out")
    try:
        deadline = time.monotonic() + 400
        while not (first_run / "checkpoint.safetensors").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "no round-1 checkpoint"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
    finally:
        output = _stop(process)
    assert process.returncode == 130, output
    assert not (first_run / "summary.json").exists(), "the grid finished the run before Ctrl-C: " + output
    assert _statuses(experiment_dir)["e2e__method_fedlora__seed_1"] == "interrupted"
    rounds_before = len((first_run / "metrics.jsonl").read_text().splitlines())
    assert rounds_before >= 1

    process = _grid_process(spec, tmp_path / "out")
    output = _stop(process)
    assert process.returncode == 0, output
    assert f"start e2e__method_fedlora__seed_1 (resuming from its checkpoint after round {rounds_before})" in output
    entries = {entry["run_name"]: entry for entry in _grid_json(experiment_dir)["runs"]}
    assert entries["e2e__method_fedlora__seed_1"]["resumed_after_round"] == rounds_before
    assert {entry["status"] for entry in entries.values()} == {"done"}
    assert not list(experiment_dir.glob("*.incomplete-*"))

    reference = tmp_path / "reference.toml"
    reference.write_text(RESUME_SPEC.format(name="e2e", seeds="[1]", methods='["fedlora"]'))
    process = _grid_process(reference, tmp_path / "ref")
    output = _stop(process)
    assert process.returncode == 0, output
    uninterrupted = tmp_path / "ref" / "e2e" / "e2e__method_fedlora__seed_1"
    assert _rows_without_clock(first_run) == _rows_without_clock(uninterrupted)
    summaries = [{k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in WALL_CLOCK}
                 for folder in (first_run, uninterrupted)]
    assert summaries[0] == summaries[1] and summaries[0]["rounds"] == 2

    frame = load_runs(experiment_dir)
    assert len(frame) == 4 and frame.groupby("run").size().tolist() == [2] * 2
    assert frame["round"].tolist() == [1, 2] * 2 and set(frame.status) == {"finished"}
    assert sorted(frame.groupby(["method", "seed"]).size().index) == [("fedavg", 1), ("fedlora", 1)]
    assert {"acc_mean", "best_acc_mean", "final_acc_mean", "num_clients", "num-server-rounds"} <= set(frame.columns)
    resumed = frame[frame.run == "e2e__method_fedlora__seed_1"]
    assert resumed["resume"].tolist() == [True, True] and resumed.best_acc_mean.notna().all()
    report = make_report(experiment_dir, out=tmp_path / "report", echo=lambda _: None)
    assert report.table[["method", "n"]].values.tolist() == [["fedavg", 1], ["fedlora", 1]]
    assert report.table.runs.map(len).tolist() == [1, 1] and not report.skipped
    print(f"interrupted + resumed grid of 2 runs and the reference run: {time.monotonic() - started:.1f}s")
