"""pFedLoRA (arXiv 2310.13283): the heterogeneous CNN family, the homogeneous adapter, the L/G
schedule's invariants, and a federation of all five architectures on the real code path
(ServerApp/ClientApp in process, tests/inprocess.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from test_federation import _arrays, _eval_type, _identical, _metrics, _run, _state, _train_type

from clients.pfedlora import FedAvgAdapterClient, PFedLoRAClient
from conftest import app_defaults
from fedlora_flwr import bench
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import Phase
from fedlora_flwr.methods import registry
from fedlora_flwr.models import MODEL_FAMILIES, MODELS, build_model, family_member
from fedlora_flwr.report import make_report
from fedlora_flwr.store import CHECKSUM, PersonalStateStore, StateError, write_safetensors_atomic
from fedlora_flwr.training import train_schedule
from strategies.base import ARRAYS, average_arrays
from strategies.protocol import TRAINED_EVALUATION

TASK = TaskSpec(num_classes=10)
FAMILY = MODEL_FAMILIES["cnn-hetero"]
ADAPTER_KEYS = ["adapter.lora_A", "adapter.lora_B", "adapter.bias"]


def _config(tmp_path: Path, **overrides):
    return load_config({**app_defaults(), "method": "pfedlora", "model-family": "cnn-hetero", "dataset": "synthetic",
                        "device": "cpu", "output-dir": str(tmp_path), **overrides})


def _state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --------------------------------------------------------------------------- family and adapter


def test_cnn_family_is_methods_c1():
    """FedGH's CNNs.py: conv2 filters, flatten and FC1 width per member; h is 500-d for all; client k
    gets CNN-((k mod 5) + 1)."""
    expected = {"cnn-1": (32, 800, 2000), "cnn-2": (16, 400, 2000), "cnn-3": (32, 800, 1000),
                "cnn-4": (32, 800, 800), "cnn-5": (32, 800, 500)}
    assert FAMILY == tuple(expected)
    for name, (filters, flatten, fc1) in expected.items():
        model = build_model(name, 10)
        assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (3, 16, (5, 5))
        assert model.conv2.out_channels == filters
        assert (model.fc1.in_features, model.fc1.out_features) == (flatten, fc1)
        assert (model.fc2.out_features, model.fc.in_features, model.fc.out_features) == (500, 500, 10)
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 500)
    assert [family_member("cnn-hetero", k) for k in range(7)] == ["cnn-1", "cnn-2", "cnn-3", "cnn-4", "cnn-5", "cnn-1", "cnn-2"]
    assert all(member in MODELS for members in MODEL_FAMILIES.values() for member in members)


def test_adapter_shapes_and_init_are_identical_on_every_architecture(tmp_path):
    """The adapter: A (r × 500) Kaiming-uniform, B (C × r) = 0, b = 0; the same seeded θ⁰ on every client
    whatever its architecture and whatever the global RNG did before."""
    client = PFedLoRAClient(_config(tmp_path, **{"pfedlora-rank": 4}))
    adapters = []
    for pid in range(len(FAMILY)):
        torch.manual_seed(100 + pid)  # the global RNG must not matter
        model = client.build_model(TASK, pid)
        adapters.append(client.partition.state(model, "shared"))
    assert list(adapters[0]) == ADAPTER_KEYS
    assert adapters[0]["adapter.lora_A"].shape == (4, 500) and adapters[0]["adapter.lora_B"].shape == (10, 4)
    assert torch.all(adapters[0]["adapter.lora_B"] == 0) and torch.all(adapters[0]["adapter.bias"] == 0)
    bound = 1 / np.sqrt(500)  # kaiming_uniform_(a=√5) on fan_in 500
    assert adapters[0]["adapter.lora_A"].abs().max() <= bound and adapters[0]["adapter.lora_A"].std() > bound / 4
    assert all(_bitwise_equal(adapters[0], other) for other in adapters[1:])
    other_seed = PFedLoRAClient(_config(tmp_path, **{"pfedlora-rank": 4, "seed": 2})).build_model(TASK, 0)
    assert not torch.equal(other_seed.adapter.lora_A, adapters[0]["adapter.lora_A"])


def test_the_local_model_init_is_the_plain_models():
    """Building the adapter does not consume the global RNG: F_k starts as the plain CNN would."""
    config = load_config({**app_defaults(), "method": "pfedlora", "model-family": "cnn-hetero", "dataset": "synthetic"})
    torch.manual_seed(7)
    combined = PFedLoRAClient(config).build_model(TASK, 2)
    torch.manual_seed(7)
    plain = build_model("cnn-3", 10)
    assert _bitwise_equal(_state_of(combined.local), _state_of(plain))


def test_output_is_the_mu_weighted_sum(tmp_path):
    model = PFedLoRAClient(_config(tmp_path, **{"pfedlora-mu": 0.3})).build_model(TASK, 1)
    with torch.no_grad():
        model.adapter.lora_B.normal_()
        model.adapter.bias.normal_()
        x = torch.randn(3, 3, 32, 32)
        h = model.local.features(x)
        expected = 0.3 * model.local.fc(h) + 0.7 * (h @ model.adapter.lora_A.T @ model.adapter.lora_B.T + model.adapter.bias)
        assert torch.allclose(model(x), expected, atol=1e-5)


# ------------------- invariants: θ identical after aggregation, phase L leaves θ and phase G F_k unchanged, μ = 1


def _data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("pid", [0, 1])
def test_phase_l_leaves_the_adapter_and_phase_g_the_local_model_bitwise_unchanged(tmp_path, pid):
    client = PFedLoRAClient(_config(tmp_path))
    torch.manual_seed(0)
    model = client.build_model(TASK, pid)
    with torch.no_grad():
        model.adapter.lora_B.normal_(std=0.1)  # a trained adapter: gradients reach A too
    x, y = _data()
    phase_l, phase_g = client.schedule()
    assert (phase_l.groups, phase_g.groups) == (("personal",), ("shared",))
    for phase, unchanged, changed in [(phase_l, "adapter", "local"), (phase_g, "local", "adapter")]:
        before = {name: _state_of(getattr(model, name)) for name in ("adapter", "local")}
        train_schedule(model, client.partition, [phase], x, y, batch_size=8, lr=0.1, momentum=0.9,
                       generator=torch.Generator().manual_seed(1), loss_fn=client.loss)
        assert _bitwise_equal(before[unchanged], _state_of(getattr(model, unchanged))), f"{phase.groups} moved {unchanged}"
        moved = _state_of(getattr(model, changed))
        assert all(not torch.equal(before[changed][key], moved[key]) for key in moved), f"{phase.groups} left {changed} alone"


def test_mu_one_gives_a_zero_adapter_gradient(tmp_path):
    x, y = _data(8)
    for mu, zero in [(1.0, True), (0.5, False)]:
        model = PFedLoRAClient(_config(tmp_path, **{"pfedlora-mu": mu})).build_model(TASK, 0)
        with torch.no_grad():
            model.adapter.lora_B.normal_()
        F.cross_entropy(model(x), y).backward()
        grads = [model.adapter.lora_A.grad, model.adapter.lora_B.grad, model.adapter.bias.grad]
        assert all(grad is not None for grad in grads)
        assert all(torch.all(grad == 0) for grad in grads) == zero, mu


def test_schedules_and_their_optimizer(tmp_path):
    config = _config(tmp_path, **{"pfedlora-local-epochs": 2, "pfedlora-adapter-epochs": 3, "pfedlora-lr": 0.05,
                                  "pfedlora-weight-decay": 0.01, "pfedlora-max-grad-norm": 5.0})
    phase_l, phase_g = PFedLoRAClient(config).schedule()
    assert (phase_l.epochs, phase_g.epochs) == (2, 3)
    for phase in (phase_l, phase_g):
        assert (phase.optimizer.name, phase.optimizer.lr, phase.optimizer.weight_decay) == ("sgd", 0.05, 0.01)
        assert phase.optimizer.momentum is None and phase.max_grad_norm == 5.0  # the run's momentum (0.9)
    assert "personal" in phase_g.eval_groups and "shared" in phase_l.eval_groups
    (joint,) = FedAvgAdapterClient(config).schedule()
    assert joint == Phase(("shared", "personal"), epochs=5, optimizer=phase_l.optimizer, max_grad_norm=5.0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value"),
    [("pfedlora-rank", 0), ("pfedlora-mu", 1.5), ("pfedlora-mu", -0.1), ("pfedlora-local-epochs", -1),
     ("pfedlora-lr", 0.0), ("pfedlora-weight-decay", -1.0), ("pfedlora-max-grad-norm", 0.0), ("model-family", "resnets")],
)
def test_bad_pfedlora_key_is_one_line_naming_it(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, **{key: value})
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_family_needs_a_method_whose_uploads_fit_every_architecture(tmp_path):
    with pytest.raises(ConfigError, match=r"method='fedavg' shares architecture-dependent tensors; model-family='cnn-hetero'"):
        _config(tmp_path, method="fedavg")
    heterogeneous = {name for name, method in registry().items() if method.requires.model_family}
    assert heterogeneous == {"pfedlora", "fedavg-adapter", "local"}
    for method in heterogeneous:
        client = registry()[method].client(_config(tmp_path, method=method))
        templates = [{k: (tuple(v.shape), v.dtype) for k, v in client.upload_template(client.build_model(TASK, pid)).items()}
                     for pid in range(len(FAMILY))]
        assert all(template == templates[0] for template in templates), method
    fedavg = registry()["fedavg"].client(_config(tmp_path, method="fedavg", **{"model-family": ""}, model="cnn-1"))
    assert fedavg.architecture(3) == "cnn-1" and fedavg.client_group(3) is None


# --------------------------------------------------------------------------- federation


@pytest.fixture(scope="module")
def pfedlora_run(tmp_path_factory):
    """Five clients, one per architecture, two rounds, evaluated at both points."""
    return _run(tmp_path_factory.mktemp("pfedlora"), "pfedlora-5c", num_clients=5, method="pfedlora",
                model_family="cnn-hetero", evaluate_at="both")


def test_only_adapter_keys_reach_the_server_and_every_client_gets_the_same_adapter(pfedlora_run):
    run_dir, grid, _ = pfedlora_run
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in (1, 2):
        uploads = {pid: _arrays(reply.content[ARRAYS]) for pid, reply in grid.replies[(server_round, train)].items()}
        assert sorted(uploads) == [0, 1, 2, 3, 4]
        assert all(list(upload) == ADAPTER_KEYS for upload in uploads.values())
        for kind in (train, evaluate):
            sent = grid.sent[(server_round, kind)]
            assert all(list(arrays) == ADAPTER_KEYS for arrays in sent.values())
            assert all(_identical(sent[0], arrays) for arrays in sent.values()), f"round {server_round} {kind}"
        # After aggregation: the sample-weighted mean of the uploads, the same for every client.
        sizes = [float(grid.replies[(server_round, train)][pid].content["metrics"]["num-examples"]) for pid in sorted(uploads)]
        mean = average_arrays([grid.replies[(server_round, train)][pid].content[ARRAYS] for pid in sorted(uploads)], sizes)
        assert _identical(grid.sent[(server_round, evaluate)][0], _arrays(mean))
    shared, _ = _state(run_dir / "shared.safetensors")
    assert sorted(shared) == sorted(ADAPTER_KEYS)


def test_personal_files_hold_each_architecture(pfedlora_run):
    run_dir, _, _ = pfedlora_run
    shapes = {}
    for pid in range(5):
        personal, metadata = _state(run_dir / "clients" / str(pid) / "personal.safetensors")
        assert metadata["method"] == "pfedlora" and all(key.startswith("local.") for key in personal)
        shapes[pid] = {key: value.shape for key, value in personal.items()}
        assert sorted(path.name for path in (run_dir / "clients" / str(pid)).iterdir()
                      if ".previous." not in path.name) == ["personal.safetensors"]
    assert shapes[0]["local.fc1.weight"] == (2000, 800) and shapes[1]["local.fc1.weight"] == (2000, 400)
    assert shapes[1]["local.conv2.weight"] == (16, 16, 5, 5) and shapes[4]["local.fc1.weight"] == (500, 800)
    assert len({tuple(sorted(s.items())) for s in shapes.values()}) == 5


def test_metrics_record_the_accuracy_per_architecture(pfedlora_run, tmp_path):
    run_dir, _, _ = pfedlora_run
    for record in _metrics(run_dir):
        per_client, per_group = record["acc_per_client"], record["acc_per_group"]
        assert sorted(per_group) == list(FAMILY)
        for pid, accuracy in per_client.items():  # one client per architecture here
            assert per_group[FAMILY[int(pid)]] == accuracy
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "cnn-hetero"
    report = make_report(run_dir.parent, out=tmp_path / "report", echo=lambda _line: None, plots=False)
    assert "| cnn-1 | cnn-2 | cnn-3 | cnn-4 | cnn-5 |" in report.markdown


def test_the_paper_point_evaluates_the_adapter_after_local_training(pfedlora_run):
    """As in the group's FedGH/FedMRL code, acc_mean is F_k + θ_k before aggregation (the train
    reply's after-training record); after aggregation, F_k + θ̄ (the evaluate reply), recorded beside it."""
    run_dir, grid, run_config = pfedlora_run
    config = load_config(run_config)
    assert registry()["pfedlora"].evaluate_at == "after-training"
    assert config.evaluation_points == ("after-training", "after-aggregation")
    pid = 2
    trained = grid.replies[(2, _train_type(grid))][pid].content
    session = ClientSession.create(config, pid, 5, run_dir / "clients", server_round=2)
    session.load(_state_dict(_arrays(trained[ARRAYS])), training=False)  # F_k of round 2 + its θ_k
    after_training = session.evaluate(after_training=True).accuracy
    assert after_training == trained[TRAINED_EVALUATION]["accuracy"]
    evaluated = grid.replies[(2, _eval_type(grid))][pid].content["metrics"]
    aggregated = evaluated["accuracy"]
    session.load(_state_dict(grid.sent[(2, _eval_type(grid))][pid]), training=False)  # F_k + θ̄
    assert session.evaluate().accuracy == aggregated
    row = _metrics(run_dir)[1]
    assert row["eval_point"] == "after-training"
    assert row["acc_per_client"][str(pid)] == after_training
    assert row["acc_per_client_after_aggregation"][str(pid)] == aggregated
    assert trained[TRAINED_EVALUATION]["eval-loss"] != evaluated["eval-loss"], "F_k + θ_k is not F_k + θ̄"


def _state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value.copy()) for key, value in arrays.items()}


def test_a_stored_local_model_of_another_architecture_is_one_line_and_nothing_is_overwritten(pfedlora_run):
    """Client 0 builds CNN-1; a CNN-3 file (same keys, FC1 2000 → 1000 wide) or a CNN-2 file in its
    place is refused with one line and left as it was: as another client's file, and, relabelled as
    client 0's, for its shapes."""
    run_dir, grid, run_config = pfedlora_run
    config = load_config(run_config)
    received = _state_dict(grid.sent[(2, _eval_type(grid))][0])
    store = PersonalStateStore(run_dir / "clients", "pfedlora")
    path = store.path(0)
    original = path.read_bytes()
    with safe_open(path, framework="pt") as handle:
        own_metadata = {key: value for key, value in handle.metadata().items() if not key.startswith(CHECKSUM)}
    for impostor, needle in [(2, "local.fc1.weight is torch.float32(1000, 800)"), (1, "local.conv2.weight is torch.float32(16, 16, 5, 5)")]:
        impostor_path = run_dir / "clients" / str(impostor) / "personal.safetensors"
        relabelled = dict(load_file(impostor_path))
        for write, message in [(lambda: path.write_bytes(impostor_path.read_bytes()), f"partition-id '{impostor}' (expected '0')"),
                               (lambda: write_safetensors_atomic(path, relabelled, own_metadata), needle)]:
            write()
            foreign = path.read_bytes()
            try:
                session = ClientSession.create(config, 0, 5, run_dir / "clients", server_round=3)
                with pytest.raises(StateError) as info:
                    session.load(received, training=True)
                assert message in str(info.value) and "\n" not in str(info.value)
                assert path.read_bytes() == foreign
            finally:
                path.write_bytes(original)


@pytest.mark.parametrize("method", ["local", "fedavg-adapter"])
def test_controls_run_on_the_family(tmp_path, method):
    run_dir, grid, _ = _run(tmp_path, f"{method}-5c", num_clients=5, method=method, model_family="cnn-hetero")
    uploads = grid.replies[(1, _train_type(grid))]
    expected = [] if method == "local" else ADAPTER_KEYS
    assert all(list(reply.content[ARRAYS]) == expected for reply in uploads.values())
    assert sorted(_metrics(run_dir)[-1]["acc_per_group"]) == list(FAMILY)
    personal, _ = _state(run_dir / "clients" / "1" / "personal.safetensors")
    assert personal[("" if method == "local" else "local.") + "conv2.weight"].shape == (16, 16, 5, 5)


# --------------------------------------------------------------------------- cost measurement


def test_training_cost_counts_the_frozen_local_model_as_forward_only(tmp_path):
    base = {**app_defaults(), "dataset": "synthetic", "device": "cpu", "train-per-client": 20, "batch-size": 10,
            "output-dir": str(tmp_path)}
    pfedlora = load_config({**base, "method": "pfedlora", "model-family": "cnn-hetero"})
    fedavg = load_config({**base, "method": "fedavg", "model": "cnn-1", "local-epochs": 2})
    flops_p, bytes_p = bench.training_cost(pfedlora, 0, 5, tmp_path / "p")
    flops_f, bytes_f = bench.training_cost(fedavg, 0, 5, tmp_path / "f")
    payload_p = (16 * 500 + 10 * 16 + 10) * 4
    payload_f = sum(p.numel() for p in build_model("cnn-1", 10).parameters()) * 4
    assert payload_p < bytes_p < payload_p + 1024 and payload_f < bytes_f < payload_f + 2048  # + keys, dtypes, shapes
    # Phase L = one full training epoch; phase G ≈ one forward pass (1/3 of an epoch's matmul FLOPs).
    assert 0.6 < flops_p / flops_f < 0.7
