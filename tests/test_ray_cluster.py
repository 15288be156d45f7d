"""A ``flwr run`` simulation on a Ray cluster started beforehand, attached through ``RAY_ADDRESS``.

This is the multi-machine recipe of docs/guide/scale.md on one machine: ``ray start --head``, then a SuperLink
whose environment holds ``RAY_ADDRESS`` (Flower 1.41's Ray backend calls ``ray.init()`` without an
address, so Ray reads the variable), then ``flwr run``. The head runs in its own process group and
temp dir; it and everything below it are stopped by PID, never with ``ray stop``.

Ray 2.55 does not keep a head on the loopback address: ``ray start --node-ip-address 127.0.0.1``
registers the machine's IP instead (``ray._private.services.resolve_ip_for_localhost``) and its
servers listen on every interface; the test reaches it at 127.0.0.1 on free ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO

from fedlora_flwr.superlink import BIN_DIR, LocalSuperLink, free_port

pytestmark = pytest.mark.e2e

HEAD_CPUS = 2  # two 1-CPU client actors; a local Ray on a bigger machine would report its own count


class RayHead:
    """``ray start --head --block`` on free ports, in its own session (process group) and temp dir."""

    def __init__(self, startup_timeout: float = 90) -> None:
        # Short: Ray puts unix sockets under the temp dir (path limit 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self.temp_dir / "head.log"
        ports = {
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        command = [
            str(BIN_DIR / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(self.port), "--temp-dir", str(self.temp_dir), "--include-dashboard", "false",
            "--num-cpus", str(HEAD_CPUS), "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats",
            *[str(part) for item in ports.items() for part in item],
        ]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.gcs_log = None
        deadline = time.monotonic() + startup_timeout
        while "Ray runtime started" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"ray start --head did not start:\n{tail}")
            time.sleep(0.5)
        self.gcs_log = self.temp_dir / "session_latest" / "logs" / "gcs_server.out"

    def registered_driver_pids(self) -> list[int]:
        """The driver PID of every job the head's GCS registered (Ray 2.55's log line)."""
        return [int(pid) for pid in re.findall(r"Registering job\. job_id=\w+ driver_pid=(\d+)", self.gcs_log.read_text())]

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.process.pid:
                    found.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return found

    def stop(self) -> None:
        """SIGTERM to the head's process group, SIGKILL to whatever outlives 20 s (Ray's monitor does)."""
        tree = self.processes()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(tree, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)
        self.stopped = tree
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    head = RayHead()
    try:
        yield head
    finally:
        head.stop()
    assert not [proc for proc in head.stopped if proc.is_running()], "Ray head processes outlived stop()"


def test_flwr_run_attaches_to_a_running_ray_head(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)  # reaches the SuperLink and the simulation below it
    out = tmp_path / "outputs"
    with LocalSuperLink() as link:
        code, log = link.run(
            REPO,
            dict(
                dataset="synthetic", model="cnn", **{"num-server-rounds": 2, "local-epochs": 1, "lora-epochs": 1,
                "train-per-client": 40, "test-per-client": 20, "output-dir": str(out), "run-name": "ray-cluster"}
            ),
            num_supernodes=3,
            timeout=600,
        )
        below_superlink = set(link.tree)
    run_dir = out / "ray-cluster"
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    drivers = ray_head.registered_driver_pids()
    assert set(drivers) & below_superlink, (
        f"no job on the head came from the SuperLink's processes (drivers {drivers}): "
        f"the simulation started its own Ray\n{ray_head.gcs_log.read_text()[-2000:]}"
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["num_participants"] == 3 and m["num_failures"] == 0 for m in metrics)
    assert all(set(m["acc_per_client"]) == {"0", "1", "2"} for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_clients"] == 3 and summary["rounds"] == 2
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == ["0", "1", "2"]
