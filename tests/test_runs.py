"""fedlora_flwr.load_runs / load_client_accuracies on fake run folders: columns, statuses, errors.
The real 2 methods × 2 seeds × 2 rounds grid is tests/test_grid.py's e2e test."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from runfolders import fake_run

import fedlora_flwr
from fedlora_flwr.runs import RunsError, load_client_accuracies, load_runs


def test_one_row_per_run_and_round_with_config_and_summary(tmp_path):
    root = tmp_path / "grids"
    fake_run(root / "a", "fedlora-s1", "fedlora", 1, 0.8)
    fake_run(root / "b", "fedavg-s2", "fedavg", 2, 0.6)
    fake_run(root / "a", "fedlora-s2", "fedlora", 2, 0.7, finished=False)
    frame = fedlora_flwr.load_runs(root)
    assert len(frame) == 9
    assert frame.groupby("run").size().to_dict() == {"fedavg-s2": 3, "fedlora-s1": 3, "fedlora-s2": 3}
    assert frame["round"].tolist() == [1, 2, 3] * 3
    assert frame.run_dir.tolist()[0] == str((root / "a" / "fedlora-s1").resolve())
    by_run = frame.groupby("run").first()
    assert by_run.status.to_dict() == {"fedavg-s2": "finished", "fedlora-s1": "finished", "fedlora-s2": "unfinished"}
    assert by_run.loc["fedlora-s1", "best_acc_mean"] == 0.8 and by_run.loc["fedlora-s1", "final_acc_mean"] == 0.79
    assert pd.isna(by_run.loc["fedlora-s2", "best_acc_mean"])  # no summary yet
    assert by_run.loc["fedavg-s2", "num-server-rounds"] == 3 and by_run.loc["fedavg-s2", "seed"] == 2
    assert by_run.loc["fedavg-s2", "num_clients"] == 4
    assert {"acc_per_client", "participants", "run-dir"}.isdisjoint(frame.columns)
    assert "num-server-rounds" in frame.attrs["config_columns"] and "acc_mean" not in frame.attrs["config_columns"]
    assert frame.loc[(frame.run == "fedlora-s1") & (frame["round"] == 2), "acc_mean"].item() == 0.8

    clients = load_client_accuracies(root)
    assert list(clients.columns) == ["run", "run_dir", "round", "client", "acc"]
    assert len(clients) == 3 * 3 * 4 and clients.client.tolist()[:4] == [0, 1, 2, 3]
    row = clients[(clients.run == "fedlora-s1") & (clients["round"] == 2) & (clients.client == 3)]
    assert row.acc.item() == pytest.approx(0.9)


def test_one_run_folder_failed_status_and_a_run_without_rounds(tmp_path):
    run_dir = fake_run(tmp_path, "failed", "fedlora", 1, 0.5)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(status="failed", failure="no-valid-replies", reason="round 3: no valid reply")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    frame = load_runs(run_dir)
    assert set(frame.status) == {"failed"} and set(frame.failure) == {"no-valid-replies"}
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "summary.json").unlink()
    frame = load_runs(run_dir)
    assert len(frame) == 1 and pd.isna(frame["round"].iloc[0]) and frame.status.iloc[0] == "unfinished"


def test_group_accuracies_become_columns(tmp_path):
    run_dir = fake_run(tmp_path, "hetero", "pfedlora", 1, 0.5)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["acc_per_group"] = {"cnn-1": 0.4, "cnn-2": 0.6}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    frame = load_runs(tmp_path)
    assert frame["acc_per_group.cnn-2"].tolist() == [0.6] * 3


@pytest.mark.parametrize(
    ("file", "text", "says"),
    [
        ("metrics.jsonl", '{"round": 1}\n{"round": 2, "acc_mean": 0.\n', "metrics.jsonl line 2: not JSON"),
        ("metrics.jsonl", '{"round": "1"}\n', "metrics.jsonl line 1: not an object with an integer 'round'"),
        ("config.json", "[1, 2]", "config.json: not a JSON object"),
        ("summary.json", "{", "summary.json: unreadable (JSONDecodeError"),
    ],
)
def test_a_corrupt_file_is_one_line_naming_it(tmp_path, file, text, says):
    run_dir = fake_run(tmp_path, "bad", "fedlora", 1, 0.5)
    (run_dir / file).write_text(text)
    with pytest.raises(RunsError) as info:
        load_runs(tmp_path)
    assert str(info.value).startswith(str(run_dir / file)) and says in str(info.value)
    assert "\n" not in str(info.value)


def test_not_a_folder_and_an_empty_folder(tmp_path):
    with pytest.raises(RunsError, match="not a folder"):
        load_runs(tmp_path / "missing")
    frame = load_runs(tmp_path)
    assert frame.empty and {"run", "run_dir", "status", "round"} <= set(frame.columns)
