"""The registry of methods: each a :class:`Method` (name, client, strategy, own keys, requirements).

A method is one self-describing unit. Its client class (``clients/``) holds the paper, the
client's math in its docstring, its parameter partition and schedule, its own run-config keys
(``params``, a :class:`fedlora_flwr.config.MethodParams` model) and what it needs from a model
(``requires``, :class:`Requirements`); its strategy (``strategies/``) says what the server does.
An incompatible method × model pair is refused before anything is written, in one line naming both
and the reason.

The built-in methods are :data:`BUILT_IN`. A method from another installed package is found
through the entry-point group ``fedlora_flwr.methods`` (name → ``module:attribute``, the attribute
a :class:`Method` of that name) and runs under ``flwr run`` by its name with the same validation,
state store, resume and reports (``examples/fedprox/`` is a complete one).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clients.adapters import (
    AdapterClient,
    FedAvgHeadClient,
    FedSALoRAClient,
    FedSArsLoRAClient,
    FedSAVeRAClient,
    FFALoRAClient,
    LocalAdapterClient,
)
from clients.base import MethodClient
from clients.fedamp import FedAMPClient
from clients.fedavg import FedAvgClient, FedAvgLoRAClient
from clients.fedbn import FedBNClient
from clients.fedcac import FedCACClient
from clients.fedlora import FedLoRAClient
from clients.fedper import FedPerClient
from clients.fedrep import FedRepClient
from clients.fedrod import FedRoDClient
from clients.local import LocalClient, LocalLoRAClient, LocalLoRAParams
from clients.lora_ft import LoRAFineTuneClient
from clients.pf2lora import PF2LoRAClient, PF2LoRASimultaneousClient
from clients.pfedgate import PFedGateClient
from clients.pfedlora import FedAvgAdapterClient, PFedLoRAClient
from clients.pfedsd import PFedSDClient
from fedlora_flwr.config import AFTER_AGGREGATION, AFTER_TRAINING, ConfigError, EvalPoint, MethodParams, RunConfig
from fedlora_flwr.models import MODEL_FAMILIES, build_model
from fedlora_flwr.requirements import Requirements
from strategies.base import PersonalizedStrategy
from strategies.fedamp import FedAMPStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedcac import FedCACStrategy
from strategies.fedlora import FedLoRAStrategy
from strategies.local import LocalStrategy

if TYPE_CHECKING:
    from fedlora_flwr.data import TaskSpec

ENTRY_POINT_GROUP = "fedlora_flwr.methods"


@dataclass(frozen=True)
class Method:
    """A registered method. ``client`` is a :class:`MethodClient` subclass (its ``params``,
    ``requires``, ``evaluate_at`` and ``points`` are the method's unless given here) or a function
    choosing one from the config."""

    name: str
    client: Callable[[RunConfig], MethodClient]
    strategy: type[PersonalizedStrategy]
    params: type[MethodParams] = field(default=None)  # type: ignore[assignment]
    requires: Requirements = field(default=None)  # type: ignore[assignment]
    evaluate_at: EvalPoint = field(default=None)  # type: ignore[assignment]
    points: tuple[EvalPoint, ...] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for attribute in ("params", "requires", "evaluate_at", "points"):
            if getattr(self, attribute) is None:
                declared = getattr(self.client, attribute, None)
                if declared is None:
                    raise TypeError(f"method {self.name!r}: give {attribute}= (its client declares none)")
                object.__setattr__(self, attribute, declared)

    @property
    def doc(self) -> str:
        """The method's description: its client's docstring."""
        return (self.client.__doc__ or "").strip()

    def evaluation_points(self, config: RunConfig) -> tuple[EvalPoint, ...]:
        """``evaluate-at`` for this method, its primary point first: ``default`` is :attr:`evaluate_at`
        (the paper's), ``both`` adds the other point after it. Raises ``ValueError`` (one line) for a
        point outside :attr:`points`."""
        choice = config.evaluate_at
        if choice == "default":
            return (self.evaluate_at,)
        if choice == "both":
            other = AFTER_TRAINING if self.evaluate_at == AFTER_AGGREGATION else AFTER_AGGREGATION
            wanted = (self.evaluate_at, other)
        else:
            wanted = (choice,)
        missing = [point for point in wanted if point not in self.points]
        if missing:
            raise ValueError(f"evaluate-at={choice!r}: method={self.name!r} cannot be evaluated {missing[0]} "
                             f"(it evaluates {', '.join(self.points)} only)")
        return wanted

    def check_model(self, task: TaskSpec, config: RunConfig) -> None:
        """Build the run's plain model (each member of a family) and check :attr:`requires` against
        it; raises :class:`ConfigError` (one line) when the model lacks what the method needs."""
        family = MODEL_FAMILIES.get(config.model_family, (config.model,))
        try:
            for architecture in family:
                self.requires.check_model(build_model(architecture, task.num_classes), config, self.name)
        except ValueError as err:
            raise ConfigError(f"invalid run config: {err}") from None


def local_lora(config: RunConfig) -> MethodClient:
    """Local w/ LoRA: each client trains a LoRA model alone; two controls under one name.

    - On a pretrained text model or an image ``backbone``: the FedSA-LoRA paper's local baseline
      (Guo et al., arXiv 2410.01463; :class:`clients.adapters.LocalAdapterClient`): PEFT LoRA
      h = W0·x + (α/r)·B·A·x on the frozen backbone, A, B and head trained jointly with plain SGD
      for ``local-steps`` mini-batches a round and kept; nothing is sent.
    - From scratch: the FedLoRA paper's Table 4 control (:class:`clients.local.LocalLoRAClient`):
      its decomposed model θ = σ + B·A trained jointly for E epochs a round and kept.

    Parameters
    ----------
    rank-conv, rank-linear : float, default 0.6
        From scratch: R_c and R_l of FedLoRA's decomposition.
    lora-r : int, default 8
        Pretrained: LoRA rank r.
    lora-alpha : float, default 16.0
        Pretrained: LoRA α (scaling α/r).
    lora-dropout : float, default 0.05
        Pretrained: dropout on the adapter input.
    lora-target-modules : str, default ""
        Pretrained: modules the adapters go on ("": query,value on a text model, every Conv2d and
        Linear but the head on an image backbone).
    local-steps : int, default 10
        Pretrained: mini-batch steps per round (0: ``local-epochs`` epochs).
    """
    return LocalAdapterClient(config) if config.pretrained else LocalLoRAClient(config)


BUILT_IN: tuple[Method, ...] = (
    Method("fedlora", FedLoRAClient, FedLoRAStrategy),
    Method("fedavg", FedAvgClient, FedAvgStrategy),
    Method("local", LocalClient, LocalStrategy),
    # FedLoRA paper Table 4 controls: the decomposed model without FedLoRA's partition/schedule.
    Method("fedavg-lora", FedAvgLoRAClient, FedAvgStrategy),
    Method("local-lora", local_lora, LocalStrategy, params=LocalLoRAParams, requires=Requirements(image_backbone=True),
           evaluate_at=MethodClient.evaluate_at, points=MethodClient.points),
    # The PFL baselines of FedLoRA's Table 1.
    Method("fedper", FedPerClient, FedAvgStrategy),
    Method("fedrep", FedRepClient, FedAvgStrategy),
    Method("fedbn", FedBNClient, FedAvgStrategy),
    Method("fedrod", FedRoDClient, FedAvgStrategy),
    Method("fedamp", FedAMPClient, FedAMPStrategy),
    Method("pfedsd", PFedSDClient, FedAvgStrategy),
    Method("pfedgate", PFedGateClient, FedAvgStrategy),
    Method("fedcac", FedCACClient, FedCACStrategy),
    # Adapters on a frozen pretrained model (FedSA-LoRA paper): sample-weighted mean.
    Method("fedsa-lora", FedSALoRAClient, FedAvgStrategy),
    Method("fedsa-rslora", FedSArsLoRAClient, FedAvgStrategy),
    Method("fedsa-vera", FedSAVeRAClient, FedAvgStrategy),
    Method("lora", AdapterClient, FedAvgStrategy),
    Method("ffa-lora", FFALoRAClient, FedAvgStrategy),
    Method("fedavg-head", FedAvgHeadClient, FedAvgStrategy),
    # pFedLoRA: heterogeneous local models, a shared homogeneous adapter; and its FedAvg-style control.
    Method("pfedlora", PFedLoRAClient, FedAvgStrategy),
    Method("fedavg-adapter", FedAvgAdapterClient, FedAvgStrategy),
    # PF2LoRA, its "simultaneous" ablation and the fine-tuned LoRA control.
    Method("pf2lora", PF2LoRAClient, FedAvgStrategy),
    Method("pf2lora-simultaneous", PF2LoRASimultaneousClient, FedAvgStrategy),
    Method("lora-ft", LoRAFineTuneClient, FedAvgStrategy),
)


class UnknownMethod(KeyError):
    """No built-in method and no installed entry point has this name."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginError(RuntimeError):
    """An installed ``fedlora_flwr.methods`` entry point is broken (one line naming it and why)."""


def _plugin(entry_point: importlib.metadata.EntryPoint) -> Method:
    where = f"entry point {entry_point.name!r} ({entry_point.value}) of group {ENTRY_POINT_GROUP!r}"
    try:
        method = entry_point.load()
    except Exception as err:  # noqa: BLE001 - any import failure of a third-party package, named in one line
        raise PluginError(f"{where}: cannot load it ({type(err).__name__}: {err})") from None
    if not isinstance(method, Method):
        raise PluginError(f"{where}: is a {type(method).__name__}, not a fedlora_flwr.methods.Method")
    if method.name != entry_point.name:
        raise PluginError(f"{where}: the Method is named {method.name!r}; the entry point must carry its name")
    return method


@functools.cache
def registry() -> dict[str, Method]:
    """Every method by name: the built-in ones, then the installed entry points (loaded once per process)."""
    methods = {method.name: method for method in BUILT_IN}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in methods:
            raise PluginError(f"entry point {entry_point.name!r} ({entry_point.value}) of group "
                              f"{ENTRY_POINT_GROUP!r}: a method of that name is already registered")
        methods[entry_point.name] = _plugin(entry_point)
    return methods


def get_method(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise UnknownMethod(f"unknown method; choose one of {sorted(methods)} (or install a package that "
                            f"registers it in the entry-point group {ENTRY_POINT_GROUP!r})")
    return methods[name]


def all_param_keys() -> set[str]:
    """The run-config keys some registered method declares."""
    return set(all_param_defaults())


def all_param_defaults() -> dict[str, Any]:
    """Every registered method's keys with their defaults."""
    defaults: dict[str, Any] = {}
    for method in registry().values():
        for name, info in method.params.model_fields.items():
            defaults.setdefault(info.alias or name, info.get_default(call_default_factory=True))
    return defaults
