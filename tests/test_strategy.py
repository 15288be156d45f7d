"""Server-side aggregation (strategies/base.py): FedLoRA's unweighted mean (eq. 8) and FedDecomp's
all-clients average, FedAvg's sample-weighted mean, BN buffers included."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from fedlora_flwr.exits import NoValidReplies
from conftest import app_defaults
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from inprocess import InProcessGrid

from fedlora_flwr import client_app
from fedlora_flwr.config import load_config
from fedlora_flwr.results import RunRecorder
from strategies.base import ARRAYS, METRICS, average_arrays
from strategies.fedavg import FedAvgStrategy
from strategies.fedlora import FedLoRAStrategy


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array.from_numpy_ndarray(np.asarray(value)) for key, value in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: record[key].numpy() for key in record}


def _client_arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": (rng.standard_normal((4, 3, 3, 3)) * scale).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 7)) * scale,  # float64: order-sensitive at the ulp level
        "bn1.running_var": rng.uniform(0.5, 2.0, size=4).astype(np.float32),
        "bn1.num_batches_tracked": np.array(int(rng.integers(0, 50)), dtype=np.int64),
    }


# --------------------------------------------------------------------------- average_arrays


def test_unweighted_mean_is_the_float64_mean_cast_back():
    clients = [_client_arrays(seed) for seed in range(3)]
    result = _numpy(average_arrays([_record(c) for c in clients], [1.0, 1.0, 1.0]))
    assert list(result) == list(clients[0])
    for key in ("conv1.weight", "bn1.running_var"):
        expected = (np.sum([c[key].astype(np.float64) for c in clients], axis=0) / 3).astype(np.float32)
        assert result[key].dtype == np.float32
        assert np.array_equal(result[key], expected), key
    expected64 = np.sum([c["fc.weight"] for c in clients], axis=0) / 3
    assert result["fc.weight"].dtype == np.float64
    np.testing.assert_allclose(result["fc.weight"], expected64, rtol=1e-13, atol=1e-15)


def test_weighted_mean():
    a, b = _client_arrays(0), _client_arrays(1)
    result = _numpy(average_arrays([_record(a), _record(b)], [1.0, 3.0]))
    for key in ("conv1.weight", "bn1.running_var"):
        expected = ((a[key].astype(np.float64) + 3 * b[key].astype(np.float64)) / 4).astype(np.float32)
        assert np.array_equal(result[key], expected), key
    np.testing.assert_allclose(result["fc.weight"], (a["fc.weight"] + 3 * b["fc.weight"]) / 4, rtol=1e-13, atol=1e-15)
    # Weights are relative: scaling them all changes nothing.
    scaled = _numpy(average_arrays([_record(a), _record(b)], [10.0, 30.0]))
    assert np.array_equal(scaled["conv1.weight"], result["conv1.weight"])


def test_integer_buffers_stay_integers_and_are_rounded():
    records = [
        _record({"n": np.array(value, dtype=np.int64), "m": np.array([value, 2 * value], dtype=np.int32)})
        for value in (5, 6, 6)
    ]
    result = _numpy(average_arrays(records, [1.0, 1.0, 1.0]))
    assert result["n"].dtype == np.int64 and result["n"].shape == ()
    assert int(result["n"]) == 6, "mean 5.67 rounds to 6 (not truncated to 5)"
    assert result["m"].dtype == np.int32
    assert result["m"].tolist() == [6, 11]  # 17/3 → 6, 34/3 = 11.33 → 11


def test_single_record_is_returned_unchanged():
    client = _client_arrays(4)
    result = _numpy(average_arrays([_record(client)], [7.0]))
    for key, value in client.items():
        assert result[key].dtype == value.dtype and np.array_equal(result[key], value), key


# --------------------------------------------------------------------------- aggregate_train


class _Harness:
    """A strategy with a grid of ``num_nodes`` (no ClientApp: replies are built by hand)."""

    def __init__(self, tmp_path, strategy_cls=FedLoRAStrategy, num_nodes=3, global_arrays=None, **overrides):
        values = {**app_defaults(), "dataset": "synthetic", "model": "cnn", "output-dir": str(tmp_path / "out"),
                  "run-name": "strategy", **overrides}
        self.config = load_config(values, base=tmp_path)
        run_dir = tmp_path / "out" / "strategy"
        run_dir.mkdir(parents=True)
        self.recorder = RunRecorder(run_dir, self.config)
        self.global_arrays = _client_arrays(100) if global_arrays is None else global_arrays
        self.strategy = strategy_cls.from_config(self.config, self.recorder, upload_template=_record(self.global_arrays))
        # Only the strategy's partition-id queries reach the real ClientApp; replies are built by hand.
        self.grid = InProcessGrid(client_app=client_app.app, num_nodes=num_nodes, run_config=values)

    def configure_train(self, server_round=1) -> list[Message]:
        return list(self.strategy.configure_train(server_round, _record(self.global_arrays), ConfigRecord({}), self.grid))

    @staticmethod
    def pid(message: Message) -> int:
        return message.metadata.dst_node_id - 1000

    @staticmethod
    def train_reply(message: Message, arrays: dict[str, np.ndarray], num_examples: int, loss: float = 1.0) -> Message:
        pid = message.metadata.dst_node_id - 1000
        content = RecordDict({
            ARRAYS: _record(arrays),
            METRICS: MetricRecord({"num-examples": num_examples, "train-loss": loss, "train-samples": num_examples,
                                    "partition-id": pid}),
        })
        return Message(content, reply_to=message)

    @staticmethod
    def eval_reply(message: Message, accuracy: float, num_examples: int) -> Message:
        pid = message.metadata.dst_node_id - 1000
        metrics = MetricRecord({"num-examples": num_examples, "accuracy": accuracy, "eval-loss": 0.5, "partition-id": pid})
        return Message(RecordDict({METRICS: metrics}), reply_to=message)

    @staticmethod
    def error_reply(message: Message) -> Message:
        return Message(Error(code=0, reason="injected"), reply_to=message)


def test_fedlora_aggregation_is_order_independent_bit_for_bit(tmp_path):
    harness = _Harness(tmp_path, num_nodes=4)
    messages = harness.configure_train()
    replies = [harness.train_reply(m, _client_arrays(harness.pid(m)), num_examples=10 + harness.pid(m)) for m in messages]
    results = []
    for order in itertools.permutations(range(len(replies))):
        arrays, _ = harness.strategy.aggregate_train(1, [replies[i] for i in order])
        results.append(_numpy(arrays))
    for other in results[1:]:
        for key, value in results[0].items():
            assert value.dtype == other[key].dtype
            assert value.tobytes() == other[key].tobytes(), f"{key} depends on the arrival order"


def test_fedlora_aggregation_is_the_unweighted_mean(tmp_path):
    """FedLoRA eq. 8: σ̄ = (1/m) Σ σ_i, whatever the clients' sample counts."""
    harness = _Harness(tmp_path)
    messages = harness.configure_train()
    clients = {harness.pid(m): _client_arrays(harness.pid(m)) for m in messages}
    replies = [harness.train_reply(m, clients[harness.pid(m)], num_examples=[1, 100, 7][harness.pid(m)]) for m in messages]
    arrays, metrics = harness.strategy.aggregate_train(1, reversed(replies))
    expected = average_arrays([_record(clients[pid]) for pid in sorted(clients)], [1.0, 1.0, 1.0])
    assert all(np.array_equal(arrays[key].numpy(), expected[key].numpy()) for key in expected)
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_fedavg_aggregation_is_sample_weighted(tmp_path):
    harness = _Harness(tmp_path, strategy_cls=FedAvgStrategy)
    messages = harness.configure_train()
    counts = {0: 1, 1: 100, 2: 7}
    clients = {harness.pid(m): _client_arrays(harness.pid(m)) for m in messages}
    replies = [harness.train_reply(m, clients[harness.pid(m)], counts[harness.pid(m)]) for m in messages]
    random.Random(0).shuffle(replies)
    arrays, _ = harness.strategy.aggregate_train(1, replies)
    expected = average_arrays([_record(clients[pid]) for pid in sorted(clients)], [float(counts[p]) for p in sorted(clients)])
    assert all(np.array_equal(arrays[key].numpy(), expected[key].numpy()) for key in expected)


def test_aggregation_override_mean_for_fedavg(tmp_path):
    harness = _Harness(tmp_path, strategy_cls=FedAvgStrategy, aggregation="mean")
    messages = harness.configure_train()
    clients = {harness.pid(m): _client_arrays(harness.pid(m)) for m in messages}
    replies = [harness.train_reply(m, clients[harness.pid(m)], [1, 100, 7][harness.pid(m)]) for m in messages]
    arrays, _ = harness.strategy.aggregate_train(1, replies)
    expected = average_arrays([_record(clients[pid]) for pid in sorted(clients)], [1.0, 1.0, 1.0])
    assert np.array_equal(arrays["conv1.weight"].numpy(), expected["conv1.weight"].numpy())


@pytest.mark.parametrize("failed", [False, True], ids=["no-failure", "one-failure"])
@pytest.mark.parametrize("mode", ["all-clients", "participants"])
def test_partial_participation_average(tmp_path, mode, failed):
    """With "all-clients" (FedDecomp's code: the absent clients hold σ̄^t), σ̄^{t+1} − σ̄^t = (m/N)·mean_i(σ_i − σ̄^t).

    N = 4, 3 sampled; with a failure, m = the 2 clients that replied (the failed one holds σ̄^t).
    """
    # float64 tensors so that the identity can be checked tightly
    previous = {key: value.astype(np.float64) for key, value in _client_arrays(100).items() if key != "bn1.num_batches_tracked"}
    harness = _Harness(tmp_path, num_nodes=4, global_arrays=previous, **{"fraction-train": 0.75, "partial-average": mode})
    messages = harness.configure_train()
    assert len(messages) == 3
    failing = harness.pid(messages[0]) if failed else None
    clients = {harness.pid(msg): {k: v.astype(np.float64) for k, v in _client_arrays(harness.pid(msg), scale=3.0).items()
                                  if k in previous} for msg in messages if harness.pid(msg) != failing}
    replies = [harness.error_reply(msg) if harness.pid(msg) == failing else harness.train_reply(msg, clients[harness.pid(msg)], 10)
               for msg in messages]
    arrays, _ = harness.strategy.aggregate_train(1, replies)
    result = _numpy(arrays)
    m, n = len(clients), 4
    for key, before in previous.items():
        mean_delta = np.mean([clients[pid][key] - before for pid in clients], axis=0)
        if mode == "all-clients":
            np.testing.assert_allclose(result[key] - before, (m / n) * mean_delta, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(result[key], np.mean([clients[pid][key] for pid in clients], axis=0), rtol=1e-12, atol=1e-12)


def test_all_clients_with_full_participation_is_the_plain_mean(tmp_path):
    harness = _Harness(tmp_path, num_nodes=3, **{"partial-average": "all-clients"})
    messages = harness.configure_train()
    clients = {harness.pid(m): _client_arrays(harness.pid(m)) for m in messages}
    arrays, _ = harness.strategy.aggregate_train(1, [harness.train_reply(m, clients[harness.pid(m)], 5) for m in messages])
    expected = average_arrays([_record(clients[pid]) for pid in sorted(clients)], [1.0, 1.0, 1.0])
    assert all(np.array_equal(arrays[key].numpy(), expected[key].numpy()) for key in expected)


def test_error_replies_are_excluded_and_counted(tmp_path):
    harness = _Harness(tmp_path, num_nodes=3)
    messages = harness.configure_train()
    clients = {harness.pid(m): _client_arrays(harness.pid(m)) for m in messages}
    replies = [harness.error_reply(m) if harness.pid(m) == 1 else harness.train_reply(m, clients[harness.pid(m)], 10, loss=2.0 * harness.pid(m))
               for m in messages]
    arrays, metrics = harness.strategy.aggregate_train(1, replies)
    expected = average_arrays([_record(clients[0]), _record(clients[2])], [1.0, 1.0])
    assert all(np.array_equal(arrays[key].numpy(), expected[key].numpy()) for key in expected)
    assert metrics["train-loss"] == pytest.approx(2.0)  # mean of 0.0 and 4.0: the failed client is not counted

    eval_messages = list(harness.strategy.configure_evaluate(1, arrays, ConfigRecord({}), harness.grid))
    assert len(eval_messages) == 3, "every client evaluates (fraction_evaluate = 1)"
    accuracy = {0: 0.5, 1: 0.9, 2: 0.8}
    sizes = {0: 10, 1: 10, 2: 30}
    eval_replies = [harness.error_reply(m) if harness.pid(m) == 1 else harness.eval_reply(m, accuracy[harness.pid(m)], sizes[harness.pid(m)])
                    for m in eval_messages]
    harness.strategy.aggregate_evaluate(1, eval_replies)

    [record] = harness.recorder.rounds
    assert record["round"] == 1
    assert record["num_participants"] == 2
    assert record["num_failures"] == 1  # one client failed (its train and evaluate replies)
    assert record["acc_per_client"] == {"0": 0.5, "2": 0.8}
    assert record["acc_mean"] == pytest.approx(0.65)
    assert record["acc_weighted"] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
    assert record["acc_std"] == pytest.approx(0.15)
    assert record["bytes_up"] == 2 * _record(clients[0]).count_bytes()
    sent = _record(harness.global_arrays).count_bytes() * 3 + arrays.count_bytes() * 3
    assert record["bytes_down"] == sent


def test_round_without_any_valid_reply_stops_the_run(tmp_path):
    harness = _Harness(tmp_path, num_nodes=2)
    messages = harness.configure_train()
    with pytest.raises(NoValidReplies, match=r"round 1: no client sent a valid reply \(2 asked, 2 replied, 2 errors"):
        harness.strategy.aggregate_train(1, [harness.error_reply(m) for m in messages])
