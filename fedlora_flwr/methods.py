"""The registry of methods: a name, its client declaration and its server strategy.

Methods whose server is FedAvg's sample-weighted mean of what clients upload (FedPer, FedRep,
FedBN, FedRoD, pFedSD, pFedGate: METHODS.md E.3–E.6, E.8, E.9; PF2LoRA: D.4) reuse :class:`FedAvgStrategy`;
their clients decide what is uploaded. The names are ``fedlora_flwr.config.MethodName``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clients.adapters import (
    AdapterClient,
    FedAvgHeadClient,
    FedSALoRAClient,
    FedSArsLoRAClient,
    FedSAVeRAClient,
    FFALoRAClient,
    LocalAdapterClient,
)
from clients.base import MethodClient
from clients.fedamp import FedAMPClient
from clients.fedavg import FedAvgClient, FedAvgLoRAClient
from clients.fedbn import FedBNClient
from clients.fedcac import FedCACClient
from clients.fedlora import FedLoRAClient
from clients.fedper import FedPerClient
from clients.fedrep import FedRepClient
from clients.fedrod import FedRoDClient
from clients.local import LocalClient, LocalLoRAClient
from clients.lora_ft import LoRAFineTuneClient
from clients.pf2lora import PF2LoRAClient, PF2LoRASimultaneousClient
from clients.pfedgate import PFedGateClient
from clients.pfedlora import FedAvgAdapterClient, PFedLoRAClient
from clients.pfedsd import PFedSDClient
from fedlora_flwr.config import RunConfig
from fedlora_flwr.text_models import is_pretrained_text_model
from strategies.base import PersonalizedStrategy
from strategies.fedamp import FedAMPStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedcac import FedCACStrategy
from strategies.fedlora import FedLoRAStrategy
from strategies.local import LocalStrategy


@dataclass(frozen=True)
class Method:
    client: Callable[[RunConfig], MethodClient]  # a MethodClient subclass, or a function choosing one
    strategy: type[PersonalizedStrategy]


def local_lora(config: RunConfig) -> MethodClient:
    """``local-lora``: on a pretrained text model or an image ``backbone`` the FedSA-LoRA paper's local
    baseline (PEFT LoRA + head kept per client, backbone frozen); from scratch FedLoRA's Table 4
    control (its decomposed model trained jointly and kept)."""
    pretrained = is_pretrained_text_model(config.model) or bool(config.backbone)
    return LocalAdapterClient(config) if pretrained else LocalLoRAClient(config)


METHODS: dict[str, Method] = {
    "fedlora": Method(FedLoRAClient, FedLoRAStrategy),
    "fedavg": Method(FedAvgClient, FedAvgStrategy),
    "local": Method(LocalClient, LocalStrategy),
    # FedLoRA paper Table 4 controls: the decomposed model without FedLoRA's partition/schedule.
    "fedavg-lora": Method(FedAvgLoRAClient, FedAvgStrategy),
    "local-lora": Method(local_lora, LocalStrategy),
    # The PFL baselines of FedLoRA's Table 1 (METHODS.md §E).
    "fedper": Method(FedPerClient, FedAvgStrategy),
    "fedrep": Method(FedRepClient, FedAvgStrategy),
    "fedbn": Method(FedBNClient, FedAvgStrategy),
    "fedrod": Method(FedRoDClient, FedAvgStrategy),
    "fedamp": Method(FedAMPClient, FedAMPStrategy),
    "pfedsd": Method(PFedSDClient, FedAvgStrategy),
    "pfedgate": Method(PFedGateClient, FedAvgStrategy),
    "fedcac": Method(FedCACClient, FedCACStrategy),
    # Adapters on a frozen pretrained model (FedSA-LoRA paper; METHODS.md §B): sample-weighted mean.
    "fedsa-lora": Method(FedSALoRAClient, FedAvgStrategy),
    "fedsa-rslora": Method(FedSArsLoRAClient, FedAvgStrategy),
    "fedsa-vera": Method(FedSAVeRAClient, FedAvgStrategy),
    "lora": Method(AdapterClient, FedAvgStrategy),
    "ffa-lora": Method(FFALoRAClient, FedAvgStrategy),
    "fedavg-head": Method(FedAvgHeadClient, FedAvgStrategy),
    # pFedLoRA (METHODS.md §C): heterogeneous local models, a shared homogeneous adapter; and its
    # FedAvg-style control (same model and partition, one joint phase).
    "pfedlora": Method(PFedLoRAClient, FedAvgStrategy),
    "fedavg-adapter": Method(FedAvgAdapterClient, FedAvgStrategy),
    # PF2LoRA (METHODS.md §D), its "simultaneous" ablation and the fine-tuned LoRA control.
    "pf2lora": Method(PF2LoRAClient, FedAvgStrategy),
    "pf2lora-simultaneous": Method(PF2LoRASimultaneousClient, FedAvgStrategy),
    "lora-ft": Method(LoRAFineTuneClient, FedAvgStrategy),
}
