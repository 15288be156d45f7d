"""Byzantine-robust aggregation of the shared tensors (``aggregation`` = ``trimmed-mean``,
``median``, ``krum``), on this app's per-partition replies.

Each rule replaces the mean of :func:`strategies.base.average_arrays` and, like it, works in
float64 over the replies sorted by partition id and casts back to each tensor's dtype (integer
BatchNorm counters rounded). All three are unweighted: a client's ``num-examples`` is its own
claim, and letting it weigh the result would hand a hostile client the lever the rule removes.

- ``trimmed-mean``: coordinate-wise, the mean of the values left after cutting the
  ⌊β·n⌋ largest and ⌊β·n⌋ smallest (β = ``trim-fraction``), Flower's ``trim_mean``
  (``flwr.serverapp.strategy.fedtrimmedavg``; Yin et al., ICML 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates"). It tolerates fewer than ⌊β·n⌋ hostile clients.
- ``median``: the coordinate-wise median (``numpy.median``, as Flower's ``FedMedian``; Yin et al. 2018).
- ``krum``: the one reply whose summed squared L2 distance to its n − f − 2 nearest other replies
  is smallest (f = ``krum-byzantine``), selected with Flower's ``select_multikrum``
  (``flwr.serverapp.strategy.multikrum``; Blanchard et al., NeurIPS 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent"); that reply's tensors become the aggregate.

Flower's strategies themselves (``FedTrimmedAvg``, ``FedMedian``, ``Krum``) cannot run here: they
aggregate whatever replies arrive with their own reply check (one bad reply ends the run) and
know nothing of partition ids; so their functions are applied to the replies this app validated.
Those two functions sit in public modules of Flower's strategy package but are not in its
``__all__``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from strategies.protocol import ARRAYS, METRICS

#: The robust rules of ``aggregation`` (the others are plain means, strategies/base.py).
ROBUST_RULES = ("trimmed-mean", "median", "krum")


def _coordinatewise(records: list[ArrayRecord], rule: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
    """``rule`` over the stacked (clients × …) float64 values of each key, cast back to its dtype."""
    out: dict[str, np.ndarray] = {}
    for key in records[0]:
        reference = records[0][key].numpy()
        value = rule(np.stack([record[key].numpy().astype(np.float64) for record in records]))
        if np.issubdtype(reference.dtype, np.integer):
            value = np.rint(value)
        out[key] = np.asarray(value, dtype=reference.dtype).reshape(reference.shape)
    return ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in out.items()})


def trimmed_mean(records: list[ArrayRecord], beta: float) -> ArrayRecord:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018) with Flower's ``trim_mean``."""
    return _coordinatewise(records, lambda stacked: trim_mean(stacked, beta))


def median(records: list[ArrayRecord]) -> ArrayRecord:
    """Coordinate-wise median (Yin et al. 2018)."""
    return _coordinatewise(records, lambda stacked: np.median(stacked, axis=0))


def krum_index(replies: list[Message], byzantine: int) -> int:
    """The index of the reply Krum selects (Blanchard et al. 2017), by Flower's ``select_multikrum``."""
    contents = [message.content for message in replies]
    chosen = select_multikrum(contents, num_malicious_nodes=byzantine, num_nodes_to_select=1)[0]
    return next(index for index, content in enumerate(contents) if content is chosen)


class RobustAggregator:
    """One robust rule (:data:`ROBUST_RULES`) with its parameter.

    Parameters
    ----------
    rule : str
        ``"trimmed-mean"``, ``"median"`` or ``"krum"``.
    trim_fraction : float, default 0.2
        β of the trimmed mean, in [0, 0.5) (run-config ``trim-fraction``).
    byzantine : int, default 1
        Krum's f (run-config ``krum-byzantine``).
    """

    def __init__(self, rule: str, trim_fraction: float = 0.2, byzantine: int = 1) -> None:
        if rule not in ROBUST_RULES:
            raise ValueError(f"robust aggregation must be one of {ROBUST_RULES}, not {rule!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, not {byzantine}")
        self.rule, self.trim_fraction, self.byzantine = rule, trim_fraction, byzantine
        #: the partition id Krum selected last (None for the coordinate-wise rules)
        self.selected: int | None = None

    def describe(self) -> str:
        if self.rule == "trimmed-mean":
            return f"trimmed mean (β = {self.trim_fraction:g})"
        return f"Krum (f = {self.byzantine})" if self.rule == "krum" else "coordinate-wise median"

    def aggregate(self, replies: list[Message]) -> ArrayRecord:
        """The robust aggregate of the replies' shared arrays (sorted by partition id)."""
        records = [message.content[ARRAYS] for message in replies]
        if self.rule == "trimmed-mean":
            return trimmed_mean(records, self.trim_fraction)
        if self.rule == "median":
            return median(records)
        index = krum_index(replies, self.byzantine)
        self.selected = int(replies[index].content[METRICS]["partition-id"])
        chosen = records[index]
        return ArrayRecord({key: Array.from_numpy_ndarray(chosen[key].numpy().copy()) for key in chosen})
