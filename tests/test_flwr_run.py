"""End to end: real ``flwr run`` simulations on Ray through a SuperLink this session started."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from fedlora_flwr.lora import is_lora_key

pytestmark = pytest.mark.e2e


def _check_contract(run_dir: Path, num_clients: int, rounds: int, method: str = "fedlora") -> list[dict]:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["num-server-rounds"] == rounds
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for m in metrics:
        assert set(m["acc_per_client"]) == {str(pid) for pid in range(num_clients)}
        assert 0.0 <= m["acc_mean"] <= 1.0
        assert m["num_participants"] == num_clients and m["num_failures"] == 0
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_clients"] == num_clients and summary["rounds"] == rounds
    assert summary["best_acc_mean"] == max(m["acc_mean"] for m in metrics)
    return metrics


def _taus(run_dir: Path, num_clients: int) -> list[dict[str, torch.Tensor]]:
    taus = [load_file(run_dir / "clients" / str(pid) / "personal.safetensors") for pid in range(num_clients)]
    for tau in taus:
        assert tau and all(is_lora_key(key) for key in tau)
    return taus


def test_fedlora_simulation_synthetic(superlink, tmp_path):
    out = tmp_path / "outputs"
    code, log = superlink.run(
        REPO,
        dict(
            dataset="synthetic", model="cnn", **{"num-server-rounds": 2, "local-epochs": 2, "lora-epochs": 1,
            "train-per-client": 100, "test-per-client": 40, "output-dir": str(out), "run-name": "e2e-synthetic",
            "evaluate-at": "both"}
        ),
        num_supernodes=3,
    )
    run_dir = out / "e2e-synthetic"
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    assert "[fedlora-flwr] round 2/2" in log
    metrics = _check_contract(run_dir, num_clients=3, rounds=2)
    for m in metrics:  # evaluate-at = "both": FedLoRA's paper point first, after training beside it
        assert m["eval_point"] == "after-aggregation" and set(m["acc_per_client_after_training"]) == {"0", "1", "2"}
        assert 0.0 <= m["acc_mean_after_training"] <= 1.0
    taus = _taus(run_dir, 3)
    lora_b = [key for key in taus[0] if key.endswith("lora_B")]
    assert any(not torch.equal(taus[0][key], taus[1][key]) for key in lora_b), "τ should differ between clients"


def test_fedlora_simulation_real_cifar10(superlink, tmp_path, real_npz):
    out = tmp_path / "outputs"
    code, log = superlink.run(
        REPO,
        dict(
            dataset="npz", model="cnn", **{"data-dir": str(real_npz), "num-server-rounds": 2, "local-epochs": 1,
            "lora-epochs": 1, "lora-schedule": "simultaneous", "train-per-client": 100, "test-per-client": 50,
            "output-dir": str(out), "run-name": "e2e-cifar10"}
        ),
        num_supernodes=3,
    )
    run_dir = out / "e2e-cifar10"
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    metrics = _check_contract(run_dir, num_clients=3, rounds=2)
    assert json.loads((run_dir / "config.json").read_text())["data-dir"] == str(real_npz.resolve())
    assert all(m["train_loss"] > 0 for m in metrics)
    _taus(run_dir, 3)


@pytest.mark.parametrize(("method", "slot"), [("fedamp", "model"), ("fedcac", "customized")])
def test_per_client_messages_through_ray(superlink, tmp_path, method, slot):
    """FedAMP's u_i and FedCAC's customized models need the node → partition id map learned from
    real replies (random node ids): the server keeps one file per partition id."""
    out = tmp_path / "outputs"
    code, log = superlink.run(
        REPO,
        dict(
            method=method, dataset="synthetic", model="cnn", **{"num-server-rounds": 2, "local-epochs": 1,
            "lora-epochs": 0, "train-per-client": 40, "test-per-client": 20, "output-dir": str(out), "run-name": method}
        ),
        num_supernodes=3,
    )
    run_dir = out / method
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    _check_contract(run_dir, num_clients=3, rounds=2, method=method)
    assert sorted(p.parent.name for p in (run_dir / "server").glob(f"*/{slot}.safetensors")) == ["0", "1", "2"]


FAULT_RUN = {"dataset": "synthetic", "model": "cnn", "num-server-rounds": 3, "local-epochs": 1, "lora-epochs": 1,
             "train-per-client": 20, "test-per-client": 10, "fault-fraction": 0.3}


def _faulty(server_round: int, stream: int = 1, clients: int = 20) -> set[int]:
    return {int(p) for p in np.random.default_rng([1, server_round, stream]).choice(clients, size=6, replace=False)}


def test_stragglers_cost_their_own_round_only(superlink, tmp_path):
    """fault-kind = "timeout" on 30 % of 20 clients on this 2-core machine's 2 Ray actors
    (client-resources-num-cpus = 1): the picked clients are modelled stragglers, so no actor is held
    past its round; the other 14 clients train in every round, every client evaluates every round, and
    every client's personal state (saved before the fault) is present and loadable. (A sleeping fault
    held both actors: rounds 2 and 3 trained and evaluated no one.)"""
    out = tmp_path / "outputs"
    clients, rounds = 20, 3
    code, log = superlink.run(
        REPO, {**FAULT_RUN, "fault-kind": "timeout", "round-timeout": 60.0, "output-dir": str(out), "run-name": "timeout"},
        num_supernodes=clients, client_cpus=1,
    )
    run_dir = out / "timeout"
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for m in metrics:
        assert m["participants"] == sorted(set(range(clients)) - _faulty(m["round"]))
        assert m["num_failures"] == 6 and m["num_bad_updates"] == 0
        assert len(m["acc_per_client"]) == clients and 0.0 <= m["acc_mean"] <= 1.0
    assert log.count("modelled straggler") == 6 * rounds
    _taus(run_dir, clients)


@pytest.mark.parametrize("kind", ["nan-weight", "negative-weight", "forged-id", "bad-eval"])
def test_thirty_percent_bad_replies_through_ray(superlink, tmp_path, kind):
    """20 clients, 3 rounds, 30 % of each round's replies spoilt as ``kind``: the run completes, counts
    every fault, keeps the shared tensors finite, and records only accuracies in [0, 1] and unique,
    in-range participants."""
    out = tmp_path / "outputs"
    clients, rounds = 20, 3
    code, log = superlink.run(REPO, {**FAULT_RUN, "method": "fedavg", "fault-kind": kind, "output-dir": str(out),
                                     "run-name": kind}, num_supernodes=clients, client_cpus=1)
    run_dir = out / kind
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    assert code == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    evaluation = kind == "bad-eval"
    for m in metrics:
        faulty = _faulty(m["round"], stream=2 if evaluation else 1)
        trained = set(range(clients)) - (set() if evaluation else faulty)
        assert m["participants"] == sorted(trained), "unique, in range, and none of the faulty ones"
        assert m["num_failures"] == 6 and m["num_bad_updates"] == (0 if evaluation else 6)
        assert set(m["acc_per_client"]) == {str(pid) for pid in set(range(clients)) - (faulty if evaluation else set())}
        assert all(0.0 <= acc <= 1.0 for acc in m["acc_per_client"].values())
    shared = load_file(run_dir / "shared.safetensors")
    assert all(torch.isfinite(value).all() for value in shared.values() if value.is_floating_point())


def test_invalid_config_stops_before_training(superlink, tmp_path):
    """In simulation too the run fails with the config error's status (Flower: "Simulation failed")."""
    out = tmp_path / "outputs"
    code, log = superlink.run(REPO, {"rank-conv": 0.0, "output-dir": str(out)}, num_supernodes=2)
    lines = [line for line in log.splitlines() if "invalid run config" in line]
    assert lines and "rank-conv" in lines[0], log[-3000:]
    assert code == 2 and "finished:failed: Simulation failed with exception: [fedlora-flwr exit 2]" in log
    assert "[ROUND 1" not in log
    assert not out.exists()
