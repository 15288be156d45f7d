"""pFedGate's client: a personal gate scales (and, under a budget s < 1, prunes) blocks of the shared
model (:class:`PFedGateClient`; Chen et al., ICML 2023, arXiv 2305.02776; official code yxdyc/pFedGate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from clients.base import MethodClient
from fedlora_flwr.config import MethodParams
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import OptimizerSpec, ParameterPartition, Phase
from fedlora_flwr.requirements import Requirements

GATE = "gate."
#: The official learner maps the clipped scores in [0, 1] to integer knapsack values round(10·g)
#: (``gated_scores_scale_factor``).
SCORE_SCALE = 10


class PFedGateParams(MethodParams):
    pfedgate_budget: float = Field(1.0, gt=0, le=1, description="s: sparsity budget, the fraction of the base "
                                   "model's parameters a client's sparse model may keep (1: no selection)")
    pfedgate_split: int = Field(1, ge=1, description="fine_grained_block_split: each parameter tensor is cut into "
                                "this many blocks, each with its own gate score (the official CIFAR scripts: 5)")
    pfedgate_knapsack: Literal["greedy", "exact"] = Field(
        "greedy", description="block selection for s < 1: greedy (the official learner's found_max_value_greedy: "
        "blocks by value, largest first, each kept if it still fits) or exact (the 0-1 knapsack optimum)")
    pfedgate_lr_gate: float = Field(0.0, ge=0, description="SGD learning rate of the gate pass (lr_gating; the "
                                    "official CIFAR-10 scripts: 0.05); 0: the run's lr")
    pfedgate_lr_model: float = Field(0.0, ge=0, description="SGD learning rate of the base pass (lr_model; the "
                                     "official CIFAR-10 scripts: 0.05); 0: the run's lr")
    pfedgate_weight_decay: float = Field(0.0, ge=0, description="SGD weight decay of gate and base (the official "
                                         "optimizer: 5e-4)")
    pfedgate_schedule: Literal["alternating", "joint"] = Field(
        "alternating", description="alternating: per epoch a gate pass, then a base pass (bi_level_opt 1, the "
        "code's default); joint: one pass updating both from the same loss (bi_level_opt 0, the official CIFAR "
        "scripts)")
    pfedgate_max_grad_norm: float = Field(10.0, gt=0, description="gradient-norm clip of gate and base (each "
                                          "apart in the joint schedule)")

    def check(self, config) -> None:
        s, split = self.pfedgate_budget, self.pfedgate_split
        if s < 1 and split == 1:
            raise ValueError(f"pfedgate-budget={s}: a budget below 1 needs pfedgate-split >= 2 (with split 1 the "
                             "official rule reserves s_min = s for first sub-blocks that do not exist, so the "
                             "knapsack capacity is 0 and every block would be zeroed)")
        if s < 1 and s <= 1 / split:
            raise ValueError(f"pfedgate-budget={s}: must exceed 1/pfedgate-split = 1/{split} (the first block of "
                             "every tensor is always kept, which alone is at least that fraction of the model)")


def min_score(budget: float, split: int) -> float:
    """s_min = min(max(1/split, 0.1), s): the gate scores' lower clip (``GatedLearner.min_sparse_factor``),
    also the share of the budget reserved for the always-kept first block of every tensor."""
    return min(max(1 / split, 0.1), budget)


@dataclass(frozen=True)
class BlockLayout:
    """The gate's blocks over the base model's parameter tensors (``GatingLayer.__init__`` of the
    official ``models/gating_layers.py``).

    With ``split`` = 1 a block is one tensor. Otherwise a tensor of n elements (flattened) is cut into
    k = ceil(n / c) contiguous blocks of c = ceil(n / min(split, n)) elements, the last one holding the
    rest. Blocks are grouped as the code groups them for the selection: those of ``nn.Linear``
    parameters and all others (convolutions, BatchNorm), since linear layers hold most parameters.
    ``selectable``: per group, the blocks the knapsack may drop; with ``split`` > 1 the first block
    of every tensor is always kept ("to avoid cutting info flow"), with ``split`` = 1 every block is
    selectable (the code filters names containing ``sub0``, which only split > 1 creates)."""

    names: tuple[str, ...]  # parameter names, in named_parameters() order
    sizes: torch.Tensor  # int64, elements of each block
    spans: tuple[tuple[int, int, int], ...]  # per tensor: (first block, end block, elements per block)
    first: torch.Tensor  # bool per block: the first block of its tensor (with split > 1)
    selectable: tuple[tuple[int, ...], tuple[int, ...]]  # (linear, other) blocks the knapsack decides

    @classmethod
    def of(cls, base: nn.Module, split: int) -> BlockLayout:
        if split < 1:
            raise ValueError(f"split must be >= 1, got {split}")
        linear_params = {id(p) for module in base.modules() if isinstance(module, nn.Linear)
                         for p in module.parameters(recurse=False)}
        names, sizes, spans, first, groups = [], [], [], [], ([], [])
        for name, param in base.named_parameters():
            n = param.numel()
            each = math.ceil(n / min(split, n))
            count = math.ceil(n / each)
            begin = len(sizes)
            for j in range(count):
                sizes.append(min(each, n - j * each))
                first.append(split > 1 and j == 0)
                if not first[-1]:
                    groups[0 if id(param) in linear_params else 1].append(len(sizes) - 1)
            names.append(name)
            spans.append((begin, len(sizes), each))
        return cls(tuple(names), torch.tensor(sizes, dtype=torch.int64), tuple(spans), torch.tensor(first),
                   (tuple(groups[0]), tuple(groups[1])))

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    def expand(self, gates: torch.Tensor, index: int, shape: torch.Size) -> torch.Tensor:
        """Tensor ``index``'s element-wise mask: each block's gate repeated over its elements."""
        begin, end, _ = self.spans[index]
        return gates[begin:end].repeat_interleave(self.sizes[begin:end].to(gates.device)).view(shape)


def knapsack_greedy(weights: np.ndarray, values: np.ndarray, capacity: int) -> np.ndarray:
    """The official learner's selection (``KnapsackSolver01.found_max_value_greedy``): items by value,
    largest first (ties: lower index first; the code's unstable numpy argsort leaves them open), each
    kept when it still fits. Returns a bool mask; the kept weights sum to at most ``capacity``."""
    keep = np.zeros(len(weights), dtype=bool)
    total = 0
    for i in np.argsort(-values, kind="stable"):
        if total + weights[i] <= capacity:
            total += weights[i]
            keep[i] = True
    return keep


def knapsack_exact(weights: np.ndarray, values: np.ndarray, capacity: int) -> np.ndarray:
    """The 0-1 knapsack optimum (the paper's eq. for the block selection): max Σ v_i over subsets
    with Σ w_i ≤ ``capacity``, by dynamic programming over the integer values (the lightest subset
    reaching each total value), as the official ``KnapsackSolver01.found_max_value`` does. Values
    must be non-negative integers. Time and memory O(n·Σv). Returns a bool mask."""
    values = np.asarray(values, dtype=np.int64)
    if np.any(values < 0):
        raise ValueError("knapsack values must be non-negative integers")
    total = int(values.sum())
    lightest = np.full(total + 1, np.inf)  # lightest[v]: least weight of a subset of value exactly v
    lightest[0] = 0.0
    took = np.zeros((len(weights), total + 1), dtype=bool)
    for i, (w, v) in enumerate(zip(weights, values)):
        candidate = np.full(total + 1, np.inf)
        candidate[v:] = lightest[: total + 1 - v] + float(w)
        took[i] = candidate < lightest
        lightest = np.minimum(lightest, candidate)
    best = int(np.flatnonzero(lightest <= capacity).max())
    keep = np.zeros(len(weights), dtype=bool)
    for i in range(len(weights) - 1, -1, -1):  # walk back: item i was taken at value best iff took[i, best]
        if took[i, best]:
            keep[i] = True
            best -= int(values[i])
    return keep


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
    """The base model with every block scaled by its gate: θ̃_b = g_b·θ_b (``GatedLearner`` of the
    official ``pFedGate/gated_learner.py``, its block-wise path ``block_wise_prune = 1``).

    Scores g = mean over the batch of the gate's sigmoids. With ``budget`` s = 1 the gates are the
    raw scores (the code skips the selection). With s < 1 (:meth:`block_gates`): the scores are
    clipped below at s_min (:func:`min_score`), mapped to integer values round(10·g), and, in each
    group of :class:`BlockLayout`, a knapsack keeps selectable blocks of total size at most
    round(W_group·(s − s_min)) (W_group: the group's selectable elements); the first block of every
    tensor is always kept. A kept block's gate is g_b·(1 − ĝ_b + ĝ_b) with ĝ_b the clipped score
    (value g_b, the straight-through gradient of the code's mask), a dropped block's is 0."""

    def __init__(self, base: nn.Module, image_shape: tuple[int, int, int], budget: float = 1.0, split: int = 1,
                 knapsack: Literal["greedy", "exact"] = "greedy") -> None:
        super().__init__()
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.base = base
        self.budget, self.split, self.knapsack = budget, split, knapsack
        self.layout = BlockLayout.of(base, split)
        self.gate = GateNet(image_shape, num_blocks=self.layout.num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated_forward(x, self.block_gates(x))

    def block_gates(self, x: torch.Tensor) -> torch.Tensor:
        """One gate per block for the batch ``x``: the scores at s = 1, the selected ones below."""
        scores = self.gate(x)
        if self.budget == 1:
            return scores
        clipped = scores.clamp(min=min_score(self.budget, self.split))
        keep = self.select(clipped.detach()).to(scores.device)
        straight_through = 1 - clipped.detach() + clipped
        return scores * straight_through * keep

    @torch.no_grad()
    def select(self, clipped: torch.Tensor) -> torch.Tensor:
        """The kept blocks (bool) for clipped scores: per group, the knapsack of ``knapsack`` over the
        selectable blocks, values round(10·ĝ) (``GatedLearner._select_top_sub_blocks``)."""
        s_min = min_score(self.budget, self.split)
        solve = knapsack_greedy if self.knapsack == "greedy" else knapsack_exact
        values = np.around(clipped.to(torch.float64).cpu().numpy() * SCORE_SCALE).astype(np.int64)
        keep = self.layout.first.clone()
        for group in self.layout.selectable:
            if not group:
                continue
            index = torch.tensor(group)
            weights = self.layout.sizes[index]
            capacity = int(torch.round(weights.sum() * (self.budget - s_min)))  # float32, as the code
            chosen = solve(weights.numpy(), values[list(group)], capacity)
            keep[index[torch.from_numpy(chosen)]] = True
        return keep

    def gated_forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        if self.split == 1:
            scaled = {name: gate * param for gate, (name, param) in zip(gates, self.base.named_parameters())}
        else:
            scaled = {name: param * self.layout.expand(gates, i, param.shape)
                      for i, (name, param) in enumerate(self.base.named_parameters())}
        return functional_call(self.base, scaled, (x,))  # buffers: the base's own (BN stats update in place)


@dataclass(frozen=True)
class SparseCost:
    """What the sparse model of one batch costs against the dense base (the paper's FLOPs and model
    size). ``params``: parameter elements in non-zero blocks; ``bytes``: those at the parameters'
    element size (values only, no index); ``flops``: 2 × the multiply-accumulates of the conv and
    linear weights per sample (a zero weight's are skipped; biases, BatchNorm and activations are not
    counted). ``dense_*``: the same for the whole base model."""

    params: int
    dense_params: int
    bytes: int
    dense_bytes: int
    flops: int
    dense_flops: int

    @property
    def param_ratio(self) -> float:
        return self.params / self.dense_params

    @property
    def flop_ratio(self) -> float:
        return self.flops / self.dense_flops


@torch.no_grad()
def sparse_cost(model: GatedModel, x: torch.Tensor) -> SparseCost:
    """The cost of the sparse model ``model`` uses for the batch ``x`` (eval mode, as at test time)."""
    was_training = model.training
    model.eval()
    try:
        gates = model.block_gates(x)
        uses: dict[int, int] = {}  # id(weight) -> times each weight element is used per sample

        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            per_sample = output[0].numel() // module.weight.shape[0] if isinstance(module, nn.Conv2d) else 1
            uses[id(module.weight)] = per_sample

        hooks = [m.register_forward_hook(record) for m in model.base.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            model.base(x[:1])
        finally:
            for hook in hooks:
                hook.remove()
    finally:
        model.train(was_training)
    params = dense_params = bytes_ = dense_bytes = macs = dense_macs = 0
    for i, param in enumerate(model.base.parameters()):
        kept = int((model.layout.expand(gates, i, param.shape) != 0).sum())
        params, dense_params = params + kept, dense_params + param.numel()
        bytes_, dense_bytes = bytes_ + kept * param.element_size(), dense_bytes + param.numel() * param.element_size()
        if id(param) in uses:
            macs, dense_macs = macs + kept * uses[id(param)], dense_macs + param.numel() * uses[id(param)]
    return SparseCost(params, dense_params, bytes_, dense_bytes, 2 * macs, 2 * dense_macs)


def is_gate(key: str, _module: nn.Module) -> bool:
    return key.startswith(GATE)


class PFedGateClient(MethodClient):
    """pFedGate: "Efficient Personalized Federated Learning via Sparse Model-Adaptation" (Chen et al.,
    ICML 2023, arXiv 2305.02776; official code yxdyc/pFedGate, ``pFedGate/gated_learner.py``,
    ``models/gating_layers.py``, ``models/knapsack_solver.py``).

    - shared: the base model θ, every tensor (BatchNorm statistics included);
    - personal: the gating network (``gate``): SwitchNorm2d on the input image → flatten → Linear
      to one score per block → BatchNorm1d → sigmoid → mean over the batch; nothing frozen.

    Blocks (:class:`BlockLayout`): the base's parameter tensors, each cut into ``pfedgate-split``
    blocks. The forward uses θ̃_b = g_b(x)·θ_b, so the effective weights depend on the batch. With a
    budget s < 1 (:class:`GatedModel`), scores are clipped at s_min = min(max(1/split, 0.1), s) and a
    knapsack per group (linear / other) keeps blocks of at most round(W·(s − s_min)) elements beside
    the always-kept first block of each tensor; the others are zeroed, so the sparse model keeps
    about s of the parameters or less (the first blocks exceed 1/split only by the rounding up of
    small tensors; :func:`sparse_cost` also counts the conv/linear FLOPs). Training
    minimises the cross-entropy of the gated forward with SGD (momentum: the run's; lr:
    ``pfedgate-lr-gate`` / ``pfedgate-lr-model``, 0 = the run's lr; ``pfedgate-weight-decay``),
    gradient norms clipped at ``pfedgate-max-grad-norm``. ``pfedgate-schedule = "alternating"``
    (the code's default ``bi_level_opt = 1``): each of the E = ``local-epochs`` epochs is two
    passes, each with a fresh optimizer: the gate with the base frozen and in eval mode, then the
    base with the gate frozen and in eval mode. ``"joint"`` (``bi_level_opt = 0``, the official
    CIFAR scripts): E epochs in which every step updates gate and base from the same loss, both in
    train mode, each with its own lr and its own gradient clip. Like the official CIFAR loaders
    (``drop_last`` when the data holds more than one batch), each epoch leaves out its last partial
    mini-batch: the gate's BatchNorm1d cannot train on a batch of one sample. The client uploads θ. Server
    (:class:`strategies.fedavg.FedAvgStrategy`): the sample-weighted mean of the participants' θ (the
    official aggregator averages all clients, the absent ones holding the last global they
    received). Evaluation: the gated (and, for s < 1, pruned) forward. For s < 1 each train reply
    carries the sparse model's cost (:meth:`train_metrics`; ``method_metrics`` in ``metrics.jsonl``).

    Official CIFAR-10 settings (``scripts/README.md``; the authors warn that pFedGate is sensitive to
    the two learning rates): split 5, batch 128, SGD lr_gating = lr_model = 0.05 for s ∈ {1, 0.5}
    (0.03 / 1.5 for s = 0.3), momentum 0.9, weight decay 5e-4, ``block_wise_prune = 1``,
    ``bi_level_opt = 0``, a multi-step lr schedule, 400 rounds
    (``experiments/grids/pfedgate-budgets-cpu.toml`` sets all but the schedule and the rounds).

    Deviations from the official code: no lr schedule (the run's constant lr; the CIFAR scripts use
    a multi-step one); optimizers restart every round (and every pass in the alternating
    schedule), where the code keeps its two for the whole run; the greedy selection breaks value
    ties by block order; only the block-wise path (``block_wise_prune = 1``): the code's other path also zeroes a (1 − g_b) tail
    of each tensor, even at s = 1; s < 1 requires split ≥ 2 and s > 1/split (with split 1 the code's
    capacity round(W·(s − s_min)) is 0 and every block is dropped); ``pfedgate-knapsack = "exact"``
    (ours) solves the 0-1 knapsack the paper states exactly, where the code's learner is greedy.
    With split 1 and s = 1 this is the code's pure per-tensor scaling by the raw scores.

    Parameters
    ----------
    pfedgate-budget : float, default 1.0
        s: the fraction of the base model's parameters the sparse model may keep.
    pfedgate-split : int, default 1
        fine_grained_block_split: blocks per parameter tensor (official CIFAR scripts: 5).
    pfedgate-knapsack : {"greedy", "exact"}, default "greedy"
        Block selection for s < 1: the official greedy, or the exact 0-1 knapsack.
    pfedgate-lr-gate, pfedgate-lr-model : float, default 0.0
        SGD learning rates of the gate and of the base (lr_gating, lr_model); 0: the run's lr.
    pfedgate-weight-decay : float, default 0.0
        SGD weight decay of both (the official optimizer's 5e-4).
    pfedgate-schedule : {"alternating", "joint"}, default "alternating"
        bi_level_opt 1 (gate pass, then base pass, per epoch) or 0 (one joint step per batch).
    pfedgate-max-grad-norm : float, default 10.0
        Gradient-norm clip of gate and of base (the official code's 10).
    """

    params = PFedGateParams
    #: The gate reads the input image (SwitchNorm2d over its channels).
    requires = Requirements(modalities=("image",), pretrained="never")
    partition = ParameterPartition(personal=is_gate)

    def build_model(self, task: TaskSpec, partition_id: int) -> nn.Module:
        p = self.params
        return GatedModel(super().build_model(task, partition_id), task.image_shape, budget=p.pfedgate_budget,
                          split=p.pfedgate_split, knapsack=p.pfedgate_knapsack)

    def schedule(self) -> list[Phase]:
        p = self.params
        clip, decay = p.pfedgate_max_grad_norm, p.pfedgate_weight_decay
        gate_lr, model_lr = p.pfedgate_lr_gate, p.pfedgate_lr_model
        if p.pfedgate_schedule == "joint":  # gated_client.step with bi_level_opt 0: fit_epoch trains both
            own = tuple((group, value) for group, value in (("personal", gate_lr), ("shared", model_lr)) if value)
            return [Phase(groups=("shared", "personal"), epochs=self.config.local_epochs, max_grad_norm=clip,
                          clip_per_group=True, drop_last=True,
                          optimizer=OptimizerSpec(weight_decay=decay, group_lr=own))]
        gate_pass = Phase(groups=("personal",), epochs=1, max_grad_norm=clip, eval_groups=("shared", "frozen"),
                          drop_last=True, optimizer=OptimizerSpec(lr=gate_lr or None, weight_decay=decay))
        base_pass = Phase(groups=("shared",), epochs=1, max_grad_norm=clip, eval_groups=("personal", "frozen"),
                          drop_last=True, optimizer=OptimizerSpec(lr=model_lr or None, weight_decay=decay))
        return [gate_pass, base_pass] * self.config.local_epochs

    def train_metrics(self, session) -> dict[str, float]:
        """For s < 1, the cost of the sparse model after training (:func:`sparse_cost`) on the client's
        first ``batch-size`` training samples, in eval mode as at test time: kept parameters, their
        bytes and FLOPs per sample, and their fractions of the dense base (the round's row holds the
        mean over the participants). At s = 1 nothing is pruned and nothing is sent."""
        if self.params.pfedgate_budget == 1:
            return {}
        x, _ = session.tensors(train=True)
        cost = sparse_cost(session.model, x[: self.config.batch_size])
        return {"pfedgate-params": cost.params, "pfedgate-bytes": cost.bytes, "pfedgate-flops": cost.flops,
                "pfedgate-param-ratio": cost.param_ratio, "pfedgate-flop-ratio": cost.flop_ratio}
