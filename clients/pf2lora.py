"""PF2LoRA client (arXiv 2503.03920; METHODS.md §D): two-level LoRA trained as a bilevel problem.

Every conv/linear weight becomes W_k = W0 + B·A + D_k·C_k (``fedlora_flwr.adapters``): the common
adapter x = (B, A), rank ``rank-common`` (8), shared and averaged; the client adapter y_k = (D_k, C_k),
rank ``rank-client`` (2), personal (D.1). The image models here have no pretrained weights, so W0,
BatchNorm and the head are trained from scratch with x and shared with it (the issue's "trained from
scratch and shared"); ``pf2lora-head = "personal"`` keeps the head's own weight and bias with y instead
(the head's adapters keep their levels). On a pretrained text model (``model=minilm`` / ``hf:<name>``)
W0 is what D.1 says: the whole encoder is frozen (group ``frozen``: never trained, stored or sent;
loaded once per process and shared by every client as for the adapter methods, ``text_models``),
both adapters go on ``lora-target-modules`` (default query, value) as in the LoRA methods, and the
head (``classifier``, not adapted) is shared with x by default (D.1 REC). Local step (D.3), ``local-steps`` (10) per round (0: ``local-epochs``
epochs): y⁺ = y − α∇_y f(x, y), x ← x − β·hypergradient (``fedlora_flwr.bilevel``), α = ``lr-lower``,
β = ``lr-upper``; the upper level uses plain SGD (D.3 REC) or, labelled, AdamW(lr β, no weight decay)
with ``pf2lora-upper-optimizer = "adamw"``. ``pf2lora-simultaneous``: the paper's App. F.2 ablation,
x and y take plain gradient steps from the same point. Evaluation: W0 + B̄Ā + D_kC_k right after
x̄ arrives (D.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field
from torch import nn

from clients.adapters import lora_target_modules
from clients.base import MethodClient, local_length
from clients.params import LocalSteps, TargetModules
from fedlora_flwr.adapters import CLIENT, COMMON, add_lora_adapters, is_adapter_key
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import BilevelUpdate, OptimizerSpec, ParameterPartition, Phase, all_of, any_of, none_of, nothing
from fedlora_flwr.models import build_model
from fedlora_flwr.peft_models import is_adapter, is_backbone
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import in_head
from fedlora_flwr.text_models import is_pretrained_text_model, text_classifier


class CommonAdapter(LocalSteps, TargetModules):
    """The common adapter x = (B, A) and its optimizer (PF2LoRA and lora-ft)."""

    rank_common: int = Field(8, ge=1, description="r: rank of the common adapter (B, A)")
    lr_upper: float = Field(1e-3, ge=0, description="β: learning rate of the common adapter's optimizer")
    pf2lora_upper_optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="the common adapter's optimizer: plain SGD, or AdamW (lr β, no weight decay; a labelled variant)")


class PF2LoRAParams(CommonAdapter):
    rank_client: int = Field(2, ge=1, description="r̃: rank of the client adapter (D_k, C_k)")
    lr_lower: float = Field(1e-3, ge=0, description="α: SGD step of the client adapter")
    pf2lora_head: Literal["shared", "personal"] = Field(
        "shared", description="the head's own weights: shared with x (averaged) or personal with y (kept)")


def is_client_adapter(key: str, _module: nn.Module) -> bool:
    return is_adapter_key(key, CLIENT)


#: The head's own weight and bias: ``fc.base_layer.*`` where the head is adapted (image models),
#: ``classifier.*`` where it is not (``lora-target-modules`` on a text model).
head_weights = all_of(in_head, none_of(is_adapter))


def adapted_model(config, num_classes: int, ranks: Mapping[str, int]) -> nn.Module:
    """The model with one LoRA adapter per ``{name: rank}``: on every conv/linear layer of a model
    trained from scratch, or on ``lora-target-modules`` of a pretrained text model whose encoder
    tensors are the process's cached pretrained ones (frozen, never written)."""
    if is_pretrained_text_model(config.model):
        model = text_classifier(config.model, num_classes, share_backbone=True)
        return add_lora_adapters(model, ranks, lora_target_modules(config))
    return add_lora_adapters(build_model(config.model, num_classes), ranks)


def frozen_backbone(config):
    """The frozen-group rule: the encoder of a pretrained text model; nothing on a model trained from scratch."""
    return is_backbone if is_pretrained_text_model(config.model) else nothing


def upper_optimizer(config) -> OptimizerSpec:
    """x's optimizer: SGD(lr β, no momentum) (D.3 REC) or AdamW(lr β, no weight decay)."""
    return OptimizerSpec(name=config.params.pf2lora_upper_optimizer, lr=config.params.lr_upper, momentum=0.0)


class PF2LoRAClient(MethodClient):
    params = PF2LoRAParams
    #: The bilevel step runs in float32 only (its Hessian-vector products).
    requires = Requirements(bf16=False)
    hypergradient = True

    def __init__(self, config) -> None:
        super().__init__(config)
        personal = any_of(is_client_adapter, head_weights) if config.params.pf2lora_head == "personal" else is_client_adapter
        self.partition = ParameterPartition(personal=personal, frozen=frozen_backbone(config))

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        return adapted_model(self.config, task.num_classes, {COMMON: self.params.rank_common, CLIENT: self.params.rank_client})

    def schedule(self) -> list[Phase]:
        update = BilevelUpdate(lower=("personal",), lr_lower=self.params.lr_lower, hypergradient=self.hypergradient)
        return [Phase(groups=("shared", "personal"), optimizer=upper_optimizer(self.config), update=update,
                      **local_length(self.config))]


class PF2LoRASimultaneousClient(PF2LoRAClient):
    hypergradient = False
