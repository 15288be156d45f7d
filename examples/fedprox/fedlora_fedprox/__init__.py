"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) as a
fedlora-flwr method from its own package: the complete example of a method plugin.

The whole method is this file. ``METHOD`` is registered under the entry-point group
``fedlora_flwr.methods`` in this package's ``pyproject.toml``; once the package is installed beside
fedlora-flwr, ``method = "fedprox"`` runs under ``flwr run`` with the framework's validation,
personal-state store, resume, metrics and reports. Its key ``fedprox-mu`` is not in the app's
``[tool.flwr.app.config]``, so a run passes it in ``method-params``::

    flwr run . --run-config 'method="fedprox" method-params="fedprox-mu = 0.01"'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.methods import Method
from fedlora_flwr.requirements import Requirements
from strategies.fedavg import FedAvgStrategy


class FedProxParams(MethodParams):
    """FedProx's own key (its paper's μ; the authors tune μ ∈ {0.001, 0.01, 0.1, 1})."""

    fedprox_mu: float = Field(0.01, ge=0, description="μ: strength of the proximal term μ/2·‖w − w^t‖²")


class FedProxClient(MethodClient):
    """FedProx client: every tensor shared, sample-weighted averaged (the FedAvg server).

    In round t client k starts from the global model w^t and minimises, for ``local-epochs`` epochs
    of SGD, the local objective plus a proximal term that keeps it near w^t (paper eq. 2)::

        h_k(w; w^t) = F_k(w) + μ/2 · ‖w − w^t‖²

    with F_k the cross-entropy on its data. μ = 0 is FedAvg.

    Parameters
    ----------
    fedprox-mu : float
        μ ≥ 0, the proximal strength (default 0.01).
    """

    params = FedProxParams
    requires = Requirements()

    def begin_training(self, session) -> None:
        self.anchor = [param.detach().clone() for param in session.model.parameters()]  # w^t, as received

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        proximal = sum(((param - anchor) ** 2).sum() for param, anchor in zip(model.parameters(), self.anchor, strict=True))
        return F.cross_entropy(model(x), y) + self.params.fedprox_mu / 2 * proximal


METHOD = Method("fedprox", FedProxClient, FedAvgStrategy)
