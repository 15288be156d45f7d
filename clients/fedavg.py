"""FedAvg client (McMahan et al., 2017; METHODS.md E.1): every tensor shared, E epochs on all."""

from clients.base import MethodClient


class FedAvgClient(MethodClient):
    """The base declaration already is FedAvg's: nothing personal, one phase over everything."""
