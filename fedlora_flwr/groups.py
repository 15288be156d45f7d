"""Parameter partition (shared / personal / frozen) and the local schedule of a method.

Every state-dict entry of a client model (parameters *and* buffers, e.g. BatchNorm running
statistics) belongs to exactly one group:

- ``shared``: sent to the server and aggregated (FedLoRA: σ, every key without ``lora_``);
- ``personal``: kept by the client in its personal-state store (FedLoRA: τ = the LoRA factors);
- ``frozen``: never trained and never sent (e.g. a pretrained backbone).

A method declares its partition with two rules (personal, frozen); everything else is shared.
A rule sees the state-dict key and the module that owns it, so it can select by name or LoRA role
(``lora_``) or by module type (FedBN's BatchNorm layers). A rule that needs the whole model is a
:class:`ModelRule`, bound to the model being partitioned: FedPer's "the model's declared head"
(``fedlora_flwr.structure.in_head``). :func:`any_of`, :func:`all_of` and :func:`none_of` combine
rules of both kinds.

A schedule is an ordered list of :class:`Phase`: "train these groups for N epochs (or N steps)
with a fresh optimizer". FedLoRA = [personal for E_lora, shared for E − E_lora] (paper §3.4,
Alg. 1); FedAvg = [shared for E]; Local = [personal for E]; FedRep = [head, then body];
PF2LoRA = [shared and personal for I steps with a :class:`BilevelUpdate`, personal = lower level].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Group = Literal["shared", "personal", "frozen"]
GROUPS: tuple[Group, ...] = ("shared", "personal", "frozen")

KeyRule = Callable[[str, nn.Module], bool]
"""Decides membership from a state-dict key and the module that directly owns the tensor."""


@dataclass(frozen=True)
class ModelRule:
    """A rule that depends on the model it partitions (e.g. where its declared head sits):
    ``bind(model)`` returns the :data:`KeyRule` for that model. ``name`` is how errors show it."""

    name: str
    bind: Callable[[nn.Module], KeyRule]

    def __str__(self) -> str:
        return self.name


Rule = KeyRule | ModelRule


def bound(rule: Rule, model: nn.Module) -> KeyRule:
    """``rule`` as a key rule for ``model`` (a :class:`ModelRule` bound to it, a key rule as is)."""
    return rule.bind(model) if isinstance(rule, ModelRule) else rule


def rule_name(rule: Rule) -> str:
    return str(rule) if isinstance(rule, ModelRule) else getattr(rule, "__name__", repr(rule))


def _combined(name: str, combine: Callable[[Iterable[bool]], bool], rules: tuple[Rule, ...]) -> ModelRule:
    if not rules:
        raise ValueError(f"{name}() needs at least one rule")

    def bind(model: nn.Module) -> KeyRule:
        key_rules = [bound(rule, model) for rule in rules]
        return lambda key, module: combine(rule(key, module) for rule in key_rules)

    return ModelRule(f"{name}({', '.join(rule_name(rule) for rule in rules)})", bind)


def any_of(*rules: Rule) -> ModelRule:
    """A key any of ``rules`` selects."""
    return _combined("any_of", any, rules)


def all_of(*rules: Rule) -> ModelRule:
    """A key every one of ``rules`` selects."""
    return _combined("all_of", all, rules)


def none_of(*rules: Rule) -> ModelRule:
    """A key none of ``rules`` selects."""
    return _combined("none_of", lambda hits: not any(hits), rules)


def nothing(_key: str, _module: nn.Module) -> bool:
    return False


def everything(_key: str, _module: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class ParameterPartition:
    """Assigns every state-dict key of a model to one group: personal, else frozen, else shared."""

    personal: Rule = nothing
    frozen: Rule = nothing

    def __str__(self) -> str:
        return f"personal={rule_name(self.personal)}, frozen={rule_name(self.frozen)}"

    def groups(self, model: nn.Module) -> dict[str, Group]:
        """Map every state-dict key of ``model`` to its group, in state-dict order."""
        personal, frozen = bound(self.personal, model), bound(self.frozen, model)
        owner: dict[str, nn.Module] = {}
        # remove_duplicate=False: a module reachable under two names (tied weights) owns both keys.
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for name, _ in module.named_parameters(recurse=False):
                owner[prefix + name] = module
            for name, _ in module.named_buffers(recurse=False):
                owner[prefix + name] = module
        groups: dict[str, Group] = {}
        for key in model.state_dict():
            module = owner[key]
            if personal(key, module):
                groups[key] = "personal"
            elif frozen(key, module):
                groups[key] = "frozen"
            else:
                groups[key] = "shared"
        return groups

    def modules_only_in(self, model: nn.Module, groups: Iterable[Group]) -> list[nn.Module]:
        """The modules that own tensors directly, all of them in ``groups`` (e.g. frozen BatchNorm)."""
        wanted = set(groups)
        membership = self.groups(model)
        found = []
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            own = [prefix + name for name, _ in module.named_parameters(recurse=False)]
            own += [prefix + name for name, _ in module.named_buffers(recurse=False) if prefix + name in membership]
            if own and all(membership[key] in wanted for key in own):
                found.append(module)
        return found

    def keys(self, model: nn.Module, group: Group) -> list[str]:
        return [key for key, owner in self.groups(model).items() if owner == group]

    def state(self, model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
        """The tensors of one group (detached views of the live model state)."""
        state = model.state_dict()
        return {key: state[key] for key in self.keys(model, group)}

    def parameters(self, model: nn.Module, groups: Iterable[Group]) -> list[nn.Parameter]:
        """The trainable ``nn.Parameter`` objects that belong to ``groups``."""
        wanted = set(groups)
        membership = self.groups(model)
        return [param for key, param in model.named_parameters() if membership[key] in wanted]


@dataclass(frozen=True)
class OptimizerSpec:
    """A phase's optimizer, built fresh for every phase of every round (FedDecomp's ``client.py``
    rebuilds its optimizers every round, so momentum restarts).

    ``lr``/``momentum`` left at None take the run's ``lr``/``momentum``. ``group_lr``: (group, lr)
    pairs giving the parameters of those groups their own learning rate (one parameter group each;
    pFedGate's joint step trains gate and base with their own lr, as its two optimizers do).
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float = 0.0
    group_lr: tuple[tuple[str, float], ...] = ()

    def build(self, params: list[nn.Parameter] | list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (tensors, or torch parameter-group dicts with their own ``lr``)."""
        lr = self.lr if self.lr is not None else lr
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        momentum = self.momentum if self.momentum is not None else momentum
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class BilevelUpdate:
    """PF2LoRA's bilevel step as a phase's update rule (``fedlora_flwr.bilevel``):
    y (the parameters of ``lower``) takes a plain SGD step of ``lr_lower`` (α); x (the phase's other
    groups) steps with the phase's optimizer on the hypergradient (``hypergradient=True``) or on
    ∇_x f(x, y) at the same point as y (the paper's "simultaneous" ablation)."""

    lower: tuple[Group, ...]
    lr_lower: float
    hypergradient: bool = True

    def __post_init__(self) -> None:
        if not self.lower:
            raise ValueError("a bilevel update needs a lower level (the groups of y)")
        if not self.lr_lower >= 0:
            raise ValueError(f"the lower-level learning rate must be >= 0, got {self.lr_lower}")


@dataclass(frozen=True)
class Phase:
    """Train the parameters of ``groups`` for ``epochs`` epochs or ``steps`` mini-batches with a
    fresh optimizer (``optimizer``; the run's SGD by default).

    All other parameters get ``requires_grad=False`` and are not in the optimizer. The model is
    in train mode, so BatchNorm running statistics move in every phase (as in FedDecomp), except
    in the modules whose tensors all belong to ``eval_groups``: those run in eval mode (a frozen
    backbone's BatchNorm does not drift; pFedGate trains its gate with the base in eval mode).
    ``max_grad_norm`` clips the gradient norm of the trained parameters before every step; with
    ``clip_per_group`` the norm of each trained group's parameters separately (pFedGate's joint
    step clips gate and base apart).
    ``drop_last`` leaves out each epoch's last partial mini-batch when the data holds more than one
    batch (pFedGate's official loader does, and its gate's BatchNorm1d cannot train on one sample).

    ``update``: None = one optimizer step per mini-batch on the gradient of the loss; a
    :class:`BilevelUpdate` = PF2LoRA's step, the optimizer then updating only the upper level.
    """

    groups: tuple[Group, ...]
    epochs: int | None = None
    steps: int | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    max_grad_norm: float | None = None
    eval_groups: tuple[Group, ...] = ("frozen",)
    update: BilevelUpdate | None = None
    drop_last: bool = False
    clip_per_group: bool = False

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"a phase counts epochs or steps, exactly one of them (got epochs={self.epochs}, steps={self.steps})")
        if (self.epochs or 0) < 0 or (self.steps or 0) < 0:
            raise ValueError(f"a phase cannot run a negative number of epochs/steps ({self.epochs}, {self.steps})")
        if self.update is not None:
            if not set(self.update.lower) < set(self.groups):
                raise ValueError(f"a bilevel phase's lower level {self.update.lower} must be a strict subset of its groups {self.groups}")
            if self.max_grad_norm is not None:
                raise ValueError("a bilevel phase does not clip gradients (max_grad_norm must be None)")
            if self.optimizer.group_lr:
                raise ValueError("a bilevel phase has no per-group learning rates (optimizer.group_lr must be empty)")
        unknown = [group for group, _ in self.optimizer.group_lr if group not in self.groups]
        if unknown:
            raise ValueError(f"optimizer.group_lr names groups {unknown} the phase does not train {self.groups}")

    @property
    def empty(self) -> bool:
        return not (self.epochs or self.steps)


def load_group(model: nn.Module, tensors: Mapping[str, torch.Tensor], expected: Iterable[str], what: str) -> None:
    """Copy ``tensors`` into ``model``; their keys must be exactly ``expected`` (shapes checked too)."""
    expected = list(expected)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what}: keys do not match the model ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    state = model.state_dict()
    for key in expected:
        if tuple(tensors[key].shape) != tuple(state[key].shape):
            raise ValueError(f"{what}: {key} has shape {tuple(tensors[key].shape)}, model expects {tuple(state[key].shape)}")
    with torch.no_grad():
        for key in expected:
            state[key].copy_(tensors[key])
