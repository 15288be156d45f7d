"""FedRoD client with a linear personal head (Chen & Chao, ICLR 2022; METHODS.md E.6).

The body and the generic head g (the model's declared head, ``fedlora_flwr.structure``: ``fc``, or
``classifier`` on ``minilm``) are shared; the personal head p (``personal_head``, the same shape as
g, starting as a copy of it) is personal. Per batch, on the body's features h:
L_g = CE(g(h) + log n_c, y), the balanced softmax with the client's class counts n_c, and
L_p = CE(p(h) + g(h), y) with g(h) and h detached, so p learns on top of the generic prediction
and the body stays trained by L_g alone (PFLlib's choice; Fling does not detach h). One step on
L_g + L_p. Prediction: argmax of p(h) + g(h).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.structure import head

PERSONAL_HEAD = "personal_head."
#: log n_c for a class the client never saw: a large negative instead of −inf (METHODS.md E.6).
LOG_ZERO = math.log(1e-30)


def is_personal_head(key: str, _module: nn.Module) -> bool:
    return key.startswith(PERSONAL_HEAD)


class FedRoDClient(MethodClient):
    requires = Requirements(head=True)
    partition = ParameterPartition(personal=is_personal_head)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        model = super().build_model(task, partition_id)
        model.personal_head = copy.deepcopy(head(model).module)
        return model

    def begin_training(self, session) -> None:
        # np.asarray: the labels are a numpy array (images) or a CPU tensor (token ids).
        labels = torch.as_tensor(np.asarray(session.dataset.y_train)[session.split.train], device=session.device)
        counts = torch.bincount(labels, minlength=session.dataset.num_classes).to(torch.float32)
        self.log_prior = torch.where(counts > 0, counts.log(), torch.full_like(counts, LOG_ZERO))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generic_head = head(model)
        features = generic_head.body.features(x)
        generic = generic_head.module(features)
        personal = model.personal_head(features.detach()) + generic.detach()
        return F.cross_entropy(generic + self.log_prior, y) + F.cross_entropy(personal, y)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        generic_head = head(model)
        features = generic_head.body.features(x)
        return model.personal_head(features) + generic_head.module(features)
