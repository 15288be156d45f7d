"""Every reply is checked before it counts (strategies/validation.py), identities are bound once
(strategies/identity.py), and a straggler costs its own round only (strategies/faults.py), through
the real ServerApp and ClientApp in process. Each test stands for a defect measured on the old
main: a forged or malformed reply was averaged, recorded, or stopped the run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord
from safetensors.numpy import load_file
from test_federation import CapturingGrid, _eval_type, _metrics, _run_config, _start, _train_type

from fedlora_flwr import client_app
from fedlora_flwr.exits import FederationIncomplete, NoValidReplies
from strategies.base import ARRAYS, METRICS, average_arrays
from strategies.faults import FaultInjector

CLIENTS = 3


class RewritingGrid(CapturingGrid):
    """A forging client: ``rewrite(kind, partition id, reply)`` changes a reply after the ClientApp
    answered (kind: ``query``, ``train`` or ``evaluate``)."""

    def __init__(self, *args, rewrite: Callable[[str, int, Message], Message], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rewrite = rewrite

    def pull_messages(self, message_ids):
        replies = []
        for reply in super().pull_messages(message_ids):
            if not reply.has_error():
                pid = self.contexts[reply.metadata.src_node_id].node_config["partition-id"]
                reply = self.rewrite(reply.metadata.message_type.split(".")[0], pid, reply)
            replies.append(reply)
        return replies


def _config(tmp_path, name: str, **overrides) -> dict:
    values = {"method": "fedavg", "local-epochs": 1, "train-per-client": 16, "test-per-client": 8, **overrides}
    return _run_config(tmp_path / "outputs", name, **values)


def _run(tmp_path, name: str, rewrite=None, clients: int = CLIENTS, **overrides):
    config = _config(tmp_path, name, **overrides)
    grid = (RewritingGrid(client_app.app, clients, config, rewrite=rewrite) if rewrite
            else CapturingGrid(client_app.app, clients, config))
    _start(grid, config)
    return tmp_path / "outputs" / name, grid


def _forging(kind: str, pid: int, change: Callable[[Message], None]):
    """A rewrite that applies ``change`` to partition ``pid``'s ``kind`` replies."""
    def rewrite(reply_kind: str, reply_pid: int, reply: Message) -> Message:
        if reply_kind == kind and reply_pid == pid:
            change(reply)
        return reply
    return rewrite


def _set(record: str, **values) -> Callable[[Message], None]:
    def change(reply: Message) -> None:
        for key, value in values.items():
            if value is None:
                del reply.content[record][key]
            else:
                reply.content[record][key] = value
    return change


def _averaged(grid: CapturingGrid, server_round: int, pids: list[int], weighted: bool = True) -> dict[str, np.ndarray]:
    """The weighted (or plain) mean of the train uploads of ``pids`` in ``server_round``."""
    uploads = grid.replies[(server_round, _train_type(grid))]
    weights = [float(uploads[pid].content[METRICS]["num-examples"]) if weighted else 1.0 for pid in pids]
    averaged = average_arrays([uploads[pid].content[ARRAYS] for pid in pids], weights)
    return {key: averaged[key].numpy() for key in averaged}


def _sent_after(grid: CapturingGrid, server_round: int) -> dict[str, np.ndarray]:
    """The arrays the server sent after aggregating ``server_round`` (its evaluate broadcast)."""
    return next(iter(grid.sent[(server_round, _eval_type(grid))].values()))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[key].tobytes() == b[key].tobytes() for key in a)


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------- train replies


@pytest.mark.parametrize("kind", ["nan-weight", "negative-weight"])
def test_bad_sample_counts_are_left_out_and_the_shared_tensors_stay_finite(tmp_path, caplog, kind):
    """Old main: num-examples = NaN turned shared.safetensors and the checkpoint into NaN; -16 was
    averaged with a negative weight."""
    with caplog.at_level(logging.WARNING):
        run_dir, grid = _run(tmp_path, kind, **{"fault-fraction": 0.34, "fault-kind": kind})
    injector = FaultInjector(0.34, kind, seed=1)
    for m in _metrics(run_dir):
        (faulty,) = injector.faulty(list(range(CLIENTS)), m["round"], training=True)
        valid = [pid for pid in range(CLIENTS) if pid != faulty]
        assert m["participants"] == valid and m["num_bad_updates"] == 1 and m["num_failures"] == 1
        assert _same(_sent_after(grid, m["round"]), _averaged(grid, m["round"], valid))
    for name in ("shared.safetensors", "checkpoint.safetensors"):
        tensors = load_file(str(run_dir / name))
        assert all(np.isfinite(value).all() for value in tensors.values() if value.dtype.kind == "f"), name
    assert len(_warnings(caplog, "num-examples")) == 2


def test_zero_sample_counts_from_every_client_stop_the_run_loudly(tmp_path):
    """Old main: a ZeroDivisionError (an unexplained crash); now a no-valid-replies failure naming the reason."""
    def zero(kind, pid, reply):
        if kind == "train":
            reply.content[METRICS]["num-examples"] = 0
        return reply
    with pytest.raises(NoValidReplies, match=r"3 bad updates\); first bad update: 'metrics' num-examples = 0 is not in 1\.\.16"):
        _run(tmp_path, "zero", rewrite=zero)


def _metrics_as_config(reply: Message) -> None:
    reply.content[METRICS] = ConfigRecord({**dict(reply.content[METRICS]), "num-examples": "16"})


@pytest.mark.parametrize(("change", "reason"), [
    (_set(METRICS, **{"train-loss": None}), "train-loss = None is not a finite number"),
    (_set(METRICS, **{"train-loss": float("inf")}), "train-loss = inf is not a finite number"),
    (_set(METRICS, **{"num-examples": 17}), "num-examples = 17 is not in 1..16"),
    (_set(METRICS, **{"num-examples": 16.0}), "num-examples = 16.0 is not an integer"),
    (_set(METRICS, **{"train-samples": -1}), "train-samples = -1 is below 0"),
    (_set(METRICS, **{"partition-id": [1]}), "partition-id = [1] is not an integer"),
    (_metrics_as_config, "'metrics' is a ConfigRecord, not a MetricRecord"),
], ids=["no-train-loss", "inf-loss", "too-many-examples", "float-examples", "negative-samples", "list-id", "string"])
def test_malformed_train_reply_is_named_counted_and_left_out(tmp_path, caplog, change, reason):
    """Old main: a missing train-loss or a string where a number belongs raised in the ServerApp."""
    with caplog.at_level(logging.WARNING):
        run_dir, grid = _run(tmp_path, "malformed", rewrite=_forging("train", 1, change))
    for m in _metrics(run_dir):
        assert m["participants"] == [0, 2] and m["num_bad_updates"] == 1 and m["num_failures"] == 1
        assert _same(_sent_after(grid, m["round"]), _averaged(grid, m["round"], [0, 2]))
        assert set(m["acc_per_client"]) == {"0", "1", "2"}, "its evaluate replies still count"
    (first, _) = _warnings(caplog, "bad update")
    assert "round 1: bad update from client 1 (node 1001)" in first and reason in first, first


# --------------------------------------------------------------------------- evaluate replies


@pytest.mark.parametrize(("change", "reason"), [
    (_set(METRICS, accuracy=None), "accuracy = None is not a finite number"),
    (_set(METRICS, **{"partition-id": None}), "partition-id = None is not an integer"),
    (_set(METRICS, accuracy=1.7), "accuracy = 1.7 is not in [0.0, 1.0]"),
    (_set(METRICS, accuracy=-3.0), "accuracy = -3.0 is not in [0.0, 1.0]"),
    (_set(METRICS, accuracy=float("nan")), "accuracy = nan is not a finite number"),
    (_set(METRICS, **{"num-examples": -8}), "num-examples = -8 is not in 1..8"),
    (_set(METRICS, **{"eval-loss": -0.5}), "eval-loss = -0.5 is below 0.0"),
    (_set(METRICS, **{"partition-id": 0}), "names partition id 0, but node 1001 is partition 1"),
], ids=["no-accuracy", "no-partition-id", "accuracy-1.7", "accuracy-minus-3", "nan-accuracy", "negative-examples",
        "negative-loss", "forged-id"])
def test_bad_evaluate_reply_is_not_recorded(tmp_path, caplog, change, reason):
    """Old main: accuracies of 1.7 or -3 and negative counts reached acc_mean and acc_weighted, one NaN
    accuracy blanked the round's mean, a forged id overwrote another client's accuracy, and a reply
    without accuracy or partition-id raised."""
    with caplog.at_level(logging.WARNING):
        run_dir, grid = _run(tmp_path, "bad-eval", rewrite=_forging("evaluate", 1, change))
    for m in _metrics(run_dir):
        replies = grid.replies[(m["round"], _eval_type(grid))]
        own = {str(pid): float(replies[pid].content[METRICS]["accuracy"]) for pid in (0, 2)}
        sizes = {str(pid): int(replies[pid].content[METRICS]["num-examples"]) for pid in (0, 2)}
        assert m["acc_per_client"] == own, "only the valid replies, each under its own client"
        assert m["acc_mean"] == pytest.approx(np.mean(list(own.values())))
        assert m["acc_weighted"] == pytest.approx(sum(own[p] * sizes[p] for p in own) / sum(sizes.values()))
        assert m["num_failures"] == 1 and m["participants"] == [0, 1, 2]
    (first, _) = _warnings(caplog, "bad evaluate reply")
    assert "from client 1 (node 1001)" in first and reason in first, first


# --------------------------------------------------------------------------- identities


def test_a_train_reply_under_another_clients_id_is_refused(tmp_path, caplog):
    """Old main: client 1's reply claiming partition 0 was averaged under it (participants [0, 0, 2])."""
    with caplog.at_level(logging.WARNING):
        run_dir, grid = _run(tmp_path, "forged", rewrite=_forging("train", 1, _set(METRICS, **{"partition-id": 0})))
    for m in _metrics(run_dir):
        assert m["participants"] == [0, 2] and m["num_bad_updates"] == 1
        assert _same(_sent_after(grid, m["round"]), _averaged(grid, m["round"], [0, 2]))
    assert "names partition id 0, but node 1001 is partition 1" in _warnings(caplog, "bad update")[0]


@pytest.mark.parametrize(("answer", "reason"), [
    ({"partition-id": 99}, "bad query reply: 'metrics' partition-id = 99 is not in 0..2"),
    ({"partition-id": 99, "num-partitions": 100}, "reports num-partitions = 100, but the federation has 3"),
    ({"partition-id": 0}, "claims partition id 0, already bound to node 1000"),
    ({"num-partitions": 1000}, "reports num-partitions = 1000, but the federation has 3"),
    ({"num-partitions": 0}, "bad query reply: 'metrics' num-partitions = 0 is below 1"),
    ({"partition-id": -1}, "bad query reply: 'metrics' partition-id = -1 is below 0"),
], ids=["out-of-range", "out-of-range-of-another-size", "taken-id", "huge-federation", "no-federation", "negative-id"])
def test_a_node_with_a_bad_query_answer_is_refused_once(tmp_path, caplog, answer, reason):
    """Old main: an id out of range (99 of 3) was accepted; a second node claiming partition 0 shut the
    honest one out of training; one node reporting num-partitions = 1000 made round 1 wait for 1,000
    nodes (here: until node-wait-timeout, then the run failed)."""
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        run_dir, grid = _run(tmp_path, "query", rewrite=_forging("query", 2, _set(METRICS, **answer)),
                             **{"node-wait-timeout": 120.0})
    assert time.monotonic() - started < 60, "round 1 did not wait for the forger's federation"
    metrics = _metrics(run_dir)
    assert [m["participants"] for m in metrics] == [[0, 1], [0, 1]], "the honest clients train"
    assert [m["num_failures"] for m in metrics] == [1, 0], "the refused node counts once"
    assert [set(m["acc_per_client"]) for m in metrics] == [{"0", "1"}, {"0", "1"}]
    assert all(2 not in replies for (_, kind), replies in grid.replies.items() if kind != "query"), \
        "a refused node is asked nothing more"
    (line,) = _warnings(caplog, "refused")
    assert "node 1002 refused for the rest of the run" in line and reason in line, line


def test_no_strict_majority_on_the_federation_size_stops_round_one(tmp_path):
    def disagree(kind, pid, reply):
        if kind == "query":
            reply.content[METRICS]["num-partitions"] = 2 + 3 * pid  # 2 and 5: no strict majority
        return reply
    with pytest.raises(FederationIncomplete, match=r"no strict majority of them reports one num-partitions \{2: 1, 5: 1\}"):
        _run(tmp_path, "split", rewrite=disagree, clients=2, **{"node-wait-timeout": 2.0})


# --------------------------------------------------------------------------- fault kinds


def test_a_timeout_fault_is_a_modelled_straggler(tmp_path, caplog):
    """Old main: a timeout fault slept round-timeout + 5 s inside the client (in a simulation, holding
    its Ray actor past the round). Now it replies at once and counts as a reply past round-timeout."""
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        run_dir, grid = _run(tmp_path, "late", **{"fault-fraction": 0.34, "fault-kind": "timeout", "round-timeout": 60.0})
    assert time.monotonic() - started < 60, "no client slept"
    injector = FaultInjector(0.34, "timeout", seed=1)
    for m in _metrics(run_dir):
        (faulty,) = injector.faulty(list(range(CLIENTS)), m["round"], training=True)
        valid = [pid for pid in range(CLIENTS) if pid != faulty]
        assert m["participants"] == valid and m["num_failures"] == 1 and m["num_bad_updates"] == 0
        assert _same(_sent_after(grid, m["round"]), _averaged(grid, m["round"], valid))
        assert set(m["acc_per_client"]) == {"0", "1", "2"}, "a straggler still evaluates"
    lines = [r.getMessage() for r in caplog.records if "modelled straggler" in r.getMessage()]
    assert len(lines) == 2 and f"client {faulty}" in lines[-1]


@pytest.mark.parametrize("extra", [{}, {"fused-evaluation": True}, {"method": "pfedsd"}],
                         ids=["evaluate-messages", "fused-evaluation", "after-training"])
def test_a_bad_eval_fault_is_drawn_among_the_evaluated_clients_and_not_recorded(tmp_path, extra):
    """pFedSD is evaluated after training: the bad evaluation rides on the train reply, whose
    upload still counts, and the client has no after-training evaluation that round."""
    clients = 5
    run_dir, _ = _run(tmp_path, "bad-eval", clients=clients, **{"fault-fraction": 0.4, "fault-kind": "bad-eval", **extra})
    injector = FaultInjector(0.4, "bad-eval", seed=1)
    for m in _metrics(run_dir):
        faulty = injector.faulty(list(range(clients)), m["round"], training=False, evaluates=m["round"])
        assert len(faulty) == 2
        assert set(m["acc_per_client"]) == {str(pid) for pid in range(clients)} - {str(pid) for pid in faulty}
        assert all(0.0 <= acc <= 1.0 for acc in m["acc_per_client"].values())
        assert m["num_failures"] == 2 and m["num_bad_updates"] == 0 and m["participants"] == list(range(clients))


def test_a_method_metrics_record_with_a_non_finite_figure_is_left_out(tmp_path, caplog):
    """``method-metrics`` (MethodClient.train_metrics) must hold finite numbers; the other
    participants' figures are averaged into the round's ``method_metrics``."""
    from strategies.protocol import METHOD_METRICS

    def rewrite(kind: str, pid: int, reply: Message) -> Message:
        if kind == "train":
            reply.content[METHOD_METRICS] = MetricRecord({"x-figure": float("nan") if pid == 1 else float(pid)})
        return reply

    with caplog.at_level(logging.WARNING):
        run_dir, _ = _run(tmp_path, "method-metrics", rewrite=rewrite)
    for m in _metrics(run_dir):
        assert m["participants"] == [0, 2] and m["num_bad_updates"] == 1
        assert m["method_metrics"] == {"x-figure": 1.0}
    assert _warnings(caplog, METHOD_METRICS)
