"""Local training (METHODS.md E.2): every tensor personal, nothing leaves the client.

``LocalLoRAClient`` is the FedLoRA paper's Table 4 control "Local w/ LoRA": the FedLoRA-decomposed
model (σ + B·A) trained jointly for E epochs, without communication (METHODS.md A.9).
"""

from clients.base import MethodClient
from clients.params import LoRA, Decomposition
from fedlora_flwr.groups import ParameterPartition, everything
from fedlora_flwr.requirements import Requirements


class LocalClient(MethodClient):
    requires = Requirements(model_family=True)
    partition = ParameterPartition(personal=everything)


class LocalLoRAClient(LocalClient):
    params = Decomposition
    requires = Requirements(decomposable=True)
    decomposed = True


class LocalLoRAParams(Decomposition, LoRA):
    """``local-lora``'s keys: the decomposition's from scratch, PEFT LoRA's on a pretrained model."""
