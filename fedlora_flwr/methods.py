"""The registry of methods: a name, its client declaration and its server strategy."""

from __future__ import annotations

from dataclasses import dataclass

from clients.base import MethodClient
from clients.fedavg import FedAvgClient, FedAvgLoRAClient
from clients.fedlora import FedLoRAClient
from clients.local import LocalClient, LocalLoRAClient
from strategies.base import PersonalizedStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedlora import FedLoRAStrategy
from strategies.local import LocalStrategy


@dataclass(frozen=True)
class Method:
    client: type[MethodClient]
    strategy: type[PersonalizedStrategy]


METHODS: dict[str, Method] = {
    "fedlora": Method(FedLoRAClient, FedLoRAStrategy),
    "fedavg": Method(FedAvgClient, FedAvgStrategy),
    "local": Method(LocalClient, LocalStrategy),
    # FedLoRA paper Table 4 controls: the decomposed model without FedLoRA's partition/schedule.
    "fedavg-lora": Method(FedAvgLoRAClient, FedAvgStrategy),
    "local-lora": Method(LocalLoRAClient, LocalStrategy),
}
