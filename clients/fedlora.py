"""FedLoRA client (FedLoRA paper §3.3–3.4, Alg. 1; METHODS.md A.1–A.4).

Every conv/linear weight is decomposed into θ = σ + τ with τ = B·A low-rank (eqs. 2–5). σ (all
non-LoRA tensors, BatchNorm statistics included) is shared; τ (``lora_A``/``lora_B``) is
personal. Local schedule: τ for E_lora epochs (eq. 6), then σ for E − E_lora epochs (eq. 7).
``lora-schedule = "simultaneous"`` trains σ and τ together for E epochs instead: the paper's
Table 3 ablation (one optimizer over all parameters; not in the official code, METHODS.md A.4).
"""

from torch import nn

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.lora import is_lora_key


def is_tau(key: str, _module: nn.Module) -> bool:
    return is_lora_key(key)


class FedLoRAClient(MethodClient):
    partition = ParameterPartition(personal=is_tau)
    decomposed = True

    def schedule(self) -> list[Phase]:
        config = self.config
        if config.lora_schedule == "simultaneous":
            return [Phase(groups=("personal", "shared"), epochs=config.local_epochs)]
        return [
            Phase(groups=("personal",), epochs=config.lora_epochs),
            Phase(groups=("shared",), epochs=config.local_epochs - config.lora_epochs),
        ]
