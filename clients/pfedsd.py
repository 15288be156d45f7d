"""pFedSD's client: FedAvg plus self-distillation from the client's previous model (:class:`PFedSDClient`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import AFTER_TRAINING, MethodParams
from fedlora_flwr.groups import load_group

TEACHER = "teacher"


class PFedSDParams(MethodParams):
    pfedsd_lambda: float = Field(0.5, ge=0, description="λ: weight of the distillation term")
    pfedsd_temperature: float = Field(3.0, gt=0, description="T: distillation temperature")


class PFedSDClient(MethodClient):
    """pFedSD: "Personalized Edge Intelligence via Federated Self-Knowledge Distillation" (Jin et
    al., IEEE TPDS 2023; official code in Fling's ``pfedsd_client``).

    Everything is shared (FedAvg); nothing frozen. Personal: the client's model after its last
    local training, kept in the store's ``teacher`` slot. Round t: client k starts from the global
    model and runs E = ``local-epochs`` epochs of SGD on::

        CE(s, y) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))

    with s the student's logits and t the teacher's (eval mode, no gradient, unchanged during the
    round); a client's first round has no teacher and no KD term. It uploads the model and keeps
    it as its next teacher. Server (:class:`strategies.fedavg.FedAvgStrategy`): the sample-weighted
    mean. Paper point (``evaluate-at = "default"``): after training, the personalized model right
    after local training, before aggregation (Fling's ``test_place``), i.e. the teacher.

    Defaults λ = 0.5, T = 3 are Fling's; learning rate and momentum are the run's (the common
    protocol's SGD 0.1/0.9; Fling's configs use lr 0.01).

    Parameters
    ----------
    pfedsd-lambda : float, default 0.5
        λ: weight of the distillation term.
    pfedsd-temperature : float, default 3.0
        T: distillation temperature.
    """

    params = PFedSDParams
    evaluate_at = AFTER_TRAINING
    teacher: nn.Module | None = None

    def _stored_teacher(self, session) -> dict[str, torch.Tensor] | None:
        return session.store.load(session.partition_id, expected=session.model.state_dict(), slot=TEACHER)

    def begin_training(self, session) -> None:
        stored = self._stored_teacher(session)
        if stored is None:
            self.teacher = None
            return
        teacher = copy.deepcopy(session.model)
        load_group(teacher, stored, stored.keys(), f"teacher of client {session.partition_id}")
        self.teacher = teacher.eval().requires_grad_(False)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        temperature = self.params.pfedsd_temperature
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                      reduction="batchmean")
        return loss + self.params.pfedsd_lambda * temperature**2 * kd

    def save(self, session) -> None:
        session.store.save(session.partition_id, session.model.state_dict(), slot=TEACHER)
