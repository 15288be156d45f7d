"""A federation across hosts, on real processes: the SuperLink, the ``flwr`` user and every
SuperNode each in a network namespace of its own (``ip netns``; a veth pair from each to a bridge
in the SuperLink's namespace; addresses in a private /24 this machine does not use), TLS with a
certificate for the SuperLink's address, SuperNode authentication, 2 rounds of FedLoRA on the
real CIFAR-10 subset with 2 SuperNodes. Meanwhile a SuperNode with an unregistered key, one that
trusts another CA and one speaking plaintext are each refused, and the federation finishes.

Needs root and iproute2's ``ip`` (skipped, saying which, otherwise). The test creates its
namespaces and links and deletes them, also when it fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import psutil
import pytest
from conftest import REPO
from flwr.supercore.exit import ExitCode
from netns import Hosts, created_hosts, skip_reason

from fedlora_flwr.deployment import LocalFederation, make_node_key, make_tls

NODES = 2
#: The refused SuperNodes: partition id → how it is misconfigured.
INTRUDERS = {2: "unregistered key", 3: "another CA", 4: "plaintext"}
ROLES = ["superlink", "cli", *(f"node-{pid}" for pid in range(NODES + len(INTRUDERS)))]

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with created_hosts(ROLES) as hosts:
        yield hosts


def test_federation_across_network_namespaces(hosts, tmp_path, real_npz):
    started = time.monotonic()
    superlink = hosts.addresses["superlink"]
    out = tmp_path / "outputs"
    with LocalFederation(tmp_path / "federation", NODES, "tls-auth", data_dir=real_npz, host=superlink,
                         launcher=hosts.launcher) as federation:
        assert federation.link.address.startswith(f"{superlink}:")
        unregistered, _ = make_node_key(tmp_path / "unregistered", "intruder")
        registered, public = make_node_key(federation.workdir / "keys", "node-3")
        federation.link.register(public)  # admitted by key: only its CA is wrong
        other_ca = make_tls(tmp_path / "other-ca", hosts=(superlink,)).ca_cert
        refused = {
            2: federation.start_supernode(2, unregistered, max_retries="1"),
            3: federation.start_supernode(3, registered, root_certificates=other_ca, max_retries="1"),
            4: federation.start_supernode(4, insecure=True, max_retries="1"),
        }
        code, log = federation.run(
            REPO,
            {"dataset": "npz", "data-dir": str(real_npz), "model": "cnn", "num-server-rounds": 2, "local-epochs": 1,
             "lora-epochs": 1, "lora-schedule": "simultaneous", "train-per-client": 100, "test-per-client": 50,
             "output-dir": str(out), "run-name": "netns", "node-wait-timeout": 300.0},
            timeout=1200,
        )
        exits = {pid: process.wait(timeout=300) for pid, process in refused.items()}
        node_logs = {pid: (federation.node_dir(pid) / "supernode.log").read_text() for pid in refused}
        state_dirs = {pid: federation.state_dir(pid) for pid in range(NODES + len(INTRUDERS))}
        federation.link.record_tree()
        processes = list(federation.link.tree.values())
    wall = time.monotonic() - started
    print(f"netns federation test: {wall:.1f} s wall")  # measured, shown with -s
    assert not [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "left running"
    run_dir = out / "netns"
    assert code == 0, log[-4000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "npz" and config["num-server-rounds"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["participants"] == [0, 1] and set(row["acc_per_client"]) == {"0", "1"}
        assert row["num_nodes"] == NODES and row["num_failures"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds"] == 2 and summary["num_clients"] == NODES
    for pid in range(NODES):
        assert sorted(p.relative_to(state_dirs[pid]).as_posix() for p in state_dirs[pid].rglob("*.safetensors")) == [
            f"netns/{pid}/personal.previous.safetensors", f"netns/{pid}/personal.safetensors"]
    assert not (run_dir / "clients").exists()  # personal state lives with the SuperNodes only
    for pid, how in INTRUDERS.items():
        assert exits[pid] != 0, f"{how}: {node_logs[pid][-2000:]}"
        assert not state_dirs[pid].exists(), how
    # Flower's SuperNode logs its exit code 305 (SUPERNODE_CONNECTION_ERROR) and why
    # (a plaintext client at a TLS port sees either a disconnect or a reset, depending on timing)
    for pid, whys in {2: ("Failed to activate SuperNode",), 3: ("CERTIFICATE_VERIFY_FAILED",),
                      4: ("Server disconnected without sending a response", "Connection reset by peer")}.items():
        node_log = node_logs[pid]
        assert f"Exit Code: {ExitCode.SUPERNODE_CONNECTION_ERROR}" in node_log, node_log[-2000:]
        assert any(why in node_log for why in whys), node_log[-2000:]
