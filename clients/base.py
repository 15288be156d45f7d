"""What a method declares for its clients; the mechanics live in ``fedlora_flwr.client_app``.

A method is a :class:`MethodClient` subclass that sets class attributes and overrides the few
hooks it needs. The defaults are FedAvg's: the plain model, every tensor shared, one phase over
all parameters for ``local-epochs`` epochs, cross-entropy, predict with ``model(x)``.

Per message, :class:`fedlora_flwr.client_app.ClientSession` calls, in order:

- ``build_model(task, partition_id)``, seeded, so every client starts from the same init;
- ``load(session, received, training)``: the server's arrays and the personal-state store;
- ``train``: ``begin_training(session)``, the schedule (``schedule()``, ``loss``), then
  ``save(session)`` (personal store) and ``upload(session)`` (the reply's arrays);
- ``evaluate`` (after aggregation): ``begin_evaluation(session)``, then ``predict`` on the
  client's test split; evaluated after training (``evaluate-at``), ``predict`` runs on the model as
  ``train`` left it, in the train message, without ``begin_evaluation``.

What is exchanged may differ from what is stored (FedAMP uploads its personal w_i and starts
from the received u_i; FedCAC uploads critical-parameter masks with its model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedlora_flwr.config import AFTER_AGGREGATION, AFTER_TRAINING, EvalPoint, MethodParams
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, Phase, load_group
from fedlora_flwr.lora import decompose
from fedlora_flwr.models import build_model, family_member
from fedlora_flwr.requirements import Requirements
from fedlora_flwr.training import cross_entropy, plain_predict

if TYPE_CHECKING:
    from fedlora_flwr.client_app import ClientSession
    from fedlora_flwr.config import RunConfig


def local_length(config: RunConfig) -> dict[str, int]:
    """A step-counted method's phase length: ``local-steps`` steps per round, or ``local-epochs``
    epochs when it is 0 (``Phase(**local_length(config))``; the method's params include
    :class:`clients.params.LocalSteps`)."""
    steps = config.params.local_steps
    return {"steps": steps} if steps > 0 else {"epochs": config.local_epochs}


class MethodClient:
    """A method's client: its model, its parameter partition, its local schedule and hooks.

    Subclasses declare ``params`` (the method's own run-config keys, read as ``self.params``),
    ``requires`` (what it needs from a model, ``fedlora_flwr.methods.Requirements``), and where its
    paper evaluates (``evaluate_at``) among the points it can be evaluated at (``points``)."""

    params: ClassVar[type[MethodParams]] = MethodParams
    requires: ClassVar[Requirements] = Requirements()
    #: The paper's evaluation point, what ``evaluate-at = "default"`` means for this method.
    evaluate_at: ClassVar[EvalPoint] = AFTER_AGGREGATION
    #: The evaluation points this method can mean (``evaluate-at`` naming another one is refused).
    points: ClassVar[tuple[EvalPoint, ...]] = (AFTER_AGGREGATION, AFTER_TRAINING)
    partition: ClassVar[ParameterPartition] = ParameterPartition()
    #: Decompose every conv/linear weight into σ + B·A (FedLoRA eqs. 2–5) with the run's
    #: ``rank-conv``/``rank-linear``; the partition then decides who owns σ and the LoRA factors.
    decomposed: ClassVar[bool] = False

    def __init__(self, config: RunConfig) -> None:
        if not isinstance(config.params, type(self).params):
            raise TypeError(f"{type(self).__name__} reads {type(self).params.__name__}; the config holds "
                            f"{type(config.params).__name__} (method={config.method!r})")
        self.config = config
        self.params = config.params

    # ------------------------------------------------------------------ model and schedule

    def architecture(self, partition_id: int) -> str:
        """The registered model this client builds: ``model``, or its member of ``model-family``."""
        family = self.config.model_family
        return family_member(family, partition_id) if family else self.config.model

    def client_group(self, partition_id: int) -> str | None:
        """The label the server groups this client's accuracy under (``acc_per_group``): its
        architecture in a ``model-family`` run; None (no groups) otherwise."""
        return self.architecture(partition_id) if self.config.model_family else None

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        """The client model; callers seed torch first so every client builds the same init.

        ``partition_id`` picks the client's architecture in a ``model-family`` run (pFedLoRA)."""
        model = build_model(self.architecture(partition_id), task.num_classes)
        if self.decomposed:
            model = decompose(model, rank_conv=self.params.rank_conv, rank_linear=self.params.rank_linear)
        return model

    def schedule(self) -> list[Phase]:
        """The local schedule: ordered phases, each training some groups for epochs or steps with its
        own optimizer (default: shared and personal together for ``local-epochs`` epochs)."""
        return [Phase(groups=("shared", "personal"), epochs=self.config.local_epochs)]

    # ------------------------------------------------------------------ exchange and storage

    def initial_download(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What the server sends before any client has replied (built from a seeded model)."""
        return self.partition.state(model, "shared")

    def upload_template(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keys, shapes and dtypes every upload must have (the server checks each reply against it)."""
        return self.partition.state(model, "shared")

    def load(self, session: ClientSession, received: Mapping[str, torch.Tensor], training: bool) -> None:
        """Load the server's shared tensors, then this client's personal tensors if it has any yet."""
        model = session.model
        load_group(model, received, self.partition.keys(model, "shared"), "shared arrays from the server")
        expected = self.partition.state(model, "personal")
        # nothing personal: nothing stored (save), and no stored state for the server's record to require
        personal = session.store.load(session.partition_id, expected=expected) if expected else None
        if personal is not None:
            load_group(model, personal, personal.keys(), f"personal state of client {session.partition_id}")

    def save(self, session: ClientSession) -> None:
        """After training: keep the personal tensors on disk (atomically)."""
        personal = self.partition.state(session.model, "personal")
        if personal:
            session.store.save(session.partition_id, personal)

    def upload(self, session: ClientSession) -> dict[str, torch.Tensor]:
        """After training: the tensors the reply carries to the server."""
        return self.partition.state(session.model, "shared")

    # ------------------------------------------------------------------ per-round and per-batch hooks

    def train_metrics(self, session: ClientSession) -> dict[str, float]:
        """After training: the method's own figures for the train reply (finite numbers, named by
        kebab-case keys that start with the method's name); the server records each key's mean over
        the participants in the round's ``method_metrics``. Default: none (no record is sent)."""
        return {}

    def begin_training(self, session: ClientSession) -> None:
        """Called after :meth:`load`, before the schedule (class counts, a teacher, an anchor)."""

    def begin_evaluation(self, session: ClientSession) -> None:
        """Called after :meth:`load`, before evaluating after aggregation (lora-ft fine-tunes its copy here)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one training mini-batch."""
        return cross_entropy(model, x, y)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The logits the client classifies with (training loss and evaluation)."""
        return plain_predict(model, x)
