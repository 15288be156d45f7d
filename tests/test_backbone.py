"""Adapter methods on an image model whose weights come from ``backbone=<safetensors>`` (the
FedSA-LoRA family and LoRA baselines of clients/adapters.py on a frozen CNN; issue 8 item 5), through
the in-process federation (tests/inprocess.py). Kept small: synthetic data, 3 clients, 2 steps."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_federation import _arrays, _eval_type, _identical, _metrics, _run, _state, _train_type

from conftest import app_defaults
from fedlora_flwr import data, models, peft_models
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.methods import registry
from fedlora_flwr.text_models import ModelError
from strategies.base import ARRAYS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="PEFT is not installed (pip install -e '.[text]')")

NUM_CLIENTS = 3
SMALL = {"local_steps": 2, "lr": 0.05}
PREFIX = "base_model.model."


@pytest.fixture
def checkpoint(tmp_path):
    """A cnn's weights as a fedavg run writes them (``shared.safetensors``: its state-dict keys)."""
    torch.manual_seed(7)
    model = models.build_model("cnn", 10)
    for name, buffer in model.named_buffers():  # non-default BatchNorm statistics, to see them kept
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    path = tmp_path / "shared.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _config(tmp_path, method: str, backbone, **overrides):
    return load_config({**app_defaults(), "dataset": "synthetic", "model": "cnn", "method": method,
                        "device": "cpu", "output-dir": str(tmp_path), "backbone": str(backbone),
                        "local-steps": 2, **overrides})


def _is_head(key: str) -> bool:
    """A key of the image model's head ``fc`` (under PEFT's wrapper or not)."""
    return key.startswith(("fc.", "base_model.model.fc."))


def _plain(key: str) -> str:
    """A PEFT state-dict key as the unwrapped model's key."""
    return key.removeprefix(PREFIX).replace(".base_layer", "")


def test_backbone_loaded_but_the_head_and_lora_on_every_conv(tmp_path, checkpoint):
    path, saved = checkpoint
    client = registry()["fedsa-lora"].client(_config(tmp_path, "fedsa-lora", path))
    torch.manual_seed(0)
    model = client.build_model(data.TaskSpec(10), 0)
    frozen = client.partition.state(model, "frozen")
    assert {_plain(k) for k in frozen} == {k for k in saved if not k.startswith("fc.")}
    assert all(torch.equal(v, saved[_plain(k)]) for k, v in frozen.items())
    state = model.state_dict()
    assert not torch.equal(state[PREFIX + "fc.weight"], saved["fc.weight"]), "the head is fresh, not the file's"
    adapted = {k.removeprefix(PREFIX).split(".lora_A")[0] for k in state if peft_models.is_lora_a(k)}
    assert adapted == {"conv1", "conv2", "conv3"}, "every Conv2d, not the head fc"
    assert set(client.partition.keys(model, "personal")) == {
        k for k in state if peft_models.is_lora_b(k) or k.startswith(PREFIX + "fc.")}


def test_image_lora_targets_every_conv_and_hidden_linear_but_the_head():
    assert models.image_lora_targets(models.build_model("cnn-1", 10)) == ("conv1", "conv2", "fc1", "fc2")
    targets = models.image_lora_targets(models.build_model("resnet8", 10))
    # the stem, 2 per block, 2 downsample convs
    assert "layers.1.0.downsample.0" in targets and "fc" not in targets and len(targets) == 9


def test_backbone_frozen_unchanged_by_training_never_sent_and_bn_in_eval(tmp_path, checkpoint):
    path, saved = checkpoint
    run_dir, grid, config = _run(tmp_path, "fedsa-lora", num_clients=NUM_CLIENTS, method="fedsa-lora",
                                 backbone=str(path), **SMALL)
    train = _train_type(grid)
    for server_round in (1, 2):
        for reply in grid.replies[(server_round, train)].values():
            keys = list(reply.content[ARRAYS])
            assert keys and all(peft_models.is_lora_a(k) for k in keys)
        received = list(grid.sent[(server_round, _eval_type(grid))].values())
        assert all(_identical(received[0], r) for r in received), "one Ā for all"
    for pid in range(NUM_CLIENTS):
        tensors, _ = _state(run_dir / "clients" / str(pid) / "personal.safetensors")
        assert tensors and all(peft_models.is_lora_b(k) or _is_head(k) for k in tensors)
    assert all(m["bytes_up"] > 0 for m in _metrics(run_dir))
    session = ClientSession.create(load_config(config), 0, NUM_CLIENTS, run_dir / "clients", 3)
    session.load({k: torch.from_numpy(v) for k, v in grid.sent[(2, train)][0].items()}, training=True)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    session.train()
    after = session.model.state_dict()
    frozen = session.method.partition.keys(session.model, "frozen")
    assert any("running_mean" in k for k in frozen), "BatchNorm statistics are in the frozen group"
    assert all(torch.equal(after[k], before[k]) and torch.equal(after[k], saved[_plain(k)]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in after if peft_models.is_lora_a(k))


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "fedsa-rslora", "local-lora", "fedavg-head"])
def test_every_adapter_method_runs_on_an_image_backbone(tmp_path, checkpoint, method):
    path, _ = checkpoint
    run_dir, grid, _ = _run(tmp_path, method, num_clients=NUM_CLIENTS, method=method, backbone=str(path),
                            num_server_rounds=1, **SMALL)
    uploads = [_arrays(reply.content[ARRAYS]) for reply in grid.replies[(1, _train_type(grid))].values()]
    assert all(peft_models.is_adapter(k) or _is_head(k) for up in uploads for k in up), "the backbone is never sent"
    assert np.isfinite(_metrics(run_dir)[-1]["acc_mean"])


def test_local_lora_on_an_image_backbone_is_the_adapter_baseline(tmp_path, checkpoint):
    from clients.adapters import LocalAdapterClient

    assert type(registry()["local-lora"].client(_config(tmp_path, "local-lora", checkpoint[0]))) is LocalAdapterClient


def _build(tmp_path, backbone, model="cnn"):
    client = registry()["lora"].client(_config(tmp_path, "lora", backbone, model=model))
    with pytest.raises(ModelError) as info:
        client.build_model(data.TaskSpec(10), 0)
    message = str(info.value)
    assert "\n" not in message and str(backbone) in message
    return message


def test_missing_file_missing_tensor_and_wrong_shape_are_one_line(tmp_path, checkpoint):
    path, saved = checkpoint
    assert "no such file" in _build(tmp_path, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert "not a safetensors file" in _build(tmp_path, tmp_path / "junk.safetensors")
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items() if k != "bn2.running_var"}, str(partial))
    assert "no tensor 'bn2.running_var'" in _build(tmp_path, partial)
    expected = "'conv1.weight' has shape (32, 3, 3, 3), model=resnet8 needs (64, 3, 7, 7)"
    assert expected in _build(tmp_path, path, "resnet8")


def test_backbone_only_for_adapter_methods_and_image_models(tmp_path, checkpoint):
    for overrides, expected in [({"method": "fedavg"}, "does not fine-tune an image backbone"),
                                ({"dataset": "agnews", "model": "minilm"}, "backbone is for image models")]:
        with pytest.raises(ConfigError) as info:
            load_config({**app_defaults(), "dataset": "synthetic", "model": "cnn", "method": "lora",
                         "backbone": str(checkpoint[0]), **overrides})
        assert "backbone=" in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


def test_vera_on_convolutions_is_one_line(tmp_path, checkpoint):
    """PEFT's VeRA adapts Linear layers only: fedsa-vera on the cnn (convolutions only) says so."""
    client = registry()["fedsa-vera"].client(_config(tmp_path, "fedsa-vera", checkpoint[0]))
    with pytest.raises(ModelError) as info:
        client.build_model(data.TaskSpec(10), 0)
    assert "lora-target-modules='conv1,conv2,conv3'" in str(info.value) and "\n" not in str(info.value)


def test_the_backbone_readers_are_the_adapter_methods():
    from clients.adapters import AdapterClient

    text = {**app_defaults(), "dataset": "agnews", "model": "minilm"}
    readers = {name for name, method in registry().items() if "text" in method.requires.modalities
               and method.requires.pretrained != "never"
               and isinstance(method.client(load_config({**text, "method": name})), AdapterClient)}
    assert readers == {name for name, method in registry().items() if method.requires.image_backbone}
