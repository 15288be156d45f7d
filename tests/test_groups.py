"""Parameter partition and local schedule (fedlora_flwr.groups, fedlora_flwr.training) of FedLoRA and its
Table 4 controls, against FedDecomp's client.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import app_defaults

from clients.fedavg import FedAvgClient, FedAvgLoRAClient
from clients.fedlora import FedLoRAClient
from clients.local import LocalClient, LocalLoRAClient
from fedlora_flwr.config import load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import BilevelUpdate, ParameterPartition, Phase, everything, load_group
from fedlora_flwr.lora import is_lora_key
from fedlora_flwr.models import build_model
from fedlora_flwr.training import cross_entropy, train_schedule

NUM_CLASSES = 10


def _config(tmp_path, **overrides):
    values = {**app_defaults(), "dataset": "synthetic", "model": "cnn", "local-epochs": 2, "lora-epochs": 1,
              "batch-size": 8, **overrides}
    return load_config(values, base=tmp_path)


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1).float() * 0.1
    return x, y


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _train(model, partition, schedule, seed=7, loss_fn=cross_entropy, **kwargs):
    x, y = _data()
    options = {"batch_size": 8, "lr": 0.1, "momentum": 0.9, **kwargs}
    return train_schedule(model, partition, schedule, x, y, generator=torch.Generator().manual_seed(seed),
                          loss_fn=loss_fn, **options)


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_fedlora_partition_tau_is_exactly_the_lora_keys(tmp_path, model_name):
    config = _config(tmp_path, model=model_name)
    torch.manual_seed(0)
    model = FedLoRAClient(config).build_model(TaskSpec(NUM_CLASSES), 0)
    plain = build_model(model_name, NUM_CLASSES)
    groups = FedLoRAClient.partition.groups(model)

    assert list(groups) == list(model.state_dict()), "every state-dict key gets exactly one group"
    personal = FedLoRAClient.partition.keys(model, "personal")
    shared = FedLoRAClient.partition.keys(model, "shared")
    assert personal and all(is_lora_key(key) for key in personal)
    assert set(personal) == {key for key in model.state_dict() if "lora_" in key}
    assert FedLoRAClient.partition.keys(model, "frozen") == []
    # σ = the undecomposed model's whole state dict, BN buffers included (FedDecomp averages every non-lora_ key), same order.
    assert shared == list(plain.state_dict())
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "fc.bias"} <= set(shared)
    # Every conv / linear got both factors.
    weights = [key.removesuffix(".weight") for key, v in plain.state_dict().items() if key.endswith(".weight") and v.dim() in (2, 4)]
    assert set(personal) == {f"{w}.lora_{f}" for w in weights for f in "AB"}


def test_partition_state_and_parameters_follow_the_groups(tmp_path):
    model = FedLoRAClient(_config(tmp_path)).build_model(TaskSpec(NUM_CLASSES), 0)
    partition = FedLoRAClient.partition
    state = partition.state(model, "personal")
    assert list(state) == partition.keys(model, "personal")
    assert all(state[key].data_ptr() == model.state_dict()[key].data_ptr() for key in state), "views of the live model"
    tau_params = partition.parameters(model, ["personal"])
    sigma_params = partition.parameters(model, ["shared"])
    named = dict(model.named_parameters())
    assert {id(p) for p in tau_params} == {id(p) for k, p in named.items() if is_lora_key(k)}
    assert {id(p) for p in sigma_params} == {id(p) for k, p in named.items() if not is_lora_key(k)}


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_local_is_all_personal_and_fedavg_all_shared(tmp_path, model_name):
    config = _config(tmp_path, model=model_name)
    for client, group in ((LocalClient, "personal"), (FedAvgClient, "shared")):
        model = client(config).build_model(TaskSpec(NUM_CLASSES), 0)
        assert not any(is_lora_key(key) for key in model.state_dict()), "baselines use the plain model"
        assert set(client.partition.groups(model).values()) == {group}
        assert client.partition.keys(model, group) == list(model.state_dict())


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_table4_controls_decompose_like_fedlora_but_share_or_keep_everything(tmp_path, model_name):
    """FedLoRA paper Table 4 (no switch in the official code; our reading): "FedAvg w/ LoRA" and "Local w/ LoRA" use FedLoRA's
    decomposed model, trained jointly for E epochs; FedAvg shares both σ and τ, Local keeps both."""
    config = _config(tmp_path, model=model_name, **{"local-epochs": 3})
    fedlora_keys = list(FedLoRAClient(config).build_model(TaskSpec(NUM_CLASSES), 0).state_dict())
    assert any(is_lora_key(key) for key in fedlora_keys)
    for client, group in ((LocalLoRAClient, "personal"), (FedAvgLoRAClient, "shared")):
        model = client(config).build_model(TaskSpec(NUM_CLASSES), 0)
        assert list(model.state_dict()) == fedlora_keys
        assert client.partition.keys(model, group) == fedlora_keys
        assert client(config).schedule() == [Phase(("shared", "personal"), 3)]


def test_frozen_rule_applies_after_personal():
    model = build_model("cnn", NUM_CLASSES)
    partition = ParameterPartition(personal=lambda key, _m: key.startswith("fc."),
                                   frozen=lambda key, _m: key.startswith(("fc.", "conv1.")))
    groups = partition.groups(model)
    assert groups["fc.weight"] == "personal" and groups["conv1.weight"] == "frozen" and groups["conv2.weight"] == "shared"


# --------------------------------------------------------------------------- schedules


def test_fedlora_schedule_is_tau_then_sigma(tmp_path):
    client = FedLoRAClient(_config(tmp_path, **{"local-epochs": 5, "lora-epochs": 2}))
    assert client.schedule() == [Phase(("personal",), 2), Phase(("shared",), 3)]
    simultaneous = FedLoRAClient(_config(tmp_path, **{"local-epochs": 5, "lora-schedule": "simultaneous"}))
    [phase] = simultaneous.schedule()
    assert set(phase.groups) == {"personal", "shared"} and phase.epochs == 5
    assert FedAvgClient(_config(tmp_path, **{"local-epochs": 3})).schedule() == [Phase(("shared", "personal"), 3)]


def test_full_fedlora_schedule_runs_e_epochs_in_total(tmp_path):
    config = _config(tmp_path, **{"local-epochs": 2, "lora-epochs": 1})
    client = FedLoRAClient(config)
    torch.manual_seed(0)
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    stats = _train(model, client.partition, client.schedule())
    n = len(_data()[1])
    assert stats.samples == 2 * n  # E_lora + (E − E_lora) = E epochs, not E_lora + E
    assert stats.steps == 2 * 2  # 16 samples / batch 8 = 2 steps per epoch
    assert torch.isfinite(torch.tensor(stats.loss))


# --------------------------------------------------------------------------- invariants of the τ and σ phases


class _GradProbe:
    """A loss function that records, at every step, which parameters require grad."""

    def __init__(self, model):
        self.model = model
        self.calls: list[set[str]] = []

    def __call__(self, model, x, target):
        self.calls.append({key for key, p in self.model.named_parameters() if p.requires_grad})
        return F.cross_entropy(model(x), target)


def test_tau_phase_changes_no_sigma_parameter(tmp_path):
    client = FedLoRAClient(_config(tmp_path))
    torch.manual_seed(0)
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    partition = client.partition
    before = _snapshot(model)
    probe = _GradProbe(model)
    _train(model, partition, [client.schedule()[0]], loss_fn=probe)
    after = _snapshot(model)

    sigma_params = {key for key, _ in model.named_parameters() if not is_lora_key(key)}
    buffers = {key for key, _ in model.named_buffers()}
    for key in sigma_params:
        assert torch.equal(before[key], after[key]), f"τ phase changed σ parameter {key}"
    # Train mode: BN running statistics still move in the τ phase (as in FedDecomp's client.py).
    assert any(not torch.equal(before[key], after[key]) for key in buffers if "running_mean" in key)
    assert after["bn1.num_batches_tracked"] == before["bn1.num_batches_tracked"] + 2
    # τ was trained (B moves first; A only once B ≠ 0).
    lora_b = [key for key in before if key.endswith("lora_B")]
    assert all(not torch.equal(before[key], after[key]) for key in lora_b)
    # Frozen by requires_grad too, not only by optimizer membership.
    lora_keys = {key for key, _ in model.named_parameters() if is_lora_key(key)}
    assert probe.calls and all(call == lora_keys for call in probe.calls)


def test_sigma_phase_changes_no_lora_tensor(tmp_path):
    client = FedLoRAClient(_config(tmp_path))
    torch.manual_seed(0)
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    with torch.no_grad():  # τ ≠ 0 so that a wrongly trained τ would receive gradient
        for key, p in model.named_parameters():
            if key.endswith("lora_B"):
                p.normal_(0, 0.02)
    before = _snapshot(model)
    probe = _GradProbe(model)
    _train(model, client.partition, [client.schedule()[1]], loss_fn=probe)
    after = _snapshot(model)

    for key in before:
        if is_lora_key(key):
            assert torch.equal(before[key], after[key]), f"σ phase changed τ tensor {key}"
    sigma_params = [key for key, _ in model.named_parameters() if not is_lora_key(key)]
    assert all(not torch.equal(before[key], after[key]) for key in sigma_params), "σ phase must train every σ parameter"
    assert probe.calls and all(call == set(sigma_params) for call in probe.calls)


def test_lora_epochs_zero_is_exactly_fedavg(tmp_path):
    """Paper §3.4: E_lora = 0 ⇒ the σ trajectory is plain FedAvg training of the undecomposed model."""
    config = _config(tmp_path, **{"local-epochs": 2, "lora-epochs": 0})
    torch.manual_seed(3)
    decomposed = FedLoRAClient(config).build_model(TaskSpec(NUM_CLASSES), 0)
    torch.manual_seed(3)
    plain = FedAvgClient(config).build_model(TaskSpec(NUM_CLASSES), 0)
    shared = FedLoRAClient.partition.keys(decomposed, "shared")
    assert all(torch.equal(decomposed.state_dict()[k], plain.state_dict()[k]) for k in shared), "same σ init"
    tau_before = FedLoRAClient.partition.state(decomposed, "personal")
    tau_before = {k: v.clone() for k, v in tau_before.items()}

    stats_lora = _train(decomposed, FedLoRAClient.partition, FedLoRAClient(config).schedule(), seed=11)
    stats_avg = _train(plain, FedAvgClient.partition, FedAvgClient(config).schedule(), seed=11)

    assert stats_lora.steps == stats_avg.steps and stats_lora.samples == stats_avg.samples
    assert stats_lora.loss == pytest.approx(stats_avg.loss, rel=1e-5)
    sigma, reference = decomposed.state_dict(), plain.state_dict()
    moved = 0
    for key in shared:
        torch.testing.assert_close(sigma[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"σ drifted from FedAvg at {key}")
        moved += not torch.equal(reference[key], _fresh_plain(config)[key])
    assert moved > 0, "training must actually have moved σ"
    for key, value in tau_before.items():
        assert torch.equal(decomposed.state_dict()[key], value), "τ untouched when E_lora = 0"


def _fresh_plain(config):
    torch.manual_seed(3)
    return FedAvgClient(config).build_model(TaskSpec(NUM_CLASSES), 0).state_dict()


def test_requires_grad_is_restored_after_training(tmp_path):
    client = FedLoRAClient(_config(tmp_path))
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    _train(model, client.partition, client.schedule())
    assert all(p.requires_grad for p in model.parameters())


def test_phase_of_zero_epochs_or_steps_is_skipped(tmp_path):
    client = FedLoRAClient(_config(tmp_path))
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    before = _snapshot(model)
    stats = _train(model, client.partition, [Phase(("frozen",), 0), Phase(("shared", "personal"), steps=0)])
    assert stats.steps == 0 and stats.samples == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_phase_whose_groups_own_no_parameter_is_an_error_naming_them(tmp_path):
    """A rule that selects nothing (FedRep's head rule on a model without that head, once) must not
    leave a phase silently untrained."""
    client = FedLoRAClient(_config(tmp_path))
    model = client.build_model(TaskSpec(NUM_CLASSES), 0)
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        _train(model, client.partition, [Phase(("shared",), 1), Phase(("frozen",), 2)])
    message = str(info.value)
    assert message.startswith("phase 2 trains the groups ('frozen',), which own no parameter") and "\n" not in message
    assert f"partition ({client.partition};" in message and "frozen 0" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "checked before anything trains"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="phase 1 trains the groups \\('personal',\\)"):
        _train(build_model("cnn", NUM_CLASSES), ParameterPartition(), [Phase(("personal",), 1)])
    bilevel = Phase(("shared", "personal"), steps=1, update=BilevelUpdate(lower=("personal",), lr_lower=0.1))
    with pytest.raises(ValueError, match="phase 1's upper level trains the groups \\('shared',\\)"):
        _train(build_model("cnn", NUM_CLASSES), ParameterPartition(personal=everything), [bilevel])


def test_fresh_optimizer_every_phase(tmp_path):
    """Two phases of one epoch equal two separate calls of one phase each (momentum restarts)."""
    config = _config(tmp_path)
    torch.manual_seed(0)
    a = FedAvgClient(config).build_model(TaskSpec(NUM_CLASSES), 0)
    torch.manual_seed(0)
    b = FedAvgClient(config).build_model(TaskSpec(NUM_CLASSES), 0)
    phase = Phase(("shared",), 1)
    x, y = _data()
    g1 = torch.Generator().manual_seed(5)
    train_schedule(a, FedAvgClient.partition, [phase, phase], x, y, batch_size=8, lr=0.1, momentum=0.9, generator=g1)
    g2 = torch.Generator().manual_seed(5)
    for _ in range(2):
        train_schedule(b, FedAvgClient.partition, [phase], x, y, batch_size=8, lr=0.1, momentum=0.9, generator=g2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# --------------------------------------------------------------------------- load_group


def test_load_group_copies_exactly_the_expected_keys(tmp_path):
    model = FedLoRAClient(_config(tmp_path)).build_model(TaskSpec(NUM_CLASSES), 0)
    partition = FedLoRAClient.partition
    shared = partition.keys(model, "shared")
    tensors = {key: torch.full_like(model.state_dict()[key], 3) for key in shared}
    tau_before = {k: v.clone() for k, v in partition.state(model, "personal").items()}
    load_group(model, tensors, shared, "shared arrays")
    state = model.state_dict()
    assert all(torch.equal(state[key], tensors[key]) for key in shared)
    assert all(torch.equal(state[key], value) for key, value in tau_before.items())
    assert state["bn1.num_batches_tracked"].dtype == torch.int64


def test_load_group_rejects_missing_and_unexpected_keys(tmp_path):
    model = FedLoRAClient(_config(tmp_path)).build_model(TaskSpec(NUM_CLASSES), 0)
    shared = FedLoRAClient.partition.keys(model, "shared")
    full = {key: model.state_dict()[key].clone() for key in shared}

    missing = {k: v for k, v in full.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match=r"shared arrays from the server.*1 missing.*fc\.bias"):
        load_group(model, missing, shared, "shared arrays from the server")

    extra = {**full, "fc.lora_A": torch.zeros(6, 128)}
    with pytest.raises(ValueError, match=r"shared arrays.*1 unexpected.*fc\.lora_A"):
        load_group(model, extra, shared, "shared arrays")


def test_load_group_rejects_wrong_shapes_and_changes_nothing(tmp_path):
    model = FedLoRAClient(_config(tmp_path)).build_model(TaskSpec(NUM_CLASSES), 0)
    shared = FedLoRAClient.partition.keys(model, "shared")
    before = _snapshot(model)
    tensors = {key: torch.ones_like(model.state_dict()[key]) for key in shared}
    tensors["fc.weight"] = torch.ones(NUM_CLASSES + 1, 128)
    with pytest.raises(ValueError, match=r"personal state of client 3: fc\.weight has shape \(11, 128\), model expects \(10, 128\)"):
        load_group(model, tensors, shared, "personal state of client 3")
    # Validated before anything is copied: the model is untouched.
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
