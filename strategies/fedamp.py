"""FedAMP's server: attentive message passing, a different u_i for every client (:class:`FedAMPStrategy`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from strategies.base import ARRAYS, METRICS, PersonalizedStrategy

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig

MODEL = "model"


def attention_weights(squared_distances: np.ndarray, alpha_k: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """ξ (one row per target client, one column per known client) from the squared distances;
    ``np.inf`` marks the target itself (its own column, if it has one) and gets ξ_ii."""
    own = np.isinf(squared_distances)
    xi = np.where(own, 0.0, alpha_k * np.exp(-np.where(own, 0.0, squared_distances) / sigma) / sigma)
    others = xi.sum(axis=1, keepdims=True)
    xi = np.where(others > 1.0, xi / np.where(others > 0, others, 1.0), xi)
    return xi, 1.0 - np.minimum(others[:, 0], 1.0)


class FedAMPStrategy(PersonalizedStrategy):
    """FedAMP's server (Huang et al., AAAI 2021, arXiv 2007.03797): attentive message passing.

    It keeps every client's last uploaded w_j on disk (``<run-dir>/server/<pid>/model``) and has
    no global model. For each client i it trains, it sends::

        u_i = Σ_j ξ_ij w_j,   ξ_ij = α_K·e^{−‖w_i − w_j‖²/σ}/σ  (j ≠ i),   ξ_ii = 1 − Σ_{j≠i} ξ_ij

    over all clients it holds a w_j for (participants of any earlier round). A client it holds no
    w for is taken to hold the common initial model w⁰; in round 1 everyone gets w⁰. Distances and
    sums run over every floating-point tensor, BatchNorm statistics included, in float64, one
    tensor key at a time (memory: the messages plus one tensor of every client, never all models).
    Evaluate messages carry nothing (clients evaluate their own w_i).

    Deviation: when Σ_{j≠i} ξ_ij > 1 (large α_K or small σ) the paper's ξ_ii would be negative;
    we rescale the ξ_ij (j ≠ i) to sum to 1 and set ξ_ii = 0.

    Parameters
    ----------
    alpha_k : float, default 1.0
        α_K (run-config ``fedamp-alpha-k``).
    sigma : float, default 1.0
        σ (run-config ``fedamp-sigma``).
    **kwargs
        :class:`PersonalizedStrategy`'s; ``server_store`` is required (it holds every w_i).
    """

    per_client_messages = True

    def __init__(self, *, alpha_k: float = 1.0, sigma: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.server_store is None:
            raise ValueError("FedAMPStrategy keeps every client's w_i on disk: pass server_store")
        self.alpha_k, self.sigma = alpha_k, sigma

    @classmethod
    def method_options(cls, config: RunConfig) -> dict[str, Any]:
        return {"alpha_k": config.params.fedamp_alpha_k, "sigma": config.params.fedamp_sigma}

    def aggregate(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        """Keep each participant's w_i; there is no global model to send."""
        store = self.server_store.at_round(server_round)
        for message in replies:
            pid = int(message.content[METRICS]["partition-id"])
            store.save(pid, message.content[ARRAYS].to_torch_state_dict(), slot=MODEL)
        return ArrayRecord()

    def client_arrays(
        self, partition_ids: list[int | None], arrays: ArrayRecord, server_round: int, training: bool
    ) -> list[ArrayRecord]:
        if not training:
            return [ArrayRecord() for _ in partition_ids]
        store = self.server_store.at_round(server_round, training=True)  # the w_j of earlier rounds
        known = store.stored_ids(MODEL)
        if not known:
            return [self.initial_arrays for _ in partition_ids]
        template = self.initial_arrays.to_torch_state_dict()
        column = {pid: index for index, pid in enumerate(known)}

        def stacked(key: str) -> tuple[np.ndarray, np.ndarray]:
            """(known clients' tensors, the targets' own tensors), flattened, float64."""
            rows = np.stack([
                store.load(pid, expected=template, slot=MODEL, keys=[key])[key].numpy().reshape(-1)
                for pid in known
            ]).astype(np.float64)
            own = np.stack([rows[column[pid]] if pid in column else template[key].numpy().reshape(-1).astype(np.float64)
                            for pid in partition_ids])
            return rows, own

        floating = [key for key, value in template.items() if value.is_floating_point()]
        squared = np.zeros((len(partition_ids), len(known)))
        for key in floating:
            rows, own = stacked(key)
            # ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b: no (targets × clients × elements) temporary
            squared += (own**2).sum(axis=1)[:, None] + (rows**2).sum(axis=1)[None, :] - 2.0 * own @ rows.T
        for index, pid in enumerate(partition_ids):
            if pid in column:
                squared[index, column[pid]] = np.inf
        xi, xi_self = attention_weights(np.maximum(squared, 0.0), self.alpha_k, self.sigma)

        messages: list[dict[str, np.ndarray]] = [{} for _ in partition_ids]
        for key, reference in template.items():
            rows, own = stacked(key)
            combined = xi @ rows + xi_self[:, None] * own
            for index in range(len(partition_ids)):
                value = combined[index].reshape(reference.shape)
                if not reference.is_floating_point():
                    value = np.rint(value)
                messages[index][key] = np.asarray(value, dtype=reference.numpy().dtype)
        return [ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in message.items()})
                for message in messages]
