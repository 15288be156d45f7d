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
  and the round is written to ``metrics.jsonl`` (with ``acc_per_group`` when replies name their
  client group, e.g. the architecture in a ``model-family`` run).

A method's strategy overrides hooks, never the round logic:

- :meth:`PersonalizedStrategy.aggregate`: how the uploads become the next shared arrays (FedCAC
  extends it; FedAMP keeps the uploads per client instead);
- :meth:`PersonalizedStrategy.client_arrays` with ``per_client_messages = True``: a different
  message per client (FedAMP's u_i, FedCAC's customized model), each in a fresh record;
- :attr:`PersonalizedStrategy.server_store`: per-client state on disk under
  ``<run-dir>/server/<partition-id>/``, keyed by partition id, never all clients in RAM.
- :meth:`PersonalizedStrategy.checkpoint_state` / :meth:`PersonalizedStrategy.restore`: what the
  strategy keeps in memory across rounds, saved with each round's checkpoint.

After every round the strategy checkpoints (``RunRecorder.save_checkpoint``) the arrays the next
round starts from; the per-client state on disk is versioned by round. A resumed run skips the
checkpointed rounds of Flower's loop and starts the next one from the checkpoint's arrays, with
the true round numbers (sampling, seeds, metrics).

Participants are reproducible: Flower draws node ids from ``os.urandom``, so the strategy first
asks every node it does not know yet for its partition id (a ``query`` message), then samples
``fraction-train`` of the sorted partition ids with a NumPy generator seeded by (seed, round):
the same seed trains the same clients every round, in simulation and in deployment.
``metrics.jsonl`` records them (``participants``). Round 1 first waits until
``min-available-nodes`` SuperNodes are connected (0: the ``num-partitions`` they report), at most
``node-wait-timeout`` seconds, then raises :class:`FederationIncomplete`; later rounds train
whoever is connected (Flower's FedAvg would start round 1 with the first node).

With ``fault-fraction`` > 0 a seeded fraction of each round's participants is told (in its
message config) to fail as ``fault-kind`` says, so that failure handling can be tested and
measured.

With ``fused-evaluation`` the evaluation of round t rides on round t+1's train message: when
round t is aggregated the strategy draws round t+1's participants, sends evaluate messages only
to the other clients, and each participant evaluates σ̄_t + its personal state (as of round t)
before it trains, replying with an ``evaluation`` record besides its upload. Round t's checkpoint,
written as usual, carries the pending evaluation (so a resumed run asks for it again); its row is
written once those replies are in. The last round evaluates everyone. The numbers
are those of separate evaluate messages (a test compares them); a participant whose train
message fails counts as round t's failure too. Not for ``per_client_messages`` strategies, whose
evaluate and train arrays differ.

Every train reply is checked against the method's upload template (keys, shapes, dtypes, finite
values) before anything is averaged; a bad reply is logged with its client and reason, counted
as a failure (``num_bad_updates`` too) and left out, never fatal to the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.app import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora_flwr.config import ConfigError, RunConfig
from fedlora_flwr.results import RunRecorder, last_trained_rounds
from fedlora_flwr.store import LAST_TRAINED, PersonalStateStore

ARRAYS = "arrays"
METRICS = "metrics"
#: Optional reply record naming the client's ``group`` (its architecture in a ``model-family``
#: run); the strategy then also records the mean accuracy per group (``acc_per_group``).
CLIENT_INFO = "client-info"
#: With ``fused-evaluation``: a train reply's evaluation of the previous round (accuracy,
#: num-examples, eval-loss), and the train config key naming that round.
EVALUATION = "evaluation"
EVALUATE_ROUND = "evaluate-round"


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


class FederationIncomplete(RuntimeError):
    """Fewer SuperNodes than ``min-available-nodes`` connected within ``node-wait-timeout``."""


@dataclass
class PendingEvaluation:
    """A round's evaluation while part of it rides on the next round's train replies
    (``fused-evaluation``); saved in the round's checkpoint until its row is written."""

    round: int
    row: dict  # the round's training figures
    results: dict[int, tuple[float, int, str | None]]  # partition id -> (accuracy, examples, group)
    deferred: set[int]  # partition ids that evaluate in their next train message
    failed: set[int]  # partition ids that failed the round's training or evaluation
    failed_unidentified: int = 0  # failed nodes that never named their partition id

    def to_json(self) -> dict:
        return {"round": self.round, "row": self.row, "results": {str(pid): list(r) for pid, r in self.results.items()},
                "deferred": sorted(self.deferred), "failed": sorted(self.failed),
                "failed_unidentified": self.failed_unidentified}

    @classmethod
    def from_json(cls, state: dict) -> PendingEvaluation:
        return cls(state["round"], state["row"], {int(pid): tuple(r) for pid, r in state["results"].items()},
                   set(state["deferred"]), set(state["failed"]), state["failed_unidentified"])


class PersonalizedStrategy(FedAvg):
    """Shared-keys aggregation + per-round evaluation of every client + run recording."""

    default_aggregation: ClassVar[str] = "weighted"
    #: Build one message per client with :meth:`client_arrays` instead of one common message.
    per_client_messages: ClassVar[bool] = False

    def __init__(self, config: RunConfig, recorder: RunRecorder, upload_template: ArrayRecord) -> None:
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
        self._num_rounds = 0
        self._next_participants: tuple[int, list[int]] | None = None  # (round, node ids), fused-evaluation
        self._deferred: set[int] = set()  # node ids
        self._pending: PendingEvaluation | None = None
        self.partition_ids: dict[int, int] = {}  # node id -> partition id, learned from replies
        self.federation_size = 0  # the largest num-partitions a node reported
        self._federation_ready = False
        self.server_store = PersonalStateStore(recorder.run_dir / SERVER_DIR, config.method)
        self.aggregated_rounds = 0
        self.upload_template = {key: (tuple(array.shape), array.dtype) for key, array in upload_template.items()}
        self.initial_arrays = ArrayRecord()  # the seeded round-1 arrays, set by start()
        self._arrays = ArrayRecord()  # the arrays of the current round (after its aggregation)
        checkpoint = recorder.checkpoint
        self.resumed_round = checkpoint.round if checkpoint else 0
        if checkpoint:
            self.restore(checkpoint.strategy)
            if checkpoint.pending_evaluation:
                self._pending = PendingEvaluation.from_json(checkpoint.pending_evaluation)
        #: partition id -> the last round its update was aggregated; sent to it as LAST_TRAINED
        self.last_trained = last_trained_rounds([*recorder.rounds, *([self._pending.row] if self._pending else [])])

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Refuse, in one line, a run config this strategy cannot honour (before any output is written)."""
        if config.fused_evaluation and cls.per_client_messages:
            raise ConfigError(f"fused-evaluation: method {config.method!r} sends each client its own arrays, so its "
                              "evaluation cannot ride on the next train message; set fused-evaluation = false")

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

    def checkpoint_state(self) -> dict:
        """What the strategy holds in memory across rounds, as JSON values (for the checkpoint)."""
        return {"aggregated_rounds": self.aggregated_rounds}

    def restore(self, state: dict) -> None:
        """Take back :meth:`checkpoint_state` when resuming."""
        self.aggregated_rounds = int(state["aggregated_rounds"])

    # ------------------------------------------------------------------ round logic

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, *args, **kwargs) -> Result:
        """Flower's round loop from ``initial_arrays`` (the seeded round-1 arrays, FedAMP's w⁰), or,
        when resuming, from the checkpoint's arrays with the checkpointed rounds skipped."""
        self.initial_arrays = initial_arrays
        self._num_rounds = num_rounds
        checkpoint = self.recorder.checkpoint
        self._arrays = checkpoint.arrays if checkpoint else initial_arrays
        result = super().start(grid, self._arrays, num_rounds, *args, **kwargs)
        result.arrays = self._arrays  # Flower's last aggregate, or the start's if none was made
        return result

    def _personalize(
        self, messages: list[Message], arrays: ArrayRecord, config: ConfigRecord, server_round: int, training: bool
    ) -> list[Message]:
        """One fresh record per node (Flower's FedAvg shares one record between all messages), with
        this node's arrays, the last round it trained in and, for the clients picked to fail, the
        fault to inject."""
        partition_ids = [self.partition_ids.get(message.metadata.dst_node_id) for message in messages]
        faulty = self._faulty(partition_ids, server_round) if training else set()
        records = (self.client_arrays(partition_ids, arrays, server_round, training) if self.per_client_messages
                   else [arrays for _ in messages])
        personalized = []
        for message, record, pid in zip(messages, records, partition_ids, strict=True):
            message_config = ConfigRecord(dict(config))
            if pid is not None:
                message_config[LAST_TRAINED] = self.last_trained.get(pid, 0)
            if pid in faulty:
                message_config["fault"] = self.config.fault_kind
            personalized.append(Message(
                content=RecordDict({ARRAYS: record, self.configrecord_key: message_config}),
                message_type=message.metadata.message_type,
                dst_node_id=message.metadata.dst_node_id,
            ))
        return personalized

    def _faulty(self, partition_ids: list[int | None], server_round: int) -> set[int]:
        """The participants told to fail this round: ``fault-fraction`` of them, seeded by (seed, round)."""
        known = sorted(pid for pid in partition_ids if pid is not None)
        count = int(round(self.config.fault_fraction * len(known)))
        if not count:
            return set()
        rng = np.random.default_rng([self.config.seed, server_round, 1])  # 1: apart from the sampling stream
        return {int(pid) for pid in rng.choice(known, size=count, replace=False)}

    def _learn_partition_ids(self, replies: list[Message]) -> None:
        for message in replies:
            self.partition_ids[message.metadata.src_node_id] = int(message.content[METRICS]["partition-id"])

    def _identify(self, grid: Grid, node_ids: list[int], server_round: int, timeout: float | None = None) -> None:
        """Ask the nodes whose partition id is not known yet (waiting ``timeout`` s, default
        ``round-timeout``); a node that fails to answer is asked again next round and is not
        sampled meanwhile."""
        unknown = sorted(set(node_ids) - set(self.partition_ids))
        if not unknown:
            return
        questions = [
            Message(RecordDict({self.configrecord_key: ConfigRecord({"server-round": server_round})}),
                    message_type=MessageType.QUERY, dst_node_id=node_id)
            for node_id in unknown
        ]
        replies = [reply for reply in grid.send_and_receive(questions, timeout=timeout or self.config.round_timeout)
                   if not reply.has_error() and METRICS in reply.content]
        self._learn_partition_ids(replies)
        sizes = [int(reply.content[METRICS].get("num-partitions", 0)) for reply in replies]
        self.federation_size = max([self.federation_size, *sizes])

    def _await_federation(self, grid: Grid, server_round: int) -> list[int]:
        """The connected node ids once ``min-available-nodes`` nodes are connected (0: the
        ``num-partitions`` they report) and asked for their partition id; raises
        :class:`FederationIncomplete` after ``node-wait-timeout``. A connected node whose ClientApp
        fails counts as present: its failures are counted in the rounds, as any client's."""
        deadline = time.monotonic() + self.config.node_wait_timeout
        reported = None
        while True:
            node_ids = list(grid.get_node_ids())
            self._identify(grid, node_ids, server_round, timeout=max(deadline - time.monotonic(), 1.0))
            needed = self.config.min_available_nodes or self.federation_size
            if needed and len(node_ids) >= needed:
                self._federation_ready = True
                return node_ids
            known = sorted(self.partition_ids[node] for node in node_ids if node in self.partition_ids)
            if time.monotonic() > deadline:
                wanted = needed or "num-partitions (no node reported it)"
                raise FederationIncomplete(
                    f"node-wait-timeout: {len(node_ids)} of {wanted} SuperNodes connected after "
                    f"{self.config.node_wait_timeout:g} s (partition ids {known}); start the missing SuperNodes, "
                    f"or lower min-available-nodes"
                )
            if reported != (len(node_ids), known):
                log(INFO, "Waiting for SuperNodes: %d of %s connected, partition ids %s", len(node_ids), needed or "?", known)
                reported = (len(node_ids), known)
            time.sleep(1.0)

    def sample_participants(self, server_round: int, grid: Grid) -> list[int]:
        """The node ids that train this round: ``fraction-train`` of the known partition ids, sorted,
        drawn by ``numpy.random.default_rng([seed, round])``."""
        if self._federation_ready:
            _, node_ids = sample_nodes(grid, self.min_available_nodes, 0)
            self._identify(grid, node_ids, server_round)
        else:
            node_ids = self._await_federation(grid, server_round)
        by_partition = {pid: node for node, pid in self.partition_ids.items() if node in set(node_ids)}
        partitions = sorted(by_partition)
        count = min(max(int(len(partitions) * self.fraction_train), self.min_train_nodes), len(partitions))
        chosen = np.random.default_rng([self.config.seed, server_round]).choice(partitions, size=count, replace=False)
        return [by_partition[int(pid)] for pid in sorted(chosen)]

    def _bad_update(self, message: Message) -> str | None:
        """Why a train reply cannot be averaged, or None when it matches the upload template."""
        if METRICS not in message.content or ARRAYS not in message.content:
            return f"the reply lacks its '{METRICS}' or '{ARRAYS}' record"
        metrics = message.content[METRICS]
        if "partition-id" not in metrics or "num-examples" not in metrics:
            return "the metrics lack partition-id or num-examples"
        arrays = message.content[ARRAYS]
        missing = sorted(set(self.upload_template) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.upload_template))
        if missing or unexpected:
            return f"keys differ from the template (missing {missing[:3]}, unexpected {unexpected[:3]})"
        for key, (shape, dtype) in self.upload_template.items():
            array = arrays[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{key} is {array.dtype}{tuple(array.shape)}, expected {dtype}{shape}"
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                return f"{key} has non-finite values"
        return None

    def summary(self) -> None:
        super().summary()  # its "Weighted by" line is Flower's metric-averaging key
        log(INFO, "\t└──> Shared tensors: %s mean over %s", self.aggregation, self.config.partial_average)
        log(INFO, "\t└──> Round 1 waits for %s SuperNodes (node-wait-timeout %g s)",
            self.config.min_available_nodes or "num-partitions", self.config.node_wait_timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round <= self.resumed_round:  # every hook passes the checkpointed rounds by
            log(INFO, "[fedlora-flwr] round %d is in the checkpoint: skipped", server_round)
            return []
        drawn = self._next_participants
        node_ids = drawn[1] if drawn and drawn[0] == server_round else self.sample_participants(server_round, grid)
        config["server-round"] = server_round
        if self._pending is not None:
            config[EVALUATE_ROUND] = self._pending.round
        elif EVALUATE_ROUND in config:
            del config[EVALUATE_ROUND]
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, node_ids, MessageType.TRAIN))
        log(INFO, "configure_train: partitions %s train (of %d known)", sorted(self.partition_ids[n] for n in node_ids),
            len(self.partition_ids))
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
        if server_round <= self.resumed_round:
            return None, None
        replies = list(replies)
        answered, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        valid = []
        bad = 0
        for message in answered:
            reason = self._bad_update(message)
            if reason is None:
                valid.append(message)
                continue
            bad += 1
            pid = self.partition_ids.get(message.metadata.src_node_id)
            log(WARNING, "[fedlora-flwr] round %d: bad update from client %s (node %d) left out: %s",
                server_round, pid, message.metadata.src_node_id, reason)
        valid.sort(key=lambda message: int(message.content[METRICS]["partition-id"]))
        self._learn_partition_ids(valid)
        if self._pending is not None:
            self._finish_pending([message for message in answered if EVALUATION in message.content])
        self._failed_train = self._sent_train - {message.metadata.src_node_id for message in valid}
        self._round.update(
            train_elapsed_s=self.recorder.elapsed(),
            participants=[int(message.content[METRICS]["partition-id"]) for message in valid],
            num_bad_updates=bad,
            num_participants=len(valid),
            bytes_up=sum(message.content[ARRAYS].count_bytes() for message in valid),
        )
        self.last_trained.update(dict.fromkeys(self._round["participants"], server_round))
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
        if server_round <= self.resumed_round:
            return []
        self._arrays = arrays
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._deferred = set()
        if self.config.fused_evaluation and server_round < self._num_rounds:
            next_participants = self.sample_participants(server_round + 1, grid)
            self._next_participants = (server_round + 1, next_participants)
            self._deferred = set(next_participants)
            messages = [message for message in messages if message.metadata.dst_node_id not in self._deferred]
        messages = self._personalize(messages, arrays, config, server_round, training=False)
        self._sent_evaluate = {message.metadata.dst_node_id for message in messages}
        self._round["bytes_down_evaluate"] = sum(message.content[ARRAYS].count_bytes() for message in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if server_round <= self.resumed_round:
            return None
        valid, _ = self._check_and_log_replies(list(replies), is_train=False)
        self._learn_partition_ids(valid)
        failed = self._failed_train | (self._sent_evaluate - {message.metadata.src_node_id for message in valid})
        evaluation = PendingEvaluation(
            server_round, dict(self._round), dict(_evaluation_result(message, METRICS) for message in valid),
            deferred={self.partition_ids[node] for node in self._deferred},
            failed={self.partition_ids[node] for node in failed if node in self.partition_ids},
            failed_unidentified=len([node for node in failed if node not in self.partition_ids]),
        )
        if evaluation.deferred:  # fused-evaluation: the rest comes with round t+1's train replies
            self._pending = evaluation
            self.recorder.save_checkpoint(server_round, self._arrays, self.checkpoint_state(), evaluation.to_json())
            return None
        record = self._record_evaluation(evaluation)
        self.recorder.save_checkpoint(server_round, self._arrays, self.checkpoint_state())
        return MetricRecord({"acc-mean": record["acc_mean"]}) if evaluation.results else None

    def _finish_pending(self, replies: list[Message]) -> None:
        """Round t's evaluation, completed by the ``evaluation`` records of round t+1's train replies."""
        pending, self._pending = self._pending, None
        results = dict(_evaluation_result(message, EVALUATION) for message in replies)
        pending.results.update(results)
        pending.failed |= pending.deferred - set(results)
        self._record_evaluation(pending)

    def _record_evaluation(self, evaluation: PendingEvaluation) -> dict:
        """Append the round's ``metrics.jsonl`` row; every statistic in partition-id order, so the
        bits do not depend on the order replies arrived in."""
        results = [evaluation.results[pid] for pid in sorted(evaluation.results)]
        accuracies = np.array([acc for acc, _, _ in results], dtype=np.float64)
        sizes = np.array([n for _, n, _ in results], dtype=np.float64)
        groups: dict[str, list[float]] = {}
        for acc, _, group in results:
            if group is not None:
                groups.setdefault(group, []).append(acc)
        record = dict(evaluation.row)
        record.setdefault("round", evaluation.round)
        record.update(
            acc_mean=float(accuracies.mean()) if len(accuracies) else float("nan"),
            acc_weighted=float((accuracies * sizes).sum() / sizes.sum()) if sizes.sum() else float("nan"),
            acc_std=float(accuracies.std()) if len(accuracies) else float("nan"),
            acc_per_client={str(pid): evaluation.results[pid][0] for pid in sorted(evaluation.results)},
            num_failures=len(evaluation.failed) + evaluation.failed_unidentified,
            bytes_up=record.get("bytes_up", 0),
            bytes_down=record.get("bytes_down_train", 0) + record.get("bytes_down_evaluate", 0),
        )
        if groups:
            record["acc_per_group"] = {group: float(np.mean(accs)) for group, accs in sorted(groups.items())}
        self.recorder.record_round(record)
        return record


def _evaluation_result(message: Message, key: str) -> tuple[int, tuple[float, int, str | None]]:
    """(partition id, (accuracy, examples, client group)) of an evaluate reply (``key`` = METRICS)
    or of a fused train reply (``key`` = EVALUATION)."""
    metrics = message.content[key]
    group = str(message.content[CLIENT_INFO]["group"]) if CLIENT_INFO in message.content else None
    return int(message.content[METRICS]["partition-id"]), (float(metrics["accuracy"]), int(metrics["num-examples"]), group)
