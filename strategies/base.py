"""Base strategy: aggregate only what clients share, evaluate every client, record the run.

Clients send exactly their method's *shared* tensors (the server never sees personal ones), so
the server averages whatever keys arrive. Built on Flower's message-based ``FedAvg`` (sampling,
message construction, reply validation) with three changes:

- aggregation is the unweighted mean of FedLoRA's eq. 8 or the sample-weighted mean, computed in
  float64 over the replies sorted by partition id (bit-for-bit reproducible whatever the arrival
  order) and cast back to each tensor's dtype (integer BN counters are rounded);
- with ``partial-average = "all-clients"`` the mean is taken over all N clients, absent ones
  holding the previous σ̄, as FedDecomp's code does (METHODS.md A.5);
- every round, after aggregation, every client evaluates (fraction_evaluate = 1, METHODS.md A.6)
  and the round is written to ``metrics.jsonl``.

A method's strategy overrides hooks, never the round logic:

- :meth:`PersonalizedStrategy.aggregate`: how the uploads become the next shared arrays (pFedGate
  and FedCAC extend it; FedAMP keeps the uploads per client instead);
- :meth:`PersonalizedStrategy.client_arrays` with ``per_client_messages = True``: a different
  message per client (FedAMP's u_i, FedCAC's customized model), each in a fresh record;
- :attr:`PersonalizedStrategy.server_store`: per-client state on disk under
  ``<run-dir>/server/<partition-id>/``, keyed by partition id, never all clients in RAM.

Partition ids are learned from the replies (every reply names its client), so a node whose
partition id is not known yet (round 1) gets the common message.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora_flwr.config import RunConfig
from fedlora_flwr.results import RunRecorder
from fedlora_flwr.store import PersonalStateStore

ARRAYS = "arrays"
METRICS = "metrics"


def average_arrays(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Weighted mean of ArrayRecords with identical keys, in float64, cast back to each dtype."""
    total = float(sum(weights))
    averaged: dict[str, np.ndarray] = {}
    for key in records[0]:
        reference = records[0][key].numpy()
        acc = np.zeros(reference.shape, dtype=np.float64)
        for record, weight in zip(records, weights, strict=True):
            acc += record[key].numpy().astype(np.float64) * (weight / total)
        if np.issubdtype(reference.dtype, np.integer):
            acc = np.rint(acc)
        averaged[key] = np.asarray(acc, dtype=reference.dtype)
    return ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in averaged.items()})


def mean_distance(records: list[ArrayRecord], center: ArrayRecord) -> float:
    """Mean over clients of the L2 distance between a client's shared tensors and the aggregate.

    Floating-point tensors only (the paper's Fig. 6 distance of σ_i to σ̄).
    """
    if not records or not len(center):
        return 0.0
    distances = []
    for record in records:
        squared = 0.0
        for key in center:
            reference = center[key].numpy()
            if np.issubdtype(reference.dtype, np.floating):
                squared += float(np.sum((record[key].numpy().astype(np.float64) - reference) ** 2))
        distances.append(squared**0.5)
    return float(np.mean(distances))


SERVER_DIR = "server"


class PersonalizedStrategy(FedAvg):
    """Shared-keys aggregation + per-round evaluation of every client + run recording."""

    default_aggregation: ClassVar[str] = "weighted"
    #: Build one message per client with :meth:`client_arrays` instead of one common message.
    per_client_messages: ClassVar[bool] = False

    def __init__(self, config: RunConfig, recorder: RunRecorder) -> None:
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            arrayrecord_key=ARRAYS,
        )
        self.config = config
        self.recorder = recorder
        self.aggregation = self.default_aggregation if config.aggregation == "auto" else config.aggregation
        self._round: dict = {}
        self._previous: ArrayRecord | None = None
        self._num_nodes = 0
        self._sent_train: set[int] = set()
        self._failed_train: set[int] = set()
        self._sent_evaluate: set[int] = set()
        self.partition_ids: dict[int, int] = {}  # node id -> partition id, learned from replies
        self.server_store = PersonalStateStore(recorder.run_dir / SERVER_DIR, config.method)
        self.aggregated_rounds = 0

    # ------------------------------------------------------------------ hooks for methods

    def client_arrays(
        self, partition_ids: list[int | None], arrays: ArrayRecord, server_round: int, training: bool
    ) -> list[ArrayRecord]:
        """One ArrayRecord per client of this batch of messages (only with ``per_client_messages``);
        a partition id is None for a node that has not replied yet. ``arrays`` is the common
        message (the initial or the last aggregated arrays)."""
        return [arrays for _ in partition_ids]

    def aggregate(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        """The next shared arrays from the valid replies (sorted by partition id) and their weights."""
        aggregated = average_arrays([message.content[ARRAYS] for message in replies], weights)
        if self.config.partial_average == "all-clients" and self._previous is not None:
            absent = max(self._num_nodes - len(replies), 0)
            aggregated = average_arrays([aggregated, self._previous], [len(replies), absent]) if absent else aggregated
        return aggregated

    # ------------------------------------------------------------------ round logic

    def _personalize(
        self, messages: list[Message], arrays: ArrayRecord, config: ConfigRecord, server_round: int, training: bool
    ) -> list[Message]:
        """One fresh record per node (Flower's FedAvg shares one record between all messages)."""
        if not self.per_client_messages:
            return messages
        partition_ids = [self.partition_ids.get(message.metadata.dst_node_id) for message in messages]
        records = self.client_arrays(partition_ids, arrays, server_round, training)
        return [
            Message(
                content=RecordDict({ARRAYS: record, self.configrecord_key: ConfigRecord(dict(config))}),
                message_type=message.metadata.message_type,
                dst_node_id=message.metadata.dst_node_id,
            )
            for message, record in zip(messages, records, strict=True)
        ]

    def _learn_partition_ids(self, replies: list[Message]) -> None:
        for message in replies:
            self.partition_ids[message.metadata.src_node_id] = int(message.content[METRICS]["partition-id"])

    def summary(self) -> None:
        super().summary()  # its "Weighted by" line is Flower's metric-averaging key
        log(INFO, "\t└──> Shared tensors: %s mean over %s", self.aggregation, self.config.partial_average)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        messages = self._personalize(messages, arrays, config, server_round, training=True)
        self._previous = arrays
        self._num_nodes = len(list(grid.get_node_ids()))
        self._sent_train = {message.metadata.dst_node_id for message in messages}
        self._round = {
            "round": server_round,
            "num_nodes": self._num_nodes,
            "bytes_down_train": sum(message.content[ARRAYS].count_bytes() for message in messages),
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        valid.sort(key=lambda message: int(message.content[METRICS]["partition-id"]))
        self._learn_partition_ids(valid)
        self._failed_train = self._sent_train - {message.metadata.src_node_id for message in valid}
        self._round.update(
            num_participants=len(valid),
            bytes_up=sum(message.content[ARRAYS].count_bytes() for message in valid),
        )
        if not valid:
            return None, None
        records = [message.content[ARRAYS] for message in valid]
        metrics = [message.content[METRICS] for message in valid]
        if self.aggregation == "mean":
            weights = [1.0] * len(valid)
        else:
            weights = [float(m["num-examples"]) for m in metrics]
        aggregated = self.aggregate(server_round, valid, weights)
        self.aggregated_rounds += 1
        train_loss = float(np.mean([float(m["train-loss"]) for m in metrics]))
        self._round.update(train_loss=train_loss, shared_distance=mean_distance(records, aggregated))
        return aggregated, MetricRecord({"train-loss": train_loss})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        messages = self._personalize(messages, arrays, config, server_round, training=False)
        self._sent_evaluate = {message.metadata.dst_node_id for message in messages}
        self._round["bytes_down_evaluate"] = sum(message.content[ARRAYS].count_bytes() for message in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        self._learn_partition_ids(valid)
        per_client = {
            int(message.content[METRICS]["partition-id"]): (
                float(message.content[METRICS]["accuracy"]),
                int(message.content[METRICS]["num-examples"]),
            )
            for message in valid
        }
        accuracies = np.array([acc for acc, _ in per_client.values()], dtype=np.float64)
        sizes = np.array([n for _, n in per_client.values()], dtype=np.float64)
        record = dict(self._round)
        record.setdefault("round", server_round)
        failed_evaluate = self._sent_evaluate - {message.metadata.src_node_id for message in valid}
        record.update(
            acc_mean=float(accuracies.mean()) if len(accuracies) else float("nan"),
            acc_weighted=float((accuracies * sizes).sum() / sizes.sum()) if sizes.sum() else float("nan"),
            acc_std=float(accuracies.std()) if len(accuracies) else float("nan"),
            acc_per_client={str(pid): per_client[pid][0] for pid in sorted(per_client)},
            num_failures=len(self._failed_train | failed_evaluate),
            bytes_up=record.get("bytes_up", 0),
            bytes_down=record.get("bytes_down_train", 0) + record.get("bytes_down_evaluate", 0),
        )
        self.recorder.record_round(record)
        return MetricRecord({"acc-mean": record["acc_mean"]}) if len(accuracies) else None
