"""``lora-ft``'s client: federated LoRA, fine-tuned locally before each evaluation (:class:`LoRAFineTuneClient`)."""
from __future__ import annotations

from torch import nn

from clients.base import MethodClient, local_length
from clients.pf2lora import CommonAdapter, adapted_model, frozen_backbone, upper_optimizer
from fedlora_flwr.adapters import COMMON
from fedlora_flwr.config import AFTER_AGGREGATION
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, Phase

FINE_TUNED = "fine-tuned"
FINE_TUNING_STREAM = 1


class LoRAFineTuneClient(MethodClient):
    """LoRA-FT: the control of PF2LoRA's comparison (arXiv 2503.03920) that fine-tunes a federated
    LoRA model locally.

    One LoRA adapter x = (B, A) (:mod:`fedlora_flwr.adapters`; rank ``rank-common``, scaling 2,
    LoRA init): W = W0 + B·A.

    - image models trained from scratch: adapters on every conv/linear layer; W0, BatchNorm and
      the head train with them and everything is shared (FedAvg of the adapted model);
    - pretrained text model: the encoder is frozen, the adapter sits on ``lora-target-modules``,
      adapter and head are shared.

    Training: ``local-steps`` steps per round (0: ``local-epochs`` epochs) with PF2LoRA's
    upper-level optimizer (SGD lr β = ``lr-upper``, or AdamW with ``pf2lora-upper-optimizer``).
    Server (:class:`strategies.fedavg.FedAvgStrategy`): the mean weighted by training size. Before
    each evaluation every client fine-tunes its own copy of the averaged model for the same number
    of steps with the same optimizer (its own mini-batch order), evaluates that copy and stores it
    in the ``fine-tuned`` slot; the next round trains from the average again, not from the copy.
    Its evaluation is this fine-tuned copy of the average: after aggregation only.

    Parameters
    ----------
    rank-common : int, default 8
        r: rank of the adapter.
    lr-upper : float, default 0.001
        β: learning rate of the optimizer.
    pf2lora-upper-optimizer : {"sgd", "adamw"}, default "sgd"
        The optimizer.
    lora-target-modules : str, default ""
        Text models: modules the adapter goes on ("": query,value).
    local-steps : int, default 10
        Steps per round (and of the fine-tuning); 0: ``local-epochs`` epochs.
    """

    params = CommonAdapter
    points = (AFTER_AGGREGATION,)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.partition = ParameterPartition(frozen=frozen_backbone(config))

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        return adapted_model(self.config, task.num_classes, {COMMON: self.params.rank_common})

    def schedule(self) -> list[Phase]:
        return [Phase(groups=("shared",), optimizer=upper_optimizer(self.config), **local_length(self.config))]

    def begin_evaluation(self, session) -> None:
        session.run_schedule(self.schedule(), stream=FINE_TUNING_STREAM)
        session.store.save(session.partition_id, self.partition.state(session.model, "shared"), slot=FINE_TUNED)
