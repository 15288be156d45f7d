"""FedPer client (Arivazhagan et al., 2019; METHODS.md E.3): the classifier ``fc`` is personal,
the body (BatchNorm included) is shared; E epochs on all parameters jointly."""

from torch import nn

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements

HEAD = "fc."


def is_head(key: str, _module: nn.Module) -> bool:
    """The classifier (weight and bias) of every model in ``fedlora_flwr.models``."""
    return key.startswith(HEAD)


class FedPerClient(MethodClient):
    requires = Requirements(head=True)
    partition = ParameterPartition(personal=is_head)
