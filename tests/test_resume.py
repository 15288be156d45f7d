"""Checkpoint and resume, in process (tests/inprocess.py): a run that crashed after a round and was
resumed with ``resume = true`` ends exactly as the same run without the crash.

The crash happens at the worst moment: round t's row is in ``metrics.jsonl`` and every client and
the server have saved their round-t state, but round t's checkpoint is not written, so the resumed
run must redo round t from the round-(t-1) state.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors import safe_open
from test_federation import _quiet_flower, _run_config

from fedlora_flwr import client_app, server_app
from fedlora_flwr.exits import RunConfigError, RunStateError
from fedlora_flwr.results import CHECKPOINT_FILE, RunRecorder
from fedlora_flwr.store import saved_round

NUM_CLIENTS = 3
ROUNDS = 3
WALL_CLOCK = {"elapsed_s", "train_elapsed_s", "wall_seconds", "run_dir"}


class Crash(RuntimeError):
    """Stands for a SIGKILL of the server between a round's metrics row and its checkpoint."""


def _config(output_dir: Path, run_name: str, method: str, **overrides) -> dict:
    """test_federation's tiny run, 3 rounds, 2 of 3 clients training each round (non-participants
    keep older state)."""
    return _run_config(output_dir, run_name, method=method,
                       **{"num-server-rounds": ROUNDS, "fraction-train": 0.67, **overrides})


def _start(config: dict, grid_class: type[InProcessGrid] = InProcessGrid) -> InProcessGrid:
    grid = grid_class(client_app.app, NUM_CLIENTS, config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with _quiet_flower():
        server_app.main(grid, context)
    return grid


def _crash_at(monkeypatch, crash_round: int) -> None:
    save = RunRecorder.save_checkpoint

    def save_or_crash(self, server_round, *args):
        if server_round == crash_round:
            raise Crash(f"killed before round {server_round}'s checkpoint")
        save(self, server_round, *args)

    monkeypatch.setattr(RunRecorder, "save_checkpoint", save_or_crash)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in WALL_CLOCK} for row in rows]


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {key: value for key, value in summary.items() if key not in WALL_CLOCK}


def _state_files(run_dir: Path) -> dict[str, tuple[dict[str, bytes], dict[str, str]]]:
    """Every per-client state file (both versions) and the final shared tensors: each tensor's
    dtype, shape and bytes, and the metadata (safetensors orders its header keys arbitrarily)."""
    files = [*run_dir.glob("clients/*/*.safetensors"), *run_dir.glob("server/*/*.safetensors"), run_dir / "shared.safetensors"]
    contents = {}
    for path in files:
        with safe_open(path, framework="np") as handle:
            tensors = {key: (str(handle.get_tensor(key).dtype), handle.get_tensor(key).shape, handle.get_tensor(key).tobytes())
                       for key in handle.keys()}
            contents[str(path.relative_to(run_dir))] = (tensors, handle.metadata())
    return contents


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per method, shared by the tests below."""
    runs = {}

    def run(method: str) -> Path:
        if method not in runs:
            config = _config(tmp_path_factory.mktemp(method), "run", method)
            _start(config)
            runs[method] = Path(config["output-dir"]) / "run"
        return runs[method]

    return run


# pfedsd: evaluated after training, a client that sits out round 3 keeps its carried evaluation (checkpointed)
@pytest.mark.parametrize(("method", "crash_round"), [("fedlora", 2), ("fedamp", 1), ("fedcac", 3), ("pfedsd", 3)])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, uninterrupted, method, crash_round):
    reference = uninterrupted(method)
    config = _config(tmp_path, "run", method)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _crash_at(patch, crash_round)
        with pytest.raises(Crash):
            _start(config)
    assert len(_rows(run_dir)) == crash_round, "the crashed round's row was written"
    stale = [path for path in run_dir.glob("*/*/*.safetensors") if saved_round(path) == crash_round]
    assert stale, "clients (and the server) saved state for the round the checkpoint does not hold"

    _start({**config, "resume": True})
    assert _rows(run_dir) == _rows(reference)
    assert _summary(run_dir) == _summary(reference)
    assert _state_files(run_dir) == _state_files(reference)


def test_resume_with_more_rounds_continues_a_finished_run(tmp_path, uninterrupted):
    reference = uninterrupted("fedlora")
    config = _config(tmp_path, "run", "fedlora", **{"num-server-rounds": 2})
    _start(config)
    _start({**config, "num-server-rounds": ROUNDS, "resume": True})
    run_dir = tmp_path / "run"
    assert _rows(run_dir) == _rows(reference)
    assert _summary(run_dir) == _summary(reference)
    assert json.loads((run_dir / "config.json").read_text())["num-server-rounds"] == ROUNDS


def _error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def _refused(config: dict, caplog, failure: type = RunConfigError) -> str:
    caplog.clear()
    with pytest.raises(failure):
        _start(config)
    (line,) = _error_lines(caplog)
    assert "\n" not in line
    return line


def test_resume_with_another_config_is_refused_in_one_line(tmp_path, caplog):
    config = _config(tmp_path, "run", "fedlora", **{"num-server-rounds": 1})
    _start(config)
    run_dir = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    line = _refused({**config, "resume": True, "seed": 2, "alpha": 0.5}, caplog)
    assert "alpha (0.1 -> 0.5)" in line and "seed (1 -> 2)" in line and str(run_dir / "config.json") in line
    line = _refused({**config, "resume": True, "num-server-rounds": 1, "method": "fedavg"}, caplog)
    assert "method" in line
    (run_dir / "config.json").write_text(json.dumps({**json.loads(before["config.json"]), "num-server-rounds": 2}))
    line = _refused({**config, "resume": True}, caplog)
    assert "num-server-rounds=1 is below the run's 2" in line
    (run_dir / "config.json").write_bytes(before["config.json"])
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def test_resume_of_a_missing_run_is_refused_in_one_line(tmp_path, caplog):
    line = _refused(_config(tmp_path, "nope", "fedlora", resume=True), caplog)
    assert "no run 'nope'" in line and str(tmp_path) in line
    assert not (tmp_path / "nope").exists()
    line = _refused(_config(tmp_path, "", "fedlora", resume=True), caplog)
    assert "resume" in line and "run-name" in line


def test_checkpoint_holds_the_round_and_the_next_rounds_arrays(uninterrupted):
    from fedlora_flwr.results import load_checkpoint
    from safetensors.torch import load_file

    run_dir = uninterrupted("fedlora")
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.round == ROUNDS and checkpoint.strategy == {"aggregated_rounds": ROUNDS, "after_training": {}}
    shared = load_file(run_dir / "shared.safetensors")
    assert list(checkpoint.arrays.keys()) and set(checkpoint.arrays.keys()) == set(shared)
    for key, tensor in checkpoint.arrays.to_torch_state_dict().items():
        assert tensor.dtype == shared[key].dtype and tensor.equal(shared[key])
    assert (run_dir / CHECKPOINT_FILE).is_file()


# --------------------------------------------------------------------------- a real crash


@pytest.mark.e2e
def test_resume_after_sigkill_of_the_superlink_equals_the_uninterrupted_run(tmp_path):
    """``flwr run`` through a private SuperLink; SIGKILL to the SuperLink's process group and
    everything below it once round 1 is recorded; a fresh SuperLink and ``resume = true`` finish
    the run, which then equals an uninterrupted one (metrics rows without wall-clock fields,
    summary accuracies, every per-client state file and the final shared tensors)."""
    from conftest import REPO

    from fedlora_flwr.superlink import LocalSuperLink

    base = dict(dataset="synthetic", model="cnn", **{
        "num-server-rounds": ROUNDS, "local-epochs": 1, "lora-epochs": 1, "lora-schedule": "simultaneous",
        "train-per-client": 40, "test-per-client": 20, "output-dir": str(tmp_path), "data-dir": str(tmp_path / "data"),
        "device": "cpu"})
    run_dir = tmp_path / "crashed"
    crashed = {**base, "run-name": "crashed"}
    with LocalSuperLink() as link:
        def crash_after_round_1(line: str) -> None:
            if f"[fedlora-flwr] round 1/{ROUNDS}" in line:
                link.kill()

        link.run(REPO, crashed, num_supernodes=4, timeout=600, on_line=crash_after_round_1)
    rows_at_crash = len(_rows(run_dir))
    assert 1 <= rows_at_crash < ROUNDS and not (run_dir / "summary.json").exists()

    with LocalSuperLink() as link:
        code, log = link.run(REPO, {**crashed, "resume": True}, num_supernodes=4, timeout=600)
        assert code == 0 and (run_dir / "summary.json").is_file(), log[-4000:]
        assert "resuming" in log
        code, log = link.run(REPO, {**base, "run-name": "reference"}, num_supernodes=4, timeout=600)
        assert code == 0, log[-4000:]
    reference = tmp_path / "reference"
    assert _rows(run_dir) == _rows(reference)
    assert _summary(run_dir) == _summary(reference)
    assert _state_files(run_dir) == _state_files(reference)


# --------------------------------------------------------------------------- resume never destroys


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-round run, copied afresh for each test that damages it."""
    source = tmp_path_factory.mktemp("finished")
    config = _config(source, "run", "fedlora", **{"num-server-rounds": 2})
    _start(config)

    def copy(tmp_path: Path) -> tuple[dict, Path]:
        shutil.copytree(source / "run", tmp_path / "run")
        return {**config, "output-dir": str(tmp_path), "resume": True}, tmp_path / "run"

    return copy


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped", "metadata"])
def test_resume_with_an_unreadable_checkpoint_is_refused_and_changes_nothing(tmp_path, finished_run, caplog, damage):
    """Today a deleted checkpoint restarts the run from round 1 in place, dropping every row."""
    from fedlora_flwr.store import write_safetensors_atomic

    config, run_dir = finished_run(tmp_path)
    checkpoint = run_dir / CHECKPOINT_FILE
    data = checkpoint.read_bytes()
    if damage == "deleted":
        checkpoint.unlink()
    elif damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        checkpoint.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        write_safetensors_atomic(checkpoint, {}, {"method": "fedlora", "checkpoint": "{not json"})
    before = _hashes(run_dir)
    line = _refused(config, caplog, RunStateError)
    assert str(checkpoint) in line
    if damage == "deleted":
        assert "records 2 rounds" in line and "does not exist" in line
    else:
        assert "corrupt" in line
    assert _hashes(run_dir) == before


@pytest.mark.parametrize("content", ["{\"method\": \"fedlo", "[1, 2]", "\xff\xfe"])
def test_resume_with_a_corrupt_config_json_is_refused_in_one_line(tmp_path, finished_run, caplog, content):
    config, run_dir = finished_run(tmp_path)
    (run_dir / "config.json").write_bytes(content.encode("latin-1"))
    before = _hashes(run_dir)
    line = _refused(config, caplog)
    assert str(run_dir / "config.json") in line
    assert _hashes(run_dir) == before


def test_resume_after_a_crash_before_the_first_checkpoint_still_works(tmp_path, monkeypatch):
    """The one row a crash may leave after the checkpoint (here: round 1's, with no checkpoint yet)
    is redone, not refused."""
    config = _config(tmp_path, "run", "fedlora", **{"num-server-rounds": 1})
    with monkeypatch.context() as patch:
        _crash_at(patch, 1)
        with pytest.raises(Crash):
            _start(config)
    crashed = _rows(tmp_path / "run")
    assert len(crashed) == 1 and not (tmp_path / "run" / CHECKPOINT_FILE).exists()
    _start({**config, "resume": True})
    assert _rows(tmp_path / "run") == crashed


def test_odd_output_paths_are_refused_in_one_line(tmp_path, caplog):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    line = _refused(_config(a_file, "run", "fedlora"), caplog)
    assert f"cannot create the run folder {a_file / 'run'}: {a_file} is a file" in line
    line = _refused(_config(a_file / "deeper", "run", "fedlora"), caplog)
    assert f"{a_file} is a file" in line
    line = _refused(_config(tmp_path, "a-file", "fedlora"), caplog)
    assert f"run-name: {a_file} is a file" in line
    line = _refused(_config(tmp_path, "r" * 300, "fedlora"), caplog)
    assert "run-name" in line and "300 characters" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"] and a_file.read_text() == "not a folder"


# --------------------------------------------------------------------------- state that vanished fails loudly


class RecordingGrid(InProcessGrid):
    """Keeps (partition id, message type, server round, reason) of every error reply; with
    ``before_delivery``, calls it with each message first (to damage a client's state on disk)."""

    before_delivery = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[tuple[int, str, int, str]] = []

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            if self.before_delivery is not None:
                self.before_delivery(message)
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids, strict=True):
            reply = self._replies[message_id]
            if reply.has_error():
                pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
                server_round = int(message.content["config"].get("server-round", 0))
                self.errors.append((pid, message.metadata.message_type, server_round, reply.error.reason))
        return ids


def test_client_whose_state_vanished_fails_instead_of_starting_afresh(tmp_path):
    """Client 1 trained in round 1 (the run's record); its folder is gone before round 2: its
    round-2 train and evaluate replies fail with the StateError naming its state file, it is no
    participant of round 2, and nothing is written in its place."""
    config = _config(tmp_path, "run", "fedlora", **{"fraction-train": 1.0, "num-server-rounds": 2})
    client_dir = tmp_path / "run" / "clients" / "1"

    def lose_client_1(message):
        if message.content["config"].get("server-round") == 2 and client_dir.exists():
            shutil.rmtree(client_dir)

    grid_class = type("LosingGrid", (RecordingGrid,), {"before_delivery": staticmethod(lose_client_1)})
    grid = _start(config, grid_class)
    rows = _rows(tmp_path / "run")
    assert rows[0]["participants"] == [0, 1, 2]
    assert rows[1]["participants"] == [0, 2] and "1" not in rows[1]["acc_per_client"]
    assert rows[1]["num_failures"] == 1
    assert [(pid, kind, server_round) for pid, kind, server_round, _ in grid.errors] == [(1, "train", 2), (1, "evaluate", 2)]
    for *_, reason in grid.errors:
        assert reason.startswith("StateError: ") and str(client_dir / "personal.safetensors") in reason, reason
        assert "trained in round 1" in reason
    assert not client_dir.exists()


def test_resume_without_the_previous_state_of_the_redone_round_fails_that_client(tmp_path, monkeypatch):
    """Crash before round 2's checkpoint; a client that trained in rounds 1 and 2 lost its round-1
    state (``.previous``): its redone round-2 training fails with that path, nothing is trained in
    its place, and its round-2 state stays as it was."""
    config = _config(tmp_path, "run", "fedlora", **{"num-server-rounds": 2})
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _crash_at(patch, 2)
        with pytest.raises(Crash):
            _start(config)
    rows = _rows(run_dir)
    pid = sorted(set(rows[0]["participants"]) & set(rows[1]["participants"]))[0]
    previous = run_dir / "clients" / str(pid) / "personal.previous.safetensors"
    previous.unlink()
    newest = (run_dir / "clients" / str(pid) / "personal.safetensors").read_bytes()

    grid = _start({**config, "resume": True}, RecordingGrid)
    train_errors = [(server_round, reason) for error_pid, kind, server_round, reason in grid.errors
                    if error_pid == pid and kind == "train"]
    assert train_errors and train_errors[0][0] == 2, grid.errors
    assert "StateError" in train_errors[0][1] and f"{previous} is missing" in train_errors[0][1]
    assert pid not in _rows(run_dir)[1]["participants"]
    assert (run_dir / "clients" / str(pid) / "personal.safetensors").read_bytes() == newest
