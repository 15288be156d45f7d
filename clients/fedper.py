"""FedPer client (Arivazhagan et al., 2019; METHODS.md E.3): the model's declared head (``fc`` on
the image models and ``transformer-small``, ``classifier`` on ``minilm``; ``fedlora_flwr.structure``)
is personal, the body (BatchNorm included) is shared; E epochs on all parameters jointly."""

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import in_head


class FedPerClient(MethodClient):
    requires = Requirements(head=True)
    partition = ParameterPartition(personal=in_head)
