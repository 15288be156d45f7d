"""Who is who: each node's partition id, bound once, and the federation's size.

A node's partition id is bound to its node id when the node first answers a ``query`` message
(``partition-id``, ``num-partitions``) and never changes: a train or evaluate reply that names
another partition id, or comes from a node without one, is refused by the
:class:`~strategies.validation.ReplyValidator`.

The federation's size N, the ``num-partitions`` every node must report, is the value that a
strict majority of the answering nodes report; :class:`~strategies.sampling.ParticipantSampler`
fixes it before round 1. No single node decides it: one node reporting 1,000 among honest ones
reporting 3 is outvoted, and where no value has a strict majority round 1 does not start. From
then on each answer, in arrival order, is refused when

- it reports a ``num-partitions`` other than N (its partition id, in 0..its ``num-partitions``−1
  or the reply is malformed, is then outside 0..N−1 or unverifiable),
- its partition id is already bound to another node (the first node to claim an id keeps it);

a malformed answer (:meth:`ReplyValidator.query_problem`) is refused as soon as it arrives.

A refused node is logged once, counted once as a failure of the round it was refused in, and is
neither sampled nor asked anything again. Nothing here authenticates an answer: a node that claims
another's id first keeps it; SuperNode authentication (``--enable-supernode-auth``) is what keeps
strangers out of a real federation.
"""

from __future__ import annotations

from collections import Counter
from logging import WARNING

from flwr.common.logger import log


class Identities:
    """The node id ↔ partition id map of a run and the federation's size (None until fixed)."""

    def __init__(self) -> None:
        self.bound: dict[int, int] = {}  # node id -> partition id
        self.refused: dict[int, str] = {}  # node id -> why
        self.size: int | None = None
        self._pending: dict[int, tuple[int, int]] = {}  # node id -> (partition id, num-partitions) until size is fixed
        self._holders: dict[int, int] = {}  # partition id -> node id
        self._new_refusals = 0

    def answered(self, node: int) -> bool:
        """Whether ``node`` answered a query already (bound, refused, or waiting for the size)."""
        return node in self.bound or node in self.refused or node in self._pending

    def answer(self, node: int, partition_id: int, num_partitions: int, server_round: int) -> None:
        """Take a node's first (well-formed) query answer: bind or refuse it once the size is fixed."""
        if self.size is None:
            self._pending[node] = (partition_id, num_partitions)
        else:
            self._resolve(node, partition_id, num_partitions, server_round)

    def refuse(self, node: int, reason: str, server_round: int) -> None:
        """Refuse ``node`` for the rest of the run, with one log line."""
        self.refused[node] = reason
        self._new_refusals += 1
        log(WARNING, "[fedlora-flwr] round %d: node %d refused for the rest of the run: %s", server_round, node, reason)

    def waiting(self) -> dict[int, tuple[int, int]]:
        """node id -> (partition id, num-partitions) of the answers waiting for the size."""
        return dict(self._pending)

    def reports(self) -> Counter:
        """num-partitions -> how many of the answers still waiting for the size report it."""
        return Counter(size for _, size in self._pending.values())

    def majority(self) -> int | None:
        """The num-partitions a strict majority of the waiting answers report, or None."""
        reports = self.reports()
        if not reports:
            return None
        size, votes = reports.most_common(1)[0]
        return size if 2 * votes > sum(reports.values()) else None

    def fix(self, size: int, server_round: int) -> None:
        """Fix the federation's size and settle the waiting answers in the order they arrived."""
        self.size = size
        pending, self._pending = self._pending, {}
        for node, (partition_id, reported) in pending.items():
            self._resolve(node, partition_id, reported, server_round)

    def _resolve(self, node: int, partition_id: int, reported: int, server_round: int) -> None:
        if reported != self.size:
            self.refuse(node, f"reports num-partitions = {reported}, but the federation has {self.size}", server_round)
        elif partition_id in self._holders:
            self.refuse(node, f"claims partition id {partition_id}, already bound to node {self._holders[partition_id]}",
                        server_round)
        else:
            self.bound[node] = partition_id
            self._holders[partition_id] = node

    def problem(self, node: int, partition_id: int) -> str | None:
        """Why a train or evaluate reply from ``node`` naming ``partition_id`` is not that node's, or None."""
        if node not in self.bound:
            return f"node {node} has no bound partition id (it has not answered a query), yet names {partition_id}"
        if partition_id != self.bound[node]:
            return f"names partition id {partition_id}, but node {node} is partition {self.bound[node]}"
        return None

    def take_refusals(self) -> int:
        """How many nodes were refused since the last call (each counts once, as a failure)."""
        count, self._new_refusals = self._new_refusals, 0
        return count
