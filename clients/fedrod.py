"""FedRoD's client: a balanced-softmax generic head and a linear personal head on top (:class:`FedRoDClient`)."""

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
#: log n_c for a class the client never saw: a large negative instead of −inf (keeps the logits finite).
LOG_ZERO = math.log(1e-30)


def is_personal_head(key: str, _module: nn.Module) -> bool:
    return key.startswith(PERSONAL_HEAD)


class FedRoDClient(MethodClient):
    """FedRoD with a linear personal head: "On Bridging Generic and Personalized Federated Learning
    for Image Classification" (Chen & Chao, ICLR 2022, arXiv 2107.00778).

    - shared: the body and the generic head g (the model's declared head: ``fc``, or ``classifier``
      on ``minilm``; :mod:`fedlora_flwr.structure`);
    - personal: the head p (``personal_head``, g's shape, starting as a copy of g); nothing frozen.

    Per batch, on the body's features h, with n the client's training counts per class (log 0
    replaced by log 1e-30) and sg(·) a detached tensor::

        L_g = CE(g(h) + log n, y)            balanced softmax: the generic, prior-free predictor
        L_p = CE(p(sg h) + sg g(h), y)       p learns on top of the generic prediction

    one SGD step on L_g + L_p (E = ``local-epochs`` epochs, the run's ``lr``/``momentum``, fresh
    every round). Prediction: argmax of p(h) + g(h). Server
    (:class:`strategies.fedavg.FedAvgStrategy`): the sample-weighted mean of body and g.

    Choice: h is detached for L_p, so the body is trained by L_g alone (PFLlib's choice; Fling
    does not detach h), which keeps the shared part generic.

    Parameters
    ----------
    None: the run's core keys only.
    """

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
