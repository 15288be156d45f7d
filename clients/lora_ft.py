"""``lora-ft``: the control of PF2LoRA's comparison that fine-tunes a federated LoRA model locally.

One LoRA adapter (``fedlora_flwr.adapters``, rank ``rank-common``, scaling 2, LoRA init) on every
conv/linear layer; as in PF2LoRA on these from-scratch image models, W0, BatchNorm and the head train
with it, and everything is shared and averaged (FedAvg of the adapted model); on a pretrained text model
the encoder is frozen and the adapter sits on ``lora-target-modules``, as in PF2LoRA. Training: ``local-steps``
steps per round (0: ``local-epochs`` epochs) with PF2LoRA's upper-level optimizer (SGD lr ``lr-upper``,
or AdamW with ``pf2lora-upper-optimizer``). Before each evaluation every client fine-tunes its own
copy of the averaged model for the same number of steps with the same optimizer (its own mini-batch
order), evaluates that copy and stores it in the ``fine-tuned`` slot; the next round trains from the
average again, not from the copy.
"""

from __future__ import annotations

from torch import nn

from clients.base import MethodClient, local_length
from clients.pf2lora import CommonAdapter, adapted_model, frozen_backbone, upper_optimizer
from fedlora_flwr.adapters import COMMON
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, Phase

FINE_TUNED = "fine-tuned"
FINE_TUNING_STREAM = 1


class LoRAFineTuneClient(MethodClient):
    params = CommonAdapter
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
