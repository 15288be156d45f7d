"""FedRep's client: FedPer's split, head trained before body (:class:`FedRepClient`)."""

from pydantic import Field

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import in_head


class FedRepParams(MethodParams):
    fedrep_head_epochs: int = Field(4, ge=0, description="E_h: epochs of the head, body frozen")
    fedrep_body_epochs: int = Field(1, ge=0, description="E_b: epochs of the body, head frozen")


class FedRepClient(MethodClient):
    """FedRep: "Exploiting Shared Representations for Personalized Federated Learning" (Collins et
    al., ICML 2021, arXiv 2102.07078).

    FedPer's split: the model's declared head (``fc``/``classifier``) personal, the body shared
    (BatchNorm included); nothing frozen. Round t: client k loads the global body φ^t and its head
    h_k, then, each phase with a fresh SGD optimizer (the run's ``lr``/``momentum``)::

        h_k ← argmin_h L_k(φ^t, h)      E_h epochs, body frozen
        φ_k ← argmin_φ L_k(φ, h_k)      E_b epochs, head frozen

    and uploads φ_k. Server (:class:`strategies.fedavg.FedAvgStrategy`): the sample-weighted mean
    of the bodies; each client evaluates it with its own head.

    Choices: E_h = 4, E_b = 1 fill the common E = 5 (the paper trains the head for many epochs and
    the body for one; PFLlib: head 1 epoch, body ``local_epochs``); ``local-epochs`` is not read.
    Optimizers are rebuilt every phase and round with the run's momentum (PFLlib keeps two
    persistent momentum-free SGDs).

    Parameters
    ----------
    fedrep-head-epochs : int, default 4
        E_h: epochs of the head, body frozen.
    fedrep-body-epochs : int, default 1
        E_b: epochs of the body, head frozen.
    """

    params = FedRepParams
    requires = Requirements(head=True)
    partition = ParameterPartition(personal=in_head)

    def schedule(self) -> list[Phase]:
        return [
            Phase(groups=("personal",), epochs=self.params.fedrep_head_epochs),
            Phase(groups=("shared",), epochs=self.params.fedrep_body_epochs),
        ]
