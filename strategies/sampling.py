"""Participant sampling over partition ids, reproducible whatever the node ids.

Flower draws node ids from ``os.urandom`` and samples them with the unseeded global ``random``,
so the same seed would train different clients every run. :class:`ParticipantSampler` instead
asks every node it does not know yet for its partition id (a ``query`` message, answered by the
ClientApp with ``partition-id`` and ``num-partitions``; the answer binds the node's partition id
once, :mod:`strategies.identity`), then draws ``fraction`` of the sorted bound partition ids with
``numpy.random.default_rng([seed, round])``: the same seed trains the same clients every round,
in simulation and in deployment, and a resumed run draws the same rounds.

Round 1 waits, at most ``node_wait_timeout`` seconds, until ``min_available_nodes`` nodes are
connected (0: the ``num-partitions`` a strict majority of the answering nodes report) and a
strict majority agrees on the federation's size, which is then fixed; else it raises
:class:`FederationIncomplete` (Flower's FedAvg would start round 1 with the first node, or wait
forever). Every connected node counts as present, whatever it answered: a failing or refused
node's failures are counted as any client's. Later rounds sample whoever is connected and bound.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora_flwr.exits import FederationIncomplete
from strategies.identity import Identities
from strategies.protocol import CONFIG, METRICS
from strategies.validation import ReplyValidator


class ParticipantSampler:
    """Who trains each round: ``fraction`` of the bound partition ids, drawn by (seed, round).

    ``query_timeout``: seconds to wait for the answers to a round's partition-id queries (a node
    that does not answer is asked again next round and is not sampled meanwhile).
    """

    def __init__(self, fraction: float, seed: int, min_available_nodes: int = 0, node_wait_timeout: float = 600.0,
                 query_timeout: float = 3600.0) -> None:
        self.fraction = fraction
        self.seed = seed
        self.min_available_nodes = min_available_nodes
        self.node_wait_timeout = node_wait_timeout
        self.query_timeout = query_timeout
        self.identities = Identities()
        self.ready = False  # the federation was complete once (round 1 waited for it)

    @property
    def partition_ids(self) -> dict[int, int]:
        """node id -> bound partition id."""
        return self.identities.bound

    @property
    def federation_size(self) -> int:
        """The federation's size once fixed (0 before)."""
        return self.identities.size or 0

    def identify(self, grid: Grid, node_ids: list[int], server_round: int, timeout: float | None = None) -> None:
        """Ask the nodes that have not answered yet (waiting ``timeout`` s, default ``query_timeout``);
        a malformed answer refuses its node."""
        identities = self.identities
        unknown = sorted(node for node in node_ids if not identities.answered(node))
        if not unknown:
            return
        # A query lives as long as it is waited for: one left unanswered would otherwise stay in the
        # SuperLink's store (Flower's default TTL is 12 h), and Flower 1.41's simulation engine walks
        # every stored message for every node ten times a second (docs/guide/scale.md).
        wait = timeout or self.query_timeout
        questions = [Message(RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                             dst_node_id=node_id, message_type=MessageType.QUERY, ttl=wait) for node_id in unknown]
        checked = ReplyValidator.query(grid.send_and_receive(questions, timeout=wait), server_round)
        for message, reason in checked.rejected:
            identities.refuse(message.metadata.src_node_id, f"bad query reply: {reason}", server_round)
        for message in checked.valid:
            metrics = message.content[METRICS]
            identities.answer(message.metadata.src_node_id, metrics["partition-id"], metrics["num-partitions"],
                              server_round)
        if self.ready and identities.size is None and (size := identities.majority()) is not None:
            identities.fix(size, server_round)  # round 1 started before any node answered

    def connected(self, grid: Grid) -> list[int]:
        """The connected node ids not refused, once at least one node is connected (at most
        ``node_wait_timeout`` s)."""
        deadline = time.monotonic() + self.node_wait_timeout
        while not (node_ids := list(grid.get_node_ids())):
            if time.monotonic() > deadline:
                raise FederationIncomplete(f"node-wait-timeout: no SuperNode connected for {self.node_wait_timeout:g} s")
            time.sleep(1.0)
        return [node for node in node_ids if node not in self.identities.refused]

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """The node ids that train ``server_round``, sorted by partition id (the first call waits
        for the federation)."""
        if self.ready:
            node_ids = self.connected(grid)
            self.identify(grid, node_ids, server_round)
        else:
            node_ids = self._await_federation(grid, server_round)
            self.ready = True
        connected = set(node_ids)
        by_partition = {pid: node for node, pid in self.partition_ids.items() if node in connected}
        partitions = sorted(by_partition)
        count = min(max(int(len(partitions) * self.fraction), 1), len(partitions))
        chosen = np.random.default_rng([self.seed, server_round]).choice(partitions, size=count, replace=False)
        return [by_partition[int(pid)] for pid in sorted(chosen)]

    def sample_evaluation(self, node_ids: list[int], server_round: int, fraction: float) -> list[int]:
        """``fraction`` (at least 1) of the bound partition ids among ``node_ids``, drawn with
        ``numpy.random.default_rng([seed, round, 1])`` (not the training draw's stream), as node
        ids sorted by partition id: who is evaluated after aggregation when not everyone is."""
        by_partition = {pid: node for node in node_ids if (pid := self.partition_ids.get(node)) is not None}
        partitions = sorted(by_partition)
        if not partitions:
            return []
        count = min(max(int(len(partitions) * fraction), 1), len(partitions))
        chosen = np.random.default_rng([self.seed, server_round, 1]).choice(partitions, size=count, replace=False)
        return [by_partition[int(pid)] for pid in sorted(chosen)]

    def _await_federation(self, grid: Grid, server_round: int) -> list[int]:
        """The connected node ids not refused, once ``min_available_nodes`` (0: the num-partitions
        a strict majority reports) are connected and asked for their partition id, with the
        federation's size fixed. With ``min_available_nodes`` and no well-formed answer at all the
        size stays open (fixed by later answers)."""
        identities = self.identities
        deadline = time.monotonic() + self.node_wait_timeout
        reported = None
        while True:
            node_ids = list(grid.get_node_ids())
            self.identify(grid, node_ids, server_round, timeout=max(deadline - time.monotonic(), 1.0))
            size = identities.majority()
            needed = self.min_available_nodes or size
            present = len(node_ids)
            if needed and present >= needed and (size is not None or not identities.reports()):
                if size is not None:
                    identities.fix(size, server_round)
                return [node for node in node_ids if node not in identities.refused]
            known = sorted(pid for node, (pid, _) in identities.waiting().items() if node in node_ids)
            if time.monotonic() > deadline:
                reports = dict(sorted(identities.reports().items()))
                disagree = f"; no strict majority of them reports one num-partitions {reports}" if size is None and reports else ""
                wanted = needed or ("num-partitions" if reports else "num-partitions (no node reported it)")
                raise FederationIncomplete(
                    f"node-wait-timeout: {present} of {wanted} SuperNodes connected after "
                    f"{self.node_wait_timeout:g} s (partition ids {known}){disagree}; start the missing SuperNodes, "
                    f"or lower min-available-nodes"
                )
            if reported != (present, known):
                log(INFO, "Waiting for SuperNodes: %d of %s connected, partition ids %s", present, needed or "?", known)
                reported = (present, known)
            time.sleep(1.0)
