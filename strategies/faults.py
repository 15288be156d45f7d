"""Fault injection, so that failure handling can be tested and measured.

A seeded fraction of each round's participants is told, in its train message config (``fault``),
to fail as ``kind`` says; the ClientApp obeys (``fedlora_flwr.client_app.inject_fault``).
"""

from __future__ import annotations

import numpy as np


class FaultInjector:
    """Picks ``round(fraction · participants)`` of a round's participants, drawn by (seed, round)."""

    KINDS = ("raise", "timeout", "nan", "wrong-shape")

    def __init__(self, fraction: float, kind: str, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0 or kind not in self.KINDS:
            raise ValueError(f"fault injection: fraction {fraction} must be in [0, 1] and kind {kind!r} one of {self.KINDS}")
        self.fraction = fraction
        self.kind = kind
        self.seed = seed

    def faulty(self, partition_ids: list[int | None], server_round: int) -> set[int]:
        """The partition ids told to fail this round (nodes not identified yet are never picked)."""
        known = sorted(pid for pid in partition_ids if pid is not None)
        count = int(round(self.fraction * len(known)))
        if not count:
            return set()
        rng = np.random.default_rng([self.seed, server_round, 1])  # 1: apart from the sampling stream
        return {int(pid) for pid in rng.choice(known, size=count, replace=False)}
