"""Property: whatever the replies hold (metrics of any type and value, records of the wrong type,
arrays of the wrong shape or dtype or with non-finite values, other clients' ids, a node replying
twice), no exception escapes the strategy but NoValidReplies, nothing invalid is averaged or
recorded, and the aggregate is the (weighted or plain) mean of exactly the valid train replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import app_defaults
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_federation import ScriptedGrid
from test_strategy_parts import MemoryRecorder

from fedlora_flwr.exits import NoValidReplies
from strategies.base import average_arrays
from strategies.fedavg import FedAvgStrategy
from strategies.fedlora import FedLoRAStrategy
from strategies.protocol import ARRAYS, CLIENT_INFO, METRICS, MODELLED_TIMEOUT

CLIENTS, TRAIN_MAX, TEST_MAX = 4, 16, 8
TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float64), "n": np.asarray(0, np.int64)}

# Any MetricRecord value, edge values first; any ConfigRecord value (strings, bytes and booleans too).
metric_values = st.one_of(
    st.sampled_from([0, -1, 1, TEST_MAX, TEST_MAX + 1, TRAIN_MAX, TRAIN_MAX + 1, 2**40, 0.0, -0.0, 0.5, 1.0, 1.5, -3.0,
                     16.0, float("nan"), float("inf"), -float("inf"), [1], [0.5], []]),
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 20), max_size=3), st.lists(st.floats(-2, 2), max_size=3),
)
config_values = st.one_of(metric_values, st.text(max_size=4), st.binary(max_size=4), st.booleans())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _train_ok(metrics: dict, pid: int) -> bool:
    """The rules of a train reply's metrics (docs/concepts/strategies.md, "Reply checks"), restated."""
    examples, samples = metrics.get("num-examples"), metrics.get("train-samples")
    return (metrics.get("partition-id") == pid and _is_int(metrics.get("partition-id"))
            and _is_int(examples) and 1 <= examples <= TRAIN_MAX
            and _is_finite(metrics.get("train-loss"))
            and _is_int(samples) and samples >= 0)


def _evaluate_ok(metrics: dict, pid: int) -> bool:
    accuracy, examples, loss = metrics.get("accuracy"), metrics.get("num-examples"), metrics.get("eval-loss")
    return (metrics.get("partition-id") == pid and _is_int(metrics.get("partition-id"))
            and _is_finite(accuracy) and 0 <= accuracy <= 1
            and _is_int(examples) and 1 <= examples <= TEST_MAX
            and _is_finite(loss) and loss >= 0)


ARRAY_FAULTS = ["shape", "dtype", "nan", "inf", "missing", "extra", "absent", "metric-record", "mislabelled",
                "garbage", "torch-stype"]
INFO_FAULTS = ["int-group", "metric-record"]


@st.composite
def reply_specs(draw, pid: int, train: bool):
    """A reply's recipe: a valid reply with at most one change drawn (an error, a modelled straggler,
    metrics changed to arbitrary values or removed, a record of the wrong type, bad arrays, a bad
    client-info record), whether or not the change makes it invalid."""
    if train:
        metrics = {"partition-id": pid, "num-examples": draw(st.integers(1, TRAIN_MAX)),
                   "train-loss": draw(st.floats(0, 10)), "train-samples": draw(st.integers(0, 100))}
    else:
        metrics = {"partition-id": pid, "accuracy": draw(st.floats(0, 1)), "num-examples": draw(st.integers(1, TEST_MAX)),
                   "eval-loss": draw(st.floats(0, 10))}
    spec = {"what": "reply", "record": "metric", "metrics": metrics, "arrays": "none", "info": "none",
            "values": {key: draw(st.floats(-3, 3, width=32)) for key in TEMPLATE}}
    change = draw(st.sampled_from(["none", "none", "group", "error", "late", "metrics", "metrics", "metrics",
                                   "config-record", "no-record", "arrays", "info"]))
    if change in ("error", "late"):
        spec["what"] = change
    elif change == "group":
        spec["info"] = "group"
    elif change == "metrics":
        for key in draw(st.lists(st.sampled_from([*metrics, "other"]), min_size=1, max_size=2)):
            if draw(st.integers(0, 3)) == 0:
                metrics.pop(key, None)
            else:
                metrics[key] = draw(metric_values)
    elif change == "config-record":
        spec["record"] = "config"
        key = draw(st.sampled_from(list(metrics)))
        metrics[key] = draw(config_values)
    elif change == "no-record":
        spec["record"] = "absent"
    elif change == "arrays" and train:
        spec["arrays"] = draw(st.sampled_from(ARRAY_FAULTS))
    elif change == "info":
        spec["info"] = draw(st.sampled_from(INFO_FAULTS))
    return spec


def _arrays(spec: dict) -> dict[str, np.ndarray]:
    arrays = {key: np.full(value.shape, spec["values"][key], value.dtype) for key, value in TEMPLATE.items()}
    fault = spec["arrays"]
    if fault == "shape":
        arrays["w"] = np.zeros((3, 2), np.float32)
    elif fault == "dtype":
        arrays["b"] = arrays["b"].astype(np.float32)
    elif fault in ("nan", "inf"):
        arrays["w"][1, 2] = np.nan if fault == "nan" else -np.inf
    elif fault == "missing":
        del arrays["b"]
    elif fault == "extra":
        arrays["x"] = np.zeros(1, np.float32)
    return arrays


def _reply(spec: dict, question: Message) -> Message:
    if spec["what"] == "error":
        return Message(Error(code=0, reason="injected"), reply_to=question)
    if spec["what"] == "late":
        return Message(RecordDict({MODELLED_TIMEOUT: ConfigRecord({"fault-kind": "timeout"})}), reply_to=question)
    content = RecordDict()
    if spec["record"] != "absent":
        kind = MetricRecord if spec["record"] == "metric" else ConfigRecord
        content[METRICS] = kind(dict(spec["metrics"]))
    if spec["arrays"] == "metric-record":
        content[ARRAYS] = MetricRecord({"w": 1.0})
    elif spec["arrays"] != "absent" and question.metadata.message_type.startswith("train"):
        arrays = ArrayRecord({key: Array.from_numpy_ndarray(v) for key, v in _arrays(spec).items()})
        w = arrays["w"]  # an Array whose data is not what its dtype and shape say
        if spec["arrays"] == "mislabelled":
            arrays["w"] = Array(w.dtype, w.shape, w.stype, Array.from_numpy_ndarray(np.zeros((3, 2), np.float32)).data)
        elif spec["arrays"] == "garbage":
            arrays["w"] = Array(w.dtype, w.shape, w.stype, b"\x93NUMPY garbage")
        elif spec["arrays"] == "torch-stype":
            arrays["w"] = Array(w.dtype, w.shape, "torch", w.data)
        content[ARRAYS] = arrays
    if spec["info"] == "group":
        content[CLIENT_INFO] = ConfigRecord({"group": "cnn-1"})
    elif spec["info"] == "int-group":
        content[CLIENT_INFO] = ConfigRecord({"group": 1})
    elif spec["info"] == "metric-record":
        content[CLIENT_INFO] = MetricRecord({"group": 1})
    return Message(content, reply_to=question)


def _valid(spec: dict, pid: int, train: bool) -> bool:
    """Whether the recipe makes a valid reply, by the rules alone."""
    ok = _train_ok if train else _evaluate_ok
    return (spec["what"] == "reply" and spec["record"] == "metric" and ok(spec["metrics"], pid)
            and spec["arrays"] == "none" and spec["info"] in ("none", "group"))


def _batch(draw, messages: list[Message], grid: ScriptedGrid, train: bool) -> tuple[list[Message], dict[int, dict]]:
    """Replies to ``messages`` (some nodes twice), in a drawn arrival order, and the recipe of each
    partition's first valid reply in that order (the one that counts)."""
    drawn = []
    for question in messages:
        pid = grid.contexts[question.metadata.dst_node_id].node_config["partition-id"]
        for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
            spec = draw(reply_specs(pid, train))
            drawn.append((pid, spec, _reply(spec, question)))
    drawn = draw(st.permutations(drawn))
    chosen: dict[int, dict] = {}
    for pid, spec, _ in drawn:
        if _valid(spec, pid, train) and pid not in chosen:
            chosen[pid] = spec
    return [reply for _, _, reply in drawn], chosen


@pytest.mark.parametrize("strategy_cls", [FedAvgStrategy, FedLoRAStrategy], ids=["weighted", "mean"])
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_only_valid_replies_count_and_the_aggregate_is_their_mean(strategy_cls, data):
    grid = ScriptedGrid({1: 0.5}, CLIENTS, app_defaults())  # answers the partition-id queries honestly
    recorder = MemoryRecorder()
    template = ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in TEMPLATE.items()})
    strategy = strategy_cls(upload_template=template, train_per_client=TRAIN_MAX, test_per_client=TEST_MAX,
                            recorder=recorder)
    messages = list(strategy.configure_train(1, template, ConfigRecord({}), grid))
    replies, chosen = _batch(data.draw, messages, grid, train=True)
    if not chosen:
        with pytest.raises(NoValidReplies):
            strategy.aggregate_train(1, replies)
        return
    aggregated, _ = strategy.aggregate_train(1, replies)
    pids = sorted(chosen)
    valid = [ArrayRecord({key: Array.from_numpy_ndarray(v) for key, v in _arrays(chosen[pid]).items()}) for pid in pids]
    weights = [float(chosen[pid]["metrics"]["num-examples"]) if strategy.aggregation == "weighted" else 1.0 for pid in pids]
    expected = average_arrays(valid, weights)
    assert all(aggregated[key].numpy().tobytes() == expected[key].numpy().tobytes() for key in TEMPLATE)

    evaluations = list(strategy.configure_evaluate(1, aggregated, ConfigRecord({}), grid))
    replies, evaluated = _batch(data.draw, evaluations, grid, train=False)
    strategy.aggregate_evaluate(1, replies)
    (row,) = recorder.rounds
    assert row["participants"] == pids and row["num_participants"] == len(pids)
    assert row["acc_per_client"] == {str(pid): evaluated[pid]["metrics"]["accuracy"] for pid in sorted(evaluated)}
    assert all(0.0 <= acc <= 1.0 for acc in row["acc_per_client"].values())
    sizes = [evaluated[pid]["metrics"]["num-examples"] for pid in sorted(evaluated)]
    weighted = sum(evaluated[pid]["metrics"]["accuracy"] * n for pid, n in zip(sorted(evaluated), sizes)) / sum(sizes or [1])
    assert row["acc_weighted"] == pytest.approx(weighted) if evaluated else math.isnan(row["acc_weighted"])
    assert row["num_failures"] == len(set(range(CLIENTS)) - (set(chosen) & set(evaluated)))
