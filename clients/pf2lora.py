"""PF2LoRA's clients: two-level LoRA trained as a bilevel problem (:class:`PF2LoRAClient`), and
its "simultaneous" ablation (:class:`PF2LoRASimultaneousClient`)."""
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
    """The common adapter x = (B, A) and its optimizer (``pf2lora``, ``pf2lora-simultaneous``, ``lora-ft``)."""

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
    """x's optimizer: SGD(lr β, no momentum), as the hypergradient formula assumes, or AdamW(lr β,
    no weight decay), a labelled variant."""
    return OptimizerSpec(name=config.params.pf2lora_upper_optimizer, lr=config.params.lr_upper, momentum=0.0)


class PF2LoRAClient(MethodClient):
    """PF2LoRA: "Personalized Federated Fine-tuning for Heterogeneous Data: a Two-Level Low Rank
    Adaptation Approach" (arXiv 2503.03920; ICLR 2025 submission, OpenReview).

    Every adapted weight becomes W_k = W0 + B·A + D_k·C_k (:mod:`fedlora_flwr.adapters`): a common
    adapter x = (B, A) of rank r and a client adapter y_k = (D_k, C_k) of rank r̃ < r, both PEFT
    LoRA adapters (scaling 2 = α/r with α = 2r, LoRA init: A, C Kaiming-uniform, B = D = 0, no
    dropout).

    - shared: x, averaged; personal: y_k (kept in the client's store);
    - image models (no pretrained weights here): W0, BatchNorm and the head train from scratch
      with x and are shared with it ("trained from scratch and shared"); ``pf2lora-head =
      "personal"`` keeps the head's own weight and bias with y (its adapters keep their levels);
    - pretrained text model (``model=minilm`` / ``hf:<name>``): W0 is the whole encoder, frozen
      (never trained, stored or sent; loaded once per process and shared by its clients), both
      adapters on ``lora-target-modules``, the head (``classifier``, not adapted) shared with x
      by default (the paper does not say; our choice).

    The problem is min_x Φ(x) = (1/M) Σ_k f_k(x, y_k*(x)), y_k*(x) = argmin_y f_k(x, y). One local
    step on a mini-batch ξ (the same ξ for the three gradients; :mod:`fedlora_flwr.bilevel`)::

        y⁺ = y − α·∇_y f(x, y)
        h  = ∇_x f(x, y⁺) − α·∇²_xy f(x, y)·∇_y f(x, y⁺)     (= d/dx f(x, y − α∇_y f(x, y)))
        x  ← x − β·h,   y ← y⁺

    ``local-steps`` (I = 10, the authors' rebuttal) steps per round, 0: ``local-epochs`` epochs;
    α = ``lr-lower`` (plain SGD), β = ``lr-upper`` (plain SGD, as the formula assumes, or AdamW
    with ``pf2lora-upper-optimizer = "adamw"``, a labelled variant). The bilevel step runs in
    float32 (its Hessian-vector products; bf16 is refused). Server
    (:class:`strategies.fedavg.FedAvgStrategy`): x̄ = the mean of the x_k weighted by training size
    (the paper does not say; uniform for equal sizes). Evaluation: W0 + B̄Ā + D_kC_k right after x̄
    arrives.

    The paper's code is not public; ranks r = 8, r̃ = 2 and β = α = 1e-3 are the rebuttal's
    (MNLI, SST-2, QQP, QNLI; CoLA: β = 2e-3, α = 1e-4); init, scalings, head and aggregation
    weights are ours.

    Parameters
    ----------
    rank-common : int, default 8
        r: rank of the common adapter (B, A).
    rank-client : int, default 2
        r̃: rank of the client adapter (D_k, C_k).
    lr-upper : float, default 0.001
        β: learning rate of x's optimizer.
    lr-lower : float, default 0.001
        α: SGD step of y.
    pf2lora-upper-optimizer : {"sgd", "adamw"}, default "sgd"
        x's optimizer.
    pf2lora-head : {"shared", "personal"}, default "shared"
        The head's own weights: with x (averaged) or with y (kept).
    lora-target-modules : str, default ""
        Text models: modules the adapters go on ("": query,value).
    local-steps : int, default 10
        I: steps per round; 0: ``local-epochs`` epochs.
    """

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
    """PF2LoRA's "simultaneous" ablation (the paper's App. F.2, per the authors' rebuttal).

    :class:`PF2LoRAClient`'s model, partition, server and keys, but no hypergradient: x and y take
    plain gradient steps from the same point, x ← x − β·∇_x f(x, y), y ← y − α·∇_y f(x, y).

    Parameters
    ----------
    rank-common, rank-client, lr-upper, lr-lower, pf2lora-upper-optimizer, pf2lora-head, lora-target-modules, local-steps
        As for ``pf2lora`` (defaults 8, 2, 0.001, 0.001, "sgd", "shared", "", 10).
    """

    hypergradient = False
