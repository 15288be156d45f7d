"""FedAMP's client: local SGD from the server's u_i with a proximal pull towards it (:class:`FedAMPClient`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.groups import ParameterPartition, everything, load_group


class FedAMPParams(MethodParams):
    fedamp_alpha_k: float = Field(1.0, gt=0, description="α_K: attention weight and proximal step")
    fedamp_lambda: float = Field(1.0, ge=0, description="λ: proximal strength, λ/(2α_K)·‖w − u_i‖²")
    fedamp_sigma: float = Field(1.0, gt=0, description="σ: scale of the similarity e^{−‖w_i − w_j‖²/σ}/σ")


class FedAMPClient(MethodClient):
    """FedAMP: "Personalized Cross-Silo Federated Learning on Non-IID Data" (Huang et al., AAAI
    2021, arXiv 2007.03797).

    Every tensor is personal: client i keeps its model w_i (in its store) and also uploads it;
    there is no global model and nothing is frozen. Each round the server sends client i its own
    message u_i = Σ_j ξ_ij w_j, ξ_ij = α_K·e^{−‖w_i − w_j‖²/σ}/σ (j ≠ i), ξ_ii = 1 − Σ_{j≠i} ξ_ij
    (:class:`strategies.fedamp.FedAMPStrategy`). The client starts from w = u_i and runs E =
    ``local-epochs`` epochs of SGD (the run's ``lr``/``momentum``) on::

        CE_i(w) + λ/(2α_K)·‖w − u_i‖²         (over the parameters; u_i fixed)

    then stores and uploads the new w_i. Evaluation uses w_i (the evaluate message carries nothing).

    Deviations from PFLlib's ``clientamp``: the client starts from u_i (PFLlib continues from its
    own w_i), and the proximal term is squared and has a gradient (PFLlib builds it from detached
    ``p.data`` with the unsquared norm, so it contributes none and its FedAMP is nearly local
    training). Defaults are PFLlib's (α_K = λ = σ = 1); the paper's values are not known here.

    Parameters
    ----------
    fedamp-alpha-k : float, default 1.0
        α_K: attention weight (server) and proximal step (client).
    fedamp-lambda : float, default 1.0
        λ: proximal strength.
    fedamp-sigma : float, default 1.0
        σ: scale of the similarity e^{−‖w_i − w_j‖²/σ}/σ (server).
    """

    params = FedAMPParams
    partition = ParameterPartition(personal=everything)

    def initial_download(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()  # round 1: u_i = w⁰, the common seeded init

    def upload_template(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.partition.state(model, "personal")

    def load(self, session, received: Mapping[str, torch.Tensor], training: bool) -> None:
        model = session.model
        if training:
            load_group(model, received, model.state_dict().keys(), "FedAMP's u_i from the server")
            self.anchor = [param.detach().clone() for param in model.parameters()]
            return
        super().load(session, received, training)  # evaluate: nothing received, own w_i from the store

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        proximal = sum(((param - anchor) ** 2).sum() for param, anchor in zip(model.parameters(), self.anchor))
        coefficient = self.params.fedamp_lambda / (2 * self.params.fedamp_alpha_k)
        return F.cross_entropy(model(x), y) + coefficient * proximal

    def upload(self, session) -> dict[str, torch.Tensor]:
        return self.partition.state(session.model, "personal")
