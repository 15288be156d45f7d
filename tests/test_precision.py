"""The training loop's device-side loss sums and the optional bf16 autocast (``precision``),
on the CPU paths (tests/test_gpu.py runs the CUDA ones where a GPU is visible)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors.torch import load_file

from fedlora_flwr import client_app, server_app
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.methods import registry
from fedlora_flwr.models import build_model
from fedlora_flwr.training import autocast, evaluate, train_schedule


def _data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model_name: str = "cnn", precision: str = "fp32", loss_fn=None):
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    x, y = _data()
    stats = train_schedule(model, ParameterPartition(), [Phase(groups=("shared",), epochs=1)], x, y, batch_size=8,
                           lr=0.05, momentum=0.9, generator=torch.Generator().manual_seed(1), precision=precision,
                           **({"loss_fn": loss_fn} if loss_fn else {}))
    return model, stats


def test_the_reported_train_loss_is_the_python_float_mean_of_the_batch_losses():
    """Summing on the device in float64 gives the bits of the former per-step ``loss.item()`` sum."""
    seen = []

    def recording(model, xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        seen.append(loss.item())
        return loss

    _, stats = _train(loss_fn=recording)
    total = 0.0
    for value in seen:
        total += value
    assert stats.steps == len(seen) == 3 and stats.samples == 24
    assert stats.loss == total / len(seen)


def test_evaluate_sums_like_the_per_batch_python_loop():
    model, _ = _train()
    x, y = _data(19, seed=2)
    stats = evaluate(model, x, y, batch_size=8)
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, 19, 8):
            logits = model(x[start : start + 8])
            loss_sum += F.cross_entropy(logits, y[start : start + 8], reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y[start : start + 8]).sum())
    assert (stats.loss, stats.correct, stats.total) == (loss_sum / 19, correct, 19)
    assert isinstance(stats.correct, int)


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_bf16_autocast_trains_with_float32_state(model_name):
    dtypes = []

    def recording(model, xb, yb):
        logits = model(xb)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits, yb)

    fp32, fp32_stats = _train(model_name)
    bf16, bf16_stats = _train(model_name, "bf16", loss_fn=recording)
    assert set(dtypes) == {torch.bfloat16}  # the forward really ran in bf16
    assert all(t.dtype == torch.float32 for t in bf16.state_dict().values() if t.is_floating_point())
    assert torch.isfinite(torch.tensor(bf16_stats.loss)) and bf16_stats.loss != fp32_stats.loss
    assert any(not torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), bf16.state_dict().values()))
    x, y = _data(16, seed=3)
    low, full = evaluate(bf16, x, y, batch_size=8, precision="bf16"), evaluate(bf16, x, y, batch_size=8)
    assert torch.isfinite(torch.tensor(low.loss)) and low.loss != full.loss and low.total == 16


def test_fp32_adds_no_context_and_an_unknown_precision_is_refused():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp16")


def test_bf16_is_refused_in_one_line_where_it_is_not_safe(tmp_path):
    base = {**app_defaults(), "output-dir": str(tmp_path), "precision": "bf16"}
    for method in ("pf2lora", "pf2lora-simultaneous"):
        with pytest.raises(ConfigError, match=r"method='.*' runs in float32 only; precision='bf16' is refused") as err:
            load_config({**base, "method": method, "model": "cnn"})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"precision='bf16': bf16 autocast is for the image models"):
        load_config({**base, "method": "lora-ft", "dataset": "agnews", "model": "minilm"})
    assert load_config({**base, "method": "fedlora"}).precision == "bf16"


def test_the_bilevel_methods_are_those_whose_schedule_takes_the_bilevel_step(tmp_path):
    config = {**app_defaults(), "output-dir": str(tmp_path), "model": "cnn"}
    bilevel = {name for name, method in registry().items() if method.requires.pretrained != "required"
               and any(phase.update is not None for phase in method.client(load_config({**config, "method": name})).schedule())}
    assert bilevel == {name for name, method in registry().items() if not method.requires.bf16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line():
    with pytest.raises(RuntimeError, match="client-resources-num-gpus") as err:
        client_app.pick_device("cuda")
    assert "\n" not in str(err.value)
    assert client_app.pick_device("auto") == torch.device("cpu")


def test_a_fedlora_round_in_bf16_on_cpu(tmp_path):
    """The real client path (FedLoRA's decomposed model, store, upload) under bf16 autocast."""
    losses = {}
    for precision in ("fp32", "bf16"):
        config = {**app_defaults(), "dataset": "synthetic", "model": "cnn", "num-server-rounds": 1, "local-epochs": 1,
                  "lora-epochs": 1, "train-per-client": 16, "test-per-client": 8, "batch-size": 8, "device": "cpu",
                  "precision": precision, "output-dir": str(tmp_path), "run-name": precision}
        server_app.main(InProcessGrid(client_app.app, 2, config),
                        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        [metrics] = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        assert metrics["num_failures"] == 0 and math.isfinite(metrics["train_loss"])
        losses[precision] = metrics["train_loss"]
        for path in (tmp_path / precision).rglob("*.safetensors"):
            assert all(t.dtype in (torch.float32, torch.int64) for t in load_file(path).values()), path
    assert losses["bf16"] != losses["fp32"]
