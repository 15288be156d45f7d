"""ServerApp + ClientApp end to end, in process (tests/inprocess.py): output contract and FL invariants.

docs/concepts/outputs.md (run folder contract); FedLoRA (σ̄ the unweighted mean, every client evaluates after
aggregation), FedAvg (all clients identical) and Local (nothing sent) as their clients document.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import app_defaults
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from inprocess import InProcessGrid
from safetensors import safe_open

from clients.fedavg import FedAvgLoRAClient
from clients.fedlora import FedLoRAClient, FedLoRAParams
from clients.local import LocalLoRAClient
from fedlora_flwr import client_app, server_app
from fedlora_flwr.config import RunConfig, load_config
from fedlora_flwr.data import TaskSpec
from fedlora_flwr.exits import RunConfigError
from fedlora_flwr.models import build_model
from strategies.base import ARRAYS, METRICS, average_arrays

NUM_CLIENTS = 3
ROUNDS = 2
METRIC_KEYS = {"round", "acc_mean", "acc_weighted", "acc_std", "acc_per_client", "num_participants", "num_failures",
               "bytes_up", "bytes_down"}
SUMMARY_KEYS = {"method", "dataset", "alpha", "seed", "num_clients", "rounds", "best_acc_mean", "best_round",
                "final_acc_mean", "bytes_up_total", "wall_seconds"}


def _run_config(output_dir: Path, run_name: str, **overrides) -> dict:
    return {
        **app_defaults(),
        "dataset": "synthetic",
        "model": "cnn",
        "num-server-rounds": ROUNDS,
        "local-epochs": 2,
        "lora-epochs": 1,
        "train-per-client": 16,
        "test-per-client": 8,
        "batch-size": 8,
        "device": "cpu",
        "output-dir": str(output_dir),
        "run-name": run_name,
        **{key.replace("_", "-"): value for key, value in overrides.items()},
    }


@contextlib.contextmanager
def _quiet_flower():
    """Keep Flower's console handler to warnings while a run executes (records still propagate)."""
    handlers = list(FLOWER_LOGGER.handlers)
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: record[key].numpy().copy() for key in record}


class CapturingGrid(InProcessGrid):
    """InProcessGrid that keeps a copy of every instruction and reply, by round, type and partition id."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[tuple[int, str], dict[int, dict[str, np.ndarray]]] = defaultdict(dict)
        self.replies: dict[tuple[int, str], dict[int, Message]] = defaultdict(dict)
        self.pushed = 0
        self.personal: dict[tuple[int, str], dict[str, bytes]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query":
            return super().push_messages(messages)
        self.pushed += len(messages)
        for message in messages:
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            key = (int(message.content["config"]["server-round"]), message.metadata.message_type)
            self.sent[key][pid] = _arrays(message.content[ARRAYS])
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids):
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            key = (int(message.content["config"]["server-round"]), message.metadata.message_type)
            self.replies[key][pid] = self._replies[message_id]
        if messages:  # the clients' personal-state files right after this batch of messages
            clients_dir = Path(str(messages[0].content["config"]["run-dir"])) / "clients"
            files = sorted(clients_dir.rglob("*")) if clients_dir.is_dir() else []
            self.personal[key] = {str(p.relative_to(clients_dir)): p.read_bytes() for p in files if p.is_file()}
        return ids


def _start(grid: InProcessGrid, run_config: dict) -> None:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with _quiet_flower():
        server_app.main(grid, context)


def _run(tmp_dir: Path, run_name: str, failing=(), num_clients=NUM_CLIENTS, **overrides):
    config = _run_config(tmp_dir / "outputs", run_name, **overrides)
    grid = CapturingGrid(client_app.app, num_clients, config, failing=failing)
    _start(grid, config)
    return tmp_dir / "outputs" / run_name, grid, config


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(path, framework="np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def _train_type(grid: CapturingGrid) -> str:
    return next(kind for _, kind in grid.sent if kind.startswith("train"))


def _eval_type(grid: CapturingGrid) -> str:
    return next(kind for _, kind in grid.sent if kind.startswith("evaluate"))


def _ok(message: Message) -> bool:
    return not message.has_error()


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in arrays.items()})


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


# --------------------------------------------------------------------------- the FedLoRA run


@pytest.fixture(scope="module")
def fedlora_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fedlora"), "fedlora-3c")


def test_config_json_has_every_key_the_run_reads(fedlora_run):
    run_dir, _, config = fedlora_run
    written = json.loads((run_dir / "config.json").read_text())
    assert RunConfig.keys() | FedLoRAParams.keys() <= set(written)
    validated = load_config(config).as_record()
    for key, value in validated.items():
        assert written[key] == value, key
    assert Path(written["output-dir"]).is_absolute()


def test_metrics_jsonl_contract(fedlora_run):
    run_dir, grid, _ = fedlora_run
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    train, evaluate = _train_type(grid), _eval_type(grid)
    for m in metrics:
        assert METRIC_KEYS <= set(m), f"missing {METRIC_KEYS - set(m)}"
        per_client = m["acc_per_client"]
        assert set(per_client) == {str(pid) for pid in range(NUM_CLIENTS)}
        accuracies = np.array(list(per_client.values()), dtype=np.float64)
        assert all(0.0 <= a <= 1.0 for a in accuracies)
        assert m["acc_mean"] == pytest.approx(float(accuracies.mean()), abs=1e-12)
        assert m["acc_std"] == pytest.approx(float(accuracies.std()), abs=1e-12)
        eval_replies = grid.replies[(m["round"], evaluate)]
        for pid, reply in eval_replies.items():
            assert per_client[str(pid)] == pytest.approx(float(reply.content[METRICS]["accuracy"]))
        sizes = {pid: int(reply.content[METRICS]["num-examples"]) for pid, reply in eval_replies.items()}
        weighted = sum(per_client[str(pid)] * n for pid, n in sizes.items()) / sum(sizes.values())
        assert m["acc_weighted"] == pytest.approx(weighted, abs=1e-12)
        assert m["num_participants"] == NUM_CLIENTS and m["num_failures"] == 0
        up = sum(reply.content[ARRAYS].count_bytes() for reply in grid.replies[(m["round"], train)].values())
        assert m["bytes_up"] == up > 0
        down = sum(_record(a).count_bytes() for a in grid.sent[(m["round"], train)].values())
        down += sum(_record(a).count_bytes() for a in grid.sent[(m["round"], evaluate)].values())
        assert m["bytes_down"] == down


def test_summary_json_contract(fedlora_run):
    run_dir, _, config = fedlora_run
    metrics, summary = _metrics(run_dir), _summary(run_dir)
    assert SUMMARY_KEYS <= set(summary), f"missing {SUMMARY_KEYS - set(summary)}"
    assert (summary["method"], summary["dataset"], summary["seed"]) == ("fedlora", "synthetic", config["seed"])
    assert summary["alpha"] == pytest.approx(config["alpha"])
    assert summary["num_clients"] == NUM_CLIENTS and summary["rounds"] == ROUNDS
    best = max(m["acc_mean"] for m in metrics)
    assert summary["best_acc_mean"] == best
    assert summary["best_round"] == max(m["round"] for m in metrics if m["acc_mean"] == best)  # ties → later
    assert summary["final_acc_mean"] == metrics[-1]["acc_mean"]
    assert summary["bytes_up_total"] == sum(m["bytes_up"] for m in metrics)
    assert summary["wall_seconds"] >= 0
    leftovers = [p.name for p in run_dir.rglob(".*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_personal_state_is_tau_only_and_differs_between_clients(fedlora_run):
    run_dir, _, config = fedlora_run
    model = FedLoRAClient(load_config(config)).build_model(TaskSpec(10), 0)
    tau_keys = set(FedLoRAClient.partition.keys(model, "personal"))
    taus = []
    for pid in range(NUM_CLIENTS):
        path = run_dir / "clients" / str(pid) / "personal.safetensors"
        assert path.is_file(), path
        tensors, metadata = _state(path)
        assert set(tensors) == tau_keys and all("lora_" in key for key in tensors)
        assert metadata.get("method") == "fedlora"
        taus.append(tensors)
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == [str(pid) for pid in range(NUM_CLIENTS)]
    lora_b = [key for key in tau_keys if key.endswith("lora_B")]
    assert all(np.any(taus[0][k] != 0) for k in lora_b), "τ was trained (B moved away from 0)"
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not np.array_equal(taus[a][k], taus[b][k]) for k in lora_b), f"τ of clients {a} and {b} are identical"


def test_clients_upload_sigma_only(fedlora_run):
    _, grid, config = fedlora_run
    plain_keys = list(build_model(config["model"], 10).state_dict())
    train = _train_type(grid)
    for server_round in range(1, ROUNDS + 1):
        replies = grid.replies[(server_round, train)]
        assert set(replies) == set(range(NUM_CLIENTS))
        for pid, reply in replies.items():
            keys = list(reply.content[ARRAYS])
            assert not [k for k in keys if "lora_" in k], f"client {pid} uploaded τ"
            assert sorted(keys) == sorted(plain_keys), "σ = every non-LoRA tensor, BN buffers included"


def test_every_client_gets_the_same_sigma_and_it_is_the_plain_mean(fedlora_run):
    """FedLoRA eq. 8: σ̄ = unweighted mean of the σ_i; every client evaluates (and then trains from) the same σ̄."""
    _, grid, _ = fedlora_run
    train, evaluate = _train_type(grid), _eval_type(grid)
    first = grid.sent[(1, train)]
    assert set(first) == set(range(NUM_CLIENTS))
    assert all(_identical(first[0], first[pid]) for pid in first), "σ⁰ must be identical for all clients"
    for server_round in range(1, ROUNDS + 1):
        sent = grid.sent[(server_round, evaluate)]
        assert set(sent) == set(range(NUM_CLIENTS)), "every client evaluates every round"
        assert all(_identical(sent[0], sent[pid]) for pid in sent), f"round {server_round}: clients got different σ̄"
        uploads = grid.replies[(server_round, train)]
        expected = average_arrays([uploads[pid].content[ARRAYS] for pid in sorted(uploads)], [1.0] * len(uploads))
        assert _identical(sent[0], _arrays(expected)), "σ̄ must be the unweighted mean (eq. 8) of the uploads"
        if (server_round + 1, train) in grid.sent:
            assert all(_identical(sent[0], a) for a in grid.sent[(server_round + 1, train)].values())


def test_evaluate_leaves_personal_state_alone(fedlora_run):
    """τ_i is written by the client's training only; evaluating σ̄ + τ_i changes nothing on disk."""
    _, grid, _ = fedlora_run
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in range(1, ROUNDS + 1):
        after_train, after_eval = grid.personal[(server_round, train)], grid.personal[(server_round, evaluate)]
        versions = ["personal.safetensors"] if server_round == 1 else ["personal.previous.safetensors", "personal.safetensors"]
        assert sorted(after_train) == [f"{pid}/{name}" for pid in range(NUM_CLIENTS) for name in versions]
        assert after_eval == after_train
    first, second = grid.personal[(1, train)], grid.personal[(2, train)]
    assert first["0/personal.safetensors"] != second["0/personal.safetensors"], "training rewrites τ every round"
    assert second["0/personal.previous.safetensors"] == first["0/personal.safetensors"], "round 1's τ is kept for a resume"


def test_same_seed_same_results(fedlora_run, tmp_path):
    first_dir, _, _ = fedlora_run
    second_dir, _, _ = _run(tmp_path, "fedlora-3c-again")
    first, second = _metrics(first_dir), _metrics(second_dir)
    assert first[0]["train_loss"] == second[0]["train_loss"]
    assert first[0]["train_loss"] is not None
    for a, b in zip(first, second, strict=True):
        assert a["acc_per_client"] == b["acc_per_client"]
    for pid in range(NUM_CLIENTS):
        tau_a, _ = _state(first_dir / "clients" / str(pid) / "personal.safetensors")
        tau_b, _ = _state(second_dir / "clients" / str(pid) / "personal.safetensors")
        assert _identical(tau_a, tau_b)


def test_training_seeds_are_distinct_for_thousands_of_clients():
    """The old seed*1_000_003 + round*1_009 + pid gave (round 1, client 1009) round 2's client 0 seed."""
    seeds = {client_app.training_seed(seed, rnd, pid) for seed in (1, 2) for rnd in (1, 2, 3) for pid in range(5000)}
    assert len(seeds) == 2 * 3 * 5000
    assert client_app.training_seed(1, 1, 1009) != client_app.training_seed(1, 2, 0)
    assert all(0 <= seed < 2**64 for seed in seeds)


# --------------------------------------------------------------------------- baselines


def test_fedlora_without_lora_epochs_is_fedavg(tmp_path):
    """Paper §3.4: E_lora = 0 ⇒ τ stays 0 and FedLoRA is exactly (unweighted) FedAvg."""
    lora_dir, lora_grid, _ = _run(tmp_path / "a", "fedlora-e0", **{"lora-epochs": 0})
    avg_dir, avg_grid, _ = _run(tmp_path / "b", "fedavg-mean", method="fedavg", aggregation="mean")
    lora_metrics, avg_metrics = _metrics(lora_dir), _metrics(avg_dir)
    for a, b in zip(lora_metrics, avg_metrics, strict=True):
        assert a["acc_per_client"] == pytest.approx(b["acc_per_client"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    evaluate = _eval_type(lora_grid)
    for server_round in range(1, ROUNDS + 1):
        sigma, reference = lora_grid.sent[(server_round, evaluate)][0], avg_grid.sent[(server_round, evaluate)][0]
        assert list(sigma) == list(reference)
        for key in sigma:
            np.testing.assert_allclose(sigma[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    tau, _ = _state(lora_dir / "clients" / "0" / "personal.safetensors")
    assert all(not np.any(value) for key, value in tau.items() if key.endswith("lora_B"))



def test_local_sends_nothing_and_keeps_the_whole_model(tmp_path):
    run_dir, grid, config = _run(tmp_path, "local", method="local")
    metrics = _metrics(run_dir)
    assert len(metrics) == ROUNDS
    for m in metrics:
        assert m["bytes_up"] == 0, "Local: the server never receives arrays"
        assert set(m["acc_per_client"]) == {str(pid) for pid in range(NUM_CLIENTS)}
    for (_, kind), replies in grid.replies.items():
        if kind.startswith("train"):
            assert all(len(reply.content[ARRAYS]) == 0 for reply in replies.values())
    assert _summary(run_dir)["bytes_up_total"] == 0
    plain_keys = set(build_model(config["model"], 10).state_dict())
    states = []
    for pid in range(NUM_CLIENTS):
        tensors, metadata = _state(run_dir / "clients" / str(pid) / "personal.safetensors")
        assert set(tensors) == plain_keys and metadata.get("method") == "local"
        states.append(tensors)
    assert not np.array_equal(states[0]["fc.weight"], states[1]["fc.weight"]), "each client trains its own model"


def test_fedavg_keeps_no_personal_state_and_weights_by_samples(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "fedavg", method="fedavg")
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    clients_dir = run_dir / "clients"
    assert not clients_dir.exists() or not any(clients_dir.rglob("*.safetensors")), "FedAvg has no personal state"
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in range(1, ROUNDS + 1):
        uploads = grid.replies[(server_round, train)]
        weights = [float(uploads[pid].content[METRICS]["num-examples"]) for pid in sorted(uploads)]
        expected = _arrays(average_arrays([uploads[pid].content[ARRAYS] for pid in sorted(uploads)], weights))
        assert all(_identical(expected, arrays) for arrays in grid.sent[(server_round, evaluate)].values())


def test_fedavg_lora_averages_sigma_and_tau(tmp_path):
    """Table 4's "FedAvg w/ LoRA": σ and the LoRA factors are uploaded and sample-weighted averaged."""
    run_dir, grid, config = _run(tmp_path, "fedavg-lora", method="fedavg-lora")
    decomposed = list(FedAvgLoRAClient(load_config(config)).build_model(TaskSpec(10), 0).state_dict())
    train, evaluate = _train_type(grid), _eval_type(grid)
    for server_round in range(1, ROUNDS + 1):
        uploads = grid.replies[(server_round, train)]
        assert all(list(reply.content[ARRAYS]) == decomposed for reply in uploads.values())
        weights = [float(uploads[pid].content[METRICS]["num-examples"]) for pid in sorted(uploads)]
        expected = _arrays(average_arrays([uploads[pid].content[ARRAYS] for pid in sorted(uploads)], weights))
        assert any(np.any(value) for key, value in expected.items() if key.endswith("lora_B")), "τ was trained"
        assert all(_identical(expected, arrays) for arrays in grid.sent[(server_round, evaluate)].values())
    assert not any((run_dir / "clients").rglob("*.safetensors")), "FedAvg w/ LoRA has no personal state"


def test_local_lora_keeps_the_decomposed_model(tmp_path):
    """Table 4's "Local w/ LoRA": nothing sent; each client keeps σ and τ of its decomposed model."""
    run_dir, _, config = _run(tmp_path, "local-lora", method="local-lora")
    assert all(m["bytes_up"] == 0 for m in _metrics(run_dir))
    decomposed = set(LocalLoRAClient(load_config(config)).build_model(TaskSpec(10), 0).state_dict())
    states = [_state(run_dir / "clients" / str(pid) / "personal.safetensors") for pid in range(NUM_CLIENTS)]
    for tensors, metadata in states:
        assert set(tensors) == decomposed and metadata.get("method") == "local-lora"
        assert any(np.any(value) for key, value in tensors.items() if key.endswith("lora_B")), "τ was trained"
    assert not np.array_equal(states[0][0]["fc.lora_B"], states[1][0]["fc.lora_B"])


def test_tensorboard_option_logs_every_round_metric(tmp_path, fedlora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not (fedlora_run[0] / "tensorboard").exists(), "off by default"
    run_dir, _, _ = _run(tmp_path, "tb", method="local", tensorboard=True)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    metrics = _metrics(run_dir)
    for key in ("acc_mean", "acc_std", "train_loss", "bytes_down", "num_failures", "elapsed_s"):
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        assert logged == [(m["round"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    assert [event.step for event in events.Histograms("acc_per_client")] == [m["round"] for m in metrics]
    assert events.Histograms("acc_per_client")[-1].histogram_value.num == NUM_CLIENTS


# --------------------------------------------------------------------------- failures


def test_failing_client_is_counted_and_excluded(tmp_path):
    run_dir, grid, _ = _run(tmp_path, "failing", failing={1})
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1)), "the run still finishes"
    assert (run_dir / "summary.json").is_file()
    train, evaluate = _train_type(grid), _eval_type(grid)
    for m in metrics:
        assert m["num_participants"] == 2
        assert m["num_failures"] == 1  # one client (its train and its evaluate reply failed)
        assert set(m["acc_per_client"]) == {"0", "2"}
        uploads = {pid: reply for pid, reply in grid.replies[(m["round"], train)].items() if _ok(reply)}
        assert set(uploads) == {0, 2}
        expected = _arrays(average_arrays([uploads[pid].content[ARRAYS] for pid in (0, 2)], [1.0, 1.0]))
        assert all(_identical(expected, arrays) for arrays in grid.sent[(m["round"], evaluate)].values())
        assert m["bytes_up"] == sum(reply.content[ARRAYS].count_bytes() for reply in uploads.values())
    assert not (run_dir / "clients" / "1").exists()


def test_summary_num_clients_is_the_federation_size_despite_failures(tmp_path):
    run_dir, _, _ = _run(tmp_path, "failing-summary", failing={1}, **{"num-server-rounds": 1, "local-epochs": 1})
    assert _summary(run_dir)["num_clients"] == NUM_CLIENTS


# --------------------------------------------------------------------------- best round, scripted


class ScriptedGrid(InProcessGrid):
    """No ClientApp: train replies echo σ̄, evaluate replies carry scripted accuracies per round."""

    def __init__(self, accuracies: dict[int, float], *args, **kwargs) -> None:
        super().__init__(None, *args, **kwargs)
        self.accuracies = accuracies

    def push_messages(self, messages):
        ids = []
        for message in messages:
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            server_round = int(message.content["config"]["server-round"])
            if message.metadata.message_type == "query":
                content = RecordDict({METRICS: MetricRecord({"partition-id": pid, "num-partitions": len(self.contexts)})})
            elif message.metadata.message_type.startswith("train"):
                metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "train-samples": 10, "partition-id": pid})
                content = RecordDict({ARRAYS: message.content[ARRAYS], METRICS: metrics})
            else:
                metrics = MetricRecord({"num-examples": 8, "accuracy": self.accuracies[server_round], "eval-loss": 1.0,
                                        "partition-id": pid})
                content = RecordDict({METRICS: metrics})
            message_id = f"s{len(self._replies)}-{next(self._ids)}"
            self._replies[message_id] = Message(content, reply_to=message)
            ids.append(message_id)
        return ids


def test_best_round_ties_go_to_the_later_round(tmp_path):
    accuracies = {1: 0.5, 2: 0.75, 3: 0.75, 4: 0.625}
    config = _run_config(tmp_path / "outputs", "scripted", **{"num-server-rounds": 4})
    _start(ScriptedGrid(accuracies, 2, config), config)
    run_dir = tmp_path / "outputs" / "scripted"
    metrics = _metrics(run_dir)
    assert [m["acc_mean"] for m in metrics] == [0.5, 0.75, 0.75, 0.625]
    summary = _summary(run_dir)
    assert summary["best_acc_mean"] == 0.75
    assert summary["best_round"] == 3
    assert summary["final_acc_mean"] == 0.625
    assert summary["rounds"] == 4


# --------------------------------------------------------------------------- refusals


def _error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_existing_run_folder_is_refused_and_untouched(tmp_path, caplog):
    config = _run_config(tmp_path / "outputs", "taken")
    run_dir = tmp_path / "outputs" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "acc_mean": 0.9}\n')
    (run_dir / "notes.txt").write_text("keep me")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    grid = CapturingGrid(client_app.app, 2, config)
    with pytest.raises(RunConfigError):
        _start(grid, config)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    assert after == before, "an existing run must not be touched"
    assert grid.pushed == 0, "nothing was sent to the clients"
    errors = _error_lines(caplog)
    assert len(errors) == 1 and "run-name" in errors[0] and str(run_dir) in errors[0]


def test_invalid_config_exits_before_creating_outputs(tmp_path, caplog):
    config = _run_config(tmp_path / "outputs", "never", **{"rank-conv": 0.0})
    grid = CapturingGrid(client_app.app, 2, config)
    with pytest.raises(RunConfigError):
        _start(grid, config)
    assert not (tmp_path / "outputs").exists()
    assert grid.pushed == 0
    errors = _error_lines(caplog)
    assert len(errors) == 1, errors
    assert "rank-conv" in errors[0] and "\n" not in errors[0]
