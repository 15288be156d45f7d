"""FedBN's client: every BatchNorm layer personal (:class:`FedBNClient`)."""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements


def is_batchnorm(_key: str, module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


class FedBNClient(MethodClient):
    """FedBN: "Federated Learning on Non-IID Features via Local Batch Normalization" (Li et al.,
    ICLR 2021, arXiv 2102.07623).

    - personal: every BatchNorm layer (affine weight and bias, running mean and variance, the
      ``num_batches_tracked`` counter), selected by module type so the shortcut BN
      ``downsample.1`` is included (PFLlib's filter on names containing "bn" misses it);
    - shared: everything else; nothing frozen.

    Round t: client k loads the global non-BN tensors and its own BN layers, runs E =
    ``local-epochs`` epochs of SGD (the run's ``lr``/``momentum``, fresh every round) on its
    cross-entropy over all parameters, and uploads the non-BN tensors. Server
    (:class:`strategies.fedavg.FedAvgStrategy`): their sample-weighted mean; BN tensors never leave
    the client.

    Parameters
    ----------
    None: the run's core keys only.
    """

    requires = Requirements(batchnorm=True)
    partition = ParameterPartition(personal=is_batchnorm)
