"""Reply validation: which replies a strategy may use, and why each other one is a failure.

An error reply, or a reply whose content is not what its message type promises, is a failure of
that client: logged with the client and the reason, counted, left out, never fatal to the run
(Flower's own reply check raises ``InconsistentMessageReplies`` and ends the ServerApp). A train
reply must match the method's upload template (keys, shapes, dtypes, finite values) before it is
averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from strategies.protocol import ARRAYS, EVALUATION, METRICS


@dataclass
class Checked:
    """Replies sorted: usable ones, error replies, and replies rejected with a reason."""

    valid: list[Message] = field(default_factory=list)
    errors: list[Message] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)


def _missing_metrics(message: Message, record: str, keys: tuple[str, ...]) -> str | None:
    """Why ``record`` is not a metric record with a single number under each of ``keys``."""
    content = message.content
    if record not in content.metric_records:
        return f"the reply lacks its '{record}' metric record"
    metrics = content.metric_records[record]
    missing = [key for key in keys if key not in metrics or isinstance(metrics[key], list)]
    return f"'{record}' lacks a number for {missing}" if missing else None


class ReplyValidator:
    """Checks train, evaluate and query replies; train replies against ``upload_template``."""

    def __init__(self, upload_template: ArrayRecord) -> None:
        self.template = {key: (tuple(array.shape), array.dtype) for key, array in upload_template.items()}

    def train_problem(self, message: Message) -> str | None:
        """Why a train reply cannot be averaged, or None."""
        if ARRAYS not in message.content.array_records:
            return f"the reply lacks its '{ARRAYS}' array record"
        problem = _missing_metrics(message, METRICS, ("partition-id", "num-examples", "train-loss"))
        if problem:
            return problem
        arrays = message.content.array_records[ARRAYS]
        missing = sorted(set(self.template) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.template))
        if missing or unexpected:
            return f"keys differ from the template (missing {missing[:3]}, unexpected {unexpected[:3]})"
        for key, (shape, dtype) in self.template.items():
            array = arrays[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{key} is {array.dtype}{tuple(array.shape)}, expected {dtype}{shape}"
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                return f"{key} has non-finite values"
        return None

    @staticmethod
    def evaluate_problem(message: Message) -> str | None:
        """Why an evaluate reply cannot be recorded, or None."""
        return _missing_metrics(message, METRICS, ("partition-id", "num-examples", "accuracy"))

    @staticmethod
    def evaluation_problem(message: Message) -> str | None:
        """Why a fused train reply's ``evaluation`` record cannot be recorded, or None."""
        return (_missing_metrics(message, METRICS, ("partition-id",))
                or _missing_metrics(message, EVALUATION, ("num-examples", "accuracy")))

    @staticmethod
    def query_problem(message: Message) -> str | None:
        """Why a query reply does not name the node's partition, or None."""
        return _missing_metrics(message, METRICS, ("partition-id",))

    def train(self, replies: Iterable[Message], server_round: int, names: Mapping[int, int]) -> Checked:
        return _sort(replies, self.train_problem, "train", server_round, names)

    def evaluate(self, replies: Iterable[Message], server_round: int, names: Mapping[int, int]) -> Checked:
        return _sort(replies, self.evaluate_problem, "evaluate", server_round, names)

    @staticmethod
    def query(replies: Iterable[Message], server_round: int) -> Checked:
        return _sort(replies, ReplyValidator.query_problem, "query", server_round, {})

    def evaluations(self, replies: Iterable[Message], server_round: int, names: Mapping[int, int]) -> list[Message]:
        """The train replies whose ``evaluation`` record (fused evaluation) can be recorded."""
        carrying = [reply for reply in replies if not reply.has_error() and EVALUATION in reply.content]
        return _sort(carrying, self.evaluation_problem, "evaluation", server_round, names).valid


def _sort(replies: Iterable[Message], problem, kind: str, server_round: int, names: Mapping[int, int]) -> Checked:
    """Sort ``replies`` with ``problem`` and log every failure; ``names``: node id -> partition id."""
    checked = Checked()
    for message in replies:
        node = message.metadata.src_node_id
        if message.has_error():
            checked.errors.append(message)
            log(INFO, "[fedlora-flwr] round %d: %s error from client %s (node %d): %s", server_round, kind,
                names.get(node), node, message.error.reason)
        elif (reason := problem(message)) is not None:
            checked.rejected.append((message, reason))
            what = "bad update" if kind == "train" else f"bad {kind} reply"
            log(WARNING, "[fedlora-flwr] round %d: %s from client %s (node %d) left out: %s", server_round, what,
                names.get(node), node, reason)
        else:
            checked.valid.append(message)
    return checked
