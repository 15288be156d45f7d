"""Participant sampling over partition ids, reproducible whatever the node ids.

Flower draws node ids from ``os.urandom`` and samples them with the unseeded global ``random``,
so the same seed would train different clients every run. :class:`ParticipantSampler` instead
asks every node it does not know yet for its partition id (a ``query`` message, answered by the
ClientApp with ``partition-id`` and ``num-partitions``), then draws ``fraction`` of the sorted
partition ids with ``numpy.random.default_rng([seed, round])``: the same seed trains the same
clients every round, in simulation and in deployment, and a resumed run draws the same rounds.

Round 1 first waits until ``min_available_nodes`` nodes are connected (0: the ``num-partitions``
they report), at most ``node_wait_timeout`` seconds, then raises :class:`FederationIncomplete`
(Flower's FedAvg would start round 1 with the first node, or wait forever). Later rounds sample
whoever is connected and known.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora_flwr.exits import FederationIncomplete
from strategies.protocol import CONFIG, METRICS
from strategies.validation import ReplyValidator


class ParticipantSampler:
    """Who trains each round: ``fraction`` of the known partition ids, drawn by (seed, round).

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
        self.partition_ids: dict[int, int] = {}  # node id -> partition id
        self.federation_size = 0  # the largest num-partitions a node reported
        self.ready = False  # the federation was complete once (round 1 waited for it)

    def learn(self, replies: Iterable[Message]) -> None:
        """Take the partition ids that valid replies name."""
        for message in replies:
            self.partition_ids[message.metadata.src_node_id] = int(message.content[METRICS]["partition-id"])

    def identify(self, grid: Grid, node_ids: list[int], server_round: int, timeout: float | None = None) -> None:
        """Ask the nodes whose partition id is not known yet (waiting ``timeout`` s, default ``query_timeout``)."""
        unknown = sorted(set(node_ids) - set(self.partition_ids))
        if not unknown:
            return
        questions = [Message(RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                             dst_node_id=node_id, message_type=MessageType.QUERY) for node_id in unknown]
        replies = grid.send_and_receive(questions, timeout=timeout or self.query_timeout)
        valid = ReplyValidator.query(replies, server_round).valid
        self.learn(valid)
        sizes = [int(reply.content[METRICS].get("num-partitions", 0)) for reply in valid]
        self.federation_size = max([self.federation_size, *sizes])

    def connected(self, grid: Grid) -> list[int]:
        """The connected node ids, once at least one is (at most ``node_wait_timeout`` s)."""
        deadline = time.monotonic() + self.node_wait_timeout
        while not (node_ids := list(grid.get_node_ids())):
            if time.monotonic() > deadline:
                raise FederationIncomplete(f"node-wait-timeout: no SuperNode connected for {self.node_wait_timeout:g} s")
            time.sleep(1.0)
        return node_ids

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

    def _await_federation(self, grid: Grid, server_round: int) -> list[int]:
        """The connected node ids once ``min_available_nodes`` (0: the reported ``num-partitions``)
        are connected and asked for their partition id. A connected node whose ClientApp fails
        counts as present: its failures are counted in the rounds, as any client's."""
        deadline = time.monotonic() + self.node_wait_timeout
        reported = None
        while True:
            node_ids = list(grid.get_node_ids())
            self.identify(grid, node_ids, server_round, timeout=max(deadline - time.monotonic(), 1.0))
            needed = self.min_available_nodes or self.federation_size
            if needed and len(node_ids) >= needed:
                return node_ids
            known = sorted(self.partition_ids[node] for node in node_ids if node in self.partition_ids)
            if time.monotonic() > deadline:
                wanted = needed or "num-partitions (no node reported it)"
                raise FederationIncomplete(
                    f"node-wait-timeout: {len(node_ids)} of {wanted} SuperNodes connected after "
                    f"{self.node_wait_timeout:g} s (partition ids {known}); start the missing SuperNodes, "
                    f"or lower min-available-nodes"
                )
            if reported != (len(node_ids), known):
                log(INFO, "Waiting for SuperNodes: %d of %s connected, partition ids %s", len(node_ids), needed or "?", known)
                reported = (len(node_ids), known)
            time.sleep(1.0)
