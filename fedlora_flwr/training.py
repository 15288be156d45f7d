"""The one local training loop: run a method's schedule of phases over a client's data.

Each phase trains only the parameters of its groups (``requires_grad`` *and* optimizer
membership, as FedDecomp's ``client.py`` freezes) with a fresh optimizer, so momentum restarts
every phase and every round as in FedDecomp, which rebuilds its optimizers every round. Methods change *what* is trained and in which order by
declaring phases, and *what is minimised or predicted* through two per-batch hooks (``loss``,
``predict``: FedRoD's balanced softmax, pFedSD's distillation, FedAMP's proximal term); they
do not write loops. A phase with a :class:`~fedlora_flwr.groups.BilevelUpdate` replaces the
per-batch optimizer step by PF2LoRA's bilevel step (``fedlora_flwr.bilevel``), on the same hook.

No host synchronisation per step: the running loss sums (float64, on the model's device) are read
once at the end. Adding each float32 batch loss to a float64 sum gives the same bits as the Python
float sum it replaces, so CPU results are unchanged. ``precision="bf16"`` runs the forward passes
(the loss hook in training, the predict hook in evaluation) under ``torch.autocast`` with
bfloat16; parameters, buffers and optimizer state stay float32 and backward runs outside autocast
(PyTorch's recommended mixed-precision recipe; bf16 needs no loss scaling).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedlora_flwr.bilevel import bilevel_step
from fedlora_flwr.data import batches
from fedlora_flwr.groups import GROUPS, ParameterPartition, Phase

LossHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(model, x, y)``: the training loss of one mini-batch."""
PredictHook = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``predict(model, x)``: the logits a method classifies with."""
Precision = Literal["fp32", "bf16"]
"""Forward-pass precision of the run config's ``precision`` key."""


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """The context of a forward pass: bfloat16 autocast for ``bf16``, nothing at all for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision: unknown {precision!r}; choose fp32 or bf16")


def plain_predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean loss over every batch of every phase
    samples: int  # samples processed, all epochs and phases together
    steps: int


@dataclass(frozen=True)
class EvalStats:
    loss: float
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _phase_batches(phase: Phase, epoch_batches: Callable[[], Iterator]) -> Iterator:
    """The phase's mini-batches: ``epochs`` full passes, or the first ``steps`` batches of
    as many passes as that takes."""
    if phase.epochs is not None:
        return itertools.chain.from_iterable(epoch_batches() for _ in range(phase.epochs))
    return itertools.islice(itertools.chain.from_iterable(epoch_batches() for _ in itertools.count()), phase.steps)


def _check_phases(schedule: Sequence[Phase], model: nn.Module, partition: ParameterPartition,
                  membership: dict[str, str]) -> None:
    """Before anything trains: every phase that runs (and each level of a bilevel phase) must own a
    parameter, else a ValueError naming the phase, its groups and the partition."""
    counts = {group: sum(membership[key] == group for key, _ in model.named_parameters()) for group in GROUPS}
    for number, phase in enumerate(schedule, start=1):
        if phase.empty:
            continue
        levels = [(f"phase {number}", phase.groups)]
        if phase.update is not None:
            upper = tuple(group for group in phase.groups if group not in phase.update.lower)
            levels += [(f"phase {number}'s lower level", phase.update.lower), (f"phase {number}'s upper level", upper)]
        for what, groups in levels:
            if not any(counts[group] for group in groups):
                owned = ", ".join(f"{group} {count}" for group, count in counts.items())
                raise ValueError(
                    f"{what} trains the groups {tuple(groups)}, which own no parameter of {type(model).__name__} "
                    f"under the partition ({partition}; parameters per group: {owned}); a phase with nothing "
                    f"to train is an error, set its epochs or steps to 0 to skip it")


def train_schedule(
    model: nn.Module,
    partition: ParameterPartition,
    schedule: Sequence[Phase],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    loss_fn: LossHook = cross_entropy,
    precision: Precision = "fp32",
) -> TrainStats:
    """Train ``model`` in place, phase after phase; ``x``/``y`` must be on the model's device.
    A phase of 0 epochs or steps is skipped; a phase (or a bilevel level) whose groups own no
    parameter is a ValueError: it would otherwise train nothing without a word. ``precision``
    applies to the plain step; the bilevel step always runs in float32 (its Hessian-vector products
    are not taken under autocast; the run config refuses bf16 for the PF2LoRA methods)."""
    membership = partition.groups(model)
    _check_phases(schedule, model, partition, membership)
    trainable_before = {key: param.requires_grad for key, param in model.named_parameters()}
    loss_total = torch.zeros((), dtype=torch.float64, device=x.device)
    samples, steps = 0, 0

    def epoch_batches(drop_last: bool) -> Callable[[], Iterator]:
        return lambda: batches(x, y, batch_size, shuffle=True, generator=generator, augment=augment,
                               drop_last=drop_last)

    try:
        for phase in schedule:
            if phase.empty:
                continue
            params = []
            for key, param in model.named_parameters():
                trainable = membership[key] in phase.groups
                param.requires_grad_(trainable)
                if trainable:
                    params.append(param)
            model.train()
            for module in partition.modules_only_in(model, phase.eval_groups):
                module.eval()
            if phase.update is not None:
                lower = {key: param for key, param in model.named_parameters()
                         if param.requires_grad and membership[key] in phase.update.lower}
                upper = {key: param for key, param in model.named_parameters()
                         if param.requires_grad and key not in lower}
                params = list(upper.values())
            by_group = {group: [param for key, param in model.named_parameters()
                                if param.requires_grad and membership[key] == group] for group in phase.groups}
            if phase.optimizer.group_lr:
                own = dict(phase.optimizer.group_lr)
                param_groups = [{"params": by_group[group], **({"lr": own[group]} if group in own else {})}
                                for group in phase.groups if by_group[group]]
                optimizer = phase.optimizer.build(param_groups, lr=lr, momentum=momentum)
            else:
                optimizer = phase.optimizer.build(params, lr=lr, momentum=momentum)
            clipped = [ps for ps in by_group.values() if ps] if phase.clip_per_group else [params]
            for xb, yb in _phase_batches(phase, epoch_batches(phase.drop_last)):
                if phase.update is None:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(x.device, precision):
                        loss = loss_fn(model, xb, yb)
                    loss.backward()
                    if phase.max_grad_norm is not None:
                        for group_params in clipped:
                            torch.nn.utils.clip_grad_norm_(group_params, phase.max_grad_norm)
                    optimizer.step()
                else:
                    loss = bilevel_step(phase.update, model, upper, lower, optimizer, loss_fn, xb, yb)
                loss_total += loss.detach().to(torch.float64)
                samples += len(yb)
                steps += 1
    finally:
        for key, param in model.named_parameters():
            param.requires_grad_(trainable_before[key])
        model.train()
    return TrainStats(loss=loss_total.item() / steps if steps else float("nan"), samples=samples, steps=steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, predict: PredictHook = plain_predict,
    precision: Precision = "fp32",
) -> EvalStats:
    """Accuracy and mean loss of ``predict(model, x)`` in eval mode (BN uses its running statistics);
    the sums stay on the device until the end."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(x.device, precision):
            logits = predict(model, xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").to(torch.float64)
        correct += (logits.argmax(dim=1) == yb).sum()
    total = len(y)
    return EvalStats(loss=loss_sum.item() / total if total else float("nan"), correct=int(correct), total=total)
