"""Local training (METHODS.md E.2): every tensor personal, nothing leaves the client.

``LocalLoRAClient`` is the FedLoRA paper's Table 4 control "Local w/ LoRA": the FedLoRA-decomposed
model (σ + B·A) trained jointly for E epochs, without communication (METHODS.md A.9).
"""

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition, everything


class LocalClient(MethodClient):
    partition = ParameterPartition(personal=everything)


class LocalLoRAClient(LocalClient):
    decomposed = True
