"""Run outputs: the contract of DESIGN.md §4 (other tools read it; extend, don't break).

``<output-dir>/<run-name>/`` holds ``config.json`` (the validated config, every key),
``metrics.jsonl`` (one object per round), ``summary.json`` and ``shared.safetensors`` (the
final aggregated shared tensors, e.g. FedLoRA's σ̄; written at the end) and
``clients/<partition-id>/`` (each client's personal state). Client i's personalized model is
``shared.safetensors`` + ``clients/<i>/personal.safetensors``. With ``tensorboard = true`` the
same per-round numbers also go to TensorBoard event files in ``tensorboard/`` (append-only logs
for viewing, written as rounds finish; ``metrics.jsonl`` stays the record other tools read).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedlora_flwr.config import ConfigError, RunConfig
from fedlora_flwr.store import write_atomic, write_safetensors_atomic

CLIENTS_DIR = "clients"
SHARED_FILE = "shared.safetensors"
TENSORBOARD_DIR = "tensorboard"


def default_run_name(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.method}-{config.dataset}-{config.model_family or config.model}-a{config.alpha:g}-s{config.seed}-{stamp}"


def create_run_dir(config: RunConfig) -> Path:
    """Create ``<output-dir>/<run-name>``; refuse one that already holds files (no overwrite)."""
    run_dir = Path(config.output_dir) / (config.run_name or default_run_name(config))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run-name: {run_dir} already holds a run; choose another run-name or move that folder away"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class RunRecorder:
    """Writes the run folder and prints one progress line per round."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.started = time.monotonic()
        self.rounds: list[dict[str, Any]] = []
        self.client_ids: set[int] = set()
        write_json_atomic(run_dir / "config.json", {**config.as_record(), "run-dir": str(run_dir)})
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_path.touch()
        self.tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    @property
    def clients_dir(self) -> Path:
        return self.run_dir / CLIENTS_DIR

    def record_round(self, record: dict[str, Any]) -> None:
        """Append one round to ``metrics.jsonl`` (flushed and fsynced) and log the progress line."""
        record = {key: (_finite(value) if isinstance(value, float) else value) for key, value in record.items()}
        record["elapsed_s"] = round(time.monotonic() - self.started, 3)
        self.rounds.append(record)
        self.client_ids.update(int(pid) for pid in record.get("acc_per_client", {}))
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.tensorboard is not None:
            self._write_tensorboard(record)
        best = max((r["acc_mean"] for r in self.rounds if r.get("acc_mean") is not None), default=None)
        acc = record.get("acc_mean")
        log(
            INFO,
            "[fedlora-flwr] round %d/%d  acc_mean %s  best %s  participants %d  failures %d  elapsed %.1fs",
            record["round"],
            self.config.num_server_rounds,
            f"{acc:.4f}" if acc is not None else "n/a",
            f"{best:.4f}" if best is not None else "n/a",
            record.get("num_participants", 0),
            record.get("num_failures", 0),
            record["elapsed_s"],
        )

    def _write_tensorboard(self, record: Mapping[str, Any]) -> None:
        """Every numeric per-round metric as a scalar (tag = its metrics.jsonl key, step = round)
        and the per-client accuracies as a histogram."""
        step = int(record["round"])
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(key, value, step)
        per_client = list(record.get("acc_per_client", {}).values())
        if per_client:
            self.tensorboard.add_histogram("acc_per_client", torch.tensor(per_client, dtype=torch.float64), step)
        self.tensorboard.flush()

    def finish(self, shared: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Write ``shared.safetensors`` (the final aggregate) and ``summary.json``: best round
        (ties go to the later round, METHODS.md A.6) and totals."""
        write_safetensors_atomic(self.run_dir / SHARED_FILE, shared, {"method": self.config.method})
        scored = [r for r in self.rounds if r.get("acc_mean") is not None]
        best = max(reversed(scored), key=lambda r: r["acc_mean"], default=None)
        config = self.config
        summary = {
            "method": config.method,
            "dataset": config.dataset,
            "model": config.model_family or config.model,
            "partition": config.partition,
            "alpha": config.alpha,
            "seed": config.seed,
            "num_clients": max([len(self.client_ids)] + [r.get("num_nodes", 0) for r in self.rounds]),
            "rounds": len(self.rounds),
            "best_acc_mean": best["acc_mean"] if best else None,
            "best_round": best["round"] if best else None,
            "final_acc_mean": self.rounds[-1].get("acc_mean") if self.rounds else None,
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in self.rounds),
            "bytes_down_total": sum(r.get("bytes_down", 0) for r in self.rounds),
            "wall_seconds": round(time.monotonic() - self.started, 3),
            "run_dir": str(self.run_dir),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        log(INFO, "[fedlora-flwr] finished: best acc_mean %s at round %s; outputs in %s",
            summary["best_acc_mean"], summary["best_round"], self.run_dir)
        return summary
