"""FedCAC client (Wu et al., ICCV 2023; METHODS.md E.10; official code in Fling).

Everything is trained for E epochs and uploaded. After training, each parameter tensor scores
its elements by |Δw ⊙ w| (Δw = the change over this round) and marks the top ``fedcac-tau``
fraction as *critical* (threshold at the k-th largest score; when that is ≈ 0, the smallest
positive score, as Fling does). The masks travel with the model as uint8 tensors named
``critical/<key>``; the server builds this client's customized model from them
(``strategies/fedcac.py``) and sends it back for evaluation and the next round.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams

CRITICAL = "critical/"


class FedCACParams(MethodParams):
    fedcac_tau: float = Field(0.5, ge=0, le=1, description="τ: fraction of critical parameters (CIFAR-100: 0.4)")
    fedcac_beta: int = Field(100, ge=1, description="β: growth of the collaboration threshold (CIFAR-100: 170)")


def critical_mask(before: torch.Tensor, after: torch.Tensor, tau: float) -> torch.Tensor:
    """Fling's ``evaluate_critical_parameter`` for one tensor: 1 where |Δw ⊙ w| is in the top τ."""
    score = ((after - before) * after).abs().flatten()
    count = int(tau * score.numel())
    if count == 0:
        return torch.zeros_like(after, dtype=torch.uint8)
    threshold = torch.topk(score, count).values[-1]
    if threshold <= 1e-10:
        positive = score[score > 1e-20]
        if positive.numel() == 0:
            return torch.zeros_like(after, dtype=torch.uint8)
        threshold = positive.min()
    return (score >= threshold).view_as(after).to(torch.uint8)


class FedCACClient(MethodClient):
    params = FedCACParams
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
