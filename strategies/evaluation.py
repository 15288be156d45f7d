"""A round's evaluation of every client, and fused evaluation's bookkeeping.

Every client, trained this round or not, evaluates every round after aggregation (as FedDecomp's
server does). :class:`PendingEvaluation` gathers a round's results by partition id and turns them
into the round's row (:meth:`PendingEvaluation.metrics_row`).

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

from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from strategies.protocol import CLIENT_INFO, EVALUATE_ROUND, EVALUATION, METRICS


@dataclass
class PendingEvaluation:
    """A round's evaluation while it is gathered (with fused evaluation: until the next round's
    train replies are in; saved in the round's checkpoint meanwhile)."""

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

    def metrics_row(self) -> dict:
        """The round's ``metrics.jsonl`` row: every statistic in partition-id order, so the bits do
        not depend on the order replies arrived in."""
        results = [self.results[pid] for pid in sorted(self.results)]
        accuracies = np.array([acc for acc, _, _ in results], dtype=np.float64)
        sizes = np.array([n for _, n, _ in results], dtype=np.float64)
        groups: dict[str, list[float]] = {}
        for acc, _, group in results:
            if group is not None:
                groups.setdefault(group, []).append(acc)
        record = dict(self.row)
        record.setdefault("round", self.round)
        record.update(
            acc_mean=float(accuracies.mean()) if len(accuracies) else float("nan"),
            acc_weighted=float((accuracies * sizes).sum() / sizes.sum()) if sizes.sum() else float("nan"),
            acc_std=float(accuracies.std()) if len(accuracies) else float("nan"),
            acc_per_client={str(pid): self.results[pid][0] for pid in sorted(self.results)},
            num_failures=len(self.failed) + self.failed_unidentified,
            bytes_up=record.get("bytes_up", 0),
            bytes_down=record.get("bytes_down_train", 0) + record.get("bytes_down_evaluate", 0),
        )
        if groups:
            record["acc_per_group"] = {group: float(np.mean(accs)) for group, accs in sorted(groups.items())}
        return record


def evaluation_result(message: Message, key: str) -> tuple[int, tuple[float, int, str | None]]:
    """(partition id, (accuracy, examples, client group)) of a validated evaluate reply (``key`` =
    METRICS) or fused train reply (``key`` = EVALUATION)."""
    metrics = message.content[key]
    group = str(message.content[CLIENT_INFO]["group"]) if CLIENT_INFO in message.content else None
    return int(message.content[METRICS]["partition-id"]), (float(metrics["accuracy"]), int(metrics["num-examples"]), group)


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
