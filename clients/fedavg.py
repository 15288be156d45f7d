"""FedAvg clients (McMahan et al., 2017; METHODS.md E.1): every tensor shared, E epochs on all.

``FedAvgLoRAClient`` is the FedLoRA paper's Table 4 control "FedAvg w/ LoRA": the model is
decomposed as in FedLoRA (σ + B·A), σ and τ are trained together and both are averaged. The
official code has no such switch; this follows METHODS.md A.9's recommendation.
"""

from clients.base import MethodClient
from clients.params import Decomposition
from fedlora_flwr.requirements import Requirements


class FedAvgClient(MethodClient):
    """The base declaration already is FedAvg's: nothing personal, one phase over everything."""


class FedAvgLoRAClient(FedAvgClient):
    params = Decomposition
    requires = Requirements(decomposable=True)
    decomposed = True
