"""Check one compose run's copied outputs and personal state (docker/smoke.sh calls it).

    python docker/check_run.py <copy of the run folder> <state copies> --rounds N [--restarted K --before <copy>]

<state copies> holds ``state-<n>/`` (a copy of SuperNode n's /app/state volume, n = 1..3, partition
id n-1). Checked: config.json, one metrics.jsonl row per round, summary.json ``finished`` (the
output contract, fedlora_flwr/results.py), every node's personal state under
``<run-name>/<partition-id>/`` written by the last round; with ``--restarted K``: SuperNode K
trained again after its restart from the state in its volume (the last version replaced one at
least as new as ``--before``'s, the copy taken before the restart). Exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora_flwr.store import read_metadata, replaced_round, saved_round

NODES = 3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("state", type=Path)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--restarted", type=int)
    parser.add_argument("--before", type=Path)
    args = parser.parse_args()
    problems = check(args.run_dir, args.state, args.rounds, args.restarted, args.before)
    for problem in problems:
        print(f"check_run.py: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_run.py: {args.run_dir.name}: outputs and the state of {NODES} SuperNodes as expected")
    return 1 if problems else 0


def check(run_dir: Path, state: Path, rounds: int, restarted: int | None = None, before: Path | None = None) -> list[str]:
    problems = []
    for file in ("config.json", "metrics.jsonl", "summary.json"):
        if not (run_dir / file).is_file():
            return [f"{run_dir}/{file} missing"]
    config = json.loads((run_dir / "config.json").read_text())
    name = config["run-name"]
    if (config.get("dataset"), config.get("num-server-rounds")) != ("npz", rounds):
        problems.append(f"config.json: dataset {config.get('dataset')}, {config.get('num-server-rounds')} rounds")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if [row["round"] for row in rows] != list(range(1, rounds + 1)):
        problems.append(f"metrics.jsonl rounds {[row['round'] for row in rows]}, expected 1..{rounds}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "finished" or summary.get("rounds") != rounds:
        problems.append(f"summary.json: status {summary.get('status')}, rounds {summary.get('rounds')}")
    if (run_dir / "clients").exists():
        problems.append("personal state in the run folder: it belongs in the SuperNodes' volumes")
    for node in range(1, NODES + 1):
        folder = state / f"state-{node}" / name / str(node - 1)
        personal = folder / "personal.safetensors"
        if not personal.is_file():
            problems.append(f"SuperNode {node}: no {personal}")
            continue
        last = saved_round(personal)
        trained = [row["round"] for row in rows if node - 1 in row.get("participants", [])]
        if trained and last != max(trained):
            problems.append(f"SuperNode {node}: personal state from round {last}, last trained in {max(trained)}")
        if node == restarted and not any(row["round"] > 1 and node - 1 in row.get("participants", []) for row in rows):
            problems.append(f"SuperNode {node} did not train again after its restart (participants per round: "
                            f"{[row.get('participants') for row in rows]})")
        elif node == restarted:
            old = before / name / str(node - 1) / "personal.safetensors" if before else None
            old_round = saved_round(old) if old and old.is_file() else None
            replaced = replaced_round(personal, read_metadata(personal))
            if old_round is None:
                problems.append(f"SuperNode {node}: no state copied before its restart ({old})")
            elif last <= old_round or replaced is None or replaced < old_round:
                problems.append(f"SuperNode {node}: after its restart its state is round {last} replacing "
                                f"{replaced}; before the restart it was round {old_round}")
            else:
                print(f"check_run.py: SuperNode {node}: state round {old_round} before its restart, round {last} "
                      f"(replacing round {replaced}) after: kept in its volume and used")
    return problems


if __name__ == "__main__":
    sys.exit(main())
