"""What a method declares for its clients; the mechanics live in ``fedlora_flwr.client_app``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.lora import decompose
from fedlora_flwr.models import build_model

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig


class MethodClient:
    """A method's client: its model, its parameter partition and its local schedule.

    Subclasses override the class attributes :attr:`partition` and :attr:`decomposed` and,
    where needed, :meth:`schedule`. The default is FedAvg's: the plain model, every tensor
    shared, one phase over all parameters for ``local-epochs`` epochs.
    """

    partition: ClassVar[ParameterPartition] = ParameterPartition()
    #: Decompose every conv/linear weight into σ + B·A (FedLoRA eqs. 2–5) with the run's
    #: ``rank-conv``/``rank-linear``; the partition then decides who owns σ and the LoRA factors.
    decomposed: ClassVar[bool] = False

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def build_model(self, num_classes: int) -> nn.Module:
        """The client model; callers seed torch first so every client builds the same init."""
        model = build_model(self.config.model, num_classes)
        if self.decomposed:
            model = decompose(model, rank_conv=self.config.rank_conv, rank_linear=self.config.rank_linear)
        return model

    def schedule(self) -> list[Phase]:
        return [Phase(groups=("shared", "personal"), epochs=self.config.local_epochs)]
