"""Tests of the low-rank decomposition θ = σ + τ (fedlora_flwr.lora, FedDecomp's loralib layout and ranks)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedlora_flwr.lora import (
    LoRAConv2d,
    LoRALinear,
    conv_rank,
    decompose,
    is_lora_key,
    linear_rank,
    lora_layers,
    lora_mode,
)
from fedlora_flwr.models import resnet8, resnet10, small_cnn


def _counts(model):
    tau = sum(p.numel() for n, p in model.named_parameters() if is_lora_key(n))
    sigma = sum(p.numel() for n, p in model.named_parameters() if not is_lora_key(n))
    return sigma, tau


def _randomize_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


# --------------------------------------------------------------------------- rank rules

def test_rank_rules():
    assert conv_rank(0.6, 64) == 38 and conv_rank(0.6, 128) == 76 and conv_rank(0.6, 256) == 153
    assert conv_rank(0.8, 512) == 409  # floor, not round (409.6)
    assert conv_rank(0.01, 10) == 1  # guarded to >= 1
    assert conv_rank(1.0, 7) == 7
    assert linear_rank(0.6, 256, 10) == 6
    assert linear_rank(0.4, 512, 100) == 40
    assert linear_rank(0.4, 512, 200) == 80
    assert linear_rank(0.01, 4, 3) == 1
    assert linear_rank(0.6, 10, 256) == 6  # min(in, out), symmetric


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.5", None, True])
def test_invalid_ratios_raise(bad):
    with pytest.raises(ValueError, match="ratio"):
        conv_rank(bad, 64)
    with pytest.raises(ValueError, match="ratio"):
        linear_rank(bad, 64, 10)
    with pytest.raises(ValueError, match="ratio"):
        decompose(small_cnn(10), bad, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        decompose(small_cnn(10), 0.5, bad)


def test_invalid_rank_and_conv_layout_raise():
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 3), 0)
    with pytest.raises(ValueError, match=r"\(8, 2, 3, 3\)"):
        LoRAConv2d(nn.Conv2d(4, 8, 3, groups=2), 2)
    with pytest.raises(ValueError, match=r"\(8, 4, 3, 1\)"):
        LoRAConv2d(nn.Conv2d(4, 8, (3, 1)), 2)


# --------------------------------------------------------------------------- shapes / counts

def test_resnet8_shapes_and_counts_match_methods_table():
    torch.manual_seed(0)
    model = decompose(resnet8(10), 0.6, 0.6)
    mods = dict(model.named_modules())
    stem = mods["conv1"]
    assert isinstance(stem, LoRAConv2d)
    assert stem.lora_A.shape == (266, 21) and stem.lora_B.shape == (448, 266)
    assert stem.r == 38 and stem.scaling == pytest.approx(1 / 38)
    l1 = mods["layers.0.0.conv1"]
    assert l1.lora_A.shape == (114, 192) and l1.lora_B.shape == (192, 114)
    ds = mods["layers.1.0.downsample.0"]
    assert isinstance(ds, LoRAConv2d)
    assert ds.lora_A.shape == (76, 64) and ds.lora_B.shape == (128, 76)
    fc = mods["fc"]
    assert isinstance(fc, LoRALinear)
    assert fc.lora_A.shape == (6, 256) and fc.lora_B.shape == (10, 6)
    assert fc.scaling == pytest.approx(1 / 6)
    assert not any(isinstance(m, (nn.BatchNorm2d,)) and hasattr(m, "lora_A") for m in model.modules())
    # 9 convs (stem, 3×2 block convs, 2 downsample) + fc decomposed
    assert len(list(lora_layers(model))) == 10
    assert _counts(model) == (1_235_274, 1_827_470)


@pytest.mark.parametrize("classes, sigma, tau", [(100, 4_957_092, 9_374_121), (200, 5_008_392, 9_406_601)])
def test_resnet10_counts_match_methods_table(classes, sigma, tau):
    model = decompose(resnet10(classes), 0.8, 0.4)
    mods = dict(model.named_modules())
    assert mods["conv1"].lora_A.shape == (357, 21) and mods["conv1"].lora_B.shape == (448, 357)
    assert mods["conv1"].scaling == pytest.approx(1 / 51)
    c = mods["layers.3.0.conv2"]
    assert c.lora_A.shape == (1227, 1536) and c.lora_B.shape == (1536, 1227)
    assert c.scaling == pytest.approx(1 / 409)
    r = 40 if classes == 100 else 80
    assert mods["fc"].lora_A.shape == (r, 512) and mods["fc"].lora_B.shape == (classes, r)
    assert _counts(model) == (sigma, tau)


# --------------------------------------------------------------------------- names / state dict

def test_decompose_keeps_names_and_sigma_keys():
    torch.manual_seed(0)
    plain = resnet8(10)
    dec = decompose(copy.deepcopy(plain), 0.6, 0.6)
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in dec.named_modules()]
    psd, dsd = plain.state_dict(), dec.state_dict()
    layers = [n for n, _ in lora_layers(dec)]
    assert set(dsd) == set(psd) | {f"{n}.lora_{x}" for n in layers for x in "AB"}
    sigma_keys = [k for k in dsd if not is_lora_key(k)]
    assert sigma_keys == list(psd)  # same keys, same order
    for k in psd:
        assert torch.equal(psd[k], dsd[k])
    assert all(is_lora_key(k) for k in set(dsd) - set(psd))
    # the plain model's state dict loads into the decomposed one as exactly the σ part
    missing, unexpected = dec.load_state_dict(psd, strict=False)
    assert not unexpected and set(missing) == set(dsd) - set(psd)


def test_decompose_is_idempotent_and_copies_weights():
    lin = nn.Linear(5, 4)
    model = nn.Sequential(lin, nn.ReLU(), nn.Sequential(nn.Conv2d(2, 3, 1)))
    decompose(model, 0.5, 0.5)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2][0], LoRAConv2d)
    assert model[0].weight is not lin.weight and torch.equal(model[0].weight, lin.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decompose(model, 0.9, 0.9)  # already LoRA: untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # a bare layer is returned as its LoRA version
    assert isinstance(decompose(nn.Linear(3, 3), 0.5, 0.5), LoRALinear)


def test_shared_module_stays_shared():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    decompose(model, 0.5, 0.5)
    assert isinstance(model[0], LoRAConv2d) and model[0] is model[2]


def test_same_seed_same_A_and_dtype_device():
    def build(seed):
        torch.manual_seed(seed)
        return decompose(resnet8(10), 0.6, 0.6).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.lora_A"], c["conv1.lora_A"])
    # A is Kaiming-uniform(a=√5): bound = 1/sqrt(fan_in), fan_in = I·K
    bound = 1 / math.sqrt(3 * 7)
    assert a["conv1.lora_A"].abs().max() <= bound and a["conv1.lora_A"].abs().max() > 0.9 * bound
    assert torch.count_nonzero(a["conv1.lora_B"]) == 0
    lin64 = LoRALinear(nn.Linear(4, 3, dtype=torch.float64), 2)
    assert lin64.lora_A.dtype == lin64.lora_B.dtype == lin64.weight.dtype == torch.float64


def test_building_lora_layer_consumes_rng_only_for_A():
    base = nn.Linear(6, 4)
    torch.manual_seed(7)
    layer = LoRALinear(base, 3)
    after = torch.rand(5)
    torch.manual_seed(7)
    a = torch.empty(3, 6)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    assert torch.equal(layer.lora_A, a)
    assert torch.equal(torch.rand(5), after)


# --------------------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("build, train", [(resnet8, False), (resnet8, True), (small_cnn, True)])
def test_zero_B_output_equals_plain(build, train):
    torch.manual_seed(0)
    plain = build(10)
    dec = decompose(copy.deepcopy(plain), 0.6, 0.6)
    plain.train(train)
    dec.train(train)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = plain(x)
        assert torch.allclose(dec(x), y, atol=1e-5)
        with lora_mode(dec, "sigma"):
            assert torch.allclose(dec(x), y, atol=1e-5)
    for _, m in lora_layers(dec):
        assert torch.count_nonzero(m.delta_weight()) == 0


def test_linear_forward_equals_materialized_weight():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(7, 5), 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 7)
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    dW = (B @ A) / 3
    assert torch.allclose(layer(x), F.linear(x, W + dW, b), atol=1e-5)
    assert torch.allclose(layer.merged_weight(), W + dW, atol=1e-6)
    with lora_mode(layer, "sigma"):
        assert torch.allclose(layer(x), F.linear(x, W, b), atol=1e-6)
    with lora_mode(layer, "tau"):
        assert torch.allclose(layer(x), F.linear(x, dW), atol=1e-5)
    # works on extra leading dims too
    x3 = torch.randn(2, 3, 7)
    assert torch.allclose(layer(x3), F.linear(x3, W + dW, b), atol=1e-5)


@pytest.mark.parametrize(
    "cin, cout, k, stride, pad, bias, r",
    [(3, 8, 3, 1, 1, False, 4), (4, 6, 1, 2, 0, True, 3), (3, 5, 7, 2, 3, False, 3), (2, 4, 3, 2, 2, True, 1)],
)
def test_conv_forward_equals_materialized_weight(cin, cout, k, stride, pad, bias, r):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
    layer = LoRAConv2d(conv, r)
    assert layer.lora_A.shape == (r * k, cin * k) and layer.lora_B.shape == (cout * k, r * k)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, cin, 9, 9)
    W, b = layer.weight, layer.bias
    dW = (layer.lora_B @ layer.lora_A).reshape(cout, cin, k, k) / r  # row-major reinterpretation
    conv_ = lambda w, bb: F.conv2d(x, w, bb, stride=stride, padding=pad)  # noqa: E731
    full = layer(x)
    assert torch.allclose(full, conv_(W + dW, b), atol=1e-5)
    assert torch.allclose(layer.merged_weight(), W + dW, atol=1e-6)
    with lora_mode(layer, "sigma"):
        sigma = layer(x)
    with lora_mode(layer, "tau"):
        tau = layer(x)
    assert torch.allclose(sigma, conv_(W, b), atol=1e-6)
    assert torch.allclose(tau, conv_(dW, None), atol=1e-5)
    # conv(x, W + ΔW) = conv(x, W) + conv(x, ΔW)  (bias lives in σ only)
    assert torch.allclose(sigma + tau, full, atol=1e-5)
    if k > 1:  # a permuted layout (paper eq. 4 read literally) is a different model
        permuted = (layer.lora_B @ layer.lora_A).reshape(cout, k, cin, k).permute(0, 2, 1, 3) / r
        assert not torch.allclose(full, conv_(W + permuted, b), atol=1e-3)


def test_model_modes_sum_for_bias_free_convs():
    torch.manual_seed(0)
    conv = decompose(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False)), 0.5, 0.5)
    _randomize_B(conv)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        with lora_mode(conv, "sigma"):
            s = conv(x)
        with lora_mode(conv, "tau"):
            t = conv(x)
        assert torch.allclose(s + t, conv(x), atol=1e-5)
        assert not torch.allclose(t, torch.zeros_like(t))


# --------------------------------------------------------------------------- lora_mode context

def test_lora_mode_context_manager_restores():
    model = decompose(small_cnn(10), 0.5, 0.5)
    layers = [m for _, m in lora_layers(model)]
    assert len(layers) == 4 and all(m.lora_mode == "full" for m in layers)
    layers[0].lora_mode = "tau"  # heterogeneous previous state
    with lora_mode(model, "sigma"):
        assert all(m.lora_mode == "sigma" for m in layers)
        with lora_mode(model, "tau"):
            assert all(m.lora_mode == "tau" for m in layers)
        assert all(m.lora_mode == "sigma" for m in layers)
    assert [m.lora_mode for m in layers] == ["tau", "full", "full", "full"]
    with pytest.raises(RuntimeError):
        with lora_mode(model, "sigma"):
            raise RuntimeError("boom")
    assert [m.lora_mode for m in layers] == ["tau", "full", "full", "full"]
    with pytest.raises(ValueError, match="mode"):
        with lora_mode(model, "both"):
            pass
    with pytest.raises(ValueError, match="mode"):
        layers[1].lora_mode = "sigma+tau"
    assert [m.lora_mode for m in layers] == ["tau", "full", "full", "full"]


# --------------------------------------------------------------------------- gradients

def test_gradients_flow_to_A_B_and_weight():
    torch.manual_seed(0)
    model = decompose(resnet8(10), 0.6, 0.6)
    _randomize_B(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    for name, m in lora_layers(model):
        for p in (m.weight, m.lora_A, m.lora_B):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.fc.bias.grad is not None and model.bn1.weight.grad is not None


def test_gradients_at_init_and_in_modes():
    torch.manual_seed(0)
    layer = LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1), 2)
    x = torch.randn(2, 3, 6, 6)
    layer(x).square().sum().backward()
    # B = 0 ⇒ dL/dA = 0 exactly, dL/dB ≠ 0 (the LoRA warm start)
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert layer.lora_B.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    layer.zero_grad(set_to_none=True)
    with lora_mode(layer, "sigma"):
        layer(x).sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and layer.weight.grad is not None
    assert layer.merged_weight().requires_grad
