"""FedRep client (Collins et al., ICML 2021; METHODS.md E.4): FedPer's split (the model's declared
head personal, the body shared), trained head first with the body frozen for ``fedrep-head-epochs``
(E_h), then the body with the head frozen for ``fedrep-body-epochs`` (E_b). Defaults E_h = 4, E_b = 1
(METHODS.md's recommendation within E = 5); ``local-epochs`` is not used. Optimizers are rebuilt
every phase and round (PFLlib keeps two persistent momentum-free SGDs: METHODS.md E.4)."""

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.structure import in_head


class FedRepClient(MethodClient):
    partition = ParameterPartition(personal=in_head)

    def schedule(self) -> list[Phase]:
        return [
            Phase(groups=("personal",), epochs=self.config.fedrep_head_epochs),
            Phase(groups=("shared",), epochs=self.config.fedrep_body_epochs),
        ]
