"""The strategy's parts, one at a time (strategies/sampling.py, validation.py, faults.py,
evaluation.py), and the strategy's own round loop: plain keyword arguments, one RecordDict per
message, no recorder, and a resume that runs only the rounds after the checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import app_defaults
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from inprocess import InProcessGrid
from test_federation import ScriptedGrid

from fedlora_flwr import client_app
from fedlora_flwr.results import Checkpoint, point_metric
from fedlora_flwr.store import PersonalStateStore
from strategies.evaluation import FusedEvaluation, PendingEvaluation
from strategies.faults import FaultInjector
from strategies.fedamp import FedAMPStrategy
from strategies.fedlora import FedLoRAStrategy
from strategies.protocol import (
    ARRAYS, CONFIG, EVALUATE_ROUND, EVALUATION, FAULT, METRICS, MODELLED_TIMEOUT, TRAINED_EVALUATION,
)
from strategies.identity import Identities
from strategies.sampling import FederationIncomplete, ParticipantSampler
from strategies.validation import ReplyValidator


def _grid(num_nodes: int, node_seed: int | None = None, present: int | None = None) -> InProcessGrid:
    """The real ClientApp answers the partition-id queries; node ids drawn at random with
    ``node_seed``; only the first ``present`` partitions connected."""
    grid = InProcessGrid(client_app.app, num_nodes, app_defaults())
    contexts = list(grid.contexts.values())[:present]
    ids = random.Random(node_seed).sample(range(10**6, 10**7), len(contexts)) if node_seed is not None else None
    grid.contexts = {}
    for index, context in enumerate(contexts):
        context.node_id = ids[index] if ids else context.node_id
        grid.contexts[context.node_id] = context
    return grid


def _partitions(grid: InProcessGrid, node_ids: list[int]) -> list[int]:
    return [grid.contexts[node].node_config["partition-id"] for node in node_ids]


# --------------------------------------------------------------------------- sampling


def test_sampler_draws_the_same_partitions_whatever_the_node_ids():
    draws = []
    for node_seed in (1, 2):
        grid = _grid(10, node_seed)
        sampler = ParticipantSampler(fraction=0.3, seed=5)
        draws.append([_partitions(grid, sampler.sample(grid, server_round)) for server_round in (1, 2, 3)])
        assert sampler.federation_size == 10 and sorted(sampler.partition_ids.values()) == list(range(10))
    expected = [sorted(int(p) for p in np.random.default_rng([5, r]).choice(10, size=3, replace=False)) for r in (1, 2, 3)]
    assert draws[0] == draws[1] == expected


def test_sampler_stops_when_the_federation_stays_incomplete():
    grid = _grid(3, present=2)  # both report num-partitions = 3
    sampler = ParticipantSampler(fraction=1.0, seed=1, node_wait_timeout=1.0)
    with pytest.raises(FederationIncomplete, match=r"2 of 3 SuperNodes connected .*\[0, 1\]"):
        sampler.sample(grid, 1)
    started = ParticipantSampler(fraction=1.0, seed=1, min_available_nodes=2)
    assert _partitions(grid, started.sample(grid, 1)) == [0, 1]


def test_partition_id_queries_expire_when_their_wait_ends():
    """A query left unanswered must not stay in the SuperLink's store past its wait (Flower 1.41's
    simulation engine walks every stored message for every node: docs/guide/scale.md)."""
    sent = []

    class Recording(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sent.append((timeout, [message.metadata.ttl for message in messages]))
            return super().send_and_receive(messages, timeout=timeout)

    grid = Recording(client_app.app, 3, app_defaults())
    sampler = ParticipantSampler(fraction=1.0, seed=1, node_wait_timeout=50.0, query_timeout=20.0)
    sampler.sample(grid, 1)
    first_wait, ttls = sent[0]
    assert 1.0 <= first_wait <= 50.0 and ttls == [first_wait] * 3  # round 1: what is left of node-wait-timeout
    grid.contexts[99] = next(iter(grid.contexts.values()))  # a node that joins later is asked with query-timeout
    sampler.identify(grid, list(grid.contexts), 2)
    assert sent[1] == (20.0, [20.0])


# --------------------------------------------------------------------------- validation

TEMPLATE = {"w": np.zeros((2, 3), np.float32), "n": np.asarray(0, np.int64)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array.from_numpy_ndarray(np.asarray(value)) for key, value in arrays.items()})


def _reply(content: RecordDict | Error, node_id: int = 1000) -> Message:
    _grid(1)  # stamps this process's task identity, which Message() needs
    question = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=question)


def _train_content(arrays=None, **metrics) -> RecordDict:
    values = {"partition-id": 0, "num-examples": 10, "train-loss": 1.0, "train-samples": 20, **metrics}
    return RecordDict({ARRAYS: _record(TEMPLATE if arrays is None else arrays),
                       METRICS: MetricRecord({k: v for k, v in values.items() if v is not None})})


@pytest.mark.parametrize(("content", "reason"), [
    (_train_content(), None),
    (RecordDict({METRICS: MetricRecord({"partition-id": 0, "num-examples": 1, "train-loss": 1.0, "train-samples": 1})}),
     "lacks its 'arrays' ArrayRecord"),
    (_train_content(**{"num-examples": None}), "num-examples = None is not an integer"),
    (_train_content({"w": TEMPLATE["w"]}), "missing ['n']"),
    (_train_content({**TEMPLATE, "x": TEMPLATE["w"]}), "unexpected ['x']"),
    (_train_content({**TEMPLATE, "w": np.zeros((3, 2), np.float32)}), "expected float32(2, 3)"),
    (_train_content({**TEMPLATE, "w": np.zeros((2, 3), np.float64)}), "w is float64"),
    (_train_content({**TEMPLATE, "w": np.full((2, 3), np.inf, np.float32)}), "non-finite"),
], ids=["valid", "no-arrays", "no-num-examples", "missing-key", "extra-key", "shape", "dtype", "inf"])
def test_train_replies_are_checked_against_the_template(content, reason):
    validator = ReplyValidator(_record(TEMPLATE))
    problem = validator.train_problem(_reply(content))
    assert problem is None if reason is None else reason in problem, problem


def _bound(size: int, **nodes: int) -> Identities:
    """Identities of a federation of ``size`` with ``nodes`` (``n<node id>=partition id``) bound."""
    identities = Identities()
    for node, pid in nodes.items():
        identities.answer(int(node[1:]), pid, size, server_round=1)
    identities.fix(size, server_round=1)
    return identities


def test_replies_are_sorted_into_valid_errors_and_rejected():
    validator = ReplyValidator(_record(TEMPLATE))
    identities = _bound(1, n1000=0)
    good, bad = _reply(_train_content()), _reply(_train_content({"w": TEMPLATE["w"]}))
    error = _reply(Error(code=0, reason="injected"))
    late = _reply(RecordDict({MODELLED_TIMEOUT: ConfigRecord({"fault-kind": "timeout"})}))
    checked = validator.train([error, good, bad, late], server_round=1, identities=identities)
    assert checked.valid == [good] and checked.errors == [error] and [m for m, _ in checked.rejected] == [bad]
    assert checked.late == [late]
    evaluate = _reply(RecordDict({METRICS: MetricRecord({"partition-id": 0, "num-examples": 5, "eval-loss": 1.0})}))
    assert "accuracy = None is not a finite number" in validator.evaluate_problem(evaluate)
    assert validator.evaluate([evaluate], 1, identities).valid == []
    assert ReplyValidator.query([_reply(RecordDict({METRICS: MetricRecord({"num-partitions": 3})}))], 1).valid == []
    fused = _train_content()
    fused[EVALUATION] = MetricRecord({"accuracy": 0.5, "num-examples": 4, "eval-loss": 1.0})
    malformed = _train_content()
    malformed[EVALUATION] = MetricRecord({"accuracy": 0.5})
    carrying, broken = _reply(fused), _reply(malformed)
    assert validator.evaluations([good, carrying, broken, error], 2, identities) == [carrying]


# --------------------------------------------------------------------------- faults


def test_faults_are_a_seeded_fraction_of_the_identified_participants():
    injector = FaultInjector(fraction=0.4, kind="nan", seed=3)
    faulty = injector.faulty([4, None, 0, 2, 7, 9], server_round=2, training=True)
    assert faulty == {int(p) for p in np.random.default_rng([3, 2, 1]).choice([0, 2, 4, 7, 9], size=2, replace=False)}
    assert injector.faulty([4, None, 0, 2, 7, 9], server_round=2, training=False, evaluates=2) == set()
    third = {int(p) for p in np.random.default_rng([3, 3, 1]).choice([0, 2, 4, 7, 9], size=2, replace=False)}
    assert injector.faulty([4, None, 0, 2, 7, 9], server_round=3, training=True, evaluates=2) == third
    assert FaultInjector(0.1, "raise", 3).faulty([0, 1, 2], 1, training=True) == set(), "0.3 of a client rounds to none"
    bad_eval = FaultInjector(fraction=0.4, kind="bad-eval", seed=3)
    assert bad_eval.faulty([0, 1, 2, 3, 4], 2, training=True) == set(), "a train batch that evaluates nothing"
    drawn = {int(p) for p in np.random.default_rng([3, 2, 2]).choice(5, size=2, replace=False)}
    assert bad_eval.faulty([0, 1, 2, 3, 4], 2, training=False, evaluates=2) == drawn
    assert bad_eval.faulty([0, 1, 2, 3, 4], 3, training=True, evaluates=2) == drawn, "fused: round 2's evaluations"
    with pytest.raises(ValueError, match="kind"):
        FaultInjector(0.5, "explode", 3)


# --------------------------------------------------------------------------- evaluation bookkeeping


def test_pending_evaluation_row_and_checkpoint_form():
    evaluation = PendingEvaluation(3, {"bytes_down_train": 7, "bytes_down_evaluate": 5},
                                   {2: (0.5, 10, "a", None), 0: (1.0, 30, "b", None), 1: (0.0, 10, "a", None)},
                                   deferred=set(), failed={4}, failed_unidentified=1)
    assert PendingEvaluation.from_json(evaluation.to_json()) == evaluation
    row = evaluation.metrics_row()
    assert row["round"] == 3 and row["acc_per_client"] == {"0": 1.0, "1": 0.0, "2": 0.5}
    assert row["acc_mean"] == 0.5 and row["acc_weighted"] == pytest.approx(35 / 50)
    assert row["acc_per_group"] == {"a": 0.25, "b": 1.0} and row["num_failures"] == 2 and row["bytes_down"] == 12


def test_fused_evaluation_defers_then_finishes_and_counts_the_missing_as_failed():
    fused = FusedEvaluation()
    fused.defer(1, [1001, 1002])
    assert fused.participants(2) == [1001, 1002] and fused.participants(3) is None
    assert fused.train_config() == {}
    fused.pending = PendingEvaluation(1, {}, {0: (0.5, 10, None, None)}, deferred={1, 2}, failed=set())
    assert fused.train_config() == {EVALUATE_ROUND: 1}
    content = _train_content(**{"partition-id": 1})
    content[EVALUATION] = MetricRecord({"accuracy": 0.25, "num-examples": 8})
    finished = fused.finish([_reply(content, node_id=1001)])
    assert fused.pending is None
    assert finished.results == {0: (0.5, 10, None, None), 1: (0.25, 8, None, None)} and finished.failed == {2}


# --------------------------------------------------------------------------- the strategy


def test_plain_keyword_arguments_are_checked(tmp_path):
    template = _record(TEMPLATE)
    assert FedLoRAStrategy(upload_template=template).aggregation == "mean"
    with pytest.raises(ValueError, match="aggregation"):
        FedLoRAStrategy(upload_template=template, aggregation="geometric-median")
    with pytest.raises(ValueError, match="fraction_train"):
        FedLoRAStrategy(upload_template=template, fraction_train=0.0)
    with pytest.raises(ValueError, match="server_store"):
        FedAMPStrategy(upload_template=template)
    store = PersonalStateStore(tmp_path, "fedamp")
    with pytest.raises(ValueError, match="fused evaluation"):
        FedAMPStrategy(upload_template=template, server_store=store, fused_evaluation=True)
    assert FedAMPStrategy(upload_template=template, server_store=store, sigma=2.0).sigma == 2.0
    with pytest.raises(ValueError, match="no robust aggregation"):
        FedAMPStrategy(upload_template=template, server_store=store, aggregation="median")


def test_every_message_has_its_own_record_and_the_callers_config_is_untouched():
    grid = _grid(4)
    strategy = FedLoRAStrategy(upload_template=_record(TEMPLATE), faults=FaultInjector(0.5, "raise", 1))
    config = ConfigRecord({"run-dir": "x"})
    messages = list(strategy.configure_train(1, _record(TEMPLATE), config, grid))
    assert len(messages) == 4 and len({id(message.content) for message in messages}) == 4
    assert len({id(message.content[CONFIG]) for message in messages}) == 4
    assert dict(config) == {"run-dir": "x"}
    faulty = [_partitions(grid, [m.metadata.dst_node_id])[0] for m in messages if FAULT in m.content[CONFIG]]
    assert set(faulty) == FaultInjector(0.5, "raise", 1).faulty([0, 1, 2, 3], 1, training=True) and len(faulty) == 2
    assert all(message.content[CONFIG]["server-round"] == 1 for message in messages)


class MemoryRecorder:
    """A recorder (strategies.recording.Recorder) that keeps everything in memory."""

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint
        self.rounds: list[dict] = []  # the rows written
        self.saved: list[int] = []

    def elapsed(self) -> float:
        return 0.0

    def record_round(self, record: dict) -> None:
        self.rounds.append(record)

    def save_checkpoint(self, server_round, arrays, strategy_state, pending_evaluation=None) -> None:
        self.saved.append(server_round)


class RoundsGrid(ScriptedGrid):
    """ScriptedGrid that notes the round and arrays of every train message."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained: dict[int, ArrayRecord] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == MessageType.TRAIN:
                self.trained[int(message.content[CONFIG]["server-round"])] = message.content[ARRAYS]
        return super().push_messages(messages)


def test_start_without_a_recorder_returns_flowers_result():
    grid = RoundsGrid({1: 0.5, 2: 0.75}, 2, app_defaults())
    result = FedLoRAStrategy(upload_template=_record(TEMPLATE)).start(grid, _record(TEMPLATE), num_rounds=2)
    assert sorted(grid.trained) == [1, 2]
    assert {r: m["acc-mean"] for r, m in result.evaluate_metrics_clientapp.items()} == {1: 0.5, 2: 0.75}
    assert sorted(result.train_metrics_clientapp) == [1, 2] and list(result.arrays) == list(TEMPLATE)


def test_resumed_start_runs_only_the_rounds_after_the_checkpoint():
    saved = _record({"w": np.full((2, 3), 7.0, np.float32), "n": np.asarray(3, np.int64)})
    recorder = MemoryRecorder(Checkpoint(round=2, arrays=saved, elapsed_s=1.0, strategy={"aggregated_rounds": 2}))
    grid = RoundsGrid({3: 0.25, 4: 0.5}, 2, app_defaults())
    strategy = FedLoRAStrategy(upload_template=_record(TEMPLATE), recorder=recorder)
    result = strategy.start(grid, _record(TEMPLATE), num_rounds=4)
    assert sorted(grid.trained) == [3, 4], "the checkpointed rounds are not entered"
    assert all(np.array_equal(grid.trained[3][key].numpy(), saved[key].numpy()) for key in saved)
    assert [row["round"] for row in recorder.rounds] == recorder.saved == [3, 4]
    assert strategy.aggregated_rounds == 4 and sorted(result.evaluate_metrics_clientapp) == [3, 4]


# --------------------------------------------------------------------------- evaluation points


class PointsGrid(RoundsGrid):
    """RoundsGrid whose train replies also carry an ``after-training`` evaluation: accuracy
    (10·round + partition id) / 100, or an accuracy above 1 for the (round, partition id) in ``bad``."""

    def __init__(self, *args, bad: tuple[int, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad = bad
        self.evaluate_messages = 0

    def push_messages(self, messages):
        messages = list(messages)
        self.evaluate_messages += sum(message.metadata.message_type == MessageType.EVALUATE for message in messages)
        ids = super().push_messages(messages)
        for message_id, message in zip(ids, messages, strict=True):
            if message.metadata.message_type == MessageType.TRAIN:
                server_round = int(message.content[CONFIG]["server-round"])
                pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
                accuracy = 1.5 if (server_round, pid) == self.bad else (10 * server_round + pid) / 100
                self._replies[message_id].content[TRAINED_EVALUATION] = MetricRecord(
                    {"accuracy": accuracy, "num-examples": 8, "eval-loss": 1.0})
        return ids


def test_both_points_record_the_last_aggregated_training_of_each_client_and_resume_with_them():
    grid = PointsGrid({1: 0.5, 2: 0.25, 3: 0.75}, 4, app_defaults(), bad=(2, 2))
    recorder = MemoryRecorder()
    strategy = FedLoRAStrategy(upload_template=_record(TEMPLATE), fraction_train=0.5, seed=3, recorder=recorder,
                               evaluation_points=("after-aggregation", "after-training"))
    strategy.start(grid, _record(TEMPLATE), num_rounds=3)
    drawn = [sorted(int(p) for p in np.random.default_rng([3, r]).choice(4, size=2, replace=False)) for r in (1, 2, 3)]
    assert drawn == [[1, 2], [0, 2], [0, 3]], "seed 3: client 1 sits out after training, client 2 fails in round 2"
    last: dict[str, float] = {}
    for server_round, (row, participants) in enumerate(zip(recorder.rounds, drawn, strict=True), start=1):
        assert row["eval_point"] == "after-aggregation" and row["participants"] == participants
        assert row["acc_per_client"] == dict.fromkeys(("0", "1", "2", "3"), grid.accuracies[server_round])
        for pid in participants:  # a new aggregated training replaces the client's evaluation
            last[str(pid)] = (10 * server_round + pid) / 100
        if server_round == 2:
            del last["2"]  # its evaluation was bad: none until its next aggregated training
        assert row["acc_per_client_after_training"] == dict(sorted(last.items()))
        assert row["acc_mean_after_training"] == pytest.approx(np.mean(list(last.values())))
        assert row["num_failures"] == (1 if server_round == 2 else 0)
    state = strategy.checkpoint_state()
    resumed = FedLoRAStrategy(upload_template=_record(TEMPLATE), evaluation_points=("after-training",))
    resumed.restore(state)
    assert {str(pid): acc for pid, (acc, _, _, _) in resumed.after_training.items()} == last


def test_after_training_alone_sends_no_evaluate_message():
    grid = PointsGrid({}, 3, app_defaults())
    recorder = MemoryRecorder()
    strategy = FedLoRAStrategy(upload_template=_record(TEMPLATE), recorder=recorder,
                               evaluation_points=("after-training",))
    result = strategy.start(grid, _record(TEMPLATE), num_rounds=2)
    assert grid.evaluate_messages == 0 and [row["bytes_down_evaluate"] for row in recorder.rounds] == [0, 0]
    assert recorder.rounds[1]["eval_point"] == "after-training"
    assert recorder.rounds[1]["acc_per_client"] == {"0": 0.2, "1": 0.21, "2": 0.22}
    assert not any(key.endswith("_after_aggregation") for key in recorder.rounds[1])
    assert result.evaluate_metrics_clientapp[2]["acc-mean"] == pytest.approx(0.21)


def test_evaluation_points_are_checked():
    template = _record(TEMPLATE)
    for points in [(), ("after-training", "after-training"), ("before-training",)]:
        with pytest.raises(ValueError, match="evaluation_points"):
            FedLoRAStrategy(upload_template=template, evaluation_points=points)
    with pytest.raises(ValueError, match="fused_evaluation"):
        FedLoRAStrategy(upload_template=template, evaluation_points=("after-training",), fused_evaluation=True)


def test_point_metric_reads_either_point_of_a_row():
    both = PendingEvaluation(1, {}, {0: (0.5, 10, None, None)}, deferred=set(), failed=set(),
                             after_training={0: (0.75, 10, None, None)})
    row = both.metrics_row(("after-training", "after-aggregation"))
    assert point_metric(row, "after-training") == 0.75 and point_metric(row, "after-aggregation") == 0.5
    assert point_metric(row, "after-aggregation", "acc_per_client") == {"0": 0.5}
    single = both.metrics_row(("after-aggregation",))
    assert point_metric(single, "after-aggregation") == 0.5 and point_metric(single, "after-training") is None
    assert point_metric({"acc_mean": 0.5}, "after-aggregation") is None
