"""Reply validation: which replies a strategy may use, and why each other one is a failure.

Every reply is checked before it counts. An error reply, or a reply whose content is not what its
message type promises, is a failure of that client: logged with the client and the reason,
counted, never averaged or recorded, never fatal to the run (Flower's own reply check raises
``InconsistentMessageReplies`` and ends the ServerApp). The checks:

- every reply: its records have the promised types (an ArrayRecord under ``arrays``, MetricRecords
  under ``metrics`` and ``evaluation``, a ConfigRecord with a string ``group`` under
  ``client-info``); ``partition-id`` is an integer, and (train and evaluate replies) the one bound
  to the sending node (:class:`strategies.identity.Identities`); one reply per node and batch;
- train replies: the arrays match the upload template (keys, shapes, dtypes, finite values; the
  data read back, not only the shape and dtype an Array claims);
  ``num-examples`` is an integer in 1..``train_per_client``, ``train-loss`` a finite number,
  ``train-samples`` a non-negative integer; an ``evaluation`` record (fused evaluation) or an
  ``after-training`` record (``evaluate-at``) is checked as an evaluate reply and, when bad, left
  out alone (the upload still counts);
- evaluate replies: ``accuracy`` a finite number in [0, 1], ``num-examples`` an integer in
  1..``test_per_client``, ``eval-loss`` a finite number ≥ 0; with validation splits also
  ``val-accuracy`` in [0, 1] and ``val-loss`` ≥ 0;
- query replies: ``partition-id`` an integer in 0..``num-partitions``−1, ``num-partitions`` a
  positive integer.

``train_per_client`` / ``test_per_client`` (None: no upper bound) are the run's partition sizes:
no client holds more examples. Values are checked by type: a float where an integer belongs is
refused. Keys other than these are not read, unless a strategy adds its own checks of train
replies (``train_checks``: a DP run's ``dp-norm-bit``, strategies/privacy.py). A reply carrying a ``modelled-timeout`` record (the
``timeout`` fault) is neither valid nor bad: it stands for a reply that missed ``round-timeout``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log

from strategies.identity import Identities
from strategies.protocol import (
    ARRAYS,
    CLIENT_INFO,
    EVALUATION,
    METHOD_METRICS,
    METRICS,
    MODELLED_TIMEOUT,
    TRAINED_EVALUATION,
)


@dataclass
class Checked:
    """Replies sorted: usable ones, error replies, modelled stragglers, and replies rejected with a reason."""

    valid: list[Message] = field(default_factory=list)
    errors: list[Message] = field(default_factory=list)
    late: list[Message] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record(message: Message, name: str, kind: type) -> tuple[Any, str | None]:
    """(the record ``name`` of the reply, None) or (None, why it is not a ``kind``)."""
    content = message.content
    if name not in content:
        return None, f"the reply lacks its '{name}' {kind.__name__}"
    record = content[name]
    if not isinstance(record, kind):
        return None, f"'{name}' is a {type(record).__name__}, not a {kind.__name__}"
    return record, None


def _integer(metrics: Mapping, record: str, key: str, low: int, high: int | None = None) -> str | None:
    """Why ``metrics[key]`` is not an integer in low..high, or None."""
    value = metrics.get(key)
    if not _is_integer(value):
        return f"'{record}' {key} = {value!r} is not an integer"
    if value < low or (high is not None and value > high):
        where = f"is not in {low}..{high}" if high is not None else f"is below {low}"
        return f"'{record}' {key} = {value} {where}"
    return None


def _number(metrics: Mapping, record: str, key: str, low: float | None = None, high: float | None = None) -> str | None:
    """Why ``metrics[key]`` is not a finite number in [low, high], or None."""
    value = metrics.get(key)
    if not _is_number(value):
        return f"'{record}' {key} = {value!r} is not a finite number"
    if (low is not None and value < low) or (high is not None and value > high):
        where = f"is not in [{low}, {high}]" if high is not None else f"is below {low}"
        return f"'{record}' {key} = {value} {where}"
    return None


def _partition_problem(message: Message) -> str | None:
    """Why the reply does not name a partition id (a non-negative integer in its ``metrics``), or None."""
    metrics, problem = _record(message, METRICS, MetricRecord)
    return problem or _integer(metrics, METRICS, "partition-id", 0)


def _client_info_problem(message: Message) -> str | None:
    if CLIENT_INFO not in message.content:
        return None
    info, problem = _record(message, CLIENT_INFO, ConfigRecord)
    if problem:
        return problem
    return None if isinstance(info.get("group"), str) else f"'{CLIENT_INFO}' group = {info.get('group')!r} is not a string"


def _method_metrics_problem(message: Message) -> str | None:
    """Why the optional ``method-metrics`` record is not a MetricRecord of finite numbers, or None."""
    if METHOD_METRICS not in message.content:
        return None
    figures, problem = _record(message, METHOD_METRICS, MetricRecord)
    if problem:
        return problem
    return next((problem for key in figures if (problem := _number(figures, METHOD_METRICS, key))), None)


class ReplyValidator:
    """Checks train, evaluate and query replies; train replies against ``upload_template``, the
    sample counts against ``train_per_client`` and ``test_per_client`` (None: unbounded), and with
    ``validation`` every evaluation's validation accuracy and loss."""

    def __init__(self, upload_template: ArrayRecord, train_per_client: int | None = None,
                 test_per_client: int | None = None, validation: bool = False,
                 train_checks: tuple[Callable[[Message], str | None], ...] = ()) -> None:
        self.template = {key: (tuple(array.shape), array.dtype) for key, array in upload_template.items()}
        self.train_per_client = train_per_client
        self.test_per_client = test_per_client
        self.validation = validation
        #: further checks of a train reply, after these (e.g. DP's norm bit, strategies/privacy.py)
        self.train_checks = train_checks

    def train_problem(self, message: Message) -> str | None:
        """Why a train reply cannot be averaged, or None (its ``evaluation`` record aside)."""
        problem = _partition_problem(message) or _client_info_problem(message) or _method_metrics_problem(message)
        if problem:
            return problem
        metrics = message.content[METRICS]
        problem = (_integer(metrics, METRICS, "num-examples", 1, self.train_per_client)
                   or _number(metrics, METRICS, "train-loss")
                   or _integer(metrics, METRICS, "train-samples", 0))
        if problem:
            return problem
        arrays, problem = _record(message, ARRAYS, ArrayRecord)
        if problem:
            return problem
        missing = sorted(set(self.template) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.template))
        if missing or unexpected:
            return f"keys differ from the template (missing {missing[:3]}, unexpected {unexpected[:3]})"
        for key, (shape, dtype) in self.template.items():
            array = arrays[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{key} is {array.dtype}{tuple(array.shape)}, expected {dtype}{shape}"
            try:
                values = array.numpy()
            except (TypeError, ValueError, EOFError, OSError) as err:  # what np.load raises on bad bytes
                return f"{key} cannot be read as a NumPy array ({type(err).__name__}: {err})"
            if values.shape != shape or str(values.dtype) != dtype:  # the data, not just its label
                return f"{key} holds {values.dtype}{values.shape}, but says {dtype}{shape}"
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                return f"{key} has non-finite values"
        return next((problem for check in self.train_checks if (problem := check(message))), None)

    def _evaluation_problem(self, message: Message, record: str) -> str | None:
        metrics, problem = _record(message, record, MetricRecord)
        return problem or (_number(metrics, record, "accuracy", 0.0, 1.0)
                           or _integer(metrics, record, "num-examples", 1, self.test_per_client)
                           or _number(metrics, record, "eval-loss", 0.0)
                           or (self.validation and (_number(metrics, record, "val-accuracy", 0.0, 1.0)
                                                    or _number(metrics, record, "val-loss", 0.0))) or None)

    def evaluate_problem(self, message: Message) -> str | None:
        """Why an evaluate reply cannot be recorded, or None."""
        return _partition_problem(message) or _client_info_problem(message) or self._evaluation_problem(message, METRICS)

    def evaluation_problem(self, message: Message, record: str = EVALUATION) -> str | None:
        """Why a train reply's ``record`` (``evaluation``: fused; ``after-training``) cannot be recorded, or None."""
        return (_partition_problem(message) or _client_info_problem(message)
                or self._evaluation_problem(message, record))

    @staticmethod
    def query_problem(message: Message) -> str | None:
        """Why a query reply does not name a partition and the federation's size, or None."""
        problem = _partition_problem(message)
        if problem:
            return problem
        metrics = message.content[METRICS]
        return (_integer(metrics, METRICS, "num-partitions", 1)
                or _integer(metrics, METRICS, "partition-id", 0, metrics["num-partitions"] - 1))

    def train(self, replies: Iterable[Message], server_round: int, identities: Identities) -> Checked:
        return _sort(replies, self.train_problem, "train", server_round, identities)

    def evaluate(self, replies: Iterable[Message], server_round: int, identities: Identities) -> Checked:
        return _sort(replies, self.evaluate_problem, "evaluate", server_round, identities)

    @staticmethod
    def query(replies: Iterable[Message], server_round: int) -> Checked:
        """Query replies sorted; the rejected ones are not logged here (the sampler refuses their nodes)."""
        return _sort(replies, ReplyValidator.query_problem, "query", server_round, None)

    def evaluations(self, replies: Iterable[Message], server_round: int, identities: Identities) -> list[Message]:
        """The train replies whose ``evaluation`` record (fused evaluation) can be recorded."""
        carrying = [reply for reply in replies
                    if not reply.has_error() and MODELLED_TIMEOUT not in reply.content and EVALUATION in reply.content]
        return _sort(carrying, self.evaluation_problem, "evaluation", server_round, identities).valid

    def trained_evaluations(self, replies: Iterable[Message], server_round: int, identities: Identities) -> Checked:
        """Valid train replies sorted by their ``after-training`` record (missing: rejected)."""
        return _sort(replies, lambda message: self.evaluation_problem(message, TRAINED_EVALUATION),
                     "after-training evaluation", server_round, identities)


def _sort(replies: Iterable[Message], problem: Callable[[Message], str | None], kind: str, server_round: int,
          identities: Identities | None) -> Checked:
    """Sort ``replies`` with ``problem`` and, unless ``identities`` is None (queries), the bound
    partition ids; log every failure with its client (bound partition id) and node."""
    checked = Checked()
    seen: set[int] = set()
    names = identities.bound if identities is not None else {}
    for message in replies:
        node = message.metadata.src_node_id
        if message.has_error():
            checked.errors.append(message)
            log(INFO, "[fedlora-flwr] round %d: %s error from client %s (node %d): %s", server_round, kind,
                names.get(node), node, message.error.reason)
            continue
        if MODELLED_TIMEOUT in message.content:
            checked.late.append(message)
            log(INFO, "[fedlora-flwr] round %d: %s reply of client %s (node %d) counts as past round-timeout "
                "(modelled straggler, fault-kind 'timeout')", server_round, kind, names.get(node), node)
            continue
        reason = problem(message)
        if reason is None and identities is not None:
            reason = identities.problem(node, message.content[METRICS]["partition-id"])
        if reason is None and node in seen:
            reason = f"a second {kind} reply from node {node} in this round"
        if reason is not None:
            checked.rejected.append((message, reason))
            if identities is not None:
                what = "bad update" if kind == "train" else f"bad {kind} reply"
                log(WARNING, "[fedlora-flwr] round %d: %s from client %s (node %d) left out: %s", server_round, what,
                    names.get(node), node, reason)
            continue
        seen.add(node)
        checked.valid.append(message)
    return checked
