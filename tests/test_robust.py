"""Byzantine-robust aggregation (strategies/robust.py) and the ``scaled`` fault: the rules' math
against independent implementations, and a scripted federation in which 30 % of the clients send
boosted updates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import app_defaults
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from inprocess import InProcessGrid
from scipy import stats
from test_federation import ScriptedGrid

from fedlora_flwr.client_app import inject_fault
from strategies.faults import FaultInjector
from strategies.fedavg import FedAvgStrategy
from strategies.protocol import ARRAYS, CONFIG, FAULT, METRICS
from strategies.robust import RobustAggregator, median, trimmed_mean


def _records(rng: np.random.Generator, count: int) -> list[ArrayRecord]:
    return [ArrayRecord({"w": Array(rng.normal(size=(5, 3)).astype(np.float32)),
                         "n": Array(np.asarray(rng.integers(0, 10), np.int64))}) for _ in range(count)]


def test_trimmed_mean_and_median_are_the_coordinatewise_statistics():
    records = _records(np.random.default_rng(0), 9)
    stacked = np.stack([r["w"].numpy().astype(np.float64) for r in records])
    counts = np.array([int(r["n"].numpy()) for r in records], dtype=np.float64)
    trimmed = trimmed_mean(records, 0.25)
    assert np.allclose(trimmed["w"].numpy(), stats.trim_mean(stacked, 0.25, axis=0).astype(np.float32))
    assert trimmed["w"].numpy().dtype == np.float32
    assert int(trimmed["n"].numpy()) == int(np.rint(stats.trim_mean(counts, 0.25)))
    med = median(records)
    assert np.array_equal(med["w"].numpy(), np.median(stacked, axis=0).astype(np.float32))
    assert int(med["n"].numpy()) == int(np.rint(np.median(counts)))


def _stamp() -> None:
    InProcessGrid(None, 1, {})  # stamps this process's task identity, which Message() needs


def _reply(record: ArrayRecord, pid: int) -> Message:
    _stamp()
    question = Message(RecordDict({ARRAYS: record, CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=1000 + pid,
                       message_type=MessageType.TRAIN)
    metrics = MetricRecord({"partition-id": pid, "num-examples": 10, "train-loss": 1.0, "train-samples": 10})
    return Message(RecordDict({ARRAYS: record, METRICS: metrics}), reply_to=question)


def test_krum_selects_the_reply_with_the_smallest_score():
    rng = np.random.default_rng(1)
    records = _records(rng, 7)
    records[2] = ArrayRecord({"w": Array(np.full((5, 3), 50.0, np.float32)), "n": Array(np.asarray(1, np.int64))})
    flat = np.stack([np.concatenate([r["w"].numpy().ravel(), r["n"].numpy().ravel()]).astype(np.float64)
                     for r in records])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    f = 2
    scores = [np.sort(np.delete(row, i))[: len(records) - f - 2].sum() for i, row in enumerate(distances)]
    aggregator = RobustAggregator("krum", byzantine=f)
    chosen = aggregator.aggregate([_reply(record, pid) for pid, record in enumerate(records)])
    best = int(np.argmin(scores))
    assert aggregator.selected == best != 2
    assert np.array_equal(chosen["w"].numpy(), records[best]["w"].numpy())


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="trim_fraction"):
        RobustAggregator("trimmed-mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="one of"):
        RobustAggregator("mean")


def test_the_scaled_fault_boosts_the_floating_point_update():
    _stamp()
    received = ArrayRecord({"w": Array(np.ones(3, np.float32)), "n": Array(np.asarray(2, np.int64))})
    question = Message(RecordDict({ARRAYS: received, CONFIG: ConfigRecord({FAULT: "scaled"})}), dst_node_id=1,
                       message_type=MessageType.TRAIN)
    trained = ArrayRecord({"w": Array(np.array([1.5, 1.0, 0.0], np.float32)), "n": Array(np.asarray(4, np.int64))})
    reply = Message(RecordDict({ARRAYS: trained, METRICS: MetricRecord({"partition-id": 0, "num-examples": 3})}),
                    reply_to=question)
    out = inject_fault("scaled", question, reply, 2, scale=10.0).content[ARRAYS]
    assert np.array_equal(out["w"].numpy(), np.array([6.0, 1.0, -9.0], np.float32))
    assert int(out["n"].numpy()) == 4


class AttackedGrid(ScriptedGrid):
    """Train replies: received + an honest update drawn per client; the clients the server told to
    fail ('scaled') send received + 100·update (what the real ClientApp's inject_fault does)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.honest_means: dict[int, np.ndarray] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        honest = []
        for message, message_id in zip(messages, ids):
            if message.metadata.message_type != MessageType.TRAIN:
                continue
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            server_round = int(message.content[CONFIG]["server-round"])
            sent = message.content[ARRAYS]["w"].numpy()
            update = 0.1 + np.random.default_rng([pid, server_round]).normal(0, 0.01, sent.shape).astype(np.float32)
            reply = self._replies[message_id]
            reply.content[ARRAYS] = ArrayRecord({"w": Array(sent + update)})
            if FAULT in message.content[CONFIG]:
                reply = inject_fault("scaled", message, reply, len(self.contexts), scale=100.0)
                self._replies[message_id] = reply
            else:
                honest.append(sent + update)
            self.honest_means[server_round] = np.mean(honest, axis=0) if honest else None
        return ids


@pytest.mark.parametrize(("aggregation", "fooled"), [("mean", True), ("weighted", True), ("trimmed-mean", False),
                                                      ("median", False), ("krum", False)])
def test_thirty_percent_scaled_updates_steer_the_mean_but_not_the_robust_rules(aggregation, fooled):
    template = ArrayRecord({"w": Array(np.zeros(50, np.float32))})
    grid = AttackedGrid({1: 0.5, 2: 0.5}, 20, app_defaults())
    strategy = FedAvgStrategy(upload_template=template, aggregation=aggregation, trim_fraction=0.35,
                              krum_byzantine=6, faults=FaultInjector(0.3, "scaled", 3))
    result = strategy.start(grid, template, num_rounds=2)
    honest_step = 2 * 0.1  # two rounds of honest updates of mean ~0.1
    error = np.abs(result.arrays["w"].numpy() - honest_step).max()
    if fooled:
        assert error > 5.0, "6 of 20 updates ×100 move the mean ~30× the honest step"
    else:
        assert error < 0.05, f"{aggregation} strays {error} from the honest step"
