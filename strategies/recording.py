"""Recording: what a strategy needs from the object that writes its run, if it is given one.

A strategy records nothing by itself: without a recorder it returns Flower's ``Result`` only.
With one (this app's :class:`fedlora_flwr.results.RunRecorder`) it writes every round's row and,
after every round, a checkpoint of the arrays the next round starts from, its own
``checkpoint_state()`` and any pending fused evaluation. A recorder whose ``checkpoint`` is set
makes the strategy's ``start()`` continue that run after the checkpointed round.
"""

from __future__ import annotations

from typing import Any, Protocol

from flwr.app import ArrayRecord


class ResumePoint(Protocol):
    """A saved checkpoint (``fedlora_flwr.results.Checkpoint``)."""

    round: int  # the last round it holds
    arrays: ArrayRecord  # the arrays round + 1 starts from
    strategy: dict[str, Any]  # the strategy's checkpoint_state()
    pending_evaluation: dict[str, Any] | None  # PendingEvaluation.to_json() of a fused run


class Recorder(Protocol):
    """Writes a strategy's rounds and checkpoints."""

    checkpoint: ResumePoint | None  # where a resumed run continues (None: from round 1)
    rounds: list[dict[str, Any]]  # the rows written so far (a resumed run's earlier rounds)

    def elapsed(self) -> float:
        """Seconds since the run started (a resumed run goes on from its checkpoint's)."""

    def record_round(self, record: dict[str, Any]) -> None:
        """Write one round's row."""

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, strategy_state: dict[str, Any],
                        pending_evaluation: dict[str, Any] | None = None) -> None:
        """Save what round ``server_round`` + 1 needs, after that round's row (or with its pending evaluation)."""
