"""examples/plain_serverapp.py: a user's own ServerApp running FedLoRAStrategy (no recorder, no run
folder) with this project's ClientApp, in process. It must train exactly as this app's ServerApp
does: the same σ̄, the same τ_i, and Flower ``Result`` metrics equal to the recorded rows."""

from __future__ import annotations

import importlib.util

from conftest import REPO
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors.torch import load_file
from test_federation import _metrics, _quiet_flower, _run_config, _start

from fedlora_flwr import client_app
from strategies.fedlora import FedLoRAStrategy

NUM_CLIENTS = 3


def _example():
    spec = importlib.util.spec_from_file_location("plain_serverapp", REPO / "examples" / "plain_serverapp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_serverapp_trains_as_this_apps_serverapp(tmp_path, monkeypatch):
    overrides = {"fraction-train": 0.67, "num-server-rounds": 2}
    reference_config = _run_config(tmp_path / "app", "run", **overrides)
    _start(InProcessGrid(client_app.app, NUM_CLIENTS, reference_config), reference_config)
    reference = tmp_path / "app" / "run"

    results = []
    start = FedLoRAStrategy.start

    def keep_result(self, *args, **kwargs):
        assert self.recorder is None
        results.append(start(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(FedLoRAStrategy, "start", keep_result)
    config = _run_config(tmp_path / "plain", "unused", **overrides)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with _quiet_flower():
        _example().main(InProcessGrid(client_app.app, NUM_CLIENTS, config), context)

    run_dir = tmp_path / "plain" / "plain-serverapp"
    assert sorted(path.name for path in run_dir.iterdir()) == ["clients", "sigma.safetensors"], "nothing recorded"
    sigma, shared = load_file(run_dir / "sigma.safetensors"), load_file(reference / "shared.safetensors")
    assert list(sigma) == list(shared) and all(sigma[key].equal(shared[key]) for key in shared)
    for pid in range(NUM_CLIENTS):
        tau = load_file(run_dir / "clients" / str(pid) / "personal.safetensors")
        expected = load_file(reference / "clients" / str(pid) / "personal.safetensors")
        assert all(tau[key].equal(expected[key]) for key in expected), f"client {pid}'s τ differs"

    (result,) = results
    rows = _metrics(reference)
    assert sorted(result.evaluate_metrics_clientapp) == sorted(result.train_metrics_clientapp) == [1, 2]
    for row in rows:
        assert result.evaluate_metrics_clientapp[row["round"]]["acc-mean"] == row["acc_mean"]
        assert result.train_metrics_clientapp[row["round"]]["train-loss"] == row["train_loss"]
