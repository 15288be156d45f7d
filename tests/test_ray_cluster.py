"""A ``flwr run`` simulation on a Ray cluster started beforehand, attached through ``RAY_ADDRESS``.

With root and iproute2 (tests/netns.py), the cluster spans two network hosts: a Ray head and a Ray
worker in two network namespaces, the SuperLink on the head's; Ray's own records (the GCS's node
and actor tables) must place the ClientApp actors on both nodes' addresses. Elsewhere the single-host
test below runs instead: the head alone on this machine.

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from netns import Hosts, created_hosts, skip_reason

from fedlora_flwr.superlink import BIN_DIR, LocalSuperLink, free_port

pytestmark = pytest.mark.e2e

HEAD_CPUS = 2  # two 1-CPU client actors; a local Ray on a bigger machine would report its own count
#: A raylet waits at most 30 s (Ray 2.55's default) for its node's dashboard agent, which may take longer
#: to import on a loaded 2-core machine; the raylet then aborts and ``ray start`` fails.
RAY_ENV = {"RAY_agent_register_timeout_ms": "120000"}


class RayNode:
    """``ray start --head --block`` (or, with ``join``, ``ray start --address join --block``: a worker
    node) on free ports, in its own session (process group) and temp dir; ``launcher`` prefixes the
    command (``ip netns exec NAME``: another network host), ``node_ip`` is the address it registers."""

    def __init__(self, startup_timeout: float = 90, *, num_cpus: int = HEAD_CPUS, node_ip: str = "127.0.0.1",
                 launcher: Sequence[str] = (), join: str | None = None) -> None:
        # Short: Ray puts unix sockets under the temp dir (path limit 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = join or f"{node_ip}:{self.port}"
        self.log_path = self.temp_dir / "head.log"
        ports = {
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        if join is None:
            role = ["--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_port())]
        else:
            role = ["--address", join]
        command = [
            *launcher, str(BIN_DIR / "ray"), "start", *role, "--block", "--node-ip-address", node_ip,
            "--temp-dir", str(self.temp_dir), "--num-cpus", str(num_cpus),
            "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats",
            *[str(part) for item in ports.items() for part in item],
        ]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **RAY_ENV})
        self.gcs_log = None
        deadline = time.monotonic() + startup_timeout
        while "Ray runtime started" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"ray start {' '.join(role)} did not start:\n{tail}")
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
def ray_head() -> Iterator[RayNode]:
    head = RayNode()
    try:
        yield head
    finally:
        head.stop()
    assert not [proc for proc in head.stopped if proc.is_running()], "Ray head processes outlived stop()"


@pytest.mark.skipif(skip_reason() is None, reason="where network namespaces work, the test across two hosts "
                    "below covers this one (RAY_ADDRESS, the GCS's job, the output contract) on a real cluster")
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


#: Run in the head's namespace, after the run: the cluster's nodes and every ClientApp actor the
#: GCS placed, as Ray records them (``ray.nodes()``; the GCS actor table, as ``ray list actors`` shows it).
PLACEMENT = """
import json, ray
from ray._private.state import actors
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
nodes = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}}
placed = [{{"actor_id": a["ActorID"], "class": a["ActorClassName"], "state": a["State"],
           "node_id": a["Address"]["NodeID"], "node_ip": a["Address"]["IPAddress"]}}
          for a in actors().values() if a["ActorClassName"].endswith("ClientAppActor")]
print("PLACEMENT " + json.dumps({{"nodes": nodes, "actors": placed}}))
ray.shutdown()
"""


@pytest.fixture
def two_hosts() -> Iterator[Hosts]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    with created_hosts(["head", "worker"]) as hosts:
        yield hosts


def test_flwr_run_places_client_actors_on_both_hosts_of_a_ray_cluster(two_hosts, tmp_path, monkeypatch):
    """A Ray head and a Ray worker in two network namespaces (a veth pair across a bridge, addresses
    only there), each with 1 CPU; the SuperLink in the head's namespace with ``RAY_ADDRESS`` at the
    head; 2 clients of 1 CPU each, 1 round: Flower's actor pool holds one actor per node, and Ray's
    own records place the ClientApp actors on both nodes' addresses."""
    started = time.monotonic()
    head_ip, worker_ip = two_hosts.addresses["head"], two_hosts.addresses["worker"]
    head = RayNode(num_cpus=1, node_ip=head_ip, launcher=two_hosts.launcher("head"))
    nodes = [head]
    try:
        nodes.append(RayNode(num_cpus=1, node_ip=worker_ip, launcher=two_hosts.launcher("worker"), join=head.address))
        monkeypatch.setenv("RAY_ADDRESS", head.address)
        out = tmp_path / "outputs"
        with LocalSuperLink(host=head_ip, launcher=two_hosts.launcher("head"),
                            cli_launcher=two_hosts.launcher("head")) as link:
            code, log = link.run(
                REPO,
                {"dataset": "synthetic", "model": "cnn", "num-server-rounds": 1, "local-epochs": 1, "lora-epochs": 1,
                 "train-per-client": 20, "test-per-client": 10, "batch-size": 20, "output-dir": str(out),
                 "run-name": "ray-hosts"},
                num_supernodes=2,
                timeout=600,
            )
            below_superlink = set(link.tree)
        assert code == 0, log[-4000:]
        drivers = head.registered_driver_pids()
        assert set(drivers) & below_superlink, f"the simulation started its own Ray (drivers {drivers})"
        query = subprocess.run(
            [*two_hosts.launcher("head"), str(BIN_DIR / "python"), "-c", PLACEMENT.format(address=head.address)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        lines = [line for line in query.stdout.splitlines() if line.startswith("PLACEMENT ")]
        assert lines, query.stdout[-2000:] + query.stderr[-2000:]
        placement = json.loads(lines[-1].removeprefix("PLACEMENT "))
    finally:
        for node in reversed(nodes):
            node.stop()
    for node in nodes:
        assert not [proc for proc in node.stopped if proc.is_running()], "Ray processes outlived stop()"
    print(f"Ray cluster across hosts: {json.dumps(placement)}; {time.monotonic() - started:.1f} s")  # shown with -s
    assert sorted(placement["nodes"].values()) == sorted([head_ip, worker_ip])
    actors = placement["actors"]
    assert {actor["node_ip"] for actor in actors} == {head_ip, worker_ip}, actors
    assert {actor["node_id"] for actor in actors} == set(placement["nodes"]), actors
    run_dir = out / "ray-hosts"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["num_participants"], m["num_failures"]) for m in metrics] == [(1, 2, 0)]
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == ["0", "1"]
