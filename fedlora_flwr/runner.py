"""``fedlora-flwr run``: ``flwr run`` with the run's outcome as its exit status.

Flower 1.41's ``flwr run --stream`` exits 0 whatever the run did. This command takes ``flwr
run``'s arguments and, through Flower's public CLI only:

1. submits the run: ``flwr run APP [SUPERLINK] ... --format json`` (its JSON names the run id);
2. streams the run's logs until it ends: ``flwr log RUN_ID [SUPERLINK] --stream``;
3. reads the run's final status: ``flwr ls [SUPERLINK] --run-id RUN_ID --format json``
   (``finished:completed``, ``finished:failed`` or ``finished:stopped``, and the status details).

It exits 0 for ``finished:completed``; for a failed run, the status the ServerApp's failure names
in the details (:mod:`fedlora_flwr.exits`: 2 config, 3 node-wait-timeout, 4 no valid replies,
5 state), else 1 (a stopped run, any other failure, a run that could not be submitted); 124
after ``--timeout`` and 130 on Ctrl-C (the run goes on on the SuperLink). Its last line names the
run, its status and the details. ``deploy/local_federation.py``, the grid runner and
the tests run every ``flwr run`` through :class:`FlwrRun`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.constant import Status, SubStatus

from fedlora_flwr.exits import OTHER_FAILURE, status_in

BIN_DIR = Path(sys.executable).parent
COMPLETED = f"{Status.FINISHED}:{SubStatus.COMPLETED}"
#: ``fedlora-flwr run`` gave up (``--timeout``) or was interrupted (Ctrl-C): the run goes on.
TIMED_OUT, INTERRUPTED = 124, 130
STATUS_POLL_S = 1.0


class FlwrError(RuntimeError):
    """A ``flwr`` command failed; the message is Flower's, on one line."""


@dataclass(frozen=True)
class RunOutcome:
    """A submitted run after it ended: Flower's status (``finished:...``), its details, the exit
    status :func:`exit_status` gives, and every output line."""

    run_id: int
    status: str
    details: str
    exit_code: int
    output: str


def exit_status(status: str, details: str) -> int:
    """0 for a completed run; for a failed one, the ServerApp failure's status, else 1."""
    if status == COMPLETED:
        return 0
    return status_in(details) or OTHER_FAILURE


def _one_line(text: str) -> str:
    return " ".join(text.split())


class FlwrRun:
    """One ``flwr run`` of ``app`` on the SuperLink connection ``superlink`` (None: the default one
    of ``$FLWR_HOME/config.toml``), then its logs and status. ``env``: the environment of the
    ``flwr`` commands (``FLWR_HOME``); ``launcher``: a command prefix for them (e.g. ``ip netns
    exec NAME`` where the SuperLink is reachable from a network namespace only).
    """

    def __init__(
        self,
        app: str | Path,
        superlink: str | None = None,
        run_config: Sequence[str] = (),
        federation_config: Sequence[str] = (),
        federation: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.app = str(app)
        self.superlink = superlink
        self.run_config = list(run_config)
        self.federation_config = list(federation_config)
        self.federation = federation
        self.env = dict(env) if env is not None else None
        self.launcher = list(launcher)
        self.run_id: int | None = None

    def _flwr(self, *args: str) -> list[str]:
        return [*self.launcher, str(BIN_DIR / "flwr"), *args]

    def _connection(self) -> list[str]:
        return [self.superlink] if self.superlink else []

    def _json(self, command: list[str], timeout: float | None) -> dict[str, Any]:
        """Run a ``--format json`` command: its payload, or FlwrError with Flower's message."""
        try:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"`flwr {command[len(self.launcher) + 1]}` did not answer within {timeout:g} s") from None
        try:
            payload = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise FlwrError(f"`flwr {command[len(self.launcher) + 1]}` exited {done.returncode} without its JSON: "
                            f"{_one_line(done.stdout + done.stderr)[-500:]}") from None
        if done.returncode != 0 or not payload.get("success"):
            raise FlwrError(_one_line(str(payload.get("error-message", payload))))
        return payload

    def submit(self, timeout: float | None = None) -> int:
        """``flwr run ... --format json``: the new run's id."""
        command = self._flwr("run", self.app, *self._connection(), "--format", "json")
        for value in self.run_config:
            command += ["--run-config", value]
        for value in self.federation_config:
            command += ["--federation-config", value]
        if self.federation:
            command += ["--federation", self.federation]
        self.run_id = int(self._json(command, timeout)["run-id"])
        return self.run_id

    def stream(self, on_line: Callable[[str], None], deadline: float | None = None,
               tick: Callable[[], None] | None = None) -> None:
        """``flwr log RUN_ID --stream`` until the run ends: each line to ``on_line``; ``tick`` is
        called every half second meanwhile. TimeoutError after ``deadline`` (time.monotonic)."""
        command = self._flwr("log", str(self.run_id), *self._connection(), "--stream")
        with subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as log:

            def read() -> None:
                for line in log.stdout:
                    on_line(line.rstrip("\n"))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                while log.poll() is None:
                    if tick:
                        tick()
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"run {self.run_id} did not finish in time")
                    time.sleep(0.5)
            finally:
                if log.poll() is None:
                    log.kill()
            reader.join()
        if log.returncode != 0:  # e.g. the connection broke: the run may still be going on
            on_line(f"[fedlora-flwr run] flwr log exited {log.returncode}; asking the SuperLink for the run's status")

    def status(self, timeout: float | None = None) -> tuple[str, str]:
        """``flwr ls --run-id RUN_ID --format json``: (status, status details)."""
        payload = self._json(self._flwr("ls", *self._connection(), "--run-id", str(self.run_id), "--format", "json"),
                             timeout)
        (run,) = payload["runs"]
        return str(run["status"]), str(run["status-details"])

    def final_status(self, deadline: float | None = None) -> tuple[str, str]:
        """The run's status once it is ``finished:...`` (the log stream may end a moment before)."""
        while True:
            status, details = self.status(timeout=60)
            if status.startswith(Status.FINISHED):
                return status, details
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} is still {status}")
            time.sleep(STATUS_POLL_S)

    def __call__(self, on_line: Callable[[str], None] | None = None, timeout: float | None = None,
                 tick: Callable[[], None] | None = None) -> RunOutcome:
        """Submit, stream, and return the outcome. ``on_line`` sees every output line (also kept
        in the outcome); TimeoutError after ``timeout`` seconds (the run is left to the caller)."""
        lines: list[str] = []

        def emit(line: str) -> None:
            lines.append(line)
            if on_line:
                on_line(line)

        deadline = time.monotonic() + timeout if timeout else None
        run_id = self.submit(timeout=timeout)
        emit(f"[fedlora-flwr run] started run {run_id} on SuperLink connection {self.superlink or '(default)'}")
        self.stream(emit, deadline, tick)
        status, details = self.final_status(deadline)
        code = exit_status(status, details)
        why = "" if status == COMPLETED else f": {_one_line(details)}"  # flwr ls: "N/A" when there are none
        emit(f"[fedlora-flwr run] run {run_id}: {status}{why} (exit {code})")
        return RunOutcome(run_id, status, details, code, "\n".join(lines) + "\n")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="flwr run, streamed, exiting with the run's status",
        description=(
            "flwr run that exits with the run's status (flwr run --stream exits 0 whatever the run did). Takes "
            "flwr run's arguments; logs are always streamed. Exit: 0 finished, 2 config error, 3 node-wait-timeout, "
            "4 a round without a valid reply, 5 state error, 1 any other failure or a stopped run; 124 after "
            "--timeout, 130 on Ctrl-C (the run goes on)."
        ),
    )
    parser.add_argument("app", nargs="?", default=".", help="the Flower App folder (default: .)")
    parser.add_argument("superlink", nargs="?", help="SuperLink connection of $FLWR_HOME/config.toml (default: its default)")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="as for flwr run (repeatable)")
    parser.add_argument("--federation-config", action="append", default=[], help="as for flwr run (repeatable)")
    parser.add_argument("--federation", help="as for flwr run")
    parser.add_argument("--stream", action="store_true", help="accepted for flwr run's sake: logs are always streamed")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 124; the run goes on)")
    parser.set_defaults(func=command)
    return parser


def command(args: argparse.Namespace) -> int:
    run = FlwrRun(args.app, args.superlink, args.run_config, args.federation_config, args.federation)
    try:
        return run(on_line=lambda line: print(line, flush=True), timeout=args.timeout).exit_code
    except FlwrError as err:
        print(f"fedlora-flwr run: {err}", file=sys.stderr)
        return OTHER_FAILURE
    except TimeoutError as err:
        print(f"fedlora-flwr run: {err} (--timeout {args.timeout:g}){_goes_on(run)}", file=sys.stderr)
        return TIMED_OUT
    except KeyboardInterrupt:
        print(f"fedlora-flwr run: interrupted{_goes_on(run)}", file=sys.stderr)
        return INTERRUPTED


def _goes_on(run: FlwrRun) -> str:
    if run.run_id is None:
        return ""
    stop = f"flwr stop {run.run_id}" + (f" {run.superlink}" if run.superlink else "")
    return f"; run {run.run_id} goes on on the SuperLink (stop it: {stop})"
