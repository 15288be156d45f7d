"""pFedGate's mechanisms (clients/pfedgate.py; Chen et al., ICML 2023, arXiv 2305.02776; official code
yxdyc/pFedGate) on the code path the runs use: block layout with fine-grained splits, score clipping,
the knapsack block selection against a brute force, the budget on real models, the sparse model's
FLOPs and bytes, s = 1 / split 1 against the minimal per-tensor scaling, and an in-process run at s = 0.5."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_baselines import _config, _train_uploads
from test_federation import _metrics, _run
from torch import nn
from torch.func import functional_call

from clients.pfedgate import (
    BlockLayout,
    GatedModel,
    PFedGateClient,
    knapsack_exact,
    knapsack_greedy,
    min_score,
    sparse_cost,
)
from fedlora_flwr.config import ConfigError
from fedlora_flwr.groups import OptimizerSpec, Phase
from fedlora_flwr.models import build_model
from fedlora_flwr.training import train_schedule

IMAGE = (3, 32, 32)


def _gated(model: str = "cnn", budget: float = 1.0, split: int = 1, knapsack: str = "greedy", seed: int = 0):
    torch.manual_seed(seed)
    return GatedModel(build_model(model, 10), IMAGE, budget=budget, split=split, knapsack=knapsack)


def _brute_force(weights, values, capacity) -> int:
    """The best total value of any subset within the capacity, by enumerating all subsets."""
    best = 0
    for picks in itertools.product((False, True), repeat=len(weights)):
        chosen = np.array(picks, dtype=bool)
        if weights[chosen].sum() <= capacity:
            best = max(best, int(values[chosen].sum()))
    return best


# --------------------------------------------------------------------------- knapsack


@pytest.mark.parametrize("seed", range(40))
def test_exact_knapsack_reaches_the_brute_force_optimum_within_the_capacity(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    weights = rng.integers(1, 50, n)
    values = rng.integers(0, 11, n)
    capacity = int(rng.integers(0, weights.sum() + 1))
    keep = knapsack_exact(weights, values, capacity)
    assert weights[keep].sum() <= capacity
    assert values[keep].sum() == _brute_force(weights, values, capacity)
    greedy = knapsack_greedy(weights, values, capacity)
    assert weights[greedy].sum() <= capacity
    assert values[greedy].sum() <= values[keep].sum()


def test_greedy_knapsack_is_the_official_rule_and_can_miss_the_optimum():
    """found_max_value_greedy: by value, largest first, kept when it fits: it takes the 5-element
    block of value 6 and then nothing fits; the optimum takes the two 4-element blocks (value 10)."""
    weights, values = np.array([5, 4, 4]), np.array([6, 5, 5])
    assert knapsack_greedy(weights, values, 8).tolist() == [True, False, False]
    assert knapsack_exact(weights, values, 8).tolist() == [False, True, True]
    # a block that does not fit is skipped, a later smaller one still taken
    assert knapsack_greedy(np.array([3, 9, 2]), np.array([7, 6, 1]), 6).tolist() == [True, False, True]


# --------------------------------------------------------------------------- blocks and clipping


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Parameter(torch.randn(5, 5))  # 25 elements: the official comment's example
        self.tiny = nn.Parameter(torch.randn(3))  # fewer elements than the split
        self.fc = nn.Linear(4, 2)  # 8 + 2 elements, the linear group


def test_fine_grained_split_cuts_each_tensor_into_contiguous_blocks_as_the_official_layer():
    layout = BlockLayout.of(_Toy(), split=10)
    # odd: ceil(25/10) = 3 per block → 9 blocks, the last one 1; tiny: 3 blocks of 1; fc.weight: 8 of 1; fc.bias: 2 of 1
    assert layout.sizes.tolist() == [3] * 8 + [1] + [1] * 3 + [1] * 8 + [1] * 2
    assert layout.spans == ((0, 9, 3), (9, 12, 1), (12, 20, 1), (20, 22, 1))
    assert layout.first.nonzero().flatten().tolist() == [0, 9, 12, 20]
    linear, other = layout.selectable
    assert linear == tuple(range(13, 20)) + (21,)
    assert other == tuple(range(1, 9)) + (10, 11)
    gates = torch.arange(layout.num_blocks, dtype=torch.float32)
    mask = layout.expand(gates, 0, torch.Size([5, 5])).flatten()
    assert mask.tolist() == [float(b) for b in range(8) for _ in range(3)] + [8.0]


def test_split_one_is_one_block_per_tensor_all_of_them_selectable():
    layout = BlockLayout.of(_Toy(), split=1)
    assert layout.sizes.tolist() == [25, 3, 8, 2] and not layout.first.any()
    assert layout.selectable == ((2, 3), (0, 1))


@pytest.mark.parametrize(("budget", "split", "expected"),
                         [(0.5, 5, 0.2), (0.5, 20, 0.1), (0.3, 2, 0.3), (1.0, 1, 1.0), (1.0, 5, 0.2)])
def test_score_floor_is_the_official_min_sparse_factor(budget, split, expected):
    assert min_score(budget, split) == pytest.approx(expected)


def test_selection_ranks_clipped_scores_and_kept_gates_carry_the_raw_score(monkeypatch):
    model = _gated(budget=0.5, split=5)
    raw = torch.linspace(0.01, 0.99, model.layout.num_blocks, requires_grad=True)
    monkeypatch.setattr(model.gate, "forward", lambda x: raw)
    seen = {}
    select = model.select

    def spy(clipped):
        seen["clipped"] = clipped.clone()
        return select(clipped)

    monkeypatch.setattr(model, "select", spy)
    gates = model.block_gates(torch.zeros(2, *IMAGE))
    assert torch.equal(seen["clipped"], raw.detach().clamp(min=0.2))  # s_min = min(max(1/5, 0.1), 0.5)
    keep = gates != 0
    assert keep[model.layout.first].all()  # the first block of every tensor stays
    assert torch.allclose(gates[keep], raw.detach()[keep]) and not (gates[~keep]).any()
    gates.sum().backward()
    # straight-through: d/dg [g·(1 − ĝ.detach() + ĝ)] = 1 + g where g ≥ s_min, 1 below the floor; 0 if dropped
    expected = torch.where(raw.detach() >= 0.2, 1 + raw.detach(), torch.ones_like(raw)) * keep
    assert torch.allclose(raw.grad, expected)


# --------------------------------------------------------------------------- the budget on real models


@pytest.mark.parametrize("knapsack", ["greedy", "exact"])
@pytest.mark.parametrize(("model_name", "budget", "split"),
                         [("cnn", 0.5, 5), ("cnn", 0.3, 5), ("cnn", 0.7, 10), ("resnet8", 0.5, 5)])
def test_selected_blocks_meet_the_budget(model_name, budget, split, knapsack):
    model = _gated(model_name, budget, split, knapsack)
    model.eval()
    with torch.no_grad():
        gates = model.block_gates(torch.randn(8, *IMAGE))
    keep = gates != 0
    sizes, s_min = model.layout.sizes, min_score(budget, split)
    for group in model.layout.selectable:
        index = torch.tensor(group)
        capacity = round(float(sizes[index].sum()) * (budget - s_min))
        assert sizes[index][keep[index]].sum() <= capacity + 1  # float32 rounding of the capacity, as the code
        assert sizes[index][keep[index]].sum() > 0
    assert float(sizes[keep].sum()) / float(sizes.sum()) <= budget
    if knapsack == "exact":  # per group, no subset within the capacity has a larger value
        values = np.around(gates.detach().clamp(min=s_min).double().numpy() * 10)
        for group in model.layout.selectable:
            g = list(group)
            chosen = keep[g].numpy()
            capacity = int(torch.round(sizes[g].sum() * (budget - s_min)))
            best = values[g][knapsack_exact(sizes[g].numpy(), values[g].astype(np.int64), capacity)].sum()
            assert values[g][chosen].sum() == best


def test_sparse_models_flops_and_bytes_follow_the_budget():
    x = torch.randn(8, *IMAGE)
    costs = {s: sparse_cost(_gated("resnet8", s, 5), x) for s in (1.0, 0.7, 0.5, 0.3)}
    dense = costs[1.0]
    assert (dense.params, dense.flops) == (dense.dense_params, dense.dense_flops)
    assert dense.dense_bytes == 4 * dense.dense_params
    for s in (0.7, 0.5, 0.3):
        cost = costs[s]
        assert cost.param_ratio <= s and cost.bytes == 4 * cost.params
        assert cost.flop_ratio < 1
    ratios = [(costs[s].param_ratio, costs[s].flop_ratio) for s in (1.0, 0.7, 0.5, 0.3)]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in itertools.pairwise(ratios))


def test_dense_flops_count_every_conv_and_linear_multiply_accumulate():
    cost = sparse_cost(_gated("cnn"), torch.randn(2, *IMAGE))
    # conv1 3→32 at 32², conv2 32→64 at 16², conv3 64→128 at 8², fc 128→10 (3×3 kernels)
    macs = 32 * 3 * 9 * 32 * 32 + 64 * 32 * 9 * 16 * 16 + 128 * 64 * 9 * 8 * 8 + 128 * 10
    assert cost.dense_flops == 2 * macs


# --------------------------------------------------------------------------- s = 1, split 1: the minimal version


def test_full_budget_split_one_is_the_minimal_per_tensor_scaling():
    model = _gated("cnn", 1.0, 1)
    x = torch.randn(6, *IMAGE)
    model.eval()
    with torch.no_grad():
        scores = model.gate(x)
        minimal = functional_call(model.base, {n: g * p for g, (n, p) in zip(scores, model.base.named_parameters())}, (x,))
        assert torch.equal(model.block_gates(x), scores)
        assert torch.equal(model(x), minimal)


def test_split_blocks_with_equal_gates_give_the_per_tensor_model():
    one, five = _gated("cnn", 1.0, 1), _gated("cnn", 1.0, 5)
    five.base.load_state_dict(one.base.state_dict())
    per_tensor = torch.rand(one.layout.num_blocks)
    per_block = torch.cat([per_tensor[i].repeat(end - begin) for i, (begin, end, _) in enumerate(five.layout.spans)])
    x = torch.randn(4, *IMAGE)
    one.eval(), five.eval()
    with torch.no_grad():
        assert torch.allclose(one.gated_forward(x, per_tensor), five.gated_forward(x, per_block), atol=1e-6)


# --------------------------------------------------------------------------- config and a run


@pytest.mark.parametrize(("budget", "split"), [(0.5, 1), (0.2, 5), (0.1, 10)])
def test_budgets_the_official_rule_cannot_meet_are_refused(tmp_path, budget, split):
    with pytest.raises(ConfigError, match="pfedgate-budget"):
        _config(tmp_path, method="pfedgate", **{"pfedgate-budget": budget, "pfedgate-split": split})


def test_full_budget_run_rows_carry_no_method_metrics(tmp_path):
    run_dir, _, _ = _run(tmp_path, "gate-full", method="pfedgate", pfedgate_split=5)
    assert all("method_metrics" not in m for m in _metrics(run_dir))


def test_gate_and_model_learning_rates_reach_their_passes(tmp_path):
    config = _config(tmp_path, method="pfedgate", **{"pfedgate-lr-gate": 0.05, "pfedgate-lr-model": 1.5})
    gate_pass, base_pass = PFedGateClient(config).schedule()[:2]
    assert (gate_pass.optimizer.lr, base_pass.optimizer.lr) == (0.05, 1.5)
    default = PFedGateClient(_config(tmp_path, method="pfedgate")).schedule()[0]
    assert default.optimizer.lr is None  # the run's lr


def test_joint_schedule_is_one_phase_training_both_with_their_own_lrs_and_clips(tmp_path):
    config = _config(tmp_path, method="pfedgate", **{"pfedgate-schedule": "joint", "pfedgate-lr-gate": 0.05,
                                                      "pfedgate-lr-model": 1.5, "pfedgate-weight-decay": 5e-4,
                                                      "local-epochs": 3})
    (phase,) = PFedGateClient(config).schedule()
    assert phase.groups == ("shared", "personal") and phase.epochs == 3 and phase.eval_groups == ("frozen",)
    assert phase.clip_per_group and phase.max_grad_norm == 10.0 and phase.drop_last
    assert phase.optimizer.group_lr == (("personal", 0.05), ("shared", 1.5)) and phase.optimizer.weight_decay == 5e-4


def _one_step(model, phase):
    client_partition = PFedGateClient.partition
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    x, y = torch.randn(8, *IMAGE), torch.randint(0, 10, (8,))
    train_schedule(model, client_partition, [phase], x, y, batch_size=8, lr=1.0, momentum=0.0,
                   generator=torch.Generator().manual_seed(0))
    delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}

    def norm(prefix: str) -> float:
        return float(torch.sqrt(sum((d**2).sum() for k, d in delta.items() if k.startswith(prefix))))

    return norm("gate."), norm("base.")


def test_per_group_clip_bounds_gate_and_base_steps_apart():
    """One SGD step at lr 1 without momentum moves each group by its clipped gradient: with
    clip_per_group both move by exactly the clip norm; with one clip over all, by 0.001 together."""
    spec = OptimizerSpec(lr=1.0, momentum=0.0)
    apart = _one_step(_gated(budget=0.5, split=5), Phase(groups=("shared", "personal"), steps=1, max_grad_norm=1e-3,
                                                        clip_per_group=True, optimizer=spec))
    assert apart == pytest.approx((1e-3, 1e-3), rel=1e-3)
    together = _one_step(_gated(budget=0.5, split=5), Phase(groups=("shared", "personal"), steps=1,
                                                           max_grad_norm=1e-3, optimizer=spec))
    assert np.hypot(*together) == pytest.approx(1e-3, rel=1e-3)


def test_group_learning_rates_reach_their_parameters():
    phase = Phase(groups=("shared", "personal"), steps=1, optimizer=OptimizerSpec(momentum=0.0, group_lr=(("personal", 0.0),)))
    gate_step, base_step = _one_step(_gated(budget=0.5, split=5), phase)
    assert gate_step == 0 and base_step > 0
    with pytest.raises(ValueError, match="group_lr"):
        Phase(groups=("shared",), epochs=1, optimizer=OptimizerSpec(group_lr=(("personal", 0.1),)))


def test_half_budget_run_trains_and_evaluates_the_sparse_model_to_the_end(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "gate-half", method="pfedgate", pfedgate_budget=0.5, pfedgate_split=5)
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train_loss"]) and m["num_failures"] == 0 for m in metrics)
    assert all(0 <= acc <= 1 for m in metrics for acc in m["acc_per_client"].values())
    for m in metrics:  # the sparse model's cost, the mean over the participants (sparse_cost)
        cost = m["method_metrics"]
        assert 0 < cost["pfedgate-param-ratio"] <= 0.5 and 0 < cost["pfedgate-flop-ratio"] < 1
        assert cost["pfedgate-bytes"] == pytest.approx(4 * cost["pfedgate-params"])
    for upload in _train_uploads(grid, 2).values():
        assert upload and all(key.startswith("base.") for key in upload)
    assert (run_dir / "summary.json").is_file()
