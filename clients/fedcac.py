"""FedCAC's client: local training, then a mask of the critical parameters (:class:`FedCACClient`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.groups import ParameterPartition

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig

CRITICAL = "critical/"


class FedCACParams(MethodParams):
    fedcac_tau: float = Field(0.5, ge=0, le=1, description="τ: fraction of critical parameters (CIFAR-100: 0.4)")
    fedcac_beta: int = Field(100, ge=1, description="β: growth of the collaboration threshold (CIFAR-100: 170)")
    fedcac_bn_stats: Literal["local", "global"] = Field(
        "local", description="local: every buffer (BatchNorm running mean/var, num_batches_tracked) stays on its "
        "client, as Fling's FedCAC merges named_parameters only; global: buffers take the FedAvg mean")


def is_buffer(key: str, module: nn.Module) -> bool:
    """A buffer (BatchNorm running statistics, ``num_batches_tracked``), not a parameter."""
    return key.rsplit(".", 1)[-1] in dict(module.named_buffers(recurse=False))


def critical_mask(before: torch.Tensor, after: torch.Tensor, tau: float) -> torch.Tensor:
    """Fling's ``evaluate_critical_parameter`` for one tensor: 1 where |Δw ⊙ w| is in the top τ.

    As Fling: no element when ⌊τ·n⌋ = 0 (its threshold is then ∞); when the k-th largest score is
    ≈ 0, the smallest positive score is the threshold; when no score is positive (the tensor did
    not move, or is 0), the threshold stays 0 and every element is critical (Fling prints
    "Abnormal!!!" and keeps ``c >= 0``)."""
    score = ((after - before) * after).abs().flatten()
    count = int(tau * score.numel())
    if count == 0:
        return torch.zeros_like(after, dtype=torch.uint8)
    threshold = torch.topk(score, count).values[-1]
    if threshold <= 1e-10:
        positive = score[score > 1e-20]
        if positive.numel() > 0:
            threshold = positive.min()
    return (score >= threshold).view_as(after).to(torch.uint8)


class FedCACClient(MethodClient):
    """FedCAC: "Bold but Cautious: Unlocking the Potential of Personalized Federated Learning
    through Cautiously Aggressive Collaboration" (Wu et al., ICCV 2023, arXiv 2309.11103; official
    code in Fling: ``fedcac_client``, ``fedcac_group``).

    Shared or personal is decided per parameter element every round: the client uploads its
    parameters w_i and a 0/1 mask c_i of its *critical* elements; nothing is frozen. Round t:
    client i loads the customized parameters the server built for it (and, by default, its own
    BatchNorm statistics), runs E = ``local-epochs`` epochs of SGD (the run's ``lr``/``momentum``,
    fresh every round) on its cross-entropy over all parameters, then scores each parameter
    tensor's elements (``named_parameters``, as Fling; buffers have no mask)::

        score = |Δw ⊙ w|     (Δw: the change over this round's local training)
        c_i   = 1 on the top-τ fraction of each tensor's scores

    (threshold at the k-th largest score; when that is ≈ 0, the smallest positive score, as Fling
    does). The masks travel with the parameters as uint8 tensors ``critical/<key>``. Server
    (:class:`strategies.fedcac.FedCACStrategy`): FedAvg w̄, collaborators by mask overlap,
    customized ŵ_i, and client i's next parameters = ŵ_i where c_i = 1, w̄ where c_i = 0.

    Buffers (``fedcac-bn-stats``): Fling synchronises the whole state dict once, at
    initialisation, and afterwards writes only ``named_parameters`` into a client's model, so every
    BatchNorm running mean/variance (and ``num_batches_tracked``) is the client's own from round 1
    on. ``local`` (default) does the same: the buffers are the personal group, kept in the
    client's store and never uploaded; ``global`` gives them the FedAvg mean (then τ = 0 is FedAvg
    exactly). Evaluation is after aggregation (the merged model with the client's statistics,
    Fling's ``after_aggregation``); ``evaluate-at = "both"`` adds Fling's ``before_aggregation``.

    Defaults are Fling's CIFAR-10 config (τ = 0.5, β = 100; CIFAR-100: τ = 0.4, β = 170), whose
    protocol is FedLoRA's (SGD 0.1/0.9, E = 5, B = 100, 40 clients).

    Parameters
    ----------
    fedcac-tau : float, default 0.5
        τ: fraction of critical parameters per tensor.
    fedcac-beta : int, default 100
        β: the collaboration threshold reaches the maximum overlap at round β (server).
    fedcac-bn-stats : {"local", "global"}, default "local"
        Where buffers (BatchNorm statistics) come from: the client's own (Fling) or the FedAvg mean.
    """

    params = FedCACParams

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        if self.params.fedcac_bn_stats == "local":
            self.partition = ParameterPartition(personal=is_buffer)

    def upload_template(self, model: nn.Module) -> dict[str, torch.Tensor]:
        masks = {CRITICAL + key: torch.zeros(param.shape, dtype=torch.uint8) for key, param in model.named_parameters()}
        return {**super().upload_template(model), **masks}

    def begin_training(self, session) -> None:
        self.before = {key: param.detach().clone() for key, param in session.model.named_parameters()}

    def upload(self, session) -> dict[str, torch.Tensor]:
        masks = {
            CRITICAL + key: critical_mask(self.before[key], param.detach(), self.params.fedcac_tau)
            for key, param in session.model.named_parameters()
        }
        return {**super().upload(session), **masks}
