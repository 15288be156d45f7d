"""The benchmark's plain-PyTorch baseline does the same work as the Flower run it is compared with."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors.torch import load_file

from fedlora_flwr import bench, client_app, server_app
from fedlora_flwr.config import load_config


@pytest.mark.parametrize("method", ["fedlora", "fedavg"])
def test_plain_federation_matches_the_flower_run(tmp_path, method):
    run_config = {
        **app_defaults(), "method": method, "dataset": "synthetic", "model": "cnn", "num-server-rounds": 2,
        "local-epochs": 1, "lora-epochs": 1, "train-per-client": 16, "test-per-client": 8, "batch-size": 8,
        "device": "cpu", "output-dir": str(tmp_path), "run-name": "flower",
    }
    grid = InProcessGrid(client_app.app, 3, run_config)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    flower_shared = load_file(tmp_path / "flower" / "shared.safetensors")

    round_seconds, plain_shared = bench.plain_federation(load_config(run_config), 3, tmp_path / "plain" / "clients")
    assert len(round_seconds) == 2 and min(round_seconds) > 0
    assert flower_shared.keys() == plain_shared.keys()
    for key, value in flower_shared.items():
        assert torch.equal(value, plain_shared[key]), key
    if method == "fedlora":
        assert sorted(p.name for p in (tmp_path / "plain" / "clients").iterdir()) == ["0", "1", "2"]


def test_bench_refuses_a_missing_npz(tmp_path, capsys):
    args = argparse.Namespace(dataset="npz", data_dir=tmp_path / "missing.npz", out=tmp_path, which="overhead")
    assert bench.run_benchmarks(args) == 2
    assert "missing.npz" in capsys.readouterr().out


def test_plain_process_runs_the_plain_federation_in_a_fresh_python(tmp_path):
    run_config = {
        **app_defaults(), "method": "fedlora", "dataset": "synthetic", "model": "cnn", "num-server-rounds": 2,
        "local-epochs": 1, "lora-epochs": 1, "train-per-client": 16, "test-per-client": 8, "batch-size": 8,
        "device": "cpu", "output-dir": str(tmp_path), "run-name": "plain",
    }
    config = load_config(run_config)
    result = bench.plain_process(config, 3, tmp_path)
    _, in_process = bench.plain_federation(config, 3, tmp_path / "again")
    assert len(result["round_s"]) == 2 and result["wall_s"] > sum(result["round_s"])
    assert result["shared"].keys() == in_process.keys()
    for key, value in in_process.items():
        assert torch.equal(value, result["shared"][key]), key
