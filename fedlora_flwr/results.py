"""Run outputs: the contract of docs/concepts/outputs.md (other tools read it; extend, don't break).

``<output-dir>/<run-name>/`` holds ``config.json`` (the validated config, every key),
``metrics.jsonl`` (one object per round), ``summary.json`` and ``shared.safetensors`` (the
final aggregated shared tensors, e.g. FedLoRA's σ̄; written at the end) and
``clients/<partition-id>/`` (each client's personal state). Client i's personalized model is
``shared.safetensors`` + ``clients/<i>/personal.safetensors``. With ``tensorboard = true`` the
same per-round numbers also go to TensorBoard event files in ``tensorboard/`` (append-only logs
for viewing, written as rounds finish; ``metrics.jsonl`` stays the record other tools read).

``summary.json`` (written atomically) says how the run ended: ``"status": "finished"``, or
``"failed"`` with the ``failure`` (``fedlora_flwr.exits``), the ``exit_status`` of ``fedlora-flwr
run`` and the ``reason``, once the run has written its ``config.json`` (a run refused before that,
e.g. for its config, writes nothing). Only a finished run counts as done (:func:`run_finished`).

After every round the server writes ``checkpoint.safetensors`` (atomically, after that round's
``metrics.jsonl`` row; with ``fused-evaluation`` the row may still be pending, and the checkpoint
then carries the evaluation gathered so far): the arrays the next round starts from and, in its
metadata, the round, the elapsed time and the strategy's state. The per-client state on disk is versioned by round
(``fedlora_flwr.store``) and every random draw derives from (seed, round), so nothing else is
needed. ``resume = true`` reopens the run: the config must match ``config.json`` except for a
``num-server-rounds`` at least as large; the row of the round a crash interrupted between its
``metrics.jsonl`` row and its checkpoint is dropped and the run continues with the next round (from
round 1 if no round was checkpointed). A run folder whose rows go further than that (its checkpoint
deleted, or older than its rows), or whose ``config.json`` or checkpoint is unreadable, is refused
in one line before anything is written: a resume never drops recorded rounds.

The server tells each client the last round it trained in (:func:`last_trained_rounds`, from the
rows' ``participants``), so that a client whose state is gone fails instead of starting afresh
(``fedlora_flwr.store``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log

from fedlora_flwr.config import OPERATIONAL_KEYS, ConfigError, RunConfig
from fedlora_flwr.exits import OTHER_FAILURE, RunFailure
from fedlora_flwr.store import StateError, read_verified, write_atomic, write_safetensors_atomic

CLIENTS_DIR = "clients"
SUMMARY_FILE = "summary.json"
#: ``summary.json``'s ``status``: the run's last round was recorded, or the run stopped on an error.
FINISHED, FAILED = "finished", "failed"
SHARED_FILE = "shared.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
TENSORBOARD_DIR = "tensorboard"
#: Run-config keys a resumed run may change: more rounds, and the keys that do not change results
#: (``run-dir`` is recorded in config.json, not a key).
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "run-dir", *OPERATIONAL_KEYS})


def default_run_name(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.method}-{config.dataset}-{config.model_family or config.model}-a{config.alpha:g}-s{config.seed}-{stamp}"


def create_run_dir(config: RunConfig) -> Path:
    """Create ``<output-dir>/<run-name>``; refuse one that already holds files (no overwrite).
    With ``resume``: the existing run folder, whose ``config.json`` must match the config."""
    run_dir = Path(config.output_dir) / (config.run_name or default_run_name(config))
    if config.resume:
        check_resumable(run_dir, config)
        return run_dir
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run-name: {run_dir} is a file, not a run folder; choose another run-name")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run-name: {run_dir} already holds a run; choose another run-name or move that folder away"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((parent for parent in run_dir.parents if parent.exists() and not parent.is_dir()), None)
        reason = f"{blocking} is a file" if blocking else err.strerror or str(err)
        raise ConfigError(f"output-dir: cannot create the run folder {run_dir}: {reason}") from None
    return run_dir


def check_resumable(run_dir: Path, config: RunConfig) -> None:
    """Refuse, in one line, to resume a run that does not exist or was started with another config."""
    recorded_path = run_dir / "config.json"
    if not recorded_path.is_file():
        raise ConfigError(f"resume: no run {config.run_name!r} in {config.output_dir} ({recorded_path} does not exist)")
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume: {recorded_path} is unreadable: {err}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("num-server-rounds"), int):
        raise ConfigError(f"resume: {recorded_path} is not a run config (no num-server-rounds)")
    current = config.as_record()
    changed = sorted(key for key in set(recorded) | set(current)
                     if key not in RESUMABLE_CHANGES and recorded.get(key, "<absent>") != current.get(key, "<absent>"))
    if changed:
        differences = ", ".join(f"{key} ({recorded.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r})"
                                for key in changed)
        raise ConfigError(f"resume: the run config differs from {recorded_path} in {differences}")
    if config.num_server_rounds < recorded["num-server-rounds"]:
        raise ConfigError(f"resume: num-server-rounds={config.num_server_rounds} is below the run's "
                          f"{recorded['num-server-rounds']} ({recorded_path})")


@dataclass(frozen=True)
class Checkpoint:
    """What the server saved after round ``round`` to continue from there."""

    round: int
    arrays: ArrayRecord  # the arrays round + 1 starts from
    elapsed_s: float
    strategy: dict[str, Any]  # the strategy's own state (PersonalizedStrategy.checkpoint_state)
    #: ``fused-evaluation``: the round's evaluation still waiting for the next round's train
    #: replies (``strategies.evaluation.PendingEvaluation``); its row is not in ``metrics.jsonl`` yet.
    pending_evaluation: dict[str, Any] | None = None


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, method: str) -> None:
    """One atomic file: the arrays as tensors (key order kept), everything else in its metadata."""
    state = {"round": checkpoint.round, "elapsed_s": checkpoint.elapsed_s, "strategy": checkpoint.strategy,
             "pending_evaluation": checkpoint.pending_evaluation, "keys": list(checkpoint.arrays.keys())}
    tensors = checkpoint.arrays.to_torch_state_dict()
    write_safetensors_atomic(run_dir / CHECKPOINT_FILE, tensors, {"method": method, "checkpoint": json.dumps(state)})


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint (checksums verified), or None if no round was checkpointed;
    :class:`StateError` naming the file if it is unreadable."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    tensors, metadata, stored_keys = read_verified(path, what="checkpoint")
    try:
        state = json.loads(metadata["checkpoint"])
        keys, checkpoint_round = [str(key) for key in state["keys"]], int(state["round"])
        elapsed_s, strategy = float(state["elapsed_s"]), dict(state["strategy"])
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"checkpoint {path} is corrupt: unreadable metadata ({type(err).__name__}: {err})") from None
    if set(keys) != stored_keys:
        raise StateError(f"checkpoint {path} is corrupt: its tensors are not the {len(keys)} recorded keys")
    arrays = ArrayRecord({key: Array.from_numpy_ndarray(tensors[key].numpy()) for key in keys})
    return Checkpoint(round=checkpoint_round, arrays=arrays, elapsed_s=elapsed_s, strategy=strategy,
                      pending_evaluation=state.get("pending_evaluation"))


def last_trained_rounds(rows: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """Partition id -> the last round whose update from that client was aggregated (the rows'
    ``participants``): what the server tells each client (``fedlora_flwr.store.LAST_TRAINED``)."""
    last: dict[int, int] = {}
    for row in rows:
        for pid in row.get("participants", ()):
            last[int(pid)] = max(last.get(int(pid), 0), int(row["round"]))
    return last


def point_metric(row: Mapping[str, Any], point: str, name: str = "acc_mean") -> Any:
    """A ``metrics.jsonl`` row's ``name`` (``acc_mean``, ``acc_per_client``, ...) at the evaluation
    ``point`` (``"after-aggregation"``, ``"after-training"``): the plain key when the row's
    ``eval_point`` is that point, else the key suffixed with the point; None when the row did not
    evaluate that point, or names none (written before ``evaluate-at`` existed: pFedSD's and
    pFedLoRA's rows were after training then, every other method's after aggregation)."""
    if "eval_point" not in row:
        return None
    return row.get(name if point == row["eval_point"] else f"{name}_{point.replace('-', '_')}")


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
        self.metrics_path = run_dir / "metrics.jsonl"
        #: With ``resume``: the checkpoint the run continues from (None: from round 1).
        self.checkpoint = load_checkpoint(run_dir) if config.resume else None
        if config.resume:
            self._restore()
        write_json_atomic(run_dir / "config.json", {**config.as_record(), "run-dir": str(run_dir)})
        self.metrics_path.touch()
        self.tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            # purge_step: a resumed run drops the event records of the rounds it runs again
            purge_step = len(self.rounds) + 1 if config.resume else None
            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _restore(self) -> None:
        """Keep the ``metrics.jsonl`` rows up to the checkpoint (each round appended one row, fsynced
        before its checkpoint was written; with ``fused-evaluation`` the checkpoint's own row may
        still be pending) and drop the one a crash may have left after them, atomically; refuse
        (:class:`StateError`, nothing written) when more rows follow the checkpoint."""
        checkpoint = self.checkpoint
        done = checkpoint.round - (1 if checkpoint.pending_evaluation else 0) if checkpoint else 0
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines() if self.metrics_path.is_file() else []
        if len(lines) > done + 1:
            held = f"holds round {checkpoint.round}" if checkpoint else "does not exist"
            raise StateError(f"resume: {self.metrics_path} records {len(lines)} rounds but "
                             f"{self.run_dir / CHECKPOINT_FILE} {held}; resuming would drop {len(lines) - done} "
                             "recorded rounds; nothing was changed (restore the checkpoint, or start a new run-name)")
        try:
            rows = [json.loads(line) for line in lines[:done]]
        except json.JSONDecodeError as err:
            raise StateError(f"{self.metrics_path} is corrupt: {err}") from None
        if [row.get("round") for row in rows] != list(range(1, done + 1)):
            raise StateError(f"{self.metrics_path} does not hold rounds 1..{done} of the checkpoint")
        write_atomic(self.metrics_path, "".join(line + "\n" for line in lines[:done]).encode("utf-8"))
        for row in rows:
            self.rounds.append(row)
            self.client_ids.update(int(pid) for pid in row.get("acc_per_client", {}))
        if self.checkpoint:
            self.started -= self.checkpoint.elapsed_s
        log(INFO, "[fedlora-flwr] resuming %s after round %d (%d later metrics rows dropped)", self.run_dir,
            checkpoint.round if checkpoint else 0, len(lines) - done)

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, strategy_state: dict[str, Any],
                        pending_evaluation: dict[str, Any] | None = None) -> None:
        """After a round's row (or with its pending evaluation): what the next round needs (see the
        module docstring)."""
        checkpoint = Checkpoint(server_round, arrays, self.elapsed(), strategy_state, pending_evaluation)
        save_checkpoint(self.run_dir, checkpoint, self.config.method)

    def elapsed(self) -> float:
        """Seconds since the run started (a resumed run goes on from its checkpoint's)."""
        return round(time.monotonic() - self.started, 3)

    @property
    def clients_dir(self) -> Path:
        return self.run_dir / CLIENTS_DIR

    def record_round(self, record: dict[str, Any]) -> None:
        """Append one round to ``metrics.jsonl`` (flushed and fsynced) and log the progress line."""
        record = {key: (_finite(value) if isinstance(value, float) else value) for key, value in record.items()}
        record["elapsed_s"] = self.elapsed()
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
        """Write ``shared.safetensors`` (the final aggregate) and ``summary.json`` with
        ``"status": "finished"``: best round (ties go to the later round, as FedDecomp's ``src/server.py``;
        docs/concepts/outputs.md) and totals."""
        write_safetensors_atomic(self.run_dir / SHARED_FILE, shared, {"method": self.config.method})
        summary = self._write_summary({"status": FINISHED})
        log(INFO, "[fedlora-flwr] finished: best acc_mean %s at round %s; outputs in %s",
            summary["best_acc_mean"], summary["best_round"], self.run_dir)
        return summary

    def fail(self, error: Exception) -> dict[str, Any]:
        """Write ``summary.json`` for a run stopped by ``error``: ``"status": "failed"``, the
        ``failure`` (a :class:`~fedlora_flwr.exits.RunFailure`'s kind, else ``"error"``), the
        ``exit_status`` of ``fedlora-flwr run`` and the ``reason``, with the rounds recorded so far."""
        if isinstance(error, RunFailure):
            failure = {"failure": error.kind, "exit_status": error.status, "reason": error.reason}
        else:
            failure = {"failure": "error", "exit_status": OTHER_FAILURE, "reason": f"{type(error).__name__}: {error}"}
        return self._write_summary({"status": FAILED, **failure})

    def _write_summary(self, status: dict[str, Any]) -> dict[str, Any]:
        scored = [r for r in self.rounds if r.get("acc_mean") is not None]
        best = max(reversed(scored), key=lambda r: r["acc_mean"], default=None)
        config = self.config
        summary = {
            **status,
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
            "eval_point": self.rounds[-1].get("eval_point") if self.rounds else None,
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in self.rounds),
            "bytes_down_total": sum(r.get("bytes_down", 0) for r in self.rounds),
            "wall_seconds": round(time.monotonic() - self.started, 3),
            "run_dir": str(self.run_dir),
        }
        sampled = [r["fraction_evaluate"] for r in self.rounds if "fraction_evaluate" in r]
        if sampled:  # fraction-evaluate < 1: acc_mean of each round is over a seeded sample of the clients
            summary["fraction_evaluate"] = sampled[-1]
        private = [r for r in self.rounds if "dp_epsilon" in r]
        if private:  # DP runs (strategies/privacy.py): ε at δ after the last recorded round
            summary.update(dp_epsilon=private[-1]["dp_epsilon"], dp_delta=private[-1]["dp_delta"],
                           dp_noise_multiplier=config.dp_noise_multiplier, dp_clip_norm=config.dp_clip_norm)
        validated = [r for r in self.rounds if r.get("val_acc_mean") is not None]
        if validated:  # validation-fraction > 0: the round chosen by validation accuracy (ties: the later)
            chosen = max(reversed(validated), key=lambda r: r["val_acc_mean"])
            summary.update(best_val_acc_mean=chosen["val_acc_mean"], best_val_round=chosen["round"],
                           acc_mean_at_best_val=chosen.get("acc_mean"))
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def run_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run: a ``summary.json`` whose status is ``finished``
    (summaries written before the status existed were only ever written by finished runs)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return False
    return json.loads(path.read_text(encoding="utf-8")).get("status", FINISHED) == FINISHED
