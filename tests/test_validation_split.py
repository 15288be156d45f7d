"""Best-by-validation (``validation-fraction``): a seeded validation split held out of each client's
training split, its accuracy reported with every evaluation and recorded per round, and the round
chosen by it in ``summary.json``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from test_federation import _metrics, _run, _summary, _train_type
from test_strategy_parts import TEMPLATE, _record, _reply

from conftest import app_defaults
from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import ClientSplit, DatasetError, hold_out_validation
from strategies.protocol import METRICS, TRAINED_EVALUATION
from strategies.validation import ReplyValidator


def test_the_validation_split_is_seeded_disjoint_from_training_and_sized_by_the_fraction():
    split = ClientSplit(train=np.arange(100, 200, dtype=np.int64)[::-1].copy(), test=np.arange(40, dtype=np.int64))
    held = hold_out_validation(split, 0.25, seed=1, partition_id=3)
    assert len(held.validation) == 25 and len(held.train) == 75
    assert not set(held.validation) & set(held.train) and set(held.validation) | set(held.train) == set(split.train)
    assert held.test is split.test, "the test split is untouched (and indexes the test arrays, not these)"
    kept = [int(i) for i in split.train if i in set(held.train)]
    assert held.train.tolist() == kept, "training keeps the partition's order"
    again = hold_out_validation(split, 0.25, seed=1, partition_id=3)
    assert np.array_equal(again.validation, held.validation)
    assert not np.array_equal(hold_out_validation(split, 0.25, seed=2, partition_id=3).validation, held.validation)
    assert not np.array_equal(hold_out_validation(split, 0.25, seed=1, partition_id=4).validation, held.validation)
    assert len(hold_out_validation(split, 0.1, seed=1, partition_id=3).validation) == 10
    with pytest.raises(DatasetError, match="validation-fraction=0.001: client 3 holds 100 training samples"):
        hold_out_validation(split, 0.001, seed=1, partition_id=3)


def test_a_fraction_that_holds_out_nothing_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"validation-fraction=0.01: holds out 0 of train-per-client=20 samples"):
        load_config({**app_defaults(), "validation-fraction": 0.01, "train-per-client": 20})
    config = load_config({**app_defaults(), "validation-fraction": 0.05, "train-per-client": 20})
    assert config.validation_fraction == 0.05


def test_with_validation_every_evaluation_must_carry_its_validation_accuracy():
    validator = ReplyValidator(_record(TEMPLATE), validation=True)
    metrics = {"partition-id": 0, "num-examples": 8, "accuracy": 0.5, "eval-loss": 1.0}
    assert "val-accuracy = None" in validator.evaluate_problem(_reply(RecordDict({METRICS: MetricRecord(metrics)})))
    bad = _reply(RecordDict({METRICS: MetricRecord({**metrics, "val-accuracy": 1.5, "val-loss": 1.0})}))
    assert "val-accuracy = 1.5 is not in [0.0, 1.0]" in validator.evaluate_problem(bad)
    good = _reply(RecordDict({METRICS: MetricRecord({**metrics, "val-accuracy": 0.25, "val-loss": 1.0})}))
    assert validator.evaluate_problem(good) is None
    without = _reply(RecordDict({METRICS: MetricRecord(metrics)}))
    assert ReplyValidator(_record(TEMPLATE)).evaluate_problem(without) is None


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    """Three clients, two rounds, a quarter of each training split held out, both evaluation points."""
    return _run(tmp_path_factory.mktemp("validation"), "validated", method="fedlora", validation_fraction=0.25,
                evaluate_at="both", train_per_client=16)


def test_clients_train_on_the_rest_and_report_validation_accuracy_at_both_points(validated_run):
    run_dir, grid, run_config = validated_run
    config = load_config(run_config)
    train = grid.replies[(2, _train_type(grid))]
    rows = _metrics(run_dir)
    for pid, reply in train.items():
        session = ClientSession.create(config, pid, 3, run_dir / "clients", server_round=2)
        held, rest = session.split.validation, session.split.train
        assert len(held) == round(0.25 * (len(held) + len(rest))) > 0 and not set(held) & set(rest)
        assert reply.content[METRICS]["num-examples"] == len(rest), "training uses the rest"
        session.load({key: torch.from_numpy(value.numpy().copy()) for key, value in reply.content["arrays"].items()},
                     training=False)  # the model its training left: its upload and its round-2 τ_i
        assert session.score(validation=True).accuracy == reply.content[TRAINED_EVALUATION]["val-accuracy"]
        recorded = rows[1]["val_acc_per_client_after_training"][str(pid)]
        assert recorded == reply.content[TRAINED_EVALUATION]["val-accuracy"]
    for row in rows:
        assert set(row["val_acc_per_client"]) == {"0", "1", "2"}
        assert row["val_acc_mean"] == pytest.approx(np.mean(list(row["val_acc_per_client"].values())))
        assert 0.0 <= row["val_acc_mean_after_training"] <= 1.0


def test_the_summary_picks_the_round_by_validation_accuracy(validated_run):
    run_dir, _, _ = validated_run
    rows = _metrics(run_dir)
    best = max(reversed(rows), key=lambda row: row["val_acc_mean"])
    summary = _summary(run_dir)
    assert summary["best_val_round"] == best["round"] and summary["best_val_acc_mean"] == best["val_acc_mean"]
    assert summary["acc_mean_at_best_val"] == best["acc_mean"]
