"""Deployment on Flower's engine: a ServerApp without data, waiting for the federation before
round 1, and a real SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.supercore.exit import ExitCode
from test_federation import _metrics, _run_config, _start

from fedlora_flwr import client_app
from fedlora_flwr.deployment import LocalFederation, make_node_key, make_tls
from fedlora_flwr.exits import FederationIncomplete
from fedlora_flwr.superlink import LocalSuperLink
from inprocess import InProcessGrid

NUM_NODES = 3


class LateNodesGrid(InProcessGrid):
    """Nodes connect one at a time, every ``every`` node-list queries; ``never`` partitions never do."""

    def __init__(self, *args, every: int = 2, never: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.every, self.never, self.queries = every, set(never), 0

    def get_node_ids(self):
        self.queries += 1
        connected = [node for node, context in self.contexts.items() if context.node_config["partition-id"] not in self.never]
        return connected[: 1 + self.queries // self.every]


def test_round_one_waits_for_every_partition(tmp_path):
    """min-available-nodes = 0: round 1 starts once all num-partitions are connected, not with the first."""
    config = _run_config(tmp_path / "outputs", "late", **{"num-server-rounds": 1, "node-wait-timeout": 30.0})
    grid = LateNodesGrid(client_app.app, NUM_NODES, config, every=1)
    _start(grid, config)
    (metrics,) = _metrics(tmp_path / "outputs" / "late")
    assert metrics["participants"] == [0, 1, 2] and grid.queries >= NUM_NODES


def test_min_available_nodes_starts_with_that_many(tmp_path):
    config = _run_config(tmp_path / "outputs", "two", **{"num-server-rounds": 1, "min-available-nodes": 2})
    grid = LateNodesGrid(client_app.app, NUM_NODES, config, never=(2,))
    _start(grid, config)
    assert _metrics(tmp_path / "outputs" / "two")[0]["participants"] == [0, 1]


def test_missing_nodes_stop_the_run_after_the_timeout(tmp_path, caplog):
    config = _run_config(tmp_path / "outputs", "missing", **{"node-wait-timeout": 2.0})
    grid = LateNodesGrid(client_app.app, NUM_NODES, config, never=(1,))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR), pytest.raises(FederationIncomplete) as stop:
        _start(grid, config)
    assert stop.value.exit_code == 903 and time.monotonic() - started < 30
    (line,) = [r.getMessage() for r in caplog.records if "node-wait-timeout" in r.getMessage()]
    assert "2 of 3 SuperNodes connected" in line and "[0, 2]" in line and "\n" not in line
    assert _metrics(tmp_path / "outputs" / "missing") == []  # no round started


def test_certificates_and_node_keys(tmp_path):
    tls = make_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    private, public = make_node_key(tmp_path / "keys", "node-0")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert key.public_key() == serialization.load_ssh_public_key(public.read_bytes())
    assert private.stat().st_mode & 0o077 == 0 and tls.server_key.stat().st_mode & 0o077 == 0


def _alive_in_groups(groups: list[int]) -> list[int]:
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in groups and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


@pytest.mark.e2e
def test_tls_federation_with_node_auth(tmp_path):
    """A SuperLink and 3 registered SuperNodes (TLS, node auth) run 2 rounds of FedLoRA; each node
    keeps its personal state in its own state-dir; a node whose key was not registered is refused."""
    out = tmp_path / "outputs"
    started = time.monotonic()
    with LocalFederation(tmp_path / "federation", NUM_NODES, mode="tls-auth") as federation:
        private, _ = make_node_key(tmp_path / "unregistered", "intruder")
        intruder = federation.start_supernode(NUM_NODES, private, max_retries="1")
        code, log = federation.run(
            REPO,
            dict(
                dataset="synthetic", model="cnn", **{"num-server-rounds": 2, "local-epochs": 1, "lora-epochs": 1,
                "train-per-client": 40, "test-per-client": 20, "output-dir": str(out), "run-name": "deployed",
                "node-wait-timeout": 120.0}
            ),
            timeout=400,
        )
        refused = intruder.wait(timeout=60)
        intruder_log = (federation.node_dir(NUM_NODES) / "supernode.log").read_text()
        state_dirs = [federation.state_dir(pid) for pid in range(NUM_NODES)]
        federation.link.record_tree()
        processes = list(federation.link.tree.values())
        groups = [process.pid for process in federation.link.adopted]  # one per SuperNode
    print(f"deployment test: {time.monotonic() - started:.1f} s wall")  # measured, shown with -s
    assert len(processes) >= 2 + NUM_NODES  # SuperLink, SuperNodes and what they started
    assert not [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "left running"
    assert not _alive_in_groups(groups), "left running"  # orphans too (a refused SuperNode leaves its SuperExec)
    run_dir = out / "deployed"
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "fedlora" and config["num-server-rounds"] == 2
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["participants"] == [0, 1, 2] and m["num_failures"] == 0
        assert set(m["acc_per_client"]) == {"0", "1", "2"}
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    for pid, state_dir in enumerate(state_dirs):
        assert sorted(p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*.safetensors")) == [
            f"deployed/{pid}/personal.previous.safetensors", f"deployed/{pid}/personal.safetensors"
        ]  # round 2's state and round 1's, kept for a resume (fedlora_flwr/store.py)
    assert not (run_dir / "clients").exists()  # deployment: state lives with the SuperNodes only
    # Flower logs its exit code 305 (SUPERNODE_CONNECTION_ERROR) and the process exits with 1
    assert refused != 0 and f"Exit Code: {ExitCode.SUPERNODE_CONNECTION_ERROR}" in intruder_log, intruder_log[-2000:]
    assert "Failed to activate SuperNode" in intruder_log


def test_node_auth_needs_tls(tmp_path):
    with pytest.raises(ValueError, match="needs TLS"):
        LocalSuperLink(tmp_path, simulation=False, supernode_auth=True)


def test_deploy_script_makes_the_files_of_a_real_federation(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "local_federation.py"), "certs", str(tmp_path), "--nodes", "2",
         "--hosts", "10.0.0.5", "superlink.lab"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    server = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.lab"]
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["node-0", "node-0.pub", "node-1", "node-1.pub"]
