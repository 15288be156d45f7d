"""PF2LoRA (arXiv 2503.03920): the bilevel step against central finite differences in float64 on the production
functions, the Phase update rule in the one training loop, the two-level PEFT adapters, and the
methods end to end in process (shared (B, A), distinct (C_k, D_k)); lora-ft's fine-tuned copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from test_federation import _arrays, _eval_type, _identical, _metrics, _run, _state, _train_type

from clients.pf2lora import PF2LoRAClient
from conftest import app_defaults
from fedlora_flwr.adapters import CLIENT, COMMON, add_lora_adapters, is_adapter_key
from fedlora_flwr.bilevel import batch_objective, hessian_vector_product, hypergradient, simultaneous_gradient
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import TaskSpec, batches
from fedlora_flwr.groups import BilevelUpdate, OptimizerSpec, ParameterPartition, Phase
from fedlora_flwr.training import cross_entropy, train_schedule
from strategies.base import ARRAYS

EPS = 1e-5
NUM_CLIENTS = 3


def _tiny(seed: int = 0):
    """A tiny model in float64: Linear(6→4), tanh, Linear head, common rank 3 / client rank 1 on
    both linears, every adapter factor random (LoRA init has B = D = 0), a fixed batch."""
    torch.manual_seed(seed)
    model = add_lora_adapters(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), {COMMON: 3, CLIENT: 1})
    model = model.double()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".lora_" in key:
                param.copy_(torch.randn_like(param) * 0.5)
    params = dict(model.named_parameters())
    x = {k: p.requires_grad_(True) for k, p in params.items() if is_adapter_key(k, COMMON)}
    y = {k: p.requires_grad_(True) for k, p in params.items() if is_adapter_key(k, CLIENT)}
    xb = torch.randn(5, 6, dtype=torch.float64)
    yb = torch.tensor([0, 1, 2, 1, 0])
    return model, x, y, xb, yb


def _direction(x: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in x.items()}
    norm = torch.sqrt(sum((t**2).sum() for t in d.values()))
    return {k: t / norm for k, t in d.items()}


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def _shifted(x, d, step):
    return {k: (x[k] + step * d[k]).detach() for k in x}


def _grad_y(f, x, y) -> dict[str, torch.Tensor]:
    y_leaf = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    grads = torch.autograd.grad(f(x, y_leaf), list(y_leaf.values()))
    return dict(zip(y_leaf, grads))


@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_hypergradient_matches_finite_difference_of_the_unrolled_objective(alpha, seed):
    model, x, y, xb, yb = _tiny(seed)
    f = batch_objective(model, cross_entropy, xb, yb, {**x, **y})
    h = hypergradient(f, x, y, alpha).h

    def phi(x_values):  # φ(x) = f(x, y − α ∇_y f(x, y))
        g = _grad_y(f, x_values, y)
        return float(f(x_values, {k: y[k].detach() - alpha * g[k] for k in y}))

    for direction_seed in range(3):
        d = _direction(x, 100 + direction_seed)
        analytic = _dot(h, d)
        numeric = (phi(_shifted(x, d, EPS)) - phi(_shifted(x, d, -EPS))) / (2 * EPS)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(analytic)), (analytic, numeric)
    # and the HVP term matters here: h is not the plain gradient at y⁺
    g_x_plus = torch.autograd.grad(f(x, hypergradient(f, x, y, alpha).y_plus), list(x.values()))
    assert max(float((h[k] - g).abs().max()) for k, g in zip(x, g_x_plus)) > 1e-6


def test_hessian_vector_product_matches_finite_difference_of_the_lower_gradient():
    model, x, y, xb, yb = _tiny(2)
    f = batch_objective(model, cross_entropy, xb, yb, {**x, **y})
    g_y = torch.autograd.grad(f(x, y), list(y.values()), create_graph=True)
    gen = torch.Generator().manual_seed(7)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in g_y]
    hvp = dict(zip(x, hessian_vector_product(g_y, list(x.values()), v)))
    for direction_seed in range(3):
        d = _direction(x, 200 + direction_seed)
        plus, minus = _grad_y(f, _shifted(x, d, EPS), y), _grad_y(f, _shifted(x, d, -EPS), y)
        numeric = sum(float((vi * (plus[k] - minus[k]) / (2 * EPS)).sum()) for vi, k in zip(v, y))
        analytic = _dot(hvp, d)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(analytic)), (analytic, numeric)


def test_alpha_zero_gives_exactly_the_gradient_of_x():
    model, x, y, xb, yb = _tiny(3)
    f = batch_objective(model, cross_entropy, xb, yb, {**x, **y})
    result = hypergradient(f, x, y, 0.0)
    expected = torch.autograd.grad(f(x, y), list(x.values()))
    assert all(torch.equal(result.h[k], g) for k, g in zip(x, expected))
    assert all(torch.equal(result.y_plus[k], y[k]) for k in y)


def test_simultaneous_rule_takes_both_gradients_at_the_same_point():
    model, x, y, xb, yb = _tiny(4)
    f = batch_objective(model, cross_entropy, xb, yb, {**x, **y})
    result = simultaneous_gradient(f, x, y, 0.3)
    grads = dict(zip([*x, *y], torch.autograd.grad(f(x, y), [*x.values(), *y.values()])))
    assert all(torch.equal(result.h[k], grads[k]) for k in x)
    assert all(torch.equal(result.y_plus[k], y[k].detach() - 0.3 * grads[k]) for k in y)


def _tiny_partition():
    return ParameterPartition(personal=lambda key, _m: is_adapter_key(key, CLIENT))


def _one_step(model, xb, yb, *, lr_upper: float, lr_lower: float, hypergradient: bool = True, seed: int = 5):
    """One bilevel step through train_schedule (the production loop) on the whole batch; returns
    the shuffled batch it used."""
    phase = Phase(groups=("shared", "personal"), steps=1, optimizer=OptimizerSpec(lr=lr_upper, momentum=0.0),
                  update=BilevelUpdate(lower=("personal",), lr_lower=lr_lower, hypergradient=hypergradient))
    train_schedule(model, _tiny_partition(), [phase], xb, yb, batch_size=len(yb), lr=1.0, momentum=0.9,
                   generator=torch.Generator().manual_seed(seed))
    return next(batches(xb, yb, len(yb), shuffle=True, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("hypergradient_rule", [True, False])
def test_beta_zero_leaves_x_and_moves_y_by_exactly_one_sgd_step(hypergradient_rule):
    model, x, y, xb, yb = _tiny(5)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    xs, ys = _one_step(model, xb, yb, lr_upper=0.0, lr_lower=0.25, hypergradient=hypergradient_rule)
    reference, *_ = _tiny(5)
    params = dict(reference.named_parameters())
    y_ref = {k: params[k] for k in y}
    g = torch.autograd.grad(cross_entropy(reference, xs, ys), list(y_ref.values()))
    after = dict(model.named_parameters())
    for k in before:
        if k in y:
            assert torch.equal(after[k], before[k] - 0.25 * g[list(y).index(k)]), k
        else:
            assert torch.equal(after[k], before[k]), k  # x (and W0, trained with x here) unchanged


def test_bilevel_step_applies_the_hypergradient_with_sgd():
    model, x, y, xb, yb = _tiny(6)
    reference, rx, ry, *_ = _tiny(6)
    xs, ys = _one_step(model, xb, yb, lr_upper=0.1, lr_lower=0.2)
    f = batch_objective(reference, cross_entropy, xs, ys, {**rx, **ry})
    expected = hypergradient(f, rx, ry, 0.2)
    after = dict(model.named_parameters())
    for k in rx:
        torch.testing.assert_close(after[k], rx[k].detach() - 0.1 * expected.h[k], rtol=0, atol=1e-15)
    for k in ry:
        assert torch.equal(after[k], expected.y_plus[k])


def test_bilevel_phase_declaration_is_checked():
    with pytest.raises(ValueError, match="strict subset"):
        Phase(groups=("personal",), steps=1, update=BilevelUpdate(lower=("personal",), lr_lower=0.1))
    with pytest.raises(ValueError, match="clip"):
        Phase(groups=("shared", "personal"), steps=1, max_grad_norm=1.0,
              update=BilevelUpdate(lower=("personal",), lr_lower=0.1))


def test_bilevel_step_refuses_half_precision():
    model, x, y, xb, yb = _tiny(7)
    model = model.half()
    with pytest.raises(ValueError, match="float32/float64"):
        _one_step(model, xb.half(), yb, lr_upper=0.1, lr_lower=0.1)


# --------------------------------------------------------------------------- the model and the client


def _client(tmp_path, **overrides) -> PF2LoRAClient:
    config = load_config({**app_defaults(), "dataset": "synthetic", "model": "cnn", "device": "cpu",
                          "output-dir": str(tmp_path), "method": "pf2lora", **overrides})
    return PF2LoRAClient(config)


def test_two_level_adapters_on_every_conv_and_linear_start_as_the_plain_model(tmp_path):
    client = _client(tmp_path)
    torch.manual_seed(0)
    from fedlora_flwr.models import build_model

    plain = build_model("cnn", 10).eval()
    torch.manual_seed(0)
    model = client.build_model(TaskSpec(num_classes=10), 0).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain(images), model(images))  # B = D = 0 at init
    state = model.state_dict()
    layers = ["conv1", "conv2", "conv3", "fc"]
    for layer in layers:
        assert state[f"{layer}.lora_A.{COMMON}.weight"].shape[0] == 8
        assert state[f"{layer}.lora_A.{CLIENT}.weight"].shape[0] == 2
        assert not state[f"{layer}.lora_B.{COMMON}.weight"].any()
    groups = client.partition.groups(model)
    personal = sorted(k for k, g in groups.items() if g == "personal")
    assert personal == sorted(f"{layer}.lora_{ab}.{CLIENT}.weight" for layer in layers for ab in "AB")
    assert groups["fc.base_layer.weight"] == "shared"
    head_personal = _client(tmp_path, **{"pf2lora-head": "personal"}).partition.groups(model)
    assert head_personal["fc.base_layer.weight"] == head_personal["fc.base_layer.bias"] == "personal"


def test_bilevel_step_on_the_cnn_moves_batchnorm_statistics_once_per_step(tmp_path):
    client = _client(tmp_path, **{"local-steps": 3, "lr-upper": 0.05, "lr-lower": 0.05})
    torch.manual_seed(0)
    model = client.build_model(TaskSpec(num_classes=10), 0)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    xs, ys = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stats = train_schedule(model, client.partition, client.schedule(), xs, ys, batch_size=4, lr=0.1, momentum=0.9,
                           generator=torch.Generator().manual_seed(0), loss_fn=client.loss)
    assert stats.steps == 3 and np.isfinite(stats.loss)
    after = model.state_dict()
    assert int(after["bn1.num_batches_tracked"]) == 3
    for key in (f"conv2.lora_B.{COMMON}.weight", f"conv2.lora_B.{CLIENT}.weight", "conv2.base_layer.weight"):
        assert not torch.equal(before[key], after[key]), key


@pytest.mark.parametrize(("key", "value"), [("rank-common", 0), ("rank-client", 0), ("lr-lower", -0.1),
                                            ("local-steps", -1), ("pf2lora-head", "both"),
                                            ("pf2lora-upper-optimizer", "adam")])
def test_bad_pf2lora_key_is_one_line_naming_it(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        _client(tmp_path, **{key: value})
    assert key in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- end to end


FAST = {"local-steps": 1, "lr-upper": 0.05, "lr-lower": 0.05, "train-per-client": 8, "test-per-client": 4,
        "batch-size": 4}


def test_pf2lora_shares_the_common_adapter_and_keeps_distinct_client_adapters(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "pf2lora", method="pf2lora", **FAST)
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2] and all(m["num_failures"] == 0 for m in metrics)
    for server_round in (1, 2):
        for pid, reply in grid.replies[(server_round, _train_type(grid))].items():
            upload = _arrays(reply.content[ARRAYS])
            assert not [k for k in upload if is_adapter_key(k, CLIENT)], f"client {pid} uploaded its client adapter"
            assert any(is_adapter_key(k, COMMON) for k in upload)
        sent = grid.sent[(server_round, _eval_type(grid))]
        assert all(_identical(sent[0], sent[pid]) for pid in sent), "every client gets the same (B, A)"
    stored = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert all(set(s) == set(stored[0]) and all(is_adapter_key(k, CLIENT) for k in s) for s in stored)
    key = f"conv2.lora_A.{CLIENT}.weight"
    assert not np.array_equal(stored[0][key], stored[1][key]), "C_k differ between clients"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pf2lora_simultaneous_writes_the_output_contract_and_differs_from_pf2lora(tmp_path, optimizer):
    keys = {**FAST, "num-server-rounds": 1, "pf2lora-upper-optimizer": optimizer}
    runs = {method: _run(tmp_path, method, num_clients=2, method=method, **keys)[0]
            for method in ("pf2lora", "pf2lora-simultaneous")}
    shared = {method: _state(run_dir / "shared.safetensors")[0] for method, run_dir in runs.items()}
    a, b = shared["pf2lora"], shared["pf2lora-simultaneous"]
    assert set(a) == set(b) and not all(np.array_equal(a[k], b[k]) for k in a)
    for run_dir in runs.values():
        assert [m["num_participants"] for m in _metrics(run_dir)] == [2]
        assert json.loads((run_dir / "config.json").read_text())["pf2lora-upper-optimizer"] == optimizer


def test_lora_ft_evaluates_and_stores_a_fine_tuned_copy_of_the_average(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "lora-ft", method="lora-ft", num_clients=2, **FAST)
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2] and all(m["num_failures"] == 0 for m in metrics)
    sent = grid.sent[(2, _eval_type(grid))][0]
    copies = [_state(run_dir / "clients" / str(pid) / "fine-tuned.safetensors")[0] for pid in range(2)]
    key = f"conv2.lora_B.{COMMON}.weight"
    assert set(copies[0]) == set(sent)
    assert not np.array_equal(copies[0][key], sent[key]) and not np.array_equal(copies[0][key], copies[1][key])
    assert not (run_dir / "clients" / "0" / "personal.safetensors").exists()
