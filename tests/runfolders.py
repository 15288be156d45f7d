"""Fake run folders, written as RunRecorder writes them (tests of load_runs and the report)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import app_defaults


def fake_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    best: float,
    *,
    finished: bool = True,
    num_clients: int = 4,
    **overrides,
) -> Path:
    """A run folder: 3 rounds whose best acc_mean is ``best`` (round 2) and final ``best - 0.01``."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        **app_defaults(),
        "method": method,
        "dataset": "synthetic",
        "model": "cnn",
        "seed": seed,
        "num-server-rounds": 3,
        "train-per-client": 100,
        "test-per-client": 40,
        "run-name": name,
        "output-dir": str(root),
        "run-dir": str(run_dir),
        **overrides,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    up = {"local": 0, "fedavg": 2_000_000}.get(method, 1_000_000)
    rounds = []
    for rnd, acc in ((1, best - 0.2), (2, best), (3, best - 0.01)):
        spread = (-0.05, 0.05, -0.1, 0.1)[:num_clients]
        rounds.append(
            {
                "round": rnd, "acc_mean": acc, "acc_weighted": acc, "acc_std": 0.05,
                "acc_per_client": {str(i): acc + d for i, d in enumerate(spread)},
                "num_participants": num_clients, "num_failures": 0, "participants": list(range(num_clients)),
                "bytes_up": up, "bytes_down": 2 * up, "train_loss": 1.0 / rnd,
                "shared_distance": 0.0 if method == "local" else 10.0 / rnd, "elapsed_s": float(rnd),
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if finished:
        summary = {
            "status": "finished", "method": method, "dataset": config["dataset"], "model": "cnn",
            "partition": "dirichlet", "alpha": config["alpha"], "seed": seed, "num_clients": num_clients,
            "rounds": 3, "best_acc_mean": best, "best_round": 2, "final_acc_mean": best - 0.01,
            "bytes_up_total": 3 * up, "bytes_down_total": 6 * up, "wall_seconds": 3.0, "run_dir": str(run_dir),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir
