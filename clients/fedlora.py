"""FedLoRA client (FedLoRA paper §3.3–3.4, Alg. 1; METHODS.md A.1–A.4).

Every conv/linear weight is decomposed into θ = σ + τ with τ = B·A low-rank (eqs. 2–5). σ (all
non-LoRA tensors, BatchNorm statistics included) is shared; τ (``lora_A``/``lora_B``) is
personal. Local schedule: τ for E_lora epochs (eq. 6), then σ for E − E_lora epochs (eq. 7).
``lora-schedule = "simultaneous"`` trains σ and τ together for E epochs instead: the paper's
Table 3 ablation (one optimizer over all parameters; not in the official code, METHODS.md A.4).
"""

from typing import Literal

from pydantic import Field
from torch import nn

from clients.base import MethodClient
from clients.params import Decomposition
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.lora import is_lora_key
from fedlora_flwr.requirements import Requirements


def is_tau(key: str, _module: nn.Module) -> bool:
    return is_lora_key(key)


class FedLoRAParams(Decomposition):
    lora_epochs: int = Field(2, ge=0, description="E_lora: epochs of τ before σ each round (eq. 6); "
                             "0 trains σ alone (FedAvg on the decomposed model)")
    lora_schedule: Literal["alternating", "simultaneous"] = Field(
        "alternating", description="alternating: τ then σ (Alg. 1); simultaneous: both for E epochs (Table 3)")

    def check(self, config) -> None:
        if self.lora_schedule == "alternating" and self.lora_epochs > config.local_epochs:
            raise ValueError(f"lora-epochs={self.lora_epochs}: {self.lora_epochs} exceeds local-epochs={config.local_epochs}")


class FedLoRAClient(MethodClient):
    params = FedLoRAParams
    requires = Requirements(decomposable=True)
    partition = ParameterPartition(personal=is_tau)
    decomposed = True

    def schedule(self) -> list[Phase]:
        epochs, params = self.config.local_epochs, self.params
        if params.lora_schedule == "simultaneous":
            return [Phase(groups=("personal", "shared"), epochs=epochs)]
        return [
            Phase(groups=("personal",), epochs=params.lora_epochs),
            Phase(groups=("shared",), epochs=epochs - params.lora_epochs),
        ]
