"""pFedLoRA client (Yi et al., arXiv 2310.13283; METHODS.md §C): each client keeps its own
architecture F_k (a ``model-family`` member, e.g. CNN-((k mod 5)+1)) and shares only a small
homogeneous low-rank adapter θ that reads the representation h every member produces.

No public code exists; what the paper's readable text (abstract, summaries) does not fix is
reconstructed, following METHODS.md's recommendations:

- **[REC] adapter and output** (C.2): θ = (A ∈ R^{r×d}, B ∈ R^{C×r}, b ∈ R^C) on h (d = 500 for
  CNN-1..5), A Kaiming-uniform (PEFT's ``a=√5``), B = 0, **b = 0** (METHODS.md leaves b's init
  open); logits z = μ·FC3_k(h) + (1−μ)·(B·A·h + b). d is the ``in_features`` of the client model's
  declared head (``fedlora_flwr.structure``), so the adapter also fits a homogeneous ``model`` or
  another registered family.
- **[REC] identical init on every client**: A is drawn from its own generator seeded with
  ``seed``, before and apart from the local model, so θ⁰ does not depend on the architecture.
- **[REC] schedule** (C.3): phase L trains F_k with θ frozen for E_1 epochs, phase G trains θ with
  F_k frozen (and in eval mode) for E_2 epochs; SGD lr 0.01, the run's momentum (0.9), weight decay
  1e-3, gradient-norm clip 50, rebuilt every phase; E_1 = E_2 = 1. Both phases minimise the
  cross-entropy of the combined output z.
- **evaluation** (C.5): the combined model after local training (F_k + θ_k, before aggregation),
  as the group's FedGH/FedMRL code does: θ_k is kept in the store slot ``adapter`` and loaded
  instead of the received θ̄ for evaluation; a client that has never trained evaluates θ̄.

The server is FedAvg's sample-weighted mean of θ (C.4); F_k never leaves the client (personal
group, ``clients/<k>/personal.safetensors``, whose keys and shapes differ by architecture).

``FedAvgAdapterClient`` is the FedAvg-style control (ours): the same model, partition, μ
(``pfedlora-mu``, fixed) and optimizer, but FedAvg's one-phase schedule: F_k and θ trained jointly
for E_1 + E_2 epochs, so only the iterative schedule differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import OptimizerSpec, ParameterPartition, Phase, load_group
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import Classifier, head

LOCAL = "local."
ADAPTER_SLOT = "adapter"


class PFedLoRAParams(MethodParams):
    pfedlora_rank: int = Field(16, ge=1, description="r: rank of the shared adapter θ = (A, B, b)")
    pfedlora_mu: float = Field(0.5, ge=0, le=1, description="μ in z = μ·FC3_k(h) + (1−μ)·(B·A·h + b)")
    pfedlora_local_epochs: int = Field(1, ge=0, description="E_1: epochs of the local model, adapter frozen")
    pfedlora_adapter_epochs: int = Field(1, ge=0, description="E_2: epochs of the adapter, local model frozen")
    pfedlora_lr: float = Field(0.01, gt=0, description="SGD learning rate of both phases")
    pfedlora_weight_decay: float = Field(1e-3, ge=0, description="SGD weight decay")
    pfedlora_max_grad_norm: float = Field(50.0, gt=0, description="gradient-norm clip")


class LowRankAdapter(nn.Module):
    """h ↦ B·A·h + b with A (r × d) Kaiming-uniform from ``generator``, B (C × r) and b (C) zero."""

    def __init__(self, in_features: int, num_classes: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_classes, rank))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, self.lora_A), self.lora_B, self.bias)


class PFedLoRAModel(nn.Module):
    """The local model F_k (``local``: its ``features`` and its declared head = FC3_k) and the
    adapter θ (``adapter``): z = μ·FC3_k(h) + (1−μ)·θ(h), h = F_k's representation."""

    def __init__(self, local: Classifier, adapter: LowRankAdapter, mu: float) -> None:
        super().__init__()
        self.adapter = adapter
        self.local = local
        self.mu = mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc3 = head(self.local)
        h = fc3.body.features(x)
        return self.mu * fc3.module(h) + (1.0 - self.mu) * self.adapter(h)


def is_local_model(key: str, _module: nn.Module) -> bool:
    return key.startswith(LOCAL)


class PFedLoRAClient(MethodClient):
    params = PFedLoRAParams
    requires = Requirements(head=True, pretrained="never", model_family=True)
    partition = ParameterPartition(personal=is_local_model)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        local = super().build_model(task, partition_id)
        generator = torch.Generator().manual_seed(self.config.seed)
        adapter = LowRankAdapter(head(local).module.in_features, task.num_classes, self.params.pfedlora_rank, generator)
        return PFedLoRAModel(local, adapter, self.params.pfedlora_mu)

    def phase(self, groups: tuple, epochs: int, eval_groups: tuple = ("frozen",)) -> Phase:
        """A phase with C.3's optimizer: SGD (``pfedlora-lr``, the run's momentum,
        ``pfedlora-weight-decay``), gradient norm clipped at ``pfedlora-max-grad-norm``."""
        params = self.params
        optimizer = OptimizerSpec(lr=params.pfedlora_lr, weight_decay=params.pfedlora_weight_decay)
        return Phase(groups, epochs=epochs, optimizer=optimizer, max_grad_norm=params.pfedlora_max_grad_norm,
                     eval_groups=eval_groups)

    def schedule(self) -> list[Phase]:
        """Phase L: F_k with θ frozen (E_1); phase G: θ with F_k frozen and in eval mode (E_2)."""
        return [
            self.phase(("personal",), self.params.pfedlora_local_epochs, eval_groups=("shared", "frozen")),
            self.phase(("shared",), self.params.pfedlora_adapter_epochs, eval_groups=("personal", "frozen")),
        ]

    def load(self, session, received: Mapping[str, torch.Tensor], training: bool) -> None:
        super().load(session, received, training)
        if training:
            return
        trained = session.store.load(session.partition_id, expected=self.partition.state(session.model, "shared"),
                                     slot=ADAPTER_SLOT)
        if trained is not None:
            load_group(session.model, trained, trained.keys(), f"trained adapter of client {session.partition_id}")

    def save(self, session) -> None:
        super().save(session)
        session.store.save(session.partition_id, self.partition.state(session.model, "shared"), slot=ADAPTER_SLOT)


class FedAvgAdapterClient(PFedLoRAClient):
    def schedule(self) -> list[Phase]:
        """One joint phase of E_1 + E_2 epochs (FedAvg's schedule)."""
        return [self.phase(("shared", "personal"), self.params.pfedlora_local_epochs + self.params.pfedlora_adapter_epochs)]
