"""A private Flower SuperLink in simulation mode, for tools that run many ``flwr run`` jobs.

Flower's managed local SuperLink listens on fixed ports (39091/39093) and is shared by every
``flwr run`` of the user. Tests, the grid runner and benchmarks instead start their own
``flower-superlink --simulation`` on free loopback ports with their own ``FLWR_HOME``, with
runtime dependency installation disabled (the environment already holds every dependency), and
stop it and every process below it (SuperExec, the simulation, Ray) by PID. ``kill()`` crashes it
instead (SIGKILL to its process group and that tree), as the checkpoint-and-resume test needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

BIN_DIR = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSuperLink:
    """Start with ``with LocalSuperLink() as link:``; ``link.run(...)`` submits one run and streams it."""

    CONNECTION = "private"

    def __init__(self, flwr_home: Path | None = None, startup_timeout: float = 60) -> None:
        self._tmp = None if flwr_home else tempfile.TemporaryDirectory(prefix="fedlora-flwr-home-")
        self.flwr_home = Path(flwr_home or self._tmp.name)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.tree: dict[int, psutil.Process] = {}

    @property
    def environment(self) -> dict[str, str]:
        """This interpreter's bin folder first on PATH: the SuperLink spawns `flower-superexec` by name."""
        path = f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": path}

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        http_port, control_port, fleet_port = _free_port(), _free_port(), _free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
            f'[superlink.{self.CONNECTION}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
        )
        self.log_path = self.flwr_home / "superlink.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    str(BIN_DIR / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                    "--disable-runtime-dependency-installation",
                    "--host", "127.0.0.1", "--port", str(http_port),
                    "--control-api-address", f"127.0.0.1:{control_port}",
                    "--fleet-api-address", f"127.0.0.1:{fleet_port}",
                ],
                cwd=self.flwr_home,
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        deadline = time.monotonic() + self.startup_timeout
        ready = f"Uvicorn running on http://127.0.0.1:{http_port}"
        while ready not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_path.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"flower-superlink did not start:\n{log_tail}")
            time.sleep(0.2)

    def record_tree(self) -> None:
        """Remember every process below the SuperLink (so a re-parented one is still stopped)."""
        if self.process is None:
            return
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        num_supernodes: int,
        client_cpus: int = 1,
        client_gpus: float = 0.0,
        timeout: float | None = None,
        on_line: Callable[[str], None] | None = None,
        ray_cpus: int | None = None,
    ) -> tuple[int, str]:
        """``flwr run <app_dir> --stream``; returns (exit code, whole output).

        ``run_config`` (run-config keys → values) is written to a TOML file for ``--run-config``
        (Flower takes one TOML file or ``k=v`` pairs; the file quotes every value correctly).
        ``on_line`` sees each output line as it arrives (progress reporting).
        ``ray_cpus`` caps the CPUs of the run's Ray instance (``init-args-num-cpus``; default: all
        of the machine's), e.g. to run several simulations side by side.
        """
        federation = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
            f"client-resources-num-gpus={client_gpus}"
        )
        if ray_cpus is not None:
            federation += f" init-args-num-cpus={int(ray_cpus)}"
        fd, config_file = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=self.flwr_home)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(tomli_w.dumps(dict(run_config)))
        command = [
            str(BIN_DIR / "flwr"), "run", str(app_dir), self.CONNECTION, "--stream",
            "--run-config", config_file, "--federation-config", federation,
        ]
        lines: list[str] = []
        deadline = time.monotonic() + timeout if timeout else None
        with subprocess.Popen(
            command, env=self.environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as flwr_run:

            def read() -> None:
                for line in flwr_run.stdout:
                    lines.append(line)
                    if on_line:
                        on_line(line.rstrip("\n"))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            while flwr_run.poll() is None:
                self.record_tree()
                if deadline and time.monotonic() > deadline:
                    flwr_run.kill()
                    raise TimeoutError(f"flwr run exceeded {timeout}s")
                time.sleep(0.5)
            reader.join()
            return flwr_run.returncode, "".join(lines)

    def kill(self) -> None:
        """Crash it: SIGKILL to the SuperLink's process group and to every process seen below it
        (Ray may start its own sessions), by PID. ``start()`` may then start a fresh one."""
        self.record_tree()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        for proc in self.tree.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(list(self.tree.values()), timeout=15)
        self.tree.clear()
        self.process = None

    def stop(self) -> None:
        """Terminate the SuperLink and every process seen below it, by PID."""
        self.record_tree()
        for proc in self.tree.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.tree.clear()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
