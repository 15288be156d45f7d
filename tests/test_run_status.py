"""``fedlora-flwr run`` exits with the run's status, ``flwr run`` does not: real runs (the command
as a user types it) on a private deployment SuperLink with 2 SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from conftest import REPO

from fedlora_flwr.deployment import LocalFederation
from fedlora_flwr.runner import BIN_DIR

pytestmark = pytest.mark.e2e

NODES = 2
TINY = {"dataset": "synthetic", "model": "cnn", "num-server-rounds": 1, "local-epochs": 1, "lora-epochs": 1,
        "train-per-client": 20, "test-per-client": 10, "node-wait-timeout": 120.0}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("federation"), NODES) as federation:
        yield federation


def _config_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "run-config.toml"
    path.write_text(tomli_w.dumps({**TINY, "output-dir": str(tmp_path / "outputs"), **overrides}))
    return path


def _fedlora_flwr_run(federation: LocalFederation, app: Path, config: Path) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedlora_flwr.cli", "run", str(app), federation.link.CONNECTION, "--run-config", str(config)],
        cwd=REPO, env=federation.link.environment, capture_output=True, text=True, timeout=400,
    )
    print(f"fedlora-flwr run: exit {done.returncode} after {time.monotonic() - started:.1f} s")  # shown with -s
    return done


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


def _summary(tmp_path: Path, run_name: str) -> dict:
    return json.loads((tmp_path / "outputs" / run_name / "summary.json").read_text())


def test_a_finished_run_exits_0(federation, tmp_path):
    done = _fedlora_flwr_run(federation, REPO, _config_file(tmp_path, **{"run-name": "good"}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "[fedlora-flwr] round 1/1" in done.stdout
    assert _last_line(done).endswith(": finished:completed (exit 0)")
    assert _summary(tmp_path, "good")["status"] == "finished"


def test_a_config_error_exits_2_where_flwr_run_exits_0(federation, tmp_path):
    config = _config_file(tmp_path, **{"rank-conv": 0.0})
    flwr_run = subprocess.run(
        [str(BIN_DIR / "flwr"), "run", str(REPO), federation.link.CONNECTION, "--stream", "--run-config", str(config)],
        env=federation.link.environment, capture_output=True, text=True, timeout=400,
    )
    assert "invalid run config: rank-conv" in flwr_run.stdout, flwr_run.stdout[-3000:]
    assert flwr_run.returncode == 0  # Flower 1.41: `flwr run --stream` exits 0 whatever the run did
    done = _fedlora_flwr_run(federation, REPO, config)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-2000:]
    last = _last_line(done)
    assert ": finished:failed: ServerApp failed with exception: [fedlora-flwr exit 2] invalid run config: rank-conv" in last
    assert not (tmp_path / "outputs").exists()


def test_missing_supernodes_exit_3(federation, tmp_path):
    config = _config_file(tmp_path, **{"run-name": "waiting", "min-available-nodes": NODES + 1, "node-wait-timeout": 5.0})
    done = _fedlora_flwr_run(federation, REPO, config)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"node-wait-timeout: {NODES} of {NODES + 1} SuperNodes connected after 5 s" in _last_line(done)
    summary = _summary(tmp_path, "waiting")
    assert (summary["status"], summary["failure"], summary["exit_status"]) == ("failed", "node-wait-timeout", 3)


def test_every_client_failing_exits_4(federation, tmp_path):
    """cifar10 from a folder no SuperNode has: the ServerApp needs no data, every client fails."""
    missing = tmp_path / "no-such-data"
    config = _config_file(tmp_path, **{"run-name": "no-data", "dataset": "cifar10", "data-dir": str(missing)})
    done = _fedlora_flwr_run(federation, REPO, config)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-2000:]
    summary = _summary(tmp_path, "no-data")
    assert (summary["status"], summary["failure"], summary["exit_status"], summary["rounds"]) == (
        "failed", "no-valid-replies", 4, 0)
    assert summary["reason"].startswith(f"round 1: no client sent a valid reply ({NODES} asked, {NODES} replied, "
                                        f"{NODES} errors, 0 bad updates); first error: ")
    assert str(missing) in summary["reason"]


def test_a_run_flower_refuses_exits_1_with_its_message(federation, tmp_path):
    done = _fedlora_flwr_run(federation, tmp_path, _config_file(tmp_path))  # no pyproject.toml: not an app
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fedlora-flwr run: ") and "pyproject.toml" in line
