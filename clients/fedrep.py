"""FedRep client (Collins et al., ICML 2021; METHODS.md E.4): FedPer's split (the model's declared
head personal, the body shared), trained head first with the body frozen for ``fedrep-head-epochs``
(E_h), then the body with the head frozen for ``fedrep-body-epochs`` (E_b). Defaults E_h = 4, E_b = 1
(METHODS.md's recommendation within E = 5); ``local-epochs`` is not used. Optimizers are rebuilt
every phase and round (PFLlib keeps two persistent momentum-free SGDs: METHODS.md E.4)."""

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
    params = FedRepParams
    requires = Requirements(head=True)
    partition = ParameterPartition(personal=in_head)

    def schedule(self) -> list[Phase]:
        return [
            Phase(groups=("personal",), epochs=self.params.fedrep_head_epochs),
            Phase(groups=("shared",), epochs=self.params.fedrep_body_epochs),
        ]
