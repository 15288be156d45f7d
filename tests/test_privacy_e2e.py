"""End to end: a DP run through ``flwr run`` (Ray simulation, this session's SuperLink) that
reaches its target ε stops with status 6, and its rows carry the accountant's ε."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from test_privacy import _independent_epsilon

pytestmark = pytest.mark.e2e


def test_target_epsilon_stops_a_simulation_with_status_6(superlink, tmp_path):
    z, delta = 2.0, 1e-5
    target = (_independent_epsilon(1, 3, 3, z, delta) + _independent_epsilon(2, 3, 3, z, delta)) / 2
    out = tmp_path / "outputs"
    code, log = superlink.run(
        REPO,
        {"dataset": "synthetic", "model": "cnn", "num-server-rounds": 3, "local-epochs": 1, "lora-epochs": 1,
         "train-per-client": 32, "test-per-client": 16, "output-dir": str(out), "run-name": "e2e-dp",
         "dp-clip-norm": 0.5, "dp-noise-multiplier": z, "dp-delta": delta, "dp-target-epsilon": target},
        num_supernodes=3,
    )
    assert code == 6, log[-3000:]
    assert "[fedlora-flwr exit 6] dp-target-epsilon: round 2 would take ε to" in log
    rows = [json.loads(line) for line in (out / "e2e-dp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1]
    assert rows[0]["dp_epsilon"] == pytest.approx(_independent_epsilon(1, 3, 3, z, delta), rel=1e-9)
    assert rows[0]["dp_epsilon"] < target
    assert rows[0]["dp_update_norm_max"] <= 0.5
    summary = json.loads((out / "e2e-dp" / "summary.json").read_text())
    assert (summary["failure"], summary["exit_status"]) == ("privacy-budget", 6)
