"""PF2LoRA and lora-ft on the pretrained MiniLM (issue 10's text setting): the
encoder frozen and never sent, the two adapters on ``lora-target-modules``, the head shared; the
double backward through BERT attention with dropout on. Small: 3 clients, 16 tokens, one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_federation import _arrays, _eval_type, _identical, _metrics, _state, _train_type
from test_text import AGNEWS, MISSING, NUM_CLIENTS, _config, _session, _tiny_run, is_head

from fedlora_flwr import bilevel, peft_models, text, text_models
from fedlora_flwr.adapters import CLIENT, COMMON, is_adapter_key
from strategies.base import ARRAYS

pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"the text extra is not installed ({', '.join(MISSING)}): pip install -e '.[text]'"),
    pytest.mark.skipif(not (AGNEWS / text.AGNEWS_FILE).is_file(), reason=f"{AGNEWS} absent: AG_NEWS lives in ../shared/data"),
]

PF2 = {"lr-upper": 0.05, "lr-lower": 0.05}


def _common_or_head(key: str) -> bool:
    return is_adapter_key(key, COMMON) or (is_head(key) and not peft_models.is_adapter(key))


@pytest.mark.parametrize("method", ["pf2lora", "pf2lora-simultaneous", "lora-ft"])
def test_encoder_frozen_unchanged_and_never_uploaded(tmp_path, method):
    config = _config(tmp_path, method, **PF2)
    pristine = {k: v.clone() for k, v in text_models.pretrained_backbone(text_models.checkpoint_path("minilm")).state_dict().items()}
    session = _session(config, 0, tmp_path)
    model, partition = session.model, session.method.partition
    groups = partition.groups(model)
    assert {k for k, g in groups.items() if g == "frozen"} == {k for k in groups if not (peft_models.is_adapter(k) or is_head(k))}
    adapted = {k.split(".lora_")[0] for k in groups if ".lora_" in k}
    assert adapted and all(k.endswith((".query", ".value")) for k in adapted) and len(adapted) == 12
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, upload = session.train()
    assert stats.steps == config.params.local_steps and np.isfinite(stats.loss)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k, g in groups.items() if g == "frozen")
    cached = text_models.pretrained_backbone(text_models.checkpoint_path("minilm")).state_dict()
    assert all(torch.equal(pristine[k], cached[k]) for k in pristine)
    assert set(upload) == {k for k in groups if _common_or_head(k)}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(peft_models.is_lora_b(k) and is_adapter_key(k, COMMON) for k in changed), "B trained"
    assert any(is_head(k) for k in changed), "head trained"
    if method != "lora-ft":
        assert {k for k, g in groups.items() if g == "personal"} == {k for k in groups if is_adapter_key(k, CLIENT)}
        assert any(is_adapter_key(k, CLIENT) for k in changed), "D_k trained"


def test_personal_head_goes_with_the_client_adapter(tmp_path):
    session = _session(_config(tmp_path, "pf2lora", **{"pf2lora-head": "personal"}), 0, tmp_path)
    personal = session.method.partition.keys(session.model, "personal")
    assert set(personal) == {k for k in session.model.state_dict() if is_adapter_key(k, CLIENT) or is_head(k)}


def test_every_forward_of_a_bilevel_step_draws_the_same_dropout_masks(tmp_path):
    session = _session(_config(tmp_path, "pf2lora"), 0, tmp_path)
    model = session.model.train()
    xb, yb = (t[:4] for t in session.tensors(train=True))
    live = dict(model.named_parameters())
    f = bilevel.batch_objective(model, lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y), xb, yb, live)
    first, again = f(live, {}), f(live, {})
    substituted = f({k: v.clone() for k, v in live.items()}, {})
    assert torch.equal(first, again) and torch.equal(first, substituted)
    torch.manual_seed(123)
    other = torch.nn.functional.cross_entropy(model(xb), yb)
    assert not torch.equal(first, other), "dropout is on: another RNG state, other masks"


@pytest.fixture(scope="module")
def pf2lora_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("pf2lora"), "pf2lora", **PF2)


def test_pf2lora_shares_common_adapter_and_head_and_keeps_client_adapters(pf2lora_run):
    run_dir, grid, config = pf2lora_run
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in (1, 2):
        uploads = {pid: _arrays(reply.content[ARRAYS]) for pid, reply in grid.replies[(server_round, train)].items()}
        assert len(uploads) == NUM_CLIENTS
        assert all(up and all(_common_or_head(k) for k in up) for up in uploads.values()), "only (B, A) and head"
        assert all(peft_models.is_adapter(k) or is_head(k) for up in uploads.values() for k in up), "no backbone"
        assert not _identical(uploads[0], uploads[1]), "trained locally before the mean"
        received = list(grid.sent[(server_round, evaluate)].values())
        assert len(received) == NUM_CLIENTS and all(_identical(received[0], r) for r in received), "one (B̄, Ā) for all"
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors")[0] for pid in range(NUM_CLIENTS)]
    for tensors in states:
        assert tensors and all(is_adapter_key(k, CLIENT) for k in tensors)
    d_keys = [k for k in states[0] if peft_models.is_lora_b(k)]
    assert d_keys and all(not np.array_equal(states[0][k], states[1][k]) for k in d_keys), "distinct D_k"
    assert all(m["num_participants"] == NUM_CLIENTS and m["bytes_up"] > 0 for m in _metrics(run_dir))


def test_unknown_target_module_is_one_line(tmp_path):
    config = _config(tmp_path, "pf2lora", **{"lora-target-modules": "nosuchlayer"})
    with pytest.raises(ValueError) as info:
        _session(config, 0, tmp_path)
    assert "lora-target-modules='nosuchlayer'" in str(info.value) and "\n" not in str(info.value)
