"""The CUDA path (``device = "cuda"``): runs only where torch sees a GPU (the ``gpu`` marker; the
conftest skips these elsewhere, with the reason). tests/test_augment.py and tests/test_precision.py
cover the same code on its CPU paths."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import REPO, app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors.torch import load_file

from fedlora_flwr import client_app, data, server_app
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import load_config
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.models import build_model
from fedlora_flwr.training import train_schedule

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
FILL = tuple(float(-m / s) for m, s in zip(data.CIFAR100_MEAN, data.CIFAR100_STD))


def _run_config(tmp_path, **overrides) -> dict:
    return {
        **app_defaults(), "dataset": "synthetic", "model": "cnn", "num-server-rounds": 1, "local-epochs": 1,
        "lora-epochs": 1, "train-per-client": 32, "test-per-client": 16, "batch-size": 8, "device": "cuda",
        "output-dir": str(tmp_path), "run-name": "cuda", **overrides,
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_in_process_round_on_cuda(tmp_path, precision):
    config = _run_config(tmp_path, precision=precision)
    server_app.main(InProcessGrid(client_app.app, 2, config),
                    Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    metrics = [json.loads(line) for line in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["num_failures"] == 0 and metrics[0]["num_participants"] == 2
    assert 0.0 <= metrics[0]["acc_mean"] <= 1.0 and metrics[0]["train_loss"] > 0
    shared = load_file(tmp_path / "cuda" / "shared.safetensors")
    assert all(t.dtype == torch.float32 for t in shared.values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in shared.values() if t.is_floating_point())


def test_a_client_trains_on_the_device_without_a_host_sync_per_step(tmp_path):
    """The split crosses to the GPU once; batch order and augmentation are drawn there; the loop
    synchronises with the host a fixed number of times, however many steps it takes."""
    config = load_config(_run_config(tmp_path))
    session = ClientSession.create(config, 0, 2, tmp_path / "clients", server_round=1)
    x, y = session.tensors(train=True)
    assert x.device.type == y.device.type == "cuda" and x.dtype == torch.float32
    augment = data.make_batched_augment("crop-flip-rotate", data.CIFAR100_MEAN, data.CIFAR100_STD)

    def syncs(epochs: int) -> int:
        generator = torch.Generator(device=CUDA).manual_seed(0)
        phase = Phase(groups=("shared",), epochs=epochs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stats = train_schedule(session.model, ParameterPartition(), [phase], x, y, batch_size=8, lr=0.01,
                                       momentum=0.9, generator=generator, augment=augment)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert stats.steps == 4 * epochs
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(1) == syncs(3) <= 2


def test_batched_augmentation_on_cuda_matches_the_cpu_for_the_same_parameters():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = data.draw_augment_params("crop-flip-rotate", 64, torch.Generator().manual_seed(1), "cpu")
    on_cpu = data.apply_augment(x, params, FILL)
    on_cuda = data.apply_augment(x.to(CUDA), data.AugmentParams(*(t.to(CUDA) for t in vars(params).values())), FILL)
    differ = (on_cuda.cpu() != on_cpu).any(dim=1)
    # The sampling grid may round differently at an exact half-pixel (fused multiply-add on the GPU).
    assert differ.float().mean() < 1e-3, f"{int(differ.sum())} of {differ.numel()} pixels differ"
    generator = torch.Generator(device=CUDA)
    first = data.draw_augment_params("crop-flip-rotate", 8, generator.manual_seed(4), CUDA)
    again = data.draw_augment_params("crop-flip-rotate", 8, generator.manual_seed(4), CUDA)
    assert first.angle.device.type == "cuda" and torch.equal(first.angle, again.angle)


def test_bf16_on_cuda_keeps_float32_state():
    def train(precision: str) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(0)
        model = build_model("resnet8", 10).to(CUDA)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 3, 32, 32, generator=g).to(CUDA), torch.randint(0, 10, (32,), generator=g).to(CUDA)
        stats = train_schedule(model, ParameterPartition(), [Phase(groups=("shared",), epochs=1)], x, y, batch_size=8,
                               lr=0.05, momentum=0.9, generator=torch.Generator(device=CUDA).manual_seed(1),
                               precision=precision)
        return model, stats.loss

    bf16, bf16_loss = train("bf16")
    _, fp32_loss = train("fp32")
    assert all(t.dtype == torch.float32 for t in bf16.state_dict().values() if t.is_floating_point())
    assert torch.isfinite(torch.tensor(bf16_loss)) and bf16_loss != fp32_loss


@pytest.mark.e2e
def test_fractional_gpus_in_a_flwr_run(superlink, tmp_path):
    """Two clients share one GPU (client-resources-num-gpus = 0.5) in a real simulation."""
    config = _run_config(tmp_path, **{"num-server-rounds": 2, "run-name": "fractional"})
    code, log = superlink.run(REPO, config, num_supernodes=2, client_cpus=1, client_gpus=0.5)
    assert code == 0 and (tmp_path / "fractional" / "summary.json").is_file(), log[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "fractional" / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_failures"] for m in metrics] == [0, 0]
