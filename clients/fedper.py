"""FedPer's client: the head personal, the body shared (:class:`FedPerClient`)."""

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import in_head


class FedPerClient(MethodClient):
    """FedPer: "Federated Learning with Personalization Layers" (Arivazhagan et al., arXiv
    1912.00818, 2019).

    - personal: the model's declared head (``fc`` on the image models and ``transformer-small``,
      ``classifier`` on ``minilm``; :mod:`fedlora_flwr.structure`), kept in the client's store;
    - shared: the body, BatchNorm parameters and statistics included (Fling's FedPer config
      aggregates everything but ``fc``); nothing is frozen.

    Round t: client k loads the global body and its own head and runs E = ``local-epochs`` epochs
    of SGD (the run's ``lr``/``momentum``, fresh every round) on its cross-entropy over all
    parameters jointly, then uploads the body. Server (:class:`strategies.fedavg.FedAvgStrategy`):
    the sample-weighted mean of the bodies, the same body to every client, which evaluates it with
    its own head.

    Parameters
    ----------
    None: the run's core keys only.
    """

    requires = Requirements(head=True)
    partition = ParameterPartition(personal=in_head)
