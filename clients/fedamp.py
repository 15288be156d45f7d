"""FedAMP client (Huang et al., AAAI 2021; METHODS.md E.7): every tensor is personal (w_i).

Each round the server sends u_i = Σ_j ξ_ij w_j, built for this client (``strategies/fedamp.py``).
The client starts local SGD from u_i (METHODS.md's recommendation; PFLlib continues from its own
w_i) and minimises CE + λ/(2α_K)·‖w − u_i‖² over the parameters for E epochs, with a real,
squared proximal gradient (PFLlib's uses detached tensors and contributes none). It stores and
uploads its new w_i. Evaluation uses w_i (the evaluate message carries nothing).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.groups import ParameterPartition, everything, load_group


class FedAMPParams(MethodParams):
    fedamp_alpha_k: float = Field(1.0, gt=0, description="α_K: attention weight and proximal step")
    fedamp_lambda: float = Field(1.0, ge=0, description="λ: proximal strength, λ/(2α_K)·‖w − u_i‖²")
    fedamp_sigma: float = Field(1.0, gt=0, description="σ: scale of the similarity e^{−‖w_i − w_j‖²/σ}/σ")


class FedAMPClient(MethodClient):
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
