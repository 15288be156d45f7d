"""Adapter methods on a frozen pretrained model (FedSA-LoRA paper, arXiv 2410.01463; METHODS.md §B).

The base :class:`AdapterClient` builds the pretrained text model (``model=minilm`` or ``hf:<name>``)
or an image model whose weights but the head come from ``backbone=<safetensors>`` (e.g. a
fedavg run's ``shared.safetensors``; LoRA then on every Conv2d and Linear but the head, PEFT's Conv2d
LoRA: A a conv of the layer's kernel into r channels, B a 1×1 conv), wraps it with PEFT adapters
(``fedlora_flwr.peft_models``) and trains every non-frozen tensor *jointly* for ``local-steps``
mini-batches per round with plain SGD (no momentum, no weight decay, ``lr``; FedSA-LoRA's config:
10 steps of batch 128, lr 0.02; METHODS.md B.2). The backbone is the frozen group: never trained,
stored or sent; its BatchNorm layers (all their tensors frozen) run in eval mode, so their running
statistics stay the checkpoint's (``Phase.eval_groups``). The methods differ only in their partition:

=================  =====================  ==========================  =====================
method             shared (averaged)      personal (store)            frozen
=================  =====================  ==========================  =====================
``fedsa-lora``     ``lora_A``             ``lora_B``, head            backbone
``fedsa-rslora``   ``lora_A``             ``lora_B``, head            backbone (α/√r)
``fedsa-vera``     ``vera_lambda_d``      ``vera_lambda_b``, head     backbone, A_v, B_v
``lora``           A, B, head             —                           backbone
``ffa-lora``       B, head                —                           backbone, A (its init)
``local-lora``     —                      A, B, head                  backbone
``fedavg-head``    head                   —                           backbone (no adapter)
=================  =====================  ==========================  =====================

The server is FedAvg's sample-weighted mean of what is uploaded (B.3). Deviations from the official
code (stated in METHODS.md B.6): B and the head are kept per client in the personal-state store (the
shipped config passes one B from client to client); weights stay float32 (no fp16 cast on CPU).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pydantic import Field

from clients.base import MethodClient, local_length
from clients.params import LoRA, AdapterInput, LocalSteps
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import OptimizerSpec, ParameterPartition, Phase, any_of, none_of, nothing
from fedlora_flwr.models import image_backbone, image_lora_targets
from fedlora_flwr.peft_models import AdapterKind, AdapterSpec, is_backbone, is_lora_a, is_lora_b, is_vera_lambda_b, wrap
from fedlora_flwr.structure import in_head
from fedlora_flwr.text_models import ModelError, is_pretrained_text_model, text_classifier


def lora_target_modules(config) -> tuple[str, ...]:
    """The module names of ``lora-target-modules`` (comma-separated); ``""`` is the model's
    default: ``query``/``value`` on a pretrained text model (PEFT's for BERT-like encoders), none otherwise
    (an image backbone then adapts :func:`fedlora_flwr.models.image_lora_targets`)."""
    names = tuple(name.strip() for name in config.params.lora_target_modules.split(",") if name.strip())
    if names or not is_pretrained_text_model(config.model):
        return names
    return AdapterSpec.target_modules


class AdapterClient(MethodClient):
    """LoRA (``lora``: A, B and head averaged, the FedSA-LoRA paper's "LoRA" baseline)."""

    params = LoRA
    requires = Requirements(pretrained="required", image_backbone=True)
    partition = ParameterPartition(personal=nothing, frozen=is_backbone)
    #: The PEFT adapter; None trains the head alone.
    adapter: ClassVar[AdapterKind | None] = "lora"

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        config, params = self.config, self.params
        if is_pretrained_text_model(config.model):
            model = text_classifier(config.model, task.num_classes, share_backbone=True)  # frozen: never written
        elif config.backbone:
            model = image_backbone(config.model, task.num_classes, config.backbone)
        else:
            raise ModelError(f"method={config.method!r} fine-tunes a pretrained model: set model=minilm or "
                             "hf:<name>, or backbone=<safetensors> for an image model")
        if self.adapter is None:
            return model
        vera = self.adapter == "vera"
        spec = AdapterSpec(
            kind=self.adapter,
            r=params.vera_r if vera else params.lora_r,
            alpha=0.0 if vera else params.lora_alpha,  # VeRA has no α
            dropout=params.lora_dropout,
            target_modules=lora_target_modules(config) or image_lora_targets(model),
        )
        return wrap(model, spec)

    def optimizer(self) -> OptimizerSpec:
        return OptimizerSpec(momentum=0.0)

    def schedule(self) -> list[Phase]:
        return [Phase(groups=("shared", "personal"), **local_length(self.config), optimizer=self.optimizer())]


class FedSALoRAClient(AdapterClient):
    """FedSA-LoRA (§3, Alg. 1): A shared, B and the classification head personal (B.1)."""

    partition = ParameterPartition(personal=any_of(is_lora_b, in_head), frozen=is_backbone)


class FedSArsLoRAClient(FedSALoRAClient):
    """FedSA-rsLoRA (B.5): FedSA-LoRA with rsLoRA's scaling α/√r."""

    adapter = "rslora"


class VeRA(LocalSteps, AdapterInput):
    vera_r: int = Field(256, ge=1, description="r_v: rank of VeRA's shared random projections")
    vera_lr: float = Field(0.01, gt=0, description="FedSA-VeRA's AdamW learning rate (the official lr_c)")


class FedSAVeRAClient(AdapterClient):
    """FedSA-VeRA (B.5): λ_d shared (the A-side vector), λ_b and head personal; A_v, B_v frozen.

    AdamW as in the official code, one learning rate ``vera-lr`` (default 0.01 = its head lr
    ``lr_c``) for λ and head, without its linear warm-up that restarts every round (B.6); the
    official code gives the adapter ``train.optimizer.lr`` and the head ``lr_c``."""

    params = VeRA
    partition = ParameterPartition(personal=any_of(is_vera_lambda_b, in_head), frozen=is_backbone)
    adapter = "vera"

    def optimizer(self) -> OptimizerSpec:
        return OptimizerSpec(name="adamw", lr=self.params.vera_lr)


class FFALoRAClient(AdapterClient):
    """FFA-LoRA (Sun et al., ICLR 2024; B.5): A frozen at its seeded init (the same on every client),
    B and head trained and averaged: a global model, uploads B and head only."""

    partition = ParameterPartition(personal=nothing, frozen=any_of(is_backbone, is_lora_a))


class LocalAdapterClient(AdapterClient):
    """``local-lora`` on a pretrained model: adapters and head trained and kept, nothing sent."""

    partition = ParameterPartition(personal=none_of(is_backbone), frozen=is_backbone)


class FedAvgHeadClient(AdapterClient):
    """Linear probing with FedAvg: only the head trained (on the frozen backbone) and averaged."""

    params = LocalSteps
    adapter = None
