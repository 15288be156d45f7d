"""PF2LoRA client (arXiv 2503.03920; METHODS.md §D): two-level LoRA trained as a bilevel problem.

Every conv/linear weight becomes W_k = W0 + B·A + D_k·C_k (``fedlora_flwr.adapters``): the common
adapter x = (B, A), rank ``rank-common`` (8), shared and averaged; the client adapter y_k = (D_k, C_k),
rank ``rank-client`` (2), personal (D.1). The image models here have no pretrained weights, so W0,
BatchNorm and the head are trained from scratch with x and shared with it (the issue's "trained from
scratch and shared"); ``pf2lora-head = "personal"`` keeps the head's own weight and bias with y instead
(the head's adapters keep their levels). Local step (D.3), ``local-steps`` (10) per round (0: ``local-epochs``
epochs): y⁺ = y − α∇_y f(x, y), x ← x − β·hypergradient (``fedlora_flwr.bilevel``), α = ``lr-lower``,
β = ``lr-upper``; the upper level uses plain SGD (D.3 REC) or, labelled, AdamW(lr β, no weight decay)
with ``pf2lora-upper-optimizer = "adamw"``. ``pf2lora-simultaneous``: the paper's App. F.2 ablation,
x and y take plain gradient steps from the same point. Evaluation: W0 + B̄Ā + D_kC_k right after
x̄ arrives (D.5).
"""

from __future__ import annotations

from torch import nn

from clients.base import MethodClient, local_length
from clients.fedper import HEAD
from fedlora_flwr.adapters import CLIENT, COMMON, add_lora_adapters, is_adapter_key
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import BilevelUpdate, OptimizerSpec, ParameterPartition, Phase
from fedlora_flwr.models import build_model

HEAD_WEIGHTS = HEAD + "base_layer."


def is_client_adapter(key: str, _module: nn.Module) -> bool:
    return is_adapter_key(key, CLIENT)


def is_client_adapter_or_head(key: str, module: nn.Module) -> bool:
    return is_client_adapter(key, module) or key.startswith(HEAD_WEIGHTS)


def upper_optimizer(config) -> OptimizerSpec:
    """x's optimizer: SGD(lr β, no momentum) (D.3 REC) or AdamW(lr β, no weight decay)."""
    return OptimizerSpec(name=config.pf2lora_upper_optimizer, lr=config.lr_upper, momentum=0.0)


class PF2LoRAClient(MethodClient):
    hypergradient = True

    def __init__(self, config) -> None:
        super().__init__(config)
        personal = is_client_adapter_or_head if config.pf2lora_head == "personal" else is_client_adapter
        self.partition = ParameterPartition(personal=personal)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        model = build_model(self.config.model, task.num_classes)
        return add_lora_adapters(model, {COMMON: self.config.rank_common, CLIENT: self.config.rank_client})

    def schedule(self) -> list[Phase]:
        update = BilevelUpdate(lower=("personal",), lr_lower=self.config.lr_lower, hypergradient=self.hypergradient)
        return [Phase(groups=("shared", "personal"), optimizer=upper_optimizer(self.config), update=update,
                      **local_length(self.config))]


class PF2LoRASimultaneousClient(PF2LoRAClient):
    hypergradient = False
