"""Tests of the model zoo (fedlora_flwr.models: FedDecomp's ResNet-8/10, pFedLoRA's CNN-1..5)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedlora_flwr.models import MODELS, BasicBlock, ResNet, SmallCNN, build_model, resnet8, resnet10


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, classes", [("resnet8", 10), ("resnet10", 100), ("cnn", 10), ("resnet10", 200)])
def test_output_shapes(name, classes):
    torch.manual_seed(0)
    model = build_model(name, classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, classes)  # Tiny ImageNet, unresized


def test_registry_and_unknown_name():
    assert set(MODELS) == {"resnet8", "resnet10", "cnn", "cnn-1", "cnn-2", "cnn-3", "cnn-4", "cnn-5", "minilm",
                           "transformer-small"}  # minilm: tests/test_text.py; transformer-small: tests/test_transformer_small.py
    assert isinstance(build_model("cnn", 3), SmallCNN)
    assert isinstance(build_model("resnet8", 3), ResNet)
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; choose one of .*resnet8"):
        build_model("resnet18", 10)
    with pytest.raises(ValueError):
        build_model("cnn", 0)


def test_parameter_counts():
    # σ counts (conv + BN + fc) computed from FedDecomp's code = parameter counts of the plain models
    assert _nparams(resnet8(10)) == 1_235_274
    assert _nparams(resnet10(100)) == 4_957_092
    assert _nparams(resnet10(200)) == 5_008_392
    assert 50_000 < _nparams(SmallCNN(10)) < 200_000


def test_resnet_module_names_and_layer_specs():
    model = resnet8(10)
    mods = dict(model.named_modules())
    for name in ["conv1", "bn1", "fc", "layers.0.0.conv1", "layers.0.0.bn1", "layers.0.0.conv2",
                 "layers.0.0.bn2", "layers.1.0.downsample.0", "layers.1.0.downsample.1",
                 "layers.2.0.downsample.0"]:
        assert name in mods, name
    assert "layers.0.0.downsample.0" not in mods  # 64→64 stride 1: identity shortcut
    assert "layers.3.0.conv1" not in mods
    assert "layers.3.0.downsample.0" in dict(resnet10(10).named_modules())
    stem = model.conv1
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (
        3, 64, (7, 7), (2, 2), (3, 3))
    assert stem.bias is None
    mp = model.maxpool
    assert (mp.kernel_size, mp.stride, mp.padding) == (3, 2, 1)
    ds = mods["layers.1.0.downsample.0"]
    assert ds.kernel_size == (1, 1) and ds.stride == (2, 2) and ds.bias is None
    assert isinstance(mods["layers.1.0.downsample.1"], nn.BatchNorm2d)
    c = mods["layers.2.0.conv1"]
    assert (c.in_channels, c.out_channels, c.stride, c.padding, c.bias) == (128, 256, (2, 2), (1, 1), None)
    assert mods["layers.2.0.conv2"].stride == (1, 1)
    assert model.fc.in_features == 256 and model.fc.bias is not None
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and all(m.bias is None for m in convs)


def test_stem_output_is_8x8_for_32x32():
    model = resnet8(10).eval()
    seen = {}
    model.maxpool.register_forward_hook(lambda m, i, o: seen.update(stem=o.shape))
    model.layers[2].register_forward_hook(lambda m, i, o: seen.update(last=o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["stem"] == (1, 64, 8, 8) and seen["last"] == (1, 256, 2, 2)


def test_init():
    torch.manual_seed(0)
    model = resnet8(10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.layers[2][0].conv2.weight  # kaiming normal, fan_out = 256·9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.03)
    assert abs(w.mean().item()) < 1e-3
    # Linear default init: U(-1/sqrt(in), 1/sqrt(in))
    assert model.fc.weight.abs().max() <= 1 / math.sqrt(256)


def test_basic_block_forward_matches_manual():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 8, 8)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False)

    h = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    h = bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1))
    sc = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(h + sc), atol=1e-5)
    ident = BasicBlock(8, 8, stride=1)
    assert ident.downsample is None


def test_small_cnn_macs_and_learns():
    torch.manual_seed(0)
    model = SmallCNN(10)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10
    macs = []

    def hook(m, i, o):
        if isinstance(m, nn.Conv2d):
            macs.append(o.numel() // o.shape[0] * m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        else:
            macs.append(m.in_features * m.out_features)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert 5e6 <= sum(macs) <= 12e6
    for m in model.modules():
        m._forward_hooks.clear()
    # learns a tiny separable task quickly (class-dependent mean images + noise)
    model.train()
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.arange(20) % 10
    x = templates[y] + 0.5 * torch.randn(20, 3, 32, 32, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # the paper's SGD
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_small_cnn_stays_stable_with_the_papers_sgd_on_a_skewed_client(real_npz, tmp_path):
    """Regression: client 33 of the real α = 0.1, 40-client partition (468 of 500 samples in one
    class) under FedLoRA's schedule at lr 0.1 / momentum 0.9. An earlier SmallCNN (flatten 4096 →
    hidden linear) reached losses above 100 here and collapsed a 40-client run."""
    from conftest import app_defaults

    from fedlora_flwr.client_app import ClientSession
    from fedlora_flwr.config import load_config
    from fedlora_flwr.training import train_schedule

    config = load_config({**app_defaults(), "dataset": "npz", "data-dir": str(real_npz), "model": "cnn"})
    session = ClientSession.create(config, partition_id=33, num_partitions=40, store_root=tmp_path, server_round=1)
    x, y = session.tensors(train=True)
    losses = []

    def recording_loss(model, x, labels):
        loss = F.cross_entropy(model(x), labels)
        losses.append(loss.item())
        return loss

    train_schedule(session.model, session.method.partition, session.method.schedule(), x, y, batch_size=100, lr=0.1,
                   momentum=0.9, generator=torch.Generator().manual_seed(0), loss_fn=recording_loss)
    assert len(losses) == 25 and max(losses) < 5.0, losses
