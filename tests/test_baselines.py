"""The eight PFL baselines of FedLoRA's Table 1 (clients/*.py document each): each method's defining mechanism
on the real code path (ClientApp/ServerApp in process, tests/inprocess.py), plus the core hooks
they are built on (phases in steps, per-phase eval mode, store slots, per-client messages)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from test_federation import _arrays, _eval_type, _identical, _metrics, _run, _state, _train_type

from clients.fedamp import FedAMPClient
from clients.fedbn import FedBNClient
from clients.fedcac import CRITICAL, critical_mask
from clients.fedper import FedPerClient
from clients.fedrep import FedRepClient
from clients.fedrod import FedRoDClient
from clients.pfedgate import GatedModel, PFedGateClient
from clients.pfedsd import TEACHER
from conftest import app_defaults
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.methods import registry
from fedlora_flwr.results import RunRecorder
from fedlora_flwr.store import PersonalStateStore
from fedlora_flwr.training import train_schedule
from strategies.base import ARRAYS, METRICS, average_arrays
from strategies.fedamp import MODEL, FedAMPStrategy, attention_weights
from strategies.fedcac import FedCACStrategy, collaborators, overlaps
from strategies.protocol import TRAINED_EVALUATION

NUM_CLIENTS = 3
TASK = TaskSpec(num_classes=10)
NEW_METHODS = ["fedper", "fedrep", "fedbn", "fedrod", "fedamp", "pfedsd", "pfedgate", "fedcac"]


def _config(tmp_path: Path, **overrides):
    return load_config({**app_defaults(), "dataset": "synthetic", "model": "cnn", "device": "cpu",
                        "output-dir": str(tmp_path), **overrides})


def _model(client, seed: int = 0):
    torch.manual_seed(seed)
    return client.build_model(TASK, 0)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Bitwise equal tensors under the same keys, whatever the key order (safetensors sorts keys)."""
    return _identical(dict(sorted(a.items())), dict(sorted(b.items())))


def _train_uploads(grid, server_round: int) -> dict[int, dict[str, np.ndarray]]:
    return {pid: _arrays(reply.content[ARRAYS]) for pid, reply in grid.replies[(server_round, _train_type(grid))].items()}


# --------------------------------------------------------------------------- registry and config


def test_the_registry_holds_the_table_1_baselines():
    assert set(NEW_METHODS) <= set(registry())


@pytest.mark.parametrize(
    ("key", "value"),
    [("fedcac-tau", 1.5), ("fedcac-beta", 0), ("fedamp-sigma", 0.0), ("pfedsd-temperature", -1.0),
     ("fedrep-head-epochs", -1), ("pfedgate-budget", 0.5)],
)
def test_bad_method_key_is_one_line_naming_it(tmp_path, key, value):
    method = key.split("-")[0]
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, method=method, **{key: value})
    message = str(info.value)
    assert key in message and "\n" not in message


def test_method_keys_are_recorded_in_config_json(tmp_path):
    run_dir, _, _ = _run(tmp_path, "keys", method="fedrep", **{"fedrep-head-epochs": 1, "num-server-rounds": 1})
    written = json.loads((run_dir / "config.json").read_text())
    assert written["fedrep-head-epochs"] == 1 and written["fedrep-body-epochs"] == 1
    assert "fedcac-tau" not in written  # another method's key: not read, not recorded


# --------------------------------------------------------------------------- every method end to end


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_baseline_writes_the_output_contract(tmp_path, method):
    run_dir, grid, _ = _run(tmp_path, method, method=method)
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m["acc_per_client"]) == {str(pid) for pid in range(NUM_CLIENTS)}
        assert m["num_participants"] == NUM_CLIENTS and m["num_failures"] == 0
        assert m["bytes_up"] > 0
    assert (run_dir / "summary.json").is_file() and (run_dir / "shared.safetensors").is_file()


# --------------------------------------------------------------------------- FedPer / FedRep


def test_fedper_heads_are_personal_and_bodies_identical(tmp_path):
    run_dir, grid, config = _run(tmp_path, "fedper", method="fedper")
    head = {"fc.weight", "fc.bias"}
    for server_round in (1, 2):
        for pid, upload in _train_uploads(grid, server_round).items():
            assert not head & set(upload), f"client {pid} uploaded its head"
        sent = grid.sent[(server_round, _eval_type(grid))]
        assert all(_identical(sent[0], sent[pid]) for pid in sent), "one body for all"
    heads = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert all(set(h) == head for h in heads)
    assert not np.array_equal(heads[0]["fc.weight"], heads[1]["fc.weight"])


def test_fedrep_head_phase_then_body_phase(tmp_path):
    client = FedRepClient(_config(tmp_path, method="fedrep", **{"fedrep-head-epochs": 2, "fedrep-body-epochs": 1}))
    model = _model(client)
    head_phase, body_phase = client.schedule()
    assert (head_phase.groups, head_phase.epochs, body_phase.groups, body_phase.epochs) == (("personal",), 2, ("shared",), 1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for phase, trained in ((head_phase, "fc."), (body_phase, None)):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        train_schedule(model, client.partition, [phase], x, y, batch_size=8, lr=0.1, momentum=0.9,
                       generator=torch.Generator().manual_seed(0))
        for key, param in model.named_parameters():
            in_head = key.startswith("fc.")
            moved = not torch.equal(before[key], param.detach())
            if (trained == "fc.") == in_head:
                assert moved, f"{key} should have been trained"
            else:
                assert not moved and param.grad is None, f"{key} got a gradient in the wrong phase"


# --------------------------------------------------------------------------- FedBN


def test_fedbn_personalizes_every_batchnorm_including_the_shortcut(tmp_path):
    client = FedBNClient(_config(tmp_path, model="resnet8"))
    model = _model(client)
    personal = set(client.partition.keys(model, "personal"))
    bn_keys = {f"{name}.{suffix}" for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)
               for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert personal == bn_keys
    assert "layers.1.0.downsample.1.running_var" in personal


def test_fedbn_batchnorm_never_reaches_the_server_and_differs(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "fedbn", method="fedbn")
    for server_round in (1, 2):
        for upload in _train_uploads(grid, server_round).values():
            assert not [key for key in upload if key.startswith("bn")], "BN tensors were uploaded"
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert all(key.startswith("bn") for key in states[0])
    assert not np.array_equal(states[0]["bn1.running_mean"], states[1]["bn1.running_mean"])


# --------------------------------------------------------------------------- FedRoD


def test_fedrod_loss_is_balanced_softmax_plus_personal_ce_and_body_ignores_the_personal_term(tmp_path):
    client = FedRoDClient(_config(tmp_path))
    model = _model(client)
    with torch.no_grad():
        model.personal_head.weight.normal_(0, 0.1)
    counts = torch.tensor([5.0, 0, 3, 0, 0, 0, 0, 0, 2, 0])
    client.log_prior = torch.where(counts > 0, counts.log(), torch.full_like(counts, -69.0))
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 2, 8, 2, 0, 8, 0])
    model.train()
    torch.manual_seed(1)
    total = client.loss(model, x, y)
    features = model.features(x)
    generic = model.fc(features)
    balanced = F.cross_entropy(generic + client.log_prior, y)
    personal = F.cross_entropy(model.personal_head(features) + generic, y)
    assert torch.allclose(total, balanced + personal, rtol=1e-5)

    body = [p for k, p in model.named_parameters() if not k.startswith(("fc.", "personal_head."))]
    grads_total = torch.autograd.grad(client.loss(model, x, y), body)
    grads_generic = torch.autograd.grad(F.cross_entropy(model.fc(model.features(x)) + client.log_prior, y), body)
    for a, b in zip(grads_total, grads_generic):
        assert torch.allclose(a, b, atol=1e-6), "L_p must not reach the body (h detached)"

    model.eval()
    with torch.no_grad():
        expected = model.personal_head(model.features(x)) + model.fc(model.features(x))
        assert torch.equal(client.predict(model, x), expected)


def test_fedrod_uses_the_clients_class_counts_and_keeps_the_personal_head(tmp_path):
    run_dir, grid, config = _run(tmp_path, "fedrod", method="fedrod")
    session = ClientSession.create(load_config(config), 1, NUM_CLIENTS, tmp_path / "store", server_round=1)
    session.method.begin_training(session)
    counts = np.bincount(session.dataset.y_train[session.split.train], minlength=10)
    expected = np.where(counts > 0, np.log(np.maximum(counts, 1)), -69.0776)
    np.testing.assert_allclose(session.method.log_prior.numpy(), expected, atol=1e-3)
    for upload in _train_uploads(grid, 1).values():
        assert "fc.weight" in upload and not [k for k in upload if k.startswith("personal_head.")]
    heads = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert set(heads[0]) == {"personal_head.weight", "personal_head.bias"}
    assert not np.array_equal(heads[0]["personal_head.weight"], heads[1]["personal_head.weight"])


def test_fedrod_evaluation_predicts_with_the_personal_head(tmp_path):
    _, grid, config = _run(tmp_path, "fedrod-eval", method="fedrod", **{"num-server-rounds": 1})
    reply = grid.replies[(1, _eval_type(grid))][0]
    session = ClientSession.create(load_config(config), 0, NUM_CLIENTS, Path(config["output-dir"]) / "fedrod-eval" / "clients",
                                   server_round=1)
    received = {k: torch.from_numpy(v) for k, v in grid.sent[(1, _eval_type(grid))][0].items()}
    session.load(received, training=False)
    assert session.evaluate().accuracy == pytest.approx(float(reply.content[METRICS]["accuracy"]))
    x, y = session.tensors(train=False)
    session.model.eval()
    with torch.no_grad():
        personal = session.method.predict(session.model, x).argmax(1)
    assert int((personal == y).sum()) / len(y) == pytest.approx(float(reply.content[METRICS]["accuracy"]))


# --------------------------------------------------------------------------- FedAMP


def _strategy(cls, tmp_path: Path, method: str, **overrides):
    config = _config(tmp_path, method=method, **overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    template = registry()[method].client(config).upload_template(_model(registry()[method].client(config)))
    return cls.from_config(config, RunRecorder(run_dir, config), upload_template=ArrayRecord(template))


def _record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array.from_numpy_ndarray(np.asarray(value)) for key, value in tensors.items()})


def test_fedamp_messages_equal_w_i_when_all_models_are_equal(tmp_path):
    strategy = _strategy(FedAMPStrategy, tmp_path, "fedamp", **{"fedamp-sigma": 1e6})
    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.asarray(4, dtype=np.int64)}
    for pid in range(3):
        strategy.server_store.at_round(1).save(pid, {k: torch.from_numpy(v) for k, v in w.items()}, slot=MODEL)
    strategy.initial_arrays = _record({"w": np.zeros((2, 3), np.float32), "n": np.asarray(0, np.int64)})
    messages = strategy.client_arrays([0, 1, 2], ArrayRecord(), server_round=2, training=True)
    for message in messages:
        assert _identical(_arrays(message), w)


def test_fedamp_messages_are_attention_weighted_by_similarity(tmp_path):
    alpha_k, sigma = 0.5, 2.0
    strategy = _strategy(FedAMPStrategy, tmp_path, "fedamp", **{"fedamp-alpha-k": alpha_k, "fedamp-sigma": sigma})
    models = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([0.0, 2.0])]
    for pid, w in enumerate(models):
        strategy.server_store.at_round(1).save(pid, {"w": torch.tensor(w, dtype=torch.float32)}, slot=MODEL)
    strategy.initial_arrays = _record({"w": np.zeros(2, np.float32)})
    messages = strategy.client_arrays([0, 1, 2, None], ArrayRecord(), server_round=2, training=True)
    received = [message["w"].numpy() for message in messages]
    for i in range(3):
        xi = {j: alpha_k * np.exp(-np.sum((models[i] - models[j]) ** 2) / sigma) / sigma for j in range(3) if j != i}
        expected = (1 - sum(xi.values())) * models[i] + sum(x * models[j] for j, x in xi.items())
        np.testing.assert_allclose(received[i], expected, rtol=1e-6)
    assert not np.allclose(received[0], received[1]), "a different message per client"
    # A node the server holds no model for is taken to hold w⁰ (the zero vector here).
    xi_new = [alpha_k * np.exp(-np.sum(m**2) / sigma) / sigma for m in models]
    np.testing.assert_allclose(received[3], sum(x * m for x, m in zip(xi_new, models)), rtol=1e-6)
    assert strategy.client_arrays([0], ArrayRecord(), 2, training=False)[0].count_bytes() == 0


def test_fedamp_attention_weights_are_rescaled_when_they_exceed_one():
    xi, xi_self = attention_weights(np.array([[np.inf, 0.0, 0.0]]), alpha_k=1.0, sigma=0.5)
    np.testing.assert_allclose(xi, [[0.0, 0.5, 0.5]])
    assert xi_self[0] == 0.0


def test_fedamp_end_to_end_per_client_messages_and_personal_models(tmp_path):
    run_dir, grid, config = _run(tmp_path, "fedamp", method="fedamp", **{"fedamp-sigma": 1e4})
    train, evaluate = _train_type(grid), _eval_type(grid)
    first = grid.sent[(1, train)]
    assert all(_identical(first[0], first[pid]) for pid in first), "round 1: every client gets w⁰"
    second = grid.sent[(2, train)]
    assert not _identical(second[0], second[1]), "round 2: u_i differs per client"
    assert all(not arrays for arrays in grid.sent[(1, evaluate)].values()), "evaluation sends nothing"
    stored = PersonalStateStore(run_dir / "server", "fedamp")
    assert stored.stored_ids(MODEL) == [0, 1, 2]
    uploads = _train_uploads(grid, 2)
    for pid in range(NUM_CLIENTS):
        personal, _ = _state(run_dir / "clients" / str(pid) / "personal.safetensors")
        assert _same(personal, uploads[pid]), "w_i is stored and uploaded"


def test_fedamp_proximal_term_pulls_towards_u_i(tmp_path):
    client = FedAMPClient(_config(tmp_path, method="fedamp", **{"fedamp-lambda": 2.0, "fedamp-alpha-k": 0.5}))
    model = _model(client)
    client.anchor = [param.detach().clone() for param in model.parameters()]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.eval()
    assert torch.allclose(client.loss(model, x, y), F.cross_entropy(model(x), y))
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    shift = 0.1**2 * next(model.parameters()).numel()
    assert torch.allclose(client.loss(model, x, y), F.cross_entropy(model(x), y) + 2.0 / (2 * 0.5) * shift, rtol=1e-4)


# --------------------------------------------------------------------------- pFedSD


def test_pfedsd_teacher_is_the_previous_personalized_model(tmp_path):
    run_dir, grid, config = _run(tmp_path, "pfedsd", method="pfedsd", **{"num-server-rounds": 2})
    config = load_config(config)
    store = PersonalStateStore(run_dir / "clients", "pfedsd")
    uploads = _train_uploads(grid, 2)
    for pid in range(NUM_CLIENTS):
        teacher = {k: v.numpy() for k, v in store.load(pid, expected=_teacher_template(config), slot=TEACHER).items()}
        assert _same(teacher, uploads[pid]), "the teacher is the model right after local training"
    # The paper point: the personalized model right after local training (the teacher), carried by
    # the train reply; no evaluate message is sent.
    assert config.evaluation_points == ("after-training",)
    assert not [key for key in grid.sent if key[1].startswith("evaluate")]
    reply = grid.replies[(2, _train_type(grid))][1].content[TRAINED_EVALUATION]
    session = ClientSession.create(config, 1, NUM_CLIENTS, run_dir / "clients", server_round=2)
    session.load({k: torch.from_numpy(v) for k, v in uploads[1].items()}, training=False)
    assert session.evaluate(after_training=True).accuracy == float(reply["accuracy"])
    assert _metrics(run_dir)[1]["acc_per_client"]["1"] == float(reply["accuracy"])


def _teacher_template(config):
    client = registry()["pfedsd"].client(config)
    return _model(client).state_dict()


def test_pfedsd_no_distillation_in_the_first_round_and_teacher_unchanged(tmp_path):
    config = _config(tmp_path, method="pfedsd", **{"local-epochs": 1, "lora-epochs": 0, "train-per-client": 16, "batch-size": 8})
    store_root = tmp_path / "clients"
    first = ClientSession.create(config, 0, NUM_CLIENTS, store_root, server_round=1)
    first.load(first.method.initial_download(first.model), training=True)
    first.method.begin_training(first)
    assert first.method.teacher is None
    x, y = first.tensors(train=True)
    assert torch.equal(first.method.loss(first.model, x, y), F.cross_entropy(first.model(x), y))
    first.train()

    second = ClientSession.create(config, 0, NUM_CLIENTS, store_root, server_round=2)
    global_model = {k: v + 0.01 if v.is_floating_point() else v for k, v in first.model.state_dict().items()}
    second.load(global_model, training=True)
    second.method.begin_training(second)
    teacher = second.method.teacher
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(teacher_before[k], first.model.state_dict()[k]) for k in teacher_before)
    logits = second.model(x)
    kd = F.kl_div(F.log_softmax(logits / 3.0, 1), F.softmax(teacher(x) / 3.0, 1), reduction="batchmean")
    assert torch.allclose(second.method.loss(second.model, x, y), F.cross_entropy(logits, y) + 0.5 * 9.0 * kd, rtol=1e-5)
    train_schedule(second.model, second.method.partition, second.method.schedule(), x, y, batch_size=8, lr=0.1,
                   momentum=0.9, generator=torch.Generator().manual_seed(0), loss_fn=second.method.loss)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items()), "teacher changed"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# --------------------------------------------------------------------------- pFedGate


def test_pfedgate_with_all_gates_one_is_the_base_model(tmp_path):
    client = PFedGateClient(_config(tmp_path, method="pfedgate"))
    model = _model(client)
    assert isinstance(model, GatedModel)
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ones = torch.ones(len(list(model.base.parameters())))
        assert torch.equal(model.gated_forward(x, ones), model.base(x))
        gates = model.gate(x)
    assert gates.shape == ones.shape and torch.all((gates > 0) & (gates < 1))
    assert set(client.partition.keys(model, "personal")) == {k for k in model.state_dict() if k.startswith("gate.")}
    assert set(client.partition.keys(model, "shared")) == {k for k in model.state_dict() if k.startswith("base.")}


def test_pfedgate_schedule_alternates_gate_and_base_passes_with_the_other_in_eval_mode(tmp_path):
    client = PFedGateClient(_config(tmp_path, method="pfedgate", **{"local-epochs": 2}))
    schedule = client.schedule()
    assert [phase.groups for phase in schedule] == [("personal",), ("shared",)] * 2
    assert all(phase.max_grad_norm == 10.0 and phase.epochs == 1 for phase in schedule)
    model = _model(client)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_schedule(model, client.partition, schedule[:1], x, y, batch_size=8, lr=0.1, momentum=0.9,
                   generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    for key in before:
        if key.startswith("base."):
            assert torch.equal(before[key], after[key]), f"gate pass changed the base ({key}: eval mode, frozen)"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("gate.linear"))


def test_pfedgate_drops_the_last_partial_batch_so_a_batch_of_one_never_reaches_the_gate(tmp_path):
    """21 samples in batches of 10 (≡ 1 mod the batch size): the official loader's drop_last leaves
    the 1-sample batch out of both passes (BatchNorm1d cannot train on it: this used to raise)."""
    client = PFedGateClient(_config(tmp_path, method="pfedgate", **{"local-epochs": 2}))
    model = _model(client)
    x, y = torch.randn(21, 3, 32, 32), torch.randint(0, 10, (21,))
    stats = train_schedule(model, client.partition, client.schedule(), x, y, batch_size=10, lr=0.1, momentum=0.9,
                           generator=torch.Generator().manual_seed(0))
    assert (stats.steps, stats.samples) == (8, 80)  # 2 epochs × 2 passes × 2 full batches


def test_pfedgate_uploads_the_base_and_keeps_the_gate(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "pfedgate", method="pfedgate")
    for upload in _train_uploads(grid, 1).values():
        assert upload and all(key.startswith("base.") for key in upload)
    gates = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert all(key.startswith("gate.") for key in gates[0])
    assert not np.array_equal(gates[0]["gate.linear.weight"], gates[1]["gate.linear.weight"])


# --------------------------------------------------------------------------- FedCAC


def test_fedcac_critical_mask_is_the_top_tau_fraction():
    before = torch.zeros(10)
    after = torch.arange(10, dtype=torch.float32)  # score |Δw·w| = i²
    assert critical_mask(before, after, 0.3).tolist() == [0] * 7 + [1] * 3
    assert critical_mask(before, after, 0.0).sum() == 0
    # Top-k threshold ≈ 0: the smallest positive score is the threshold instead (Fling).
    sparse = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0])
    assert critical_mask(torch.zeros(5), sparse, 0.6).tolist() == [0, 0, 0, 0, 1]
    # No positive score (the tensor did not move): Fling's threshold stays 0 and c >= 0 everywhere.
    still = torch.tensor([0.5, -1.0, 0.0, 2.0])
    assert critical_mask(still, still.clone(), 0.5).tolist() == [1, 1, 1, 1]
    assert critical_mask(still, still.clone(), 0.1).tolist() == [0, 0, 0, 0], "⌊τ·n⌋ = 0: none"


def test_fedcac_overlap_and_collaborators():
    masks = [np.array([1, 1, 0, 0]), np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1]), np.zeros(4)]
    overlap = overlaps(masks)
    assert overlap[0, 1] == 1.0 and overlap[0, 2] == 0.0 and overlap[3, 0] == 0.0
    groups = collaborators(overlap[:3, :3], server_round=50, beta=100)
    assert groups[0] == [0, 1] and groups[2] == [2]


def _fedcac_reply(pid: int, model: dict[str, np.ndarray], mask: dict[str, np.ndarray], n: int) -> Message:
    tensors = {**model, **{CRITICAL + k: v.astype(np.uint8) for k, v in mask.items()}}
    metrics = MetricRecord({"num-examples": n, "partition-id": pid, "train-loss": 1.0})
    return Message(RecordDict({ARRAYS: _record(tensors), METRICS: metrics}), dst_node_id=0, message_type="train")


def test_fedcac_merge_is_element_wise_exact(tmp_path):
    strategy = _strategy(FedCACStrategy, tmp_path, "fedcac")
    rng = np.random.default_rng(0)
    models = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.asarray(2, np.int64)} for _ in range(3)]
    masks = [{"w": rng.random((3, 4)) < 0.5} for _ in range(3)]
    replies = [_fedcac_reply(pid, models[pid], masks[pid], n) for pid, n in zip(range(3), (10, 20, 30))]
    w_bar = strategy.aggregate(5, replies, [10.0, 20.0, 30.0])
    expected_bar = average_arrays([_record(m) for m in models], [10.0, 20.0, 30.0])
    assert _identical(_arrays(w_bar), _arrays(expected_bar))
    overlap = overlaps([m["w"].reshape(-1) for m in masks])
    groups = collaborators(overlap, 5, 100)
    messages = strategy.client_arrays([0, 1, 2, None], w_bar, 5, training=False)
    for pid in range(3):
        group_mean = np.mean([models[j]["w"].astype(np.float64) for j in groups[pid]], axis=0).astype(np.float32)
        expected = np.where(masks[pid]["w"], group_mean, w_bar["w"].numpy())
        assert np.array_equal(messages[pid]["w"].numpy(), expected)
        assert np.array_equal(messages[pid]["n"].numpy(), w_bar["n"].numpy()), "unmasked tensors take w̄"
    assert _identical(_arrays(messages[3]), _arrays(w_bar)), "a client without a customized model gets w̄"
    # A later w̄ reaches the non-critical entries of a client that did not train again.
    newer = _record({"w": np.full((3, 4), 7.0, np.float32), "n": np.asarray(3, np.int64)})
    merged = strategy.client_arrays([0], newer, 6, training=True)[0]["w"].numpy()
    assert np.array_equal(merged[~masks[0]["w"]], np.full((3, 4), 7.0, np.float32)[~masks[0]["w"]])
    assert np.array_equal(merged[masks[0]["w"]], messages[0]["w"].numpy()[masks[0]["w"]])


def test_fedcac_with_tau_zero_and_global_bn_stats_is_fedavg(tmp_path):
    cac_dir, cac_grid, _ = _run(tmp_path / "a", "fedcac-0", method="fedcac",
                                **{"fedcac-tau": 0.0, "fedcac-bn-stats": "global"})
    avg_dir, avg_grid, _ = _run(tmp_path / "b", "fedavg", method="fedavg")
    for a, b in zip(_metrics(cac_dir), _metrics(avg_dir), strict=True):
        assert a["acc_per_client"] == b["acc_per_client"] and a["train_loss"] == b["train_loss"]
    for server_round in (1, 2):
        for pid in range(NUM_CLIENTS):
            assert _identical(cac_grid.sent[(server_round, _eval_type(cac_grid))][pid],
                              avg_grid.sent[(server_round, _eval_type(avg_grid))][pid])


def test_fedcac_with_tau_zero_sends_fedavg_parameters_and_keeps_bn_stats_local(tmp_path):
    """Fling at τ = 0: every parameter is w̄ (running statistics do not enter a training-mode
    forward pass, so the parameters follow FedAvg's bit for bit), but each client evaluates with
    its own BatchNorm statistics, which never reach the server."""
    cac_dir, cac_grid, _ = _run(tmp_path / "a", "fedcac-0", method="fedcac", **{"fedcac-tau": 0.0})
    avg_dir, avg_grid, _ = _run(tmp_path / "b", "fedavg", method="fedavg")
    for a, b in zip(_metrics(cac_dir), _metrics(avg_dir), strict=True):
        assert a["train_loss"] == b["train_loss"]
    for server_round in (1, 2):
        for pid in range(NUM_CLIENTS):
            sent = cac_grid.sent[(server_round, _eval_type(cac_grid))][pid]
            averaged = avg_grid.sent[(server_round, _eval_type(avg_grid))][pid]
            assert set(sent) == {key for key in averaged if not key.endswith(BUFFERS)}
            assert _same(sent, {key: averaged[key] for key in sent})


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def test_fedcac_bn_stats_stay_on_each_client(tmp_path):
    """Fling writes only ``named_parameters`` into a client's model after round 0: BatchNorm
    statistics are never uploaded nor merged, each client keeps (and evaluates with) its own."""
    run_dir, grid, config = _run(tmp_path, "fedcac", method="fedcac")
    client = registry()["fedcac"].client(load_config(config))
    model = _model(client)
    buffers = {key for key, _ in model.named_buffers()}
    assert buffers and set(client.partition.keys(model, "personal")) == buffers
    for server_round in (1, 2):
        for upload in _train_uploads(grid, server_round).values():
            assert not buffers & set(upload), "BN statistics were uploaded"
            assert {key for key in upload if key.startswith(CRITICAL)} == {CRITICAL + k for k, _ in model.named_parameters()}
        for sent in grid.sent[(server_round, _eval_type(grid))].values():
            assert not buffers & set(sent), "BN statistics were sent"
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    assert all(set(state) == buffers for state in states)
    assert not np.array_equal(states[0]["bn1.running_mean"], states[1]["bn1.running_mean"])
    # Round 2's statistics continue round 1's: two rounds × 2 epochs × 2 batches of 8 out of 16.
    assert int(states[0]["bn1.num_batches_tracked"]) == 2 * 2 * 2


def test_fedcac_sends_customized_models(tmp_path):
    _, grid, _ = _run(tmp_path, "fedcac", method="fedcac", **{"fedcac-beta": 1})
    uploads = _train_uploads(grid, 1)
    for upload in uploads.values():
        masks = [key for key in upload if key.startswith(CRITICAL)]
        assert masks and all(upload[key].dtype == np.uint8 for key in masks)
    sent = grid.sent[(1, _eval_type(grid))]
    assert not _identical(sent[0], sent[1]), "each client gets its own customized model"
    assert all(not [key for key in arrays if key.startswith(CRITICAL)] for arrays in sent.values())


# --------------------------------------------------------------------------- core hooks


def test_phase_counts_steps_across_epochs():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.randn(20, 3, 4, 4), torch.randint(0, 10, (20,))
    stats = train_schedule(model, ParameterPartition(), [Phase(groups=("shared",), steps=7)], x, y, batch_size=8,
                           lr=0.1, momentum=0.0, generator=torch.Generator().manual_seed(0))
    assert stats.steps == 7 and stats.samples == 8 + 8 + 4 + 8 + 8 + 4 + 8
    with pytest.raises(ValueError, match="exactly one"):
        Phase(groups=("shared",), epochs=1, steps=1)


def test_frozen_batchnorm_stays_in_eval_mode_and_does_not_drift(tmp_path):
    partition = ParameterPartition(frozen=lambda key, module: isinstance(module, torch.nn.BatchNorm2d))
    model = _model(FedPerClient(_config(tmp_path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    train_schedule(model, partition, [Phase(groups=("shared",), epochs=1)], x, y, batch_size=8, lr=0.1, momentum=0.9,
                   generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_store_slots_are_separate_files(tmp_path):
    store = PersonalStateStore(tmp_path, "pfedsd", round=1)
    store.save(3, {"a": torch.ones(2)})
    store.save(3, {"b": torch.zeros(1)}, slot=TEACHER)
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["personal.safetensors", "teacher.safetensors"]
    assert store.stored_ids(TEACHER) == [3] and store.stored_ids("other") == []
    assert torch.equal(store.load(3, {"b": torch.ones(1)}, slot=TEACHER)["b"], torch.zeros(1))
