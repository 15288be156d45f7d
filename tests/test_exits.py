"""Failures are loud: the ServerApp raises Flower ``AppExitException`` subclasses with distinct
exit codes, logs one line, and ``summary.json`` records how the run ended (in process, real
ServerApp and ClientApp)."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app.exception import AppExitException
from flwr.supercore.exit import ExitCode
from inprocess import InProcessGrid
from test_federation import _metrics, _run_config, _start

from fedlora_flwr import client_app
from fedlora_flwr.exits import FAILURES, FLOWER_RESERVED, NoValidReplies, RunConfigError, RunStateError, status_in
from fedlora_flwr.results import CHECKPOINT_FILE, run_finished
from fedlora_flwr.runner import exit_status
from strategies.base import PersonalizedStrategy

NUM_CLIENTS = 3


def test_exit_codes_are_distinct_and_outside_flowers():
    flower_codes = [value for name, value in vars(ExitCode).items() if not name.startswith("_") and isinstance(value, int)]
    assert flower_codes and max(flower_codes) < FLOWER_RESERVED
    statuses = [failure.status for failure in FAILURES]
    assert len(set(statuses)) == len(FAILURES) and min(statuses) > 1 and max(statuses) < 124
    for failure in FAILURES:
        assert issubclass(failure, AppExitException) and failure.exit_code == FLOWER_RESERVED + failure.status
        assert status_in(f"ServerApp failed with exception: {failure('why')}") == failure.status


@pytest.mark.parametrize(("status", "details", "code"), [
    ("finished:completed", "", 0),
    ("finished:failed", "Simulation failed with exception: [fedlora-flwr exit 2] invalid run config: x", 2),
    ("finished:failed", "ServerApp failed with exception: [fedlora-flwr exit 4] round 1: no client sent", 4),
    ("finished:failed", "ServerApp failed with exception: division by zero", 1),
    ("finished:stopped", "", 1),
])
def test_exit_status_of_a_finished_run(status, details, code):
    assert exit_status(status, details) == code


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _fedlora_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "[fedlora-flwr]" in r.getMessage()]


class FailingFromRound(InProcessGrid):
    """Every client replies to train messages with an error from round ``first`` on (queries are
    answered: the nodes are there)."""

    def __init__(self, *args, first: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first = first

    def push_messages(self, messages):
        messages = list(messages)
        training = bool(messages) and messages[0].metadata.message_type == "train"
        late = training and int(messages[0].content["config"]["server-round"]) >= self.first
        self.failing = set(range(NUM_CLIENTS)) if late else set()
        return super().push_messages(messages)


def test_a_round_without_a_valid_reply_stops_the_run(tmp_path, caplog):
    config = _run_config(tmp_path / "outputs", "none-valid")
    grid = FailingFromRound(client_app.app, NUM_CLIENTS, config, first=1)
    with caplog.at_level(logging.ERROR), pytest.raises(NoValidReplies) as info:
        _start(grid, config)
    assert info.value.exit_code == 904
    (line,) = _fedlora_errors(caplog)
    assert line.startswith("[fedlora-flwr] exit 4 (no-valid-replies): round 1: no client sent a valid reply")
    run_dir = tmp_path / "outputs" / "none-valid"
    summary = _summary(run_dir)
    assert summary["status"] == "failed" and summary["failure"] == "no-valid-replies" and summary["exit_status"] == 4
    assert summary["reason"] == ("round 1: no client sent a valid reply (3 asked, 3 replied, 3 errors, 0 bad updates); "
                                 "first error: injected failure")
    assert summary["rounds"] == 0 and _metrics(run_dir) == []
    assert not (run_dir / "shared.safetensors").exists() and not run_finished(run_dir)


def test_a_later_failure_keeps_the_recorded_rounds(tmp_path):
    config = _run_config(tmp_path / "outputs", "late", **{"num-server-rounds": 3})
    grid = FailingFromRound(client_app.app, NUM_CLIENTS, config, first=2)
    with pytest.raises(NoValidReplies, match=r"^\[fedlora-flwr exit 4\] round 2: "):
        _start(grid, config)
    run_dir = tmp_path / "outputs" / "late"
    summary = _summary(run_dir)
    assert [row["round"] for row in _metrics(run_dir)] == [1]
    assert summary["status"] == "failed" and summary["rounds"] == 1 and summary["best_round"] == 1
    assert summary["final_acc_mean"] == _metrics(run_dir)[0]["acc_mean"]


def test_an_unexpected_error_is_recorded_and_raised_as_it_is(tmp_path, caplog, monkeypatch):
    def broken(self, server_round, replies, weights):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(PersonalizedStrategy, "aggregate", broken)
    config = _run_config(tmp_path / "outputs", "bug")
    with caplog.at_level(logging.ERROR), pytest.raises(ZeroDivisionError):
        _start(InProcessGrid(client_app.app, NUM_CLIENTS, config), config)
    assert _fedlora_errors(caplog) == ["[fedlora-flwr] run failed: ZeroDivisionError: boom"]
    summary = _summary(tmp_path / "outputs" / "bug")
    assert (summary["status"], summary["failure"], summary["exit_status"], summary["reason"]) == (
        "failed", "error", 1, "ZeroDivisionError: boom")


def test_a_finished_run_says_so(tmp_path):
    config = _run_config(tmp_path / "outputs", "fine", **{"num-server-rounds": 1})
    _start(InProcessGrid(client_app.app, NUM_CLIENTS, config), config)
    run_dir = tmp_path / "outputs" / "fine"
    assert _summary(run_dir)["status"] == "finished" and run_finished(run_dir)


def test_a_corrupt_checkpoint_stops_a_resume_and_leaves_the_run_as_it_was(tmp_path, caplog):
    config = _run_config(tmp_path / "outputs", "resumed", **{"num-server-rounds": 1})
    _start(InProcessGrid(client_app.app, NUM_CLIENTS, config), config)
    run_dir = tmp_path / "outputs" / "resumed"
    checkpoint = run_dir / CHECKPOINT_FILE
    data = bytearray(checkpoint.read_bytes())
    data[-8:] = b"\xff" * 8  # inside the last tensor: its checksum no longer matches
    checkpoint.write_bytes(bytes(data))
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    resumed = {**config, "resume": True, "num-server-rounds": 2}
    with caplog.at_level(logging.ERROR), pytest.raises(RunStateError) as info:
        _start(InProcessGrid(client_app.app, NUM_CLIENTS, resumed), resumed)
    assert info.value.exit_code == 905
    (line,) = _fedlora_errors(caplog)
    assert line.startswith("[fedlora-flwr] exit 5 (state-error): ") and str(checkpoint) in line
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def test_a_refused_config_is_exit_2_and_writes_nothing(tmp_path):
    config = _run_config(tmp_path / "outputs", "never", **{"rank-conv": 0.0})
    with pytest.raises(RunConfigError) as info:
        _start(InProcessGrid(client_app.app, NUM_CLIENTS, config), config)
    assert info.value.exit_code == 902 and info.value.status == 2
    assert not (tmp_path / "outputs").exists()
