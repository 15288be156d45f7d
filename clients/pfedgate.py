"""pFedGate's client: a personal gate scales the shared model's tensors (:class:`PFedGateClient`)."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.requirements import Requirements

GATE = "gate."


class PFedGateParams(MethodParams):
    pfedgate_budget: float = Field(1.0, gt=0, le=1, description="s: sparsity budget (only 1: the minimal version)")
    pfedgate_max_grad_norm: float = Field(10.0, gt=0, description="gradient-norm clip of both passes")

    @field_validator("pfedgate_budget")
    @classmethod
    def _full_budget_only(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("only budget 1 is implemented (pFedGate's minimal version)")
        return value


class SwitchNorm2d(nn.Module):
    """Switchable Normalization (Luo et al., 2019): mean and variance are softmax-weighted mixes of
    the instance-, layer- and batch-norm statistics; running batch statistics for eval, updated
    as PyTorch's BatchNorm does (momentum 0.1, variance starting at 1). The reference SN keeps
    0.997 of the old value from zero-initialised statistics, which after the few hundred steps
    of a federated client leaves the eval-mode variance near 0 and the gate's scores saturated."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in, var_in = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in**2).mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + mean_in**2).mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn, self.momentum)
                self.running_var.lerp_(var_bn, self.momentum)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mean_w, var_w = self.mean_weight.softmax(0), self.var_weight.softmax(0)
        mean = mean_w[0] * mean_in + mean_w[1] * mean_ln + mean_w[2] * mean_bn
        var = var_w[0] * var_in + var_w[1] * var_ln + var_w[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


class GateNet(nn.Module):
    """One score in (0, 1) per block, averaged over the batch (pFedGate's ``gating_layers``)."""

    def __init__(self, image_shape: tuple[int, int, int], num_blocks: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.norm = SwitchNorm2d(channels)
        self.linear = nn.Linear(channels * height * width, num_blocks)
        self.bn = nn.BatchNorm1d(num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.bn(self.linear(torch.flatten(self.norm(x), 1))))
        return scores.mean(dim=0)


class GatedModel(nn.Module):
    """The base model with every parameter tensor scaled by its gate: θ̃_b = g_b·θ_b."""

    def __init__(self, base: nn.Module, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.base = base
        self.gate = GateNet(image_shape, num_blocks=len(list(base.parameters())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated_forward(x, self.gate(x))

    def gated_forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        scaled = {name: gate * param for gate, (name, param) in zip(gates, self.base.named_parameters())}
        return functional_call(self.base, scaled, (x,))  # buffers: the base's own (BN stats update in place)


def is_gate(key: str, _module: nn.Module) -> bool:
    return key.startswith(GATE)


class PFedGateClient(MethodClient):
    """pFedGate, minimal faithful version: "Efficient Personalized Federated Learning via Sparse
    Model-Adaptation" (Chen et al., ICML 2023, arXiv 2305.02776; official code yxdyc/pFedGate).

    - shared: the base model θ, every tensor (BatchNorm statistics included);
    - personal: the gating network (``gate``): SwitchNorm2d on the input image → flatten → Linear
      to one score per block → BatchNorm1d → sigmoid → mean over the batch; nothing frozen.

    A block is one parameter tensor θ_b of the base; the forward uses θ̃_b = g_b(x)·θ_b, so the
    effective weights depend on the batch. Each of the E = ``local-epochs`` epochs is two passes
    (the code's bi-level mode), each with a fresh SGD optimizer (the run's ``lr``/``momentum``) on
    the cross-entropy of the gated forward, gradient norms clipped at ``pfedgate-max-grad-norm``:
    the gate with the base frozen and in eval mode, then the base with the gate frozen and in eval
    mode. Like the official CIFAR loaders (``drop_last`` when the data holds more than one batch),
    each epoch leaves out its last partial mini-batch: the gate's BatchNorm1d cannot train on a
    batch of one sample. The client uploads θ. Server (:class:`strategies.fedavg.FedAvgStrategy`): the
    sample-weighted mean of the participants' θ (the official aggregator averages all clients,
    the absent ones holding the last global they received). Evaluation: the gated forward.

    Left out: sparsity budgets s < 1 (the knapsack block selection and score clipping) and
    ``fine_grained_block_split`` > 1. With split 1 and s = 1 the official code skips the knapsack
    and uses the raw scores, which is what this implements (the block-wise, pure-scaling path;
    the code's non-block-wise path would also zero a (1 − g_b) tail of each tensor even at s = 1).

    Parameters
    ----------
    pfedgate-budget : float, default 1.0
        s: sparsity budget; only 1 is accepted (the minimal version).
    pfedgate-max-grad-norm : float, default 10.0
        Gradient-norm clip of both passes (the official code's 10).
    """

    params = PFedGateParams
    #: The gate reads the input image (SwitchNorm2d over its channels).
    requires = Requirements(modalities=("image",), pretrained="never")
    partition = ParameterPartition(personal=is_gate)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        return GatedModel(super().build_model(task, partition_id), task.image_shape)

    def schedule(self) -> list[Phase]:
        clip = self.params.pfedgate_max_grad_norm
        gate_pass = Phase(groups=("personal",), epochs=1, max_grad_norm=clip, eval_groups=("shared", "frozen"),
                          drop_last=True)
        base_pass = Phase(groups=("shared",), epochs=1, max_grad_norm=clip, eval_groups=("personal", "frozen"),
                          drop_last=True)
        return [gate_pass, base_pass] * self.config.local_epochs
