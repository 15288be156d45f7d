"""Shared fixtures: the app's default run config, the real CIFAR-10 subset, a private SuperLink."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_NPZ = REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"


def app_defaults() -> dict:
    """``[tool.flwr.app.config]`` of pyproject.toml: what Flower hands the apps with no overrides."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


@pytest.fixture
def real_npz() -> Path:
    if not REAL_NPZ.is_file():
        pytest.skip(f"{REAL_NPZ} absent: the real CIFAR-10 subset lives in ../shared/data beside the checkout")
    return REAL_NPZ


@pytest.fixture
def fast_config(tmp_path: Path) -> dict:
    """A tiny, fast run on the synthetic dataset (run config keys as Flower passes them)."""
    return {
        **app_defaults(),
        "dataset": "synthetic",
        "model": "cnn",
        "num-server-rounds": 2,
        "local-epochs": 2,
        "lora-epochs": 1,
        "train-per-client": 100,
        "test-per-client": 40,
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "test-run",
    }


def _environment(flwr_home: Path) -> dict[str, str]:
    """This interpreter's bin folder first on PATH: the SuperLink spawns `flower-superexec` by name."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SuperLink:
    """A SuperLink in simulation mode that this test session started (and stops, by PID).

    Every process seen below it (SuperExec, ServerApp/simulation, Ray) is remembered while runs
    are in flight, so teardown can stop them all by PID even if one was re-parented.
    """

    def __init__(self, process: subprocess.Popen, flwr_home: Path, connection: str, psutil) -> None:
        self.process = process
        self.flwr_home = flwr_home
        self.connection = connection
        self.psutil = psutil
        self.tree: dict[int, object] = {}

    def record_tree(self) -> None:
        try:
            root = self.psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.tree.setdefault(proc.pid, proc)
        except self.psutil.NoSuchProcess:
            pass

    def flwr_run(self, run_config: str, num_supernodes: int, timeout: float = 600) -> tuple[int, str]:
        """``flwr run <repo> <connection> --stream``; returns (exit code, stdout+stderr)."""
        flwr = Path(sys.executable).with_name("flwr")
        command = [
            str(flwr), "run", str(REPO), self.connection, "--stream",
            "--run-config", run_config,
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        ]
        env = _environment(self.flwr_home)
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
            deadline = time.monotonic() + timeout
            while run.poll() is None:
                self.record_tree()
                if time.monotonic() > deadline:
                    run.kill()
                    raise TimeoutError(f"flwr run exceeded {timeout}s")
                time.sleep(0.5)
            return run.returncode, run.stdout.read()

    def stop(self) -> None:
        self.record_tree()
        psutil = self.psutil
        for proc in self.tree.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="session")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperLink]:
    """Start ``flower-superlink --simulation`` on free loopback ports with its own FLWR_HOME.

    Runtime dependency installation is disabled (the test environment already has every
    dependency; `uv sync` would download torch again). Teardown stops its process tree by PID.
    """
    psutil = pytest.importorskip("psutil", reason="psutil (test extra) stops the SuperLink's process tree")
    home = tmp_path_factory.mktemp("flwr-home")
    http_port, control_port, fleet_port = _free_port(), _free_port(), _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    log_path = home / "superlink.log"
    superlink_bin = Path(sys.executable).with_name("flower-superlink")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(superlink_bin), "--insecure", "--simulation", "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(http_port),
                "--control-api-address", f"127.0.0.1:{control_port}",
                "--fleet-api-address", f"127.0.0.1:{fleet_port}",
            ],
            cwd=home,
            env=_environment(home),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    link = SuperLink(process, home, "test", psutil)
    try:
        deadline = time.monotonic() + 60
        while f"Uvicorn running on http://127.0.0.1:{http_port}" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield link
    finally:
        link.stop()
