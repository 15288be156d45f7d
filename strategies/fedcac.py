"""FedCAC's server: FedAvg plus per-client customized critical parameters (:class:`FedCACStrategy`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from clients.fedcac import CRITICAL
from strategies.base import ARRAYS, METRICS, PersonalizedStrategy, average_arrays

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig

CUSTOMIZED = "customized"


def overlaps(masks: list[np.ndarray]) -> np.ndarray:
    """overlap[i, j] = 1 − Σ|c_i − c_j| / (2 Σ c_i) of flattened 0/1 masks (asymmetric)."""
    stacked = np.stack(masks).astype(np.float64)
    sizes = stacked.sum(axis=1)
    ones = stacked @ stacked.T  # Σ c_i c_j
    differences = sizes[:, None] + sizes[None, :] - 2.0 * ones  # Σ|c_i − c_j| for 0/1 masks
    with np.errstate(divide="ignore", invalid="ignore"):
        result = 1.0 - differences / (2.0 * sizes[:, None])
    return np.where(sizes[:, None] > 0, result, 0.0)


def collaborators(overlap: np.ndarray, server_round: int, beta: int) -> list[list[int]]:
    """For each client, itself and the clients whose overlap reaches the round's threshold."""
    count = len(overlap)
    if count < 2:
        return [[i] for i in range(count)]
    off_diagonal = overlap[~np.eye(count, dtype=bool)]
    mean, top = off_diagonal.mean(), off_diagonal.max()
    threshold = mean + server_round / beta * (top - mean)
    return [[i] + [j for j in range(count) if j != i and overlap[i, j] >= threshold] for i in range(count)]


class FedCACStrategy(PersonalizedStrategy):
    """FedCAC's server (Wu et al., ICCV 2023, arXiv 2309.11103; Fling's ``fedcac_group``).

    From the participants' models w_i and critical masks c_i (:class:`clients.fedcac.FedCACClient`):

    1. w̄ = the sample-weighted FedAvg of the models;
    2. overlap(i, j) = 1 − Σ|c_i − c_j| / (2 Σ c_i) over all masked elements (0 when c_i is
       empty); threshold_t = mean + (t/β)·(max − mean) over the pairs i ≠ j, with t the 1-based
       round (Fling's (epoch + 1) with 0-based epochs);
    3. ŵ_i = the unweighted mean of w_i and every w_j with overlap(i, j) ≥ threshold_t;
    4. client i's customized model: ŵ_i where c_i = 1, w̄ where c_i = 0, element by element.

    Each client's critical entries of ŵ_i and its mask are kept on disk (``<run-dir>/server/<pid>/
    customized``); every message to client i (this round's evaluation, the next round's training)
    is ŵ_i on its stored mask and the current w̄ elsewhere, so a client that did not train this
    round keeps its customized critical entries and gets the new w̄ for the rest; a client that
    never trained gets w̄. With τ = 0 no element is critical and this is FedAvg.

    Buffers: with ``fedcac-bn-stats = "local"`` (default, Fling's behaviour) the clients never
    upload their BatchNorm statistics (they are personal, :class:`clients.fedcac.FedCACClient`),
    so only parameters reach this strategy; with ``"global"`` the uploaded tensors without a mask
    (the buffers) take w̄, as FedAvg averages them.

    Parameters
    ----------
    beta : int, default 100
        β, how fast the collaboration threshold grows (run-config ``fedcac-beta``).
    **kwargs
        :class:`PersonalizedStrategy`'s; ``server_store`` is required (it holds every customized model).
    """

    per_client_messages = True

    def __init__(self, *, beta: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.server_store is None:
            raise ValueError("FedCACStrategy keeps every client's customized model on disk: pass server_store")
        self.beta = beta

    @classmethod
    def method_options(cls, config: RunConfig) -> dict[str, Any]:
        return {"beta": config.params.fedcac_beta}

    def aggregate(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        records = [message.content[ARRAYS] for message in replies]
        model_keys = [key for key in records[0] if not key.startswith(CRITICAL)]
        models = [{key: record[key].numpy() for key in model_keys} for record in records]
        masks = [{key: record[CRITICAL + key].numpy().astype(bool) for key in model_keys if CRITICAL + key in record}
                 for record in records]
        global_model = average_arrays(
            [ArrayRecord({key: Array.from_numpy_ndarray(model[key]) for key in model_keys}) for model in models], weights
        )
        w_bar = {key: global_model[key].numpy() for key in model_keys}
        store = self.server_store.at_round(server_round)
        groups = collaborators(overlaps([np.concatenate([m.reshape(-1) for m in mask.values()]) for mask in masks]),
                               server_round, self.beta)
        for message, mask, group in zip(replies, masks, groups, strict=True):
            stored = {}
            for key in model_keys:
                critical = mask.get(key, np.zeros(w_bar[key].shape, dtype=bool))
                merged = w_bar[key]
                if critical.any():
                    group_mean = np.mean([models[j][key].astype(np.float64) for j in group], axis=0)
                    merged = np.where(critical, group_mean.astype(w_bar[key].dtype), w_bar[key])
                stored[key] = torch.from_numpy(np.array(merged))
                stored[CRITICAL + key] = torch.from_numpy(critical.astype(np.uint8))
            store.save(int(message.content[METRICS]["partition-id"]), stored, slot=CUSTOMIZED)
        return global_model

    def client_arrays(
        self, partition_ids: list[int | None], arrays: ArrayRecord, server_round: int, training: bool
    ) -> list[ArrayRecord]:
        w_bar = arrays.to_torch_state_dict()
        template = {**w_bar, **{CRITICAL + key: torch.zeros(value.shape, dtype=torch.uint8) for key, value in w_bar.items()}}
        store = self.server_store.at_round(server_round, training)  # evaluation: this round's ŵ_i
        records = []
        for pid in partition_ids:
            stored = None if pid is None else store.load(pid, expected=template, slot=CUSTOMIZED)
            if stored is None:
                records.append(arrays)
                continue
            merged = {key: torch.where(stored[CRITICAL + key].bool(), stored[key], value) for key, value in w_bar.items()}
            records.append(ArrayRecord(merged))
        return records
