"""Fault injection, so that failure handling can be tested and measured.

A seeded fraction of a batch of messages is told, in its config (``fault``), to fail as ``kind``
says; the ClientApp obeys (``fedlora_flwr.client_app.inject_fault``). The kinds:

- ``raise``: the ClientApp raises after training (an error reply);
- ``timeout``: a *modelled* straggler: the client trains, then replies at once with a
  ``modelled-timeout`` record instead of its upload, and the server treats that reply exactly as
  one that arrived after ``round-timeout`` (not averaged, not recorded, a failure of the round).
  Sleeping instead would hold a Ray actor past its round and delay every later message of a
  simulation (measured: 20 clients on 2 actors trained no one in rounds 2 and 3);
- ``nan``, ``wrong-shape``: an uploaded tensor holds a NaN, or loses its last row;
- ``nan-weight``, ``negative-weight``: the reply's ``num-examples`` is NaN, or negative;
- ``forged-id``: the reply names the next partition id (mod ``num-partitions``), not its own;
- ``bad-eval``: an evaluation reports an accuracy above 1;
- ``scaled``: a boosted update: received + ``fault-scale``·(trained − received) for every
  floating-point shared tensor (a hostile client steering the mean; default factor 100),
  the attack the robust rules of ``aggregation`` are tested against (strategies/robust.py).

The train-reply kinds are drawn among each round's participants, by (seed, round, 1). ``bad-eval``
is drawn among the clients that evaluate round t, by (seed, t, 2), once per batch of messages that
carries those evaluations (the evaluate messages, with fused evaluation the next round's train
messages, and when clients are evaluated after training round t's train messages).
"""

from __future__ import annotations

from typing import get_args

import numpy as np

from fedlora_flwr.config import FaultKind

#: Draws of the faulty clients: of a round's trainers, and of the clients that evaluate a round.
TRAIN_STREAM, EVALUATION_STREAM = 1, 2


class FaultInjector:
    """Picks ``round(fraction · clients)`` of a batch of messages, drawn by (seed, round, stream)."""

    KINDS = get_args(FaultKind)
    #: Kinds that spoil an evaluation instead of a train reply.
    EVALUATION_KINDS = ("bad-eval",)

    def __init__(self, fraction: float, kind: str, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0 or kind not in self.KINDS:
            raise ValueError(f"fault injection: fraction {fraction} must be in [0, 1] and kind {kind!r} one of {self.KINDS}")
        self.fraction = fraction
        self.kind = kind
        self.seed = seed

    def faulty(self, partition_ids: list[int | None], server_round: int, training: bool,
               evaluates: int | None = None) -> set[int]:
        """The partition ids told to fail in one batch of messages of ``server_round`` (train
        messages if ``training``, else evaluate messages) whose clients evaluate round ``evaluates``
        (None: none). Nodes not identified yet are never picked."""
        if self.kind in self.EVALUATION_KINDS:
            if evaluates is None:
                return set()
            draw = [self.seed, evaluates, EVALUATION_STREAM]
        else:
            if not training:
                return set()
            draw = [self.seed, server_round, TRAIN_STREAM]  # apart from the sampling stream
        known = sorted(pid for pid in partition_ids if pid is not None)
        count = int(round(self.fraction * len(known)))
        if not count:
            return set()
        return {int(pid) for pid in np.random.default_rng(draw).choice(known, size=count, replace=False)}
