"""Reproducible partial participation and bad-update handling (strategies/base.py), through the real
ServerApp and ClientApp in process: participants come from sorted partition ids and a generator
seeded by (seed, round), whatever the node ids; bad replies are named, counted and left out."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file
from test_federation import CapturingGrid, _metrics, _run_config, _start, _summary, _train_type

from clients.fedlora import FedLoRAClient
from fedlora_flwr import client_app
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.store import PersonalStateStore
from strategies.base import ARRAYS, METRICS, average_arrays
from strategies.fedlora import FedLoRAStrategy

NUM_CLIENTS = 5


class ShuffledNodesGrid(CapturingGrid):
    """Node ids drawn at random per run, as Flower draws them from os.urandom."""

    def __init__(self, *args, node_seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ids = random.Random(node_seed).sample(range(10**6, 10**7), len(self.contexts))
        contexts = list(self.contexts.values())
        self.contexts = {}
        for node_id, context in zip(ids, contexts):
            context.node_id = node_id
            self.contexts[node_id] = context


def _participation_run(tmp_path, name, node_seed, **overrides):
    config = _run_config(tmp_path / "outputs", name, **{"fraction-train": 0.5, "num-server-rounds": 3, **overrides})
    grid = ShuffledNodesGrid(client_app.app, NUM_CLIENTS, config, node_seed=node_seed)
    _start(grid, config)
    return tmp_path / "outputs" / name, grid


def _expected(seed: int, server_round: int) -> list[int]:
    return sorted(int(p) for p in np.random.default_rng([seed, server_round]).choice(NUM_CLIENTS, size=2, replace=False))


def test_same_seed_same_participants_whatever_the_node_ids(tmp_path):
    first, _ = _participation_run(tmp_path, "a", node_seed=1)
    second, _ = _participation_run(tmp_path, "b", node_seed=2)
    participants = [m["participants"] for m in _metrics(first)]
    assert participants == [m["participants"] for m in _metrics(second)]
    assert participants == [_expected(1, r) for r in (1, 2, 3)]
    assert [m["acc_per_client"] for m in _metrics(first)] == [m["acc_per_client"] for m in _metrics(second)]
    other, _ = _participation_run(tmp_path, "c", node_seed=1, seed=7)
    assert [m["participants"] for m in _metrics(other)] == [_expected(7, r) for r in (1, 2, 3)]


def test_non_sampled_clients_keep_their_personal_state(tmp_path):
    run_dir, grid = _participation_run(tmp_path, "fedlora", node_seed=3)
    train = _train_type(grid)
    for m in _metrics(run_dir)[1:]:
        before, after = grid.personal[(m["round"] - 1, train)], grid.personal[(m["round"], train)]
        for pid in set(range(NUM_CLIENTS)) - set(m["participants"]):
            name = f"{pid}/personal.safetensors"
            assert before.get(name) == after.get(name), f"client {pid} did not train but its state changed"


class CorruptingGrid(CapturingGrid):
    """Client 1's train replies are corrupted after the ClientApp answered."""

    def __init__(self, *args, corrupt, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.corrupt = corrupt

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        out = []
        for reply in replies:
            if (not reply.has_error() and reply.metadata.message_type.startswith("train")
                    and int(reply.content[METRICS]["partition-id"]) == 1):
                arrays = {key: reply.content[ARRAYS][key].numpy().copy() for key in reply.content[ARRAYS]}
                reply.content[ARRAYS] = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in self.corrupt(arrays).items()})
            out.append(reply)
        return out


def _nan(arrays):
    arrays["fc.weight"][0, 0] = np.nan
    return arrays


def _wrong_shape(arrays):
    arrays["fc.weight"] = arrays["fc.weight"][:, :-1].copy()
    return arrays


def _missing(arrays):
    del arrays["fc.bias"]
    return arrays


def _wrong_dtype(arrays):
    arrays["fc.weight"] = arrays["fc.weight"].astype(np.float64)
    return arrays


@pytest.mark.parametrize(("corrupt", "reason"), [(_nan, "non-finite"), (_wrong_shape, "expected"),
                                                 (_missing, "missing ['fc.bias']"), (_wrong_dtype, "float64")],
                         ids=["nan", "wrong-shape", "missing-key", "wrong-dtype"])
def test_bad_update_is_named_counted_and_left_out(tmp_path, caplog, corrupt, reason):
    config = _run_config(tmp_path / "outputs", "bad", method="fedavg", **{"num-server-rounds": 2})
    grid = CorruptingGrid(client_app.app, 3, config, corrupt=corrupt)
    with caplog.at_level(logging.WARNING):
        _start(grid, config)
    metrics = _metrics(tmp_path / "outputs" / "bad")
    assert [m["round"] for m in metrics] == [1, 2], "the run goes on"
    for m in metrics:
        assert m["participants"] == [0, 2] and m["num_bad_updates"] == 1 and m["num_failures"] == 1
        uploads = grid.replies[(m["round"], _train_type(grid))]
        weights = [float(uploads[pid].content[METRICS]["num-examples"]) for pid in (0, 2)]
        expected = average_arrays([uploads[pid].content[ARRAYS] for pid in (0, 2)], weights)
        sent = grid.sent[(m["round"], "evaluate")][0]
        assert all(np.array_equal(sent[key], expected[key].numpy()) for key in expected)
    warnings = [r.getMessage() for r in caplog.records if "bad update" in r.getMessage()]
    assert len(warnings) == 2 and "client 1" in warnings[0] and reason in warnings[0]


def _faulty(seed: int, server_round: int, count: int) -> set[int]:
    return {int(p) for p in np.random.default_rng([seed, server_round, 1]).choice(NUM_CLIENTS, size=count, replace=False)}


@pytest.mark.parametrize(("kind", "bad"), [("raise", 0), ("nan", 2), ("wrong-shape", 2)])
def test_injected_faults_are_seeded_counted_and_survived(tmp_path, kind, bad):
    config = _run_config(tmp_path / "outputs", kind, method="fedavg",
                         **{"num-server-rounds": 2, "fault-fraction": 0.4, "fault-kind": kind})
    grid = CapturingGrid(client_app.app, NUM_CLIENTS, config)
    _start(grid, config)
    metrics = _metrics(tmp_path / "outputs" / kind)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        faulty = _faulty(1, m["round"], 2)
        assert m["participants"] == sorted(set(range(NUM_CLIENTS)) - faulty)
        assert m["num_failures"] == 2 and m["num_bad_updates"] == bad
        assert set(m["acc_per_client"]) == {str(pid) for pid in range(NUM_CLIENTS)}, "every client still evaluates"


@pytest.mark.parametrize(("kind", "bad"), [("raise", 0), ("nan", 6), ("wrong-shape", 6), ("timeout", 0), ("nan-weight", 6),
                                           ("negative-weight", 6), ("forged-id", 6), ("bad-eval", 0)])
def test_thirty_percent_faults_on_twenty_clients(tmp_path, kind, bad):
    """Issue 11: with fault-fraction 0.3 of 20 clients every round completes, 6 failures a round are
    counted, and every client's personal state is present and loadable afterwards (a faulty client
    trained and saved before its reply went wrong). Issue 18: also with the sample count, the
    partition id or the evaluation spoilt, and with modelled stragglers: the averaged participants are
    unique and in range, the recorded accuracies in [0, 1]. ``flwr run`` on Ray: test_flwr_run.py."""
    clients = 20
    config = _run_config(tmp_path / "outputs", kind, **{"num-server-rounds": 2, "fault-fraction": 0.3, "fault-kind": kind,
                                                          "train-per-client": 8, "test-per-client": 4, "local-epochs": 1})
    grid = CapturingGrid(client_app.app, clients, config)
    _start(grid, config)
    run_dir = tmp_path / "outputs" / kind
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    everyone = set(range(clients))
    for m in metrics:
        stream = 2 if kind == "bad-eval" else 1
        faulty = {int(p) for p in np.random.default_rng([1, m["round"], stream]).choice(clients, size=6, replace=False)}
        trained = everyone if kind == "bad-eval" else everyone - faulty
        evaluated = everyone - faulty if kind == "bad-eval" else everyone
        assert m["participants"] == sorted(trained)
        assert m["num_failures"] == 6 and m["num_bad_updates"] == bad
        assert set(m["acc_per_client"]) == {str(pid) for pid in evaluated}
        assert all(0.0 <= acc <= 1.0 for acc in m["acc_per_client"].values())
    shared = load_file(str(run_dir / "shared.safetensors"))
    assert all(np.isfinite(value).all() for value in shared.values() if value.dtype.kind == "f")
    run_config = load_config(config)
    client = FedLoRAClient(run_config)
    model = client.build_model(TaskSpec(num_classes=10, image_shape=(3, 32, 32)), partition_id=0)
    expected = client.partition.state(model, "personal")
    store = PersonalStateStore(run_dir / "clients", "fedlora")
    assert store.stored_ids() == list(range(clients))
    for pid in range(clients):
        assert store.load(pid, expected=expected) is not None


def test_fraction_evaluate_evaluates_a_seeded_sample_whatever_the_node_ids(tmp_path):
    """fraction-evaluate < 1: each round evaluates a draw of its own (seed, round, 1) of the partition
    ids, the same whatever the node ids; rows and summary say so; not with fused evaluation."""
    runs = [_participation_run(tmp_path, name, node_seed=node_seed, **{"fraction-evaluate": 0.4, "num-server-rounds": 2})[0]
            for name, node_seed in (("a", 1), ("b", 2))]
    rows = [_metrics(run_dir) for run_dir in runs]
    expected = [sorted(int(p) for p in np.random.default_rng([1, r, 1]).choice(NUM_CLIENTS, size=2, replace=False))
                for r in (1, 2)]
    assert [sorted(map(int, row["acc_per_client"])) for row in rows[0]] == expected
    assert [row["acc_per_client"] for row in rows[0]] == [row["acc_per_client"] for row in rows[1]]
    assert all(row["fraction_evaluate"] == 0.4 and row["num_evaluated"] == 2 for row in rows[0])
    assert _summary(runs[0])["fraction_evaluate"] == 0.4
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        FedLoRAStrategy.check(load_config({**_run_config(tmp_path, "x"), "fused-evaluation": True,
                                           "fraction-evaluate": 0.5}, base=tmp_path))
