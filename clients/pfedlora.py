"""pFedLoRA's client: heterogeneous local models sharing a homogeneous low-rank adapter
(:class:`PFedLoRAClient`), and its FedAvg-style control (:class:`FedAvgAdapterClient`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import AFTER_TRAINING, MethodParams
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import OptimizerSpec, ParameterPartition, Phase
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import Classifier, head

LOCAL = "local."


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
    """pFedLoRA: "Model-Heterogeneous Personalized Federated Learning with LoRA Tuning" (Yi et al.,
    arXiv 2310.13283).

    Each client keeps its own architecture F_k (a ``model-family`` member, e.g. CNN-((k mod 5)+1) of
    ``cnn-hetero``, from the authors' group's FedGH code) and shares only a small homogeneous
    low-rank adapter θ that reads the representation h every member produces::

        z = μ·FC3_k(h) + (1 − μ)·(B·A·h + b),   θ = (A ∈ R^{r×d}, B ∈ R^{C×r}, b ∈ R^C)

    - shared: θ (``adapter.*``), the same shape on every client;
    - personal: the whole local model F_k (``local.*``, in ``clients/<k>/personal.safetensors``,
      whose keys and shapes differ by architecture); nothing frozen.

    Round t: load θ̄ and F_k, then two phases on the cross-entropy of z, each with a fresh SGD
    (``pfedlora-lr``, the run's momentum, ``pfedlora-weight-decay``, gradient norm clipped at
    ``pfedlora-max-grad-norm``)::

        phase L: F_k ← argmin CE(z)   θ frozen,                      E_1 epochs
        phase G: θ   ← argmin CE(z)   F_k frozen (and in eval mode), E_2 epochs

    then upload θ. Server (:class:`strategies.fedavg.FedAvgStrategy`): θ̄ = Σ_k (n_k / n)·θ_k.
    Paper point (``evaluate-at = "default"``): after training, the combined model F_k + θ_k right
    after local training, before aggregation, as the group's FedGH/FedMRL code does.

    No public code exists and only the abstract and third-party summaries were readable, so these
    are reconstructions (ours):

    - adapter and output: θ on h (d = the ``in_features`` of the client model's declared head: 500
      on CNN-1..5, so it also fits a homogeneous ``model`` or another family) rather than across
      FC1–FC3, which are not homogeneous (CNN-2 flattens to 400-d, the others to 800-d); A
      Kaiming-uniform (PEFT's ``a=√5``), B = 0, b = 0 (b's init is ours); r = 16 and μ = 0.5
      (the paper's values are unknown);
    - identical init on every client: A is drawn from its own generator seeded with ``seed``,
      before and apart from the local model, so θ⁰ does not depend on the architecture;
    - optimizer in the group's FedGH code style: SGD lr 0.01, the run's momentum (0.9), weight
      decay 1e-3, clip 50, rebuilt every phase; E_1 = E_2 = 1.

    Parameters
    ----------
    pfedlora-rank : int, default 16
        r: rank of the shared adapter.
    pfedlora-mu : float, default 0.5
        μ ∈ [0, 1]: weight of the local head FC3_k in z (1 ignores the adapter).
    pfedlora-local-epochs : int, default 1
        E_1: epochs of phase L.
    pfedlora-adapter-epochs : int, default 1
        E_2: epochs of phase G.
    pfedlora-lr : float, default 0.01
        SGD learning rate of both phases.
    pfedlora-weight-decay : float, default 0.001
        SGD weight decay.
    pfedlora-max-grad-norm : float, default 50.0
        Gradient-norm clip.
    """

    params = PFedLoRAParams
    evaluate_at = AFTER_TRAINING
    requires = Requirements(head=True, pretrained="never", model_family=True)
    partition = ParameterPartition(personal=is_local_model)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        local = super().build_model(task, partition_id)
        generator = torch.Generator().manual_seed(self.config.seed)
        adapter = LowRankAdapter(head(local).module.in_features, task.num_classes, self.params.pfedlora_rank, generator)
        return PFedLoRAModel(local, adapter, self.params.pfedlora_mu)

    def phase(self, groups: tuple, epochs: int, eval_groups: tuple = ("frozen",)) -> Phase:
        """A phase with pFedLoRA's optimizer: SGD (``pfedlora-lr``, the run's momentum,
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


class FedAvgAdapterClient(PFedLoRAClient):
    """FedAvg-adapter: pFedLoRA's FedAvg-style control (ours).

    The same model, partition (θ shared, F_k personal), μ (fixed), optimizer, server and evaluation
    as :class:`PFedLoRAClient`, but FedAvg's one-phase schedule: F_k and θ trained jointly for
    E_1 + E_2 epochs, so only the iterative schedule differs.

    Parameters
    ----------
    pfedlora-rank, pfedlora-mu, pfedlora-local-epochs, pfedlora-adapter-epochs, pfedlora-lr, pfedlora-weight-decay, pfedlora-max-grad-norm
        As for ``pfedlora`` (defaults 16, 0.5, 1, 1, 0.01, 0.001, 50.0); the joint phase lasts
        E_1 + E_2 epochs.
    """

    def schedule(self) -> list[Phase]:
        """One joint phase of E_1 + E_2 epochs (FedAvg's schedule)."""
        return [self.phase(("shared", "personal"), self.params.pfedlora_local_epochs + self.params.pfedlora_adapter_epochs)]
