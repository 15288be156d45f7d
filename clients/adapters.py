"""Adapter methods on a frozen pretrained model (the FedSA-LoRA paper's family): one client per
method, differing in the adapter and in which of its tensors are shared, personal or frozen.

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

The model, the local update and the server are :class:`AdapterClient`'s.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from clients.base import MethodClient, local_length
from clients.params import AdapterInput, LocalSteps, LoRA
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import OptimizerSpec, ParameterPartition, Phase, any_of, none_of, nothing
from fedlora_flwr.models import image_backbone, image_lora_targets
from fedlora_flwr.peft_models import AdapterKind, AdapterSpec, is_backbone, is_lora_a, is_lora_b, is_vera_lambda_b, wrap
from fedlora_flwr.requirements import Requirements
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
    """LoRA, federated: the FedSA-LoRA paper's "LoRA" baseline (Guo et al., "Selective Aggregation
    for Low-Rank Adaptation in Federated Learning", ICLR 2025, arXiv 2410.01463; LoRA: Hu et al.,
    ICLR 2022, arXiv 2106.09685).

    Model: the pretrained text model (``model=minilm`` or ``hf:<name>``), or an image model whose
    weights but the head come from ``backbone=<safetensors>`` (e.g. a fedavg run's
    ``shared.safetensors``), wrapped with PEFT adapters (:mod:`fedlora_flwr.peft_models`) on
    ``lora-target-modules``. An adapted weight W0 computes::

        h = W0·x + (α/r)·B·A·x,   A (r × in) Kaiming-uniform, B (out × r) = 0

    (A from the seeded torch RNG, so every client starts from the same A; on an image backbone
    PEFT's Conv2d LoRA: A a conv of the layer's kernel into r channels, B a 1×1 conv).

    - shared: A, B and the head; personal: nothing;
    - frozen: the backbone, never trained, stored or sent; its BatchNorm layers (all their tensors
      frozen) run in eval mode, so their running statistics stay the checkpoint's.

    Local update: every non-frozen tensor trained jointly on the cross-entropy for ``local-steps``
    mini-batches of ``batch-size`` with plain SGD (the run's ``lr``, no momentum, no weight decay),
    rebuilt every round (FedSA-LoRA's config: 10 steps of batch 128, lr 0.02 on MNLI). Server
    (:class:`strategies.fedavg.FedAvgStrategy`): the mean of the uploads weighted by the clients'
    training sizes (FedSA-LoRA's aggregator weighs by the samples processed in the round: uniform
    when every client runs its 10 full batches). Each client evaluates with the averaged and its
    own tensors.

    Deviation from FedSA-LoRA's code: weights stay float32 (its config casts the model to fp16).

    Parameters
    ----------
    lora-r : int, default 8
        LoRA rank r.
    lora-alpha : float, default 16.0
        LoRA α: scaling α/r (2 at the defaults, FedSA-LoRA's).
    lora-dropout : float, default 0.05
        Dropout on the adapter input.
    lora-target-modules : str, default ""
        Modules the adapters go on; "": query,value on a text model (PEFT's default for BERT-like
        encoders), every Conv2d and Linear but the head on an image backbone.
    local-steps : int, default 10
        Mini-batch steps per round; 0: ``local-epochs`` epochs.
    """

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
    """FedSA-LoRA: "Selective Aggregation for Low-Rank Adaptation in Federated Learning" (Guo et
    al., ICLR 2025, arXiv 2410.01463; official code Pengxin-Guo/FedSA-LoRA).

    LoRA (h = W0·x + (α/r)·B·A·x) on a frozen pretrained backbone, with (§3, Alg. 1; its GLUE
    config's ``local_param: ['lora_B', 'classifier']``):

    - shared: every ``lora_A`` (A learns general knowledge);
    - personal: every ``lora_B`` and the classification head (kept in the client's store);
    - frozen: the backbone.

    Round t: load Ā and the client's own B and head; train A, B and head jointly on the
    cross-entropy with plain SGD (the run's ``lr``, rebuilt every round) for ``local-steps``
    mini-batches of ``batch-size`` (its GLUE config: 10 steps of batch 128, lr 0.02); upload A.
    Server (:class:`strategies.fedavg.FedAvgStrategy`): Ā = the mean of the A's weighted by
    training size. Model, init and optimizer: :class:`AdapterClient`.

    Deviations from the official code: B and head are kept per client (its shipped config,
    ``share_local_model: True``, gives every client and the server one model object, so a single
    B is passed from client to client); weights stay float32 (it casts to fp16).

    Parameters
    ----------
    lora-r : int, default 8
        LoRA rank r.
    lora-alpha : float, default 16.0
        LoRA α: scaling α/r.
    lora-dropout : float, default 0.05
        Dropout on the adapter input.
    lora-target-modules : str, default ""
        Modules the adapters go on ("": query,value on a text model, every Conv2d and Linear but
        the head on an image backbone).
    local-steps : int, default 10
        Mini-batch steps per round; 0: ``local-epochs`` epochs.
    """

    partition = ParameterPartition(personal=any_of(is_lora_b, in_head), frozen=is_backbone)


class FedSArsLoRAClient(FedSALoRAClient):
    """FedSA-rsLoRA: FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463) with rsLoRA's
    rank-stabilised scaling (Kalajdzievski, arXiv 2312.03732; PEFT ``use_rslora=True``).

    h = W0·x + (α/√r)·B·A·x; otherwise :class:`FedSALoRAClient`: A shared, B and head personal,
    backbone frozen, the same local update, server and deviations.

    Parameters
    ----------
    lora-r, lora-alpha, lora-dropout, lora-target-modules, local-steps
        As for ``fedsa-lora`` (defaults 8, 16.0, 0.05, "", 10); the scaling is α/√r.
    """

    adapter = "rslora"


class VeRA(LocalSteps, AdapterInput):
    """FedSA-VeRA's keys."""

    vera_r: int = Field(256, ge=1, description="r_v: rank of VeRA's shared random projections")
    vera_lr: float = Field(0.01, gt=0, description="FedSA-VeRA's AdamW learning rate (the official lr_c)")


class FedSAVeRAClient(AdapterClient):
    """FedSA-VeRA: FedSA-LoRA's selective sharing applied to VeRA (Guo et al., ICLR 2025, arXiv
    2410.01463; VeRA: Kopiczko et al., ICLR 2024, arXiv 2310.11454).

    Every adapted weight W0 computes h = W0·x + λ_b ⊙ B_v(λ_d ⊙ A_v·x), with A_v (r_v × in) and
    B_v (out × r_v) random projections shared by all layers, drawn from a fixed PRNG key (the same
    on every client), and the per-layer vectors λ_d ∈ R^{r_v}, λ_b ∈ R^{out} trained:

    - shared: λ_d (``vera_lambda_d``, the A-side vector: the official code's "freeze A" switch
      freezes it);
    - personal: λ_b (``vera_lambda_b``) and the head;
    - frozen: the backbone, A_v and B_v.

    Local update as :class:`AdapterClient`'s (``local-steps`` mini-batches, λ and head jointly)
    but with AdamW as in the official code; server: the mean of λ_d weighted by training size.

    Deviations from the official code: one learning rate ``vera-lr`` (default 0.01 = its head lr
    ``lr_c``) for λ and head, where the code gives the adapter ``train.optimizer.lr`` and the head
    ``lr_c``; no linear warm-up (the code rebuilds its 6 % warm-up scheduler every round, so the
    learning rate never nears its nominal value); float32, and λ_b and head kept per client (see
    :class:`FedSALoRAClient`).

    Parameters
    ----------
    vera-r : int, default 256
        r_v: rank of the shared random projections (our choice; not stated by the paper).
    vera-lr : float, default 0.01
        AdamW learning rate of λ and head.
    lora-dropout : float, default 0.05
        Dropout on the adapter input.
    lora-target-modules : str, default ""
        Modules the adapters go on (as for ``fedsa-lora``).
    local-steps : int, default 10
        Mini-batch steps per round; 0: ``local-epochs`` epochs.
    """

    params = VeRA
    partition = ParameterPartition(personal=any_of(is_vera_lambda_b, in_head), frozen=is_backbone)
    adapter = "vera"

    def optimizer(self) -> OptimizerSpec:
        return OptimizerSpec(name="adamw", lr=self.params.vera_lr)


class FFALoRAClient(AdapterClient):
    """FFA-LoRA: "Improving LoRA in Privacy-preserving Federated Learning" (Sun et al., ICLR 2024,
    arXiv 2403.12313), a baseline of the FedSA-LoRA paper.

    LoRA (h = W0·x + (α/r)·B·A·x) with A frozen at its seeded init, the same on every client:

    - shared: every ``lora_B`` and the head, trained and averaged; personal: nothing;
    - frozen: the backbone and every ``lora_A``.

    Local update as :class:`AdapterClient`'s; the client uploads B and head only, and every client
    receives the same B̄: a global, not personalized, model.

    Parameters
    ----------
    lora-r, lora-alpha, lora-dropout, lora-target-modules, local-steps
        As for ``lora`` (defaults 8, 16.0, 0.05, "", 10).
    """

    partition = ParameterPartition(personal=nothing, frozen=any_of(is_backbone, is_lora_a))


class LocalAdapterClient(AdapterClient):
    """``local-lora`` on a pretrained model: the FedSA-LoRA paper's local baseline.

    LoRA as :class:`AdapterClient`'s; A, B and head personal (trained and kept), backbone frozen,
    nothing sent. Keys: those of ``lora`` (``local-lora`` also accepts ``rank-conv`` and
    ``rank-linear``, read only on a model trained from scratch).
    """

    partition = ParameterPartition(personal=none_of(is_backbone), frozen=is_backbone)


class FedAvgHeadClient(AdapterClient):
    """Linear probing with FedAvg (a control of the adapter methods, ours).

    No adapter: only the head is trained, on the frozen pretrained backbone, with
    :class:`AdapterClient`'s local update, and shared (sample-weighted mean).

    Parameters
    ----------
    local-steps : int, default 10
        Mini-batch steps per round; 0: ``local-epochs`` epochs.
    """

    params = LocalSteps
    adapter = None
