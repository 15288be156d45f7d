"""PF2LoRA's bilevel local step (arXiv 2503.03920) as a declared update rule of a phase.

Upper level x (the common adapter, plus whatever else the phase trains besides y), lower level y
(the client adapter). One step on a mini-batch ξ, the same ξ for every gradient of the step (our
choice; the paper's analysis allows independent ones):

    g_y = ∇_y f(x, y),  y⁺ = y − α g_y                               (lower level, plain SGD)
    h   = ∇_x f(x, y⁺) − α ∇²_xy f(x, y) ∇_y f(x, y⁺)                (hypergradient, one unrolled step)
    x  ← upper optimizer step with gradient h (SGD: x − β h),  y ← y⁺

``h`` is exactly d/dx f(x, y − α∇_y f(x, y)): the authors' hypergradient estimate is one-step
unrolled differentiation. The mixed second-derivative term is a Hessian-vector product by double
backward (:func:`hessian_vector_product`); no Hessian is formed. ``hypergradient=False`` is the
paper's "simultaneous" ablation (App. F.2): x and y take plain gradient steps from the same point,
∇_x f(x, y) and ∇_y f(x, y).

Pitfalls handled here: gradients come from ``torch.autograd.grad`` (no ``.grad``
accumulation across terms); the step runs with autocast disabled and with the math backend of
scaled-dot-product attention (the fused flash / memory-efficient kernels have no double backward);
parameters must be float32 or float64. Not detectable here, so the model must not use gradient
checkpointing, and a Hugging Face model must not be loaded with ``attn_implementation`` set to a
fused kernel other than "sdpa"/"eager" (e.g. "flash_attention_2").

BatchNorm running statistics move once per step, in the forward at (x, y) (as in one plain step);
the forward at (x, y⁺) runs on copies of the buffers whose updates are discarded. Dropout (a
pretrained text encoder trains in train mode, e.g. MiniLM's hidden/attention dropout 0.1) is part
of the sample ξ: every forward of a step starts from the same RNG state, so f(x, y) and f(x, y⁺)
draw the same masks and h is exactly d/dx f(x, y − α∇_y f(x, y)) for that ξ; the RNG then stands
where one forward leaves it (the next step draws new masks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedlora_flwr.groups import BilevelUpdate

Tensors = dict[str, torch.Tensor]
Objective = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
"""``f(x, y)``: the mini-batch loss with the named upper- and lower-level tensors substituted."""


@dataclass(frozen=True)
class Hypergradient:
    h: Tensors  # the upper-level gradient, per name of x
    y_plus: Tensors  # y − α ∇_y f(x, y), detached
    loss: torch.Tensor  # f(x, y⁺), detached (the simultaneous rule reports f(x, y))


def hessian_vector_product(
    g_y: Sequence[torch.Tensor], x: Sequence[torch.Tensor], v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """∇²_xy f · v = ∇_x ⟨∇_y f, v⟩ by double backward; ``g_y`` = ∇_y f(x, y) built with
    ``create_graph=True``, ``v`` a constant. Tensors of x that ∇_y f does not depend on get zeros."""
    return list(torch.autograd.grad(g_y, list(x), grad_outputs=list(v), allow_unused=True, materialize_grads=True))


def hypergradient(f: Objective, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], alpha: float) -> Hypergradient:
    """h = ∇_x f(x, y⁺) − α ∇²_xy f(x, y) ∇_y f(x, y⁺) with y⁺ = y − α ∇_y f(x, y) (PF2LoRA's hypergradient estimate).

    ``x``/``y``: leaf tensors with ``requires_grad`` (the live parameters); ``f`` evaluates the loss
    at other values of y too (:func:`batch_objective`)."""
    x_names, y_names = list(x), list(y)
    x_leaves = [x[name] for name in x_names]
    g_y = torch.autograd.grad(f(x, y), [y[name] for name in y_names], create_graph=True)
    y_plus = {name: (y[name] - alpha * g).detach().requires_grad_(True) for name, g in zip(y_names, g_y)}
    loss = f(x, y_plus)
    grads = torch.autograd.grad(loss, x_leaves + [y_plus[name] for name in y_names], allow_unused=True,
                                materialize_grads=True)
    g_x, v = grads[: len(x_names)], grads[len(x_names) :]
    hvp = hessian_vector_product(g_y, x_leaves, v)
    h = {name: gx - alpha * term for name, gx, term in zip(x_names, g_x, hvp)}
    return Hypergradient(h=h, y_plus={name: t.detach() for name, t in y_plus.items()}, loss=loss.detach())


def simultaneous_gradient(f: Objective, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], alpha: float) -> Hypergradient:
    """The "simultaneous" ablation: h = ∇_x f(x, y) and y⁺ = y − α ∇_y f(x, y), both at (x, y)."""
    x_names, y_names = list(x), list(y)
    loss = f(x, y)
    grads = torch.autograd.grad(loss, [x[n] for n in x_names] + [y[n] for n in y_names], allow_unused=True,
                                materialize_grads=True)
    h = dict(zip(x_names, grads[: len(x_names)]))
    y_plus = {name: (y[name] - alpha * g).detach() for name, g in zip(y_names, grads[len(x_names) :])}
    return Hypergradient(h=h, y_plus=y_plus, loss=loss.detach())


class _BatchLoss(nn.Module):
    """The loss hook as a module, so that ``functional_call`` can substitute the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, xb, yb)


def batch_objective(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    live: Mapping[str, torch.Tensor],
) -> Objective:
    """f(x, y) = ``loss_fn(model, xb, yb)`` with the named tensors substituted. When the substitutes
    are the ``live`` parameters themselves the model runs as is (its buffers update); otherwise it
    runs on copies of its buffers (BatchNorm statistics move once per step). Every call starts from
    the RNG state at creation: the same dropout masks in every forward."""
    wrapper = _BatchLoss(model, loss_fn)
    cuda = xb.device.type == "cuda"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(xb.device) if cuda else None

    def f(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], xb.device)
        substitutes = {**x, **y}
        if all(substitutes[name] is live[name] for name in substitutes):
            return wrapper(xb, yb)
        buffers = {f"model.{name}": buf.clone() for name, buf in model.named_buffers()}
        params = {f"model.{name}": tensor for name, tensor in substitutes.items()}
        return functional_call(wrapper, {**buffers, **params}, (xb, yb))

    return f


def bilevel_step(
    update: BilevelUpdate,
    model: nn.Module,
    upper: Mapping[str, nn.Parameter],
    lower: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
) -> torch.Tensor:
    """One local step of :class:`BilevelUpdate` in place: y ← y⁺, x ← ``optimizer`` step on h.
    Returns the step's loss (f(x, y⁺); f(x, y) for the simultaneous rule)."""
    for param in (*upper.values(), *lower.values()):
        if param.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the bilevel step needs float32/float64 parameters, got {param.dtype}")
    rule = hypergradient if update.hypergradient else simultaneous_gradient
    f = batch_objective(model, loss_fn, xb, yb, {**upper, **lower})
    with torch.autocast(xb.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        result = rule(f, upper, lower, update.lr_lower)
    with torch.no_grad():
        for name, param in lower.items():
            param.copy_(result.y_plus[name])
    for name, param in upper.items():
        param.grad = result.h[name]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result.loss
