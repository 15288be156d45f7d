"""Base strategy: aggregate only what clients share, evaluate every client, optionally record the run.

Clients send exactly their method's *shared* tensors (the server never sees personal ones), so
the server averages whatever keys arrive:

- aggregation is the unweighted mean of FedLoRA's eq. 8 or the sample-weighted mean, computed in
  float64 over the replies sorted by partition id (bit-for-bit reproducible whatever the arrival
  order) and cast back to each tensor's dtype (integer BN counters are rounded);
- with ``partial_average = "all-clients"`` the mean is taken over all N clients, absent ones
  holding the previous σ̄, as FedDecomp's ``src/server.py`` does (docs/concepts/strategies.md);
- every round, after aggregation, every connected client evaluates (as FedDecomp's ``src/server.py``;
  docs/concepts/strategies.md), and/or each participant evaluates right after its local training,
  in its train reply: the run's ``evaluate-at`` (:mod:`strategies.evaluation`).

:class:`PersonalizedStrategy` is a Flower ``Strategy`` built from plain keyword arguments and
composed of parts with one job each:

- :class:`strategies.sampling.ParticipantSampler`: who trains, reproducibly, by partition id,
  with :class:`strategies.identity.Identities`: each node's partition id, bound once;
- :class:`strategies.validation.ReplyValidator`: which replies may be used, and why not;
- :class:`strategies.evaluation.FusedEvaluation`: evaluation riding on the next train message;
- :class:`strategies.faults.FaultInjector` (optional): clients told to fail, for tests;
- :class:`strategies.robust.RobustAggregator` (``aggregation`` = trimmed-mean, median, krum):
  a Byzantine-robust rule instead of the mean;
- :class:`strategies.privacy.SharedUpdatePrivacy` (optional, ``dp-clip-norm`` > 0): clipping,
  Gaussian noise and accounting of the shared update (user-level DP);
- a :class:`strategies.recording.Recorder` (optional): the round rows and checkpoints.

A method's strategy overrides hooks, never the round logic:

- :meth:`PersonalizedStrategy.aggregate`: how the uploads become the next shared arrays;
- :meth:`PersonalizedStrategy.client_arrays` with ``per_client_messages = True``: a different
  message per client (FedAMP's u_i, FedCAC's customized model);
- ``server_store``: per-client state on disk, keyed by partition id, never all clients in RAM;
- :meth:`PersonalizedStrategy.checkpoint_state` / :meth:`PersonalizedStrategy.restore`: what the
  strategy keeps in memory across rounds, saved with each round's checkpoint;
- :meth:`PersonalizedStrategy.method_options`: the method's own run-config keys, for this app.

Resume: Flower's ``Strategy.start()`` always runs rounds 1..N and has no round offset, so
:meth:`PersonalizedStrategy.start` is its loop over the same public hooks (same order, same
``Result``) that begins after the recorder's checkpoint, from the checkpoint's arrays: rounds
k+1..N run with their true numbers (sampling and client seeds, rows, checkpoints) and the
checkpointed rounds are not entered at all. Only public Flower API is used: messages are built
with ``Message(content, dst_node_id=..., message_type=...)``, one RecordDict each, and replies
are read through ``has_error()`` and their content. A round in which no client sent a valid train
reply stops the run (:class:`~fedlora_flwr.exits.NoValidReplies`, a Flower ``AppExitException``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from fedlora_flwr.config import AFTER_AGGREGATION, AFTER_TRAINING, ConfigError
from fedlora_flwr.exits import NoValidReplies
from fedlora_flwr.results import last_trained_rounds
from fedlora_flwr.store import LAST_TRAINED, PersonalStateStore, StateError
from strategies.evaluation import EvalResult, FusedEvaluation, PendingEvaluation, evaluation_result, result_from_json
from strategies.faults import FaultInjector
from strategies.privacy import SharedUpdatePrivacy, check_config
from strategies.protocol import ARRAYS, EVALUATE_ROUND, FAULT, METHOD_METRICS, METRICS, TRAINED_EVALUATION, instruction
from strategies.recording import Recorder
from strategies.robust import ROBUST_RULES, RobustAggregator
from strategies.sampling import ParticipantSampler
from strategies.validation import Checked, ReplyValidator

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig
    from fedlora_flwr.results import RunRecorder

#: This app's folder (under the run folder) for the server's per-client state.
SERVER_DIR = "server"


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


class PersonalizedStrategy(Strategy):
    """Shared-keys aggregation + per-round evaluation of every client (+ run recording).

    Keyword arguments:

    - ``upload_template``: the arrays every train reply must carry (keys, shapes, dtypes);
    - ``fraction_train``: the fraction of the known partitions that train each round (at least 1);
    - ``fraction_evaluate``: the fraction of the connected known partitions evaluated after
      aggregation each round (at least 1; 1: every connected client), drawn by (seed, round) in a
      stream of its own (:meth:`~strategies.sampling.ParticipantSampler.sample_evaluation`); not with
      ``fused_evaluation``;
    - ``seed``: seeds the participants drawn each round (``numpy.random.default_rng([seed, round])``);
    - ``aggregation``: ``"mean"`` (eq. 8) or ``"weighted"`` (by ``num-examples``), or a robust
      rule, ``"trimmed-mean"`` (β = ``trim_fraction``), ``"median"``, ``"krum"`` (f =
      ``krum_byzantine``) (:mod:`strategies.robust`); None: the class's ``default_aggregation``;
    - ``partial_average``: ``"participants"`` or ``"all-clients"`` (absent clients hold σ̄^t);
    - ``min_available_nodes``: nodes round 1 waits for (0: the ``num-partitions`` a strict majority
      of them reports), at most ``node_wait_timeout`` seconds; ``query_timeout``: seconds to wait
      for partition-id answers (:mod:`strategies.sampling`, :mod:`strategies.identity`);
    - ``train_per_client``, ``test_per_client``: the most examples a client holds, the bounds of a
      reply's ``num-examples`` (None: no upper bound; :mod:`strategies.validation`);
    - ``validation``: clients hold validation splits, so every evaluation must carry ``val-accuracy``
      and ``val-loss`` (``validation-fraction``);
    - ``evaluation_points``: where clients are evaluated, the primary point first (``evaluate-at``
      resolved by the method: ``"after-aggregation"``, ``"after-training"``; :mod:`strategies.evaluation`);
    - ``fused_evaluation``: evaluate round t in round t+1's train messages
      (:mod:`strategies.evaluation`; not with ``per_client_messages``; only after aggregation);
    - ``faults``: a :class:`FaultInjector` telling some participants to fail (tests);
    - ``server_store``: where per-client server state lives (FedAMP, FedCAC need one);
    - ``privacy``: a :class:`~strategies.privacy.SharedUpdatePrivacy`: DP of the shared update
      (needs the equally weighted ``"mean"``; not with ``per_client_messages``);
    - ``recorder``: writes the rows and checkpoints, and resumes from its checkpoint; without one
      :meth:`start` only returns Flower's ``Result`` (train metric ``train-loss``, evaluate metric
      ``acc-mean``: the unweighted mean of the clients' accuracies).
    """

    default_aggregation: ClassVar[str] = "weighted"
    #: Build one message per client with :meth:`client_arrays` instead of one common message.
    per_client_messages: ClassVar[bool] = False
    #: Clients upload shared tensors (False: nothing is shared, nothing to protect or aggregate robustly).
    shares_arrays: ClassVar[bool] = True

    def __init__(
        self,
        *,
        upload_template: ArrayRecord,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        aggregation: str | None = None,
        partial_average: str = "participants",
        min_available_nodes: int = 0,
        node_wait_timeout: float = 600.0,
        query_timeout: float = 3600.0,
        train_per_client: int | None = None,
        test_per_client: int | None = None,
        validation: bool = False,
        evaluation_points: tuple[str, ...] = (AFTER_AGGREGATION,),
        fused_evaluation: bool = False,
        faults: FaultInjector | None = None,
        server_store: PersonalStateStore | None = None,
        recorder: Recorder | None = None,
        trim_fraction: float = 0.2,
        krum_byzantine: int = 1,
        privacy: SharedUpdatePrivacy | None = None,
    ) -> None:
        self.aggregation = self.default_aggregation if aggregation is None else aggregation
        if self.aggregation not in ("mean", "weighted", *ROBUST_RULES):
            raise ValueError(f"aggregation must be one of {('mean', 'weighted', *ROBUST_RULES)}, not {aggregation!r}")
        self.robust = (RobustAggregator(self.aggregation, trim_fraction, krum_byzantine)
                       if self.aggregation in ROBUST_RULES else None)
        if (self.robust or privacy) and (self.per_client_messages or not self.shares_arrays):
            raise ValueError(f"{type(self).__name__} has no one shared aggregate: no robust aggregation, no DP")
        if privacy is not None and self.aggregation != "mean":
            raise ValueError(f"DP needs aggregation 'mean' (equal weights), not {self.aggregation!r}")
        self.privacy = privacy
        if partial_average not in ("participants", "all-clients"):
            raise ValueError(f"partial_average must be 'participants' or 'all-clients', not {partial_average!r}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], not {fraction_train}")
        if not 0.0 < fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in (0, 1], not {fraction_evaluate}")
        if fused_evaluation and fraction_evaluate < 1.0:
            raise ValueError("fused_evaluation evaluates every client (the participants in their train message): "
                             "not with fraction_evaluate < 1")
        if not evaluation_points or len(set(evaluation_points)) < len(evaluation_points) or not set(
                evaluation_points) <= {AFTER_AGGREGATION, AFTER_TRAINING}:
            raise ValueError(f"evaluation_points must name {AFTER_AGGREGATION!r} and/or {AFTER_TRAINING!r} once each, "
                             f"not {evaluation_points!r}")
        if fused_evaluation and AFTER_AGGREGATION not in evaluation_points:
            raise ValueError("fused_evaluation carries the evaluation after aggregation, which evaluation_points lacks")
        if fused_evaluation and self.per_client_messages:
            raise ValueError(f"{type(self).__name__} sends each client its own arrays: no fused evaluation")
        self.partial_average = partial_average
        self.evaluation_points = tuple(evaluation_points)
        self.fraction_evaluate = fraction_evaluate
        self.sampler = ParticipantSampler(fraction_train, seed, min_available_nodes, node_wait_timeout, query_timeout)
        self.validator = ReplyValidator(upload_template, train_per_client, test_per_client, validation,
                                        (privacy.reply_problem,) if privacy is not None else ())
        self.fused = FusedEvaluation() if fused_evaluation else None
        self.faults = faults
        self.server_store = server_store
        self.recorder = recorder
        self.aggregated_rounds = 0
        #: partition id -> the last round its update was aggregated (sent to it as LAST_TRAINED, so
        #: that a client whose state vanished fails instead of starting afresh)
        self.last_trained: dict[int, int] = {}
        #: partition id -> the after-training evaluation its last aggregated update carried
        self.after_training: dict[int, EvalResult] = {}
        self.initial_arrays = ArrayRecord()  # the round-1 arrays (FedAMP's w⁰), set by start()
        self.num_rounds = 0  # set by start()
        # the round in progress
        self._round: dict = {}  # its row's training figures
        self._arrays = ArrayRecord()  # its arrays after aggregation (what the checkpoint holds)
        self._previous: ArrayRecord | None = None  # the arrays it started from
        self._num_nodes = 0
        self._sent_train: set[int] = set()
        self._failed_train: set[int] = set()
        self._sent_evaluate: set[int] = set()
        self._failed_after_training: set[int] = set()  # partition ids whose after-training evaluation was bad

    # ------------------------------------------------------------------ this app's run config

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Refuse, in one line, a run config this strategy cannot honour (before any output is written)."""
        if config.fused_evaluation and cls.per_client_messages:
            raise ConfigError(f"fused-evaluation: method {config.method!r} sends each client its own arrays, so its "
                              "evaluation cannot ride on the next train message; set fused-evaluation = false")
        if config.fused_evaluation and config.fraction_evaluate < 1:
            raise ConfigError("fused-evaluation evaluates every client (participants in their train message), "
                              f"fraction-evaluate = {config.fraction_evaluate:g} a sample: set one of them back")
        check_config(config, cls)

    @classmethod
    def method_options(cls, config: RunConfig) -> dict[str, Any]:
        """The keyword arguments a method adds from its own run-config keys (none here)."""
        return {}

    @classmethod
    def from_config(cls, config: RunConfig, recorder: RunRecorder, upload_template: ArrayRecord) -> PersonalizedStrategy:
        """The strategy this app's ServerApp runs: every keyword argument from the run config."""
        faults = FaultInjector(config.fault_fraction, config.fault_kind, config.seed) if config.fault_fraction else None
        privacy = SharedUpdatePrivacy.from_config(config)
        aggregation = None if config.aggregation == "auto" else config.aggregation
        extra: dict[str, Any] = {}
        if privacy is not None:  # DP: the equally weighted mean whatever the method's default
            extra.update(privacy=privacy)
            aggregation = "mean"
        if config.aggregation in ROBUST_RULES:
            extra.update(trim_fraction=config.trim_fraction, krum_byzantine=config.krum_byzantine)
        return cls(
            upload_template=upload_template,
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            seed=config.seed,
            aggregation=aggregation,
            partial_average=config.partial_average,
            min_available_nodes=config.min_available_nodes,
            node_wait_timeout=config.node_wait_timeout,
            query_timeout=config.round_timeout,
            train_per_client=config.train_per_client,
            test_per_client=config.test_per_client,
            validation=config.validation_fraction > 0,
            evaluation_points=config.evaluation_points,
            # fused evaluation carries the evaluation after aggregation: nothing to carry without one
            fused_evaluation=config.fused_evaluation and AFTER_AGGREGATION in config.evaluation_points,
            faults=faults,
            server_store=PersonalStateStore(recorder.run_dir / SERVER_DIR, config.method),
            recorder=recorder,
            **extra,
            **cls.method_options(config),
        )

    # ------------------------------------------------------------------ hooks for methods

    def client_arrays(
        self, partition_ids: list[int | None], arrays: ArrayRecord, server_round: int, training: bool
    ) -> list[ArrayRecord]:
        """One ArrayRecord per client of this batch of messages (only with ``per_client_messages``);
        a partition id is None for a node that has not replied yet. ``arrays`` is the common
        message (the initial or the last aggregated arrays)."""
        return [arrays for _ in partition_ids]

    def aggregate(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        """The next shared arrays from the valid replies (sorted by partition id) and their weights:
        their mean, a robust rule's aggregate, or (DP) the noisy mean of their clipped updates."""
        if self.privacy is not None:
            aggregated, figures = self.privacy.release(server_round, replies, self._previous)
            self._round.update(figures)
        elif self.robust is not None:
            aggregated = self.robust.aggregate(replies)
            if self.robust.selected is not None:
                self._round["krum_selected"] = self.robust.selected
        else:
            aggregated = average_arrays([message.content[ARRAYS] for message in replies], weights)
        if self.partial_average == "all-clients" and self._previous is not None:
            absent = max(self._num_nodes - len(replies), 0)
            aggregated = average_arrays([aggregated, self._previous], [len(replies), absent]) if absent else aggregated
        return aggregated

    def checkpoint_state(self) -> dict:
        """What the strategy holds in memory across rounds, as JSON values (for the checkpoint)."""
        state: dict[str, Any] = {
            "aggregated_rounds": self.aggregated_rounds,
            "after_training": {str(pid): list(result) for pid, result in self.after_training.items()}}
        if self.privacy is not None:  # the clip norm and the accountant's ledger
            state["privacy"] = self.privacy.state()
        return state

    def restore(self, state: dict) -> None:
        """Take back :meth:`checkpoint_state` when resuming."""
        self.aggregated_rounds = int(state["aggregated_rounds"])
        if self.privacy is not None:
            if "privacy" not in state:
                raise StateError("the checkpoint holds no DP state (clip norm, accountant): it is not of a DP run")
            self.privacy.restore(state["privacy"])
        # a checkpoint written before evaluate-at existed holds no after-training evaluations
        self.after_training = {int(pid): result_from_json(result)
                               for pid, result in state.get("after_training", {}).items()}

    # ------------------------------------------------------------------ the round loop

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's ``Strategy.start()`` loop over the public hooks, from ``initial_arrays`` (the
        round-1 arrays, FedAMP's w⁰), or, with a recorder holding a checkpoint of round k, from the
        checkpoint's arrays and state for rounds k+1..``num_rounds`` only. ``Result.arrays``: the
        arrays after the last round; its metrics cover the rounds this call ran."""
        self.initial_arrays, self.num_rounds = initial_arrays, num_rounds
        first_round, arrays = self._resume(initial_arrays)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
        self.summary()
        result = Result()
        started = time.time()
        if evaluate_fn and first_round == 1 and (central := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = central
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            messages = self.configure_train(server_round, arrays, train_config, grid)
            aggregated, metrics = self.aggregate_train(server_round, grid.send_and_receive(messages=messages, timeout=timeout))
            if aggregated is not None:
                arrays = aggregated
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
            metrics = self.aggregate_evaluate(server_round, replies)
            if metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = metrics
            if evaluate_fn and (central := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = central
        result.arrays = arrays
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.rstrip("\n"))
        return result

    def _resume(self, initial_arrays: ArrayRecord) -> tuple[int, ArrayRecord]:
        """The first round to run and its arrays: round 1 from ``initial_arrays``, or the round
        after the recorder's checkpoint, with the strategy's saved state restored."""
        if self.recorder is None:
            return 1, initial_arrays
        checkpoint = self.recorder.checkpoint
        pending = None
        if checkpoint is not None and checkpoint.pending_evaluation is not None:
            if self.fused is None:
                raise ValueError(f"the checkpoint of round {checkpoint.round} holds a fused evaluation, "
                                 "but this strategy was built without fused_evaluation")
            pending = PendingEvaluation.from_json(checkpoint.pending_evaluation)
        # rows written so far, and a fused run's pending row (not in the rows yet)
        self.last_trained = last_trained_rounds([*self.recorder.rounds, *([pending.row] if pending else [])])
        if checkpoint is None:
            return 1, initial_arrays
        self.restore(checkpoint.strategy)
        if pending is not None:
            self.fused.pending = pending
        log(INFO, "[fedlora-flwr] rounds 1..%d are in the checkpoint: starting at round %d", checkpoint.round,
            checkpoint.round + 1)
        return checkpoint.round + 1, checkpoint.arrays

    def summary(self) -> None:
        sampler = self.sampler
        log(INFO, "\t├──> Participants: %g of the partitions, drawn by (seed %d, round)", sampler.fraction, sampler.seed)
        if self.robust is not None:
            log(INFO, "\t├──> Shared tensors: %s over %s", self.robust.describe(), self.partial_average)
        else:
            log(INFO, "\t├──> Shared tensors: %s mean over %s", self.aggregation, self.partial_average)
        if self.privacy is not None:
            log(INFO, "\t├──> %s", self.privacy.describe())
        log(INFO, "\t└──> Round 1 waits for %s SuperNodes (node-wait-timeout %g s)",
            sampler.min_available_nodes or "the num-partitions a strict majority reports", sampler.node_wait_timeout)

    def _instructions(self, node_ids: list[int], message_type: str, arrays: ArrayRecord, config: dict,
                      server_round: int) -> list[Message]:
        """One message per node: its arrays (:meth:`client_arrays`), the last round it trained in
        and, for the clients picked to fail, the fault to inject."""
        training = message_type == MessageType.TRAIN
        partition_ids = [self.sampler.partition_ids.get(node) for node in node_ids]
        # the round a batch's evaluations are of: a fused one, else this round's (after training)
        after_training = server_round if AFTER_TRAINING in self.evaluation_points else None
        evaluates = config.get(EVALUATE_ROUND, after_training) if training else server_round
        faulty = self.faults.faulty(partition_ids, server_round, training, evaluates) if self.faults else set()
        records = (self.client_arrays(partition_ids, arrays, server_round, training) if self.per_client_messages
                   else [arrays for _ in node_ids])
        messages = []
        for node, pid, record in zip(node_ids, partition_ids, records, strict=True):
            node_config = dict(config)
            if pid is not None:
                node_config[LAST_TRAINED] = self.last_trained.get(pid, 0)
            if pid in faulty:
                node_config[FAULT] = self.faults.kind
            messages.append(instruction(node, message_type, record, node_config))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        drawn = self.fused.participants(server_round) if self.fused else None
        node_ids = drawn if drawn is not None else self.sampler.sample(grid, server_round)
        evaluate_first = self.fused.train_config() if self.fused else {}
        if self.privacy is not None:  # stop before anyone trains if the round would pass the budget
            self.privacy.before_round(server_round, len(node_ids), self.sampler.federation_size or len(node_ids))
            evaluate_first = {**evaluate_first, **self.privacy.train_config()}
        config = {**config, "server-round": server_round, **evaluate_first}
        messages = self._instructions(node_ids, MessageType.TRAIN, arrays, config, server_round)
        log(INFO, "configure_train: partitions %s train (of %d known)",
            sorted(self.sampler.partition_ids[node] for node in node_ids), len(self.sampler.partition_ids))
        self._previous = arrays
        self._num_nodes = len(list(grid.get_node_ids()))
        self._sent_train = set(node_ids)
        self._round = {
            "round": server_round,
            "num_nodes": self._num_nodes,
            "bytes_down_train": sum(message.content[ARRAYS].count_bytes() for message in messages),
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        identities = self.sampler.identities
        checked = self.validator.train(replies, server_round, identities)
        valid = sorted(checked.valid, key=lambda message: int(message.content[METRICS]["partition-id"]))
        if self.fused is not None and self.fused.pending is not None:
            self._record(self.fused.finish(self.validator.evaluations(replies, server_round, identities)))
        self._failed_train = self._sent_train - {message.metadata.src_node_id for message in valid}
        if self.recorder is not None:
            self._round["train_elapsed_s"] = self.recorder.elapsed()
        self._round.update(
            participants=[int(message.content[METRICS]["partition-id"]) for message in valid],
            num_bad_updates=len(checked.rejected),
            num_participants=len(valid),
            bytes_up=sum(message.content[ARRAYS].count_bytes() for message in valid),
        )
        self.last_trained.update(dict.fromkeys(self._round["participants"], server_round))
        if AFTER_TRAINING in self.evaluation_points:
            self._keep_trained_evaluations(valid, server_round)
        if not valid:
            raise NoValidReplies(_no_valid_replies(server_round, len(self._sent_train), checked))
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
        figures = [message.content[METHOD_METRICS] for message in valid if METHOD_METRICS in message.content]
        if figures:  # a method's own figures: each key's mean over the participants that sent it
            keys = sorted({key for record in figures for key in record})
            self._round["method_metrics"] = {key: float(np.mean([float(r[key]) for r in figures if key in r]))
                                             for key in keys}
        return aggregated, MetricRecord({"train-loss": train_loss})

    def _keep_trained_evaluations(self, valid: list[Message], server_round: int) -> None:
        """Keep the after-training evaluations of the aggregated updates (:mod:`strategies.evaluation`);
        a participant whose evaluation is bad has none until its next one, and fails the round."""
        checked = self.validator.trained_evaluations(valid, server_round, self.sampler.identities)
        self.after_training.update(evaluation_result(message, TRAINED_EVALUATION) for message in checked.valid)
        self._failed_after_training = {int(message.content[METRICS]["partition-id"]) for message, _ in checked.rejected}
        for pid in self._failed_after_training:
            self.after_training.pop(pid, None)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._arrays = arrays
        # no evaluation after aggregation: no evaluate message
        node_ids = sorted(self.sampler.connected(grid)) if AFTER_AGGREGATION in self.evaluation_points else []
        if node_ids and self.fraction_evaluate < 1.0:
            node_ids = self.sampler.sample_evaluation(node_ids, server_round, self.fraction_evaluate)
            self._round.update(fraction_evaluate=self.fraction_evaluate, num_evaluated=len(node_ids))
        if self.fused is not None:
            ahead = self.sampler.sample(grid, server_round + 1) if server_round < self.num_rounds else []
            self.fused.defer(server_round, ahead)
            node_ids = [node for node in node_ids if node not in self.fused.deferred_nodes]
        config = {**config, "server-round": server_round}
        messages = self._instructions(node_ids, MessageType.EVALUATE, arrays, config, server_round)
        self._sent_evaluate = set(node_ids)
        self._round["bytes_down_evaluate"] = sum(message.content[ARRAYS].count_bytes() for message in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        names = self.sampler.partition_ids
        valid = self.validator.evaluate(replies, server_round, self.sampler.identities).valid
        failed = self._failed_train | (self._sent_evaluate - {message.metadata.src_node_id for message in valid})
        deferred = self.fused.deferred_nodes if self.fused else set()
        evaluation = PendingEvaluation(
            server_round, dict(self._round), dict(evaluation_result(message, METRICS) for message in valid),
            deferred={names[node] for node in deferred},
            failed={names[node] for node in failed if node in names} | self._failed_after_training,
            # nodes that failed without a bound partition id, and nodes refused this round (once each)
            failed_unidentified=(len([node for node in failed if node not in names])
                                 + self.sampler.identities.take_refusals()),
            after_training=dict(self.after_training),
        )
        if evaluation.deferred:  # fused evaluation: the rest comes with round t+1's train replies
            self.fused.pending = evaluation
            self._save_checkpoint(server_round, evaluation)
            return None
        row = self._record(evaluation)
        self._save_checkpoint(server_round)
        return MetricRecord({"acc-mean": row["acc_mean"]}) if row["acc_per_client"] else None

    def _record(self, evaluation: PendingEvaluation) -> dict:
        """The round's row, written by the recorder if there is one."""
        row = evaluation.metrics_row(self.evaluation_points)
        if self.recorder is not None:
            self.recorder.record_round(row)
        return row

    def _save_checkpoint(self, server_round: int, pending: PendingEvaluation | None = None) -> None:
        if self.recorder is not None:
            self.recorder.save_checkpoint(server_round, self._arrays, self.checkpoint_state(),
                                          pending.to_json() if pending else None)


def _no_valid_replies(server_round: int, asked: int, checked: Checked) -> str:
    """One line: how a round's train replies failed, with the first error's and bad update's reasons."""
    errors = [message.error.reason for message in checked.errors]
    first = f"; first error: {' '.join(errors[0].split())[:300]}" if errors else ""
    first += f"; first bad update: {checked.rejected[0][1][:300]}" if checked.rejected else ""
    replied = len(checked.errors) + len(checked.rejected) + len(checked.valid)
    late = f", {len(checked.late)} past round-timeout (modelled)" if checked.late else ""
    return (f"round {server_round}: no client sent a valid reply ({asked} asked, {replied} replied, "
            f"{len(errors)} errors, {len(checked.rejected)} bad updates{late}){first}")
