"""A round's evaluation of every client, and fused evaluation's bookkeeping.

Two evaluation points (``evaluate-at``; the run's method resolves it, primary point first):

- after aggregation: every connected client, trained this round or not, evaluates the round's
  aggregate with its personal state in an evaluate message (as FedDecomp's server does);
- after training: each participant evaluates the model its local training left, before
  aggregation, in its train reply (record ``after-training``). A client's after-training accuracy
  in round t is the one carried by its last train reply, round ≤ t, whose update was aggregated
  (the model it last trained, as pFedSD's and pFedLoRA's code evaluate it; evaluating a fixed model
  on a fixed test split gives the same number again); a client none of whose updates was
  aggregated yet has none, and one whose aggregated update carried a bad evaluation has none
  until its next one (and counts as a failure of that round).

:class:`PendingEvaluation` gathers a round's results by partition id and turns them into the
round's row (:meth:`PendingEvaluation.metrics_row`): the primary point under ``acc_mean``,
``acc_weighted``, ``acc_std``, ``acc_per_client`` (``acc_per_group``), named by ``eval_point``; with
both points, the other one under the same names suffixed ``_after_training`` or
``_after_aggregation``.

With fused evaluation the evaluation of round t rides on round t+1's train message: when round t
is aggregated the strategy draws round t+1's participants, sends evaluate messages only to the
other clients, and each participant evaluates σ̄_t + its personal state (as of round t) before it
trains, replying with an ``evaluation`` record besides its upload. :class:`FusedEvaluation` keeps
who was drawn and the evaluation still pending; the pending evaluation is saved in round t's
checkpoint (so a resumed run asks for it again) and its row is written once those replies are in.
The numbers are those of separate evaluate messages; a participant whose train message fails
counts as round t's failure too. The last round evaluates everyone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from fedlora_flwr.config import AFTER_AGGREGATION, AFTER_TRAINING
from strategies.protocol import CLIENT_INFO, EVALUATE_ROUND, EVALUATION, METRICS

#: A client's evaluation: (accuracy, examples, client group, validation accuracy or None).
EvalResult = tuple[float, int, "str | None", "float | None"]


def point_suffix(point: str) -> str:
    """The suffix of a point's row keys when it is not the primary one: ``_after_training``."""
    return "_" + point.replace("-", "_")


def accuracy_stats(results: Mapping[int, EvalResult], suffix: str = "") -> dict:
    """``acc_mean``, ``acc_weighted``, ``acc_std``, ``acc_per_client`` (and ``acc_per_group`` when
    clients name groups; ``val_acc_mean``, ``val_acc_per_client`` when they hold validation splits)
    of one point, each key ending in ``suffix``, in partition-id order."""
    ordered = [results[pid] for pid in sorted(results)]
    accuracies = np.array([acc for acc, _, _, _ in ordered], dtype=np.float64)
    sizes = np.array([n for _, n, _, _ in ordered], dtype=np.float64)
    groups: dict[str, list[float]] = {}
    for acc, _, group, _ in ordered:
        if group is not None:
            groups.setdefault(group, []).append(acc)
    stats = {
        "acc_mean": float(accuracies.mean()) if len(accuracies) else float("nan"),
        "acc_weighted": float((accuracies * sizes).sum() / sizes.sum()) if sizes.sum() else float("nan"),
        "acc_std": float(accuracies.std()) if len(accuracies) else float("nan"),
        "acc_per_client": {str(pid): results[pid][0] for pid in sorted(results)},
    }
    if groups:
        stats["acc_per_group"] = {group: float(np.mean(accs)) for group, accs in sorted(groups.items())}
    validated = {pid: results[pid][3] for pid in sorted(results) if results[pid][3] is not None}
    if validated:
        stats["val_acc_mean"] = float(np.mean(np.array(list(validated.values()), dtype=np.float64)))
        stats["val_acc_per_client"] = {str(pid): acc for pid, acc in validated.items()}
    return {key + suffix: value for key, value in stats.items()}


@dataclass
class PendingEvaluation:
    """A round's evaluation while it is gathered (with fused evaluation: until the next round's
    train replies are in; saved in the round's checkpoint meanwhile)."""

    round: int
    row: dict  # the round's training figures
    results: dict[int, EvalResult]  # after aggregation: partition id -> (accuracy, examples, group)
    deferred: set[int]  # partition ids that evaluate in their next train message
    failed: set[int]  # partition ids that failed the round's training or evaluation
    failed_unidentified: int = 0  # failed nodes that never named their partition id
    after_training: dict[int, EvalResult] = field(default_factory=dict)  # the round's after-training results

    def to_json(self) -> dict:
        return {"round": self.round, "row": self.row, "results": {str(pid): list(r) for pid, r in self.results.items()},
                "deferred": sorted(self.deferred), "failed": sorted(self.failed),
                "failed_unidentified": self.failed_unidentified,
                "after_training": {str(pid): list(r) for pid, r in self.after_training.items()}}

    @classmethod
    def from_json(cls, state: dict) -> PendingEvaluation:
        # a checkpoint written before evaluate-at existed evaluated after aggregation only
        after_training = {int(pid): result_from_json(r) for pid, r in state.get("after_training", {}).items()}
        return cls(state["round"], state["row"], {int(pid): result_from_json(r) for pid, r in state["results"].items()},
                   set(state["deferred"]), set(state["failed"]), state["failed_unidentified"], after_training)

    def metrics_row(self, points: tuple[str, ...] = (AFTER_AGGREGATION,)) -> dict:
        """The round's ``metrics.jsonl`` row for the evaluation ``points`` (primary first): every
        statistic in partition-id order, so the bits do not depend on the order replies arrived in."""
        results = {AFTER_AGGREGATION: self.results, AFTER_TRAINING: self.after_training}
        record = dict(self.row)
        record.setdefault("round", self.round)
        record["eval_point"] = points[0]
        for index, point in enumerate(points):
            record.update(accuracy_stats(results[point], point_suffix(point) if index else ""))
        record.update(
            num_failures=len(self.failed) + self.failed_unidentified,
            bytes_up=record.get("bytes_up", 0),
            bytes_down=record.get("bytes_down_train", 0) + record.get("bytes_down_evaluate", 0),
        )
        return record


def result_from_json(values: list) -> EvalResult:
    """An :data:`EvalResult` read back from a checkpoint (one written before validation splits
    existed holds three values: no validation accuracy)."""
    accuracy, examples, group, *validation = values
    return accuracy, examples, group, validation[0] if validation else None


def evaluation_result(message: Message, key: str) -> tuple[int, EvalResult]:
    """(partition id, (accuracy, examples, client group, validation accuracy)) of a validated
    evaluate reply (``key`` = METRICS) or train reply (``key`` = EVALUATION: fused;
    TRAINED_EVALUATION: after training)."""
    metrics = message.content[key]
    group = str(message.content[CLIENT_INFO]["group"]) if CLIENT_INFO in message.content else None
    validation = float(metrics["val-accuracy"]) if "val-accuracy" in metrics else None
    return int(message.content[METRICS]["partition-id"]), (float(metrics["accuracy"]), int(metrics["num-examples"]),
                                                           group, validation)


class FusedEvaluation:
    """Which round's participants were drawn ahead, and the evaluation waiting for their replies."""

    def __init__(self) -> None:
        self.drawn: tuple[int, list[int]] | None = None  # (round, node ids) drawn a round ahead
        self.deferred_nodes: set[int] = set()  # node ids that evaluate in their next train message
        self.pending: PendingEvaluation | None = None

    def participants(self, server_round: int) -> list[int] | None:
        """The node ids drawn ahead for ``server_round``, or None."""
        return self.drawn[1] if self.drawn and self.drawn[0] == server_round else None

    def defer(self, server_round: int, next_participants: list[int]) -> None:
        """Round ``server_round`` + 1's participants (none after the last round) evaluate
        ``server_round`` in their train message instead of an evaluate message."""
        self.drawn = (server_round + 1, next_participants)
        self.deferred_nodes = set(next_participants)

    def train_config(self) -> dict:
        """What a train message adds to its config: the round to evaluate first, if any."""
        return {EVALUATE_ROUND: self.pending.round} if self.pending is not None else {}

    def finish(self, replies: list[Message]) -> PendingEvaluation:
        """The pending evaluation, completed by the validated ``evaluation`` records of the next
        round's train replies; a deferred client without one failed."""
        pending, self.pending = self.pending, None
        results = dict(evaluation_result(message, EVALUATION) for message in replies)
        pending.results.update(results)
        pending.failed |= pending.deferred - set(results)
        return pending
