"""FedBN client (Li et al., ICLR 2021; METHODS.md E.5): every BatchNorm layer (affine parameters,
running statistics and counter) is personal, selected by module type so the shortcut BN
``downsample.1`` is included (PFLlib's name filter misses it); everything else is shared."""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements


def is_batchnorm(_key: str, module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


class FedBNClient(MethodClient):
    requires = Requirements(batchnorm=True)
    partition = ParameterPartition(personal=is_batchnorm)
