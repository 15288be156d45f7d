"""Local training (METHODS.md E.2): every tensor personal, nothing leaves the client."""

from clients.base import MethodClient
from fedlora_flwr.groups import ParameterPartition, everything


class LocalClient(MethodClient):
    partition = ParameterPartition(personal=everything)
