"""The benchmarks: the plain-PyTorch baseline does the same work as the Flower run it is compared with;
the new options' CPU paths (--model, --device, --workers, throughput, paper) and their refusals."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from conftest import app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from safetensors.torch import load_file

from fedlora_flwr import bench, cli, client_app, server_app
from fedlora_flwr.config import load_config
from fedlora_flwr.data import PartitionConfig, partition_dataset
from fedlora_flwr.superlink import federation_config


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
    args = argparse.Namespace(dataset="npz", data_dir=tmp_path / "missing.npz", out=tmp_path, which="overhead", device="cpu")
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


def test_bench_refuses_cuda_without_one_visible_gpu(tmp_path, capsys):
    if torch.cuda.device_count() == 1:
        pytest.skip("one CUDA GPU is visible here: --device cuda runs")
    assert cli.main(["bench", "overhead", "--device", "cuda", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("bench: --device cuda needs one visible CUDA GPU") and "\n" not in out
    assert not list(tmp_path.iterdir())


def test_bench_paper_refuses_synthetic_data(tmp_path, capsys):
    assert cli.main(["bench", "paper", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    assert "real CIFAR-10 npz" in capsys.readouterr().out


def test_client_resources_share_the_cpus_and_the_gpu():
    assert bench.client_resources("cpu", 2, cpus=2) == (1, 0.0)
    assert bench.client_resources("cpu", 1, cpus=16) == (16, 0.0)
    assert [bench.client_resources("cuda", k, cpus=16) for k in (1, 2, 3, 8, 16)] == [
        (16, 1.0), (8, 0.5), (5, 0.3333), (2, 0.125), (1, 0.0625)]
    assert bench.client_resources("cuda", 32, cpus=16) == (1, 0.0312)  # 32 x 0.0312 <= 1: they fit


def test_client_gpus_reach_flowers_ray_backend_config():
    """The --federation-config the SuperLink helper passes (grid, bench) becomes the Ray backend's
    client_resources, through Flower's own parsing (`flwr run`, then the simulation runtime)."""
    from flwr.cli.run.run import _parse_federation_config_overrides
    from flwr.cli.typing import SuperLinkConnection
    from flwr.simulation.app import _run_simulation_settings

    text = federation_config(40, client_cpus=1, client_gpus=0.25, ray_cpus=16)
    simulation = _parse_federation_config_overrides([text], SuperLinkConnection(name="local", address="127.0.0.1:9093"))
    num_supernodes, backend, backend_config, _, _ = _run_simulation_settings(simulation)
    assert (num_supernodes, backend) == (40, "ray")
    assert backend_config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert backend_config["init_args"] == {"num_cpus": 16}


def test_the_paper_protocol_is_the_papers_cifar10_setup(tmp_path, real_npz):
    args = cli.build_parser().parse_args(["bench", "paper", "--rounds", "3", "--data-dir", str(real_npz)])
    overrides, clients = bench.paper_protocol(args, tmp_path)
    config = load_config({**app_defaults(), **overrides})
    assert clients == 40 and config.num_server_rounds == 3 and config.data_dir == str(real_npz.resolve())
    assert (config.method, config.model, config.dataset, config.partition, config.alpha) == (
        "fedlora", "resnet8", "npz", "dirichlet", 0.1)
    assert (config.train_per_client, config.test_per_client, config.local_epochs, config.params.lora_epochs) == (500, 100, 5, 2)
    assert (config.batch_size, config.lr, config.momentum, config.params.rank_conv, config.params.rank_linear) == (
        100, 0.1, 0.9, 0.6, 0.6)
    assert (config.fraction_train, config.device, config.precision) == (1.0, "cpu", "fp32")


def test_extrapolation_adds_a_steady_round_for_every_round_not_run():
    assert bench.extrapolate(100.0, [30.0, 20.0, 24.0, 21.0], total_rounds=300) == 100.0 + 296 * 21.0
    assert bench.extrapolate(40.0, [30.0], total_rounds=300) == 40.0 + 299 * 30.0


def test_train_samples_per_round_counts_every_clients_split(tmp_path):
    config = load_config({**app_defaults(), "dataset": "synthetic", "train-per-client": 30, "local-epochs": 3,
                          "output-dir": str(tmp_path)})
    splits = partition_dataset("synthetic", "", PartitionConfig(num_clients=4, alpha=0.1, train_per_client=30, seed=1))
    assert bench.train_samples_per_round(config, 4) == 3 * sum(len(split.train) for split in splits) > 0


class InProcessLink:
    """Stands in for the benchmarks' LocalSuperLink: runs the `flwr run` it is asked for in this
    process (the real ServerApp and ClientApp on tests/inprocess.py's grid, with the app's defaults
    under the overrides, as Flower merges them) and records the client resources it was given."""

    runs: list[dict] = []
    tree: dict = {}  # no processes of its own: the memory benchmark samples nothing

    def record_tree(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, app_dir, run_config, num_supernodes, client_cpus, client_gpus):
        config = {**app_defaults(), **run_config}
        InProcessLink.runs.append({"num_supernodes": num_supernodes, "client_cpus": client_cpus,
                                   "client_gpus": client_gpus, **run_config})
        server_app.main(InProcessGrid(client_app.app, num_supernodes, config),
                        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        return 0, ""


@pytest.fixture
def in_process_link(monkeypatch):
    InProcessLink.runs = []
    monkeypatch.setattr(bench, "LocalSuperLink", InProcessLink)
    return InProcessLink


TINY = ["--dataset", "synthetic", "--clients", "2", "--rounds", "2", "--train-per-client", "8", "--workers", "2"]


def test_overhead_with_resnet8_on_cpu(tmp_path, in_process_link):
    assert cli.main(["bench", "overhead", "--model", "resnet8", *TINY, "--rounds", "1", "--out", str(tmp_path)]) == 0
    expected_cpus = max((os.cpu_count() or 1) // 2, 1)
    assert [(run["model"], run["device"], run["client_cpus"], run["client_gpus"]) for run in in_process_link.runs] == [
        ("resnet8", "cpu", expected_cpus, 0.0)] * 2  # separate and fused evaluation
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert overhead["settings"]["model"] == "resnet8"
    for row in overhead["rows"]:
        assert (row["model"], row["device"], row["client_cpus"], row["client_gpus"]) == ("resnet8", "cpu", expected_cpus, 0.0)
        assert row["flwr_wall_s"] >= row["flwr_rounds_s"] > 0 and row["plain_wall_s"] > 0


def test_memory_trains_and_evaluates_the_same_number_of_sampled_clients_at_every_size(tmp_path, in_process_link):
    assert cli.main(["bench", "memory", "--client-counts", "2", "5", "--memory-sampled", "2", "--memory-rounds", "1",
                     "--out", str(tmp_path)]) == 0
    assert [(run["num_supernodes"], run["fraction-train"], run["fraction-evaluate"], run["num-server-rounds"])
            for run in in_process_link.runs] == [(2, 1.0, 1.0, 1), (5, 0.4, 0.4, 1)]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(row["clients"], row["trained_per_round"], row["evaluated_per_round"]) for row in rows] == [(2, 2, 2), (5, 2, 2)]
    assert all(len(row["round_s"]) == 1 and row["peak_pss_mib"] == 0 for row in rows)


def test_throughput_on_cpu_sweeps_the_divisors_of_the_cpu_count(tmp_path, in_process_link, monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert cli.main(["bench", "throughput", *TINY, "--out", str(tmp_path)]) == 0
    assert [(run["client_cpus"], run["client_gpus"]) for run in in_process_link.runs] == [(2, 0.0), (1, 0.0)]
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert [row["workers"] for row in throughput["rows"]] == [1, 2]
    config = load_config({**app_defaults(), **{k: v for k, v in throughput["settings"].items() if k != "clients"}})
    samples = bench.train_samples_per_round(config, 2)
    for row in throughput["rows"]:
        assert "gpu_mem_per_actor_mib" not in row
        assert row["train_samples_per_s"] * row["median_round_s"] == pytest.approx(samples, rel=0.02)


def test_paper_reports_the_steady_round_and_the_300_round_time(tmp_path, in_process_link, monkeypatch, real_npz):
    """`bench paper` with the paper's protocol swapped for a 2-client toy one (its real size takes
    hours on this CPU; test_the_paper_protocol_is_the_papers_cifar10_setup checks the real one)."""
    real_protocol = bench.paper_protocol

    def toy_protocol(args, work):
        overrides, _ = real_protocol(args, work)
        return {**overrides, "model": "cnn", "train-per-client": 8, "test-per-client": 8, "local-epochs": 1,
                "lora-epochs": 1}, 2

    monkeypatch.setattr(bench, "paper_protocol", toy_protocol)
    assert cli.main(["bench", "paper", "--rounds", "3", "--workers", "2", "--data-dir", str(real_npz),
                     "--out", str(tmp_path)]) == 0
    [run] = in_process_link.runs
    assert (run["dataset"], run["data-dir"], run["num-server-rounds"], run["num_supernodes"]) == ("npz", str(real_npz), 3, 2)
    [row] = json.loads((tmp_path / "paper.json").read_text())["rows"]
    assert (row["rounds"], row["clients"], row["device"]) == (3, 2, "cpu") and row["steady_s_per_round"] > 0
    hours = (row["wall_s"] + 297 * row["steady_s_per_round"]) / 3600
    assert row["extrapolated_300_rounds_h"] == pytest.approx(hours, abs=0.006)  # bench rounds the unrounded seconds
