"""A private Flower SuperLink, for tools that run many ``flwr run`` jobs and for deployments.

Flower's managed local SuperLink listens on fixed ports (39091/39093) and is shared by every
``flwr run`` of the user. Tests, the grid runner and benchmarks instead start their own
``flower-superlink --simulation`` on free loopback ports with their own ``FLWR_HOME``, with
runtime dependency installation disabled (the environment already holds every dependency), and
stop it and every process below it (SuperExec, the simulation, Ray) by PID. ``kill()`` crashes it
instead (SIGKILL to its process group and that tree), as the checkpoint-and-resume test needs.

With ``simulation=False`` it is a deployment SuperLink that SuperNodes connect to
(``fedlora_flwr.deployment`` starts them and hands them to :meth:`LocalSuperLink.adopt`, so that
they are stopped the same way), optionally with TLS and SuperNode authentication, on ``host``
(default 127.0.0.1) and, with a ``launcher`` such as ``ip netns exec NAME``, on another network
host. Runs go through :class:`fedlora_flwr.runner.FlwrRun`: their exit code is the run's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from fedlora_flwr.exits import OTHER_FAILURE
from fedlora_flwr.runner import BIN_DIR, FlwrError, FlwrRun


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def federation_config(num_supernodes: int, client_cpus: int = 1, client_gpus: float = 0.0, ray_cpus: int | None = None) -> str:
    """``flwr run --federation-config`` for a simulation: Flower hands ``client-resources-num-gpus``
    to Ray as each client actor's ``num_gpus`` (fractions share a GPU; Ray hides the GPUs from an
    actor that asks for none); ``ray_cpus`` caps the Ray instance's CPUs (``init-args-num-cpus``)."""
    federation = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={client_gpus}"
    )
    if ray_cpus is not None:
        federation += f" init-args-num-cpus={int(ray_cpus)}"
    return federation


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS SuperLink: the CA certificate clients trust, the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


class LocalSuperLink:
    """Start with ``with LocalSuperLink() as link:``; ``link.run(...)`` submits one run and streams it.

    ``simulation=False``: a deployment SuperLink (SuperNodes connect to :attr:`address`), insecure
    or with ``tls``; ``supernode_auth`` (needs ``tls``) admits only keys passed to :meth:`register`.
    ``host``: the address it serves on; ``launcher``: a command prefix for the SuperLink process,
    ``cli_launcher`` one for the ``flwr`` commands (both empty: this host).
    """

    CONNECTION = "private"

    def __init__(
        self,
        flwr_home: Path | None = None,
        startup_timeout: float = 60,
        simulation: bool = True,
        tls: TlsFiles | None = None,
        supernode_auth: bool = False,
        host: str = "127.0.0.1",
        launcher: Sequence[str] = (),
        cli_launcher: Sequence[str] = (),
    ) -> None:
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        self._tmp = None if flwr_home else tempfile.TemporaryDirectory(prefix="fedlora-flwr-home-")
        self.flwr_home = Path(flwr_home or self._tmp.name)
        self.startup_timeout = startup_timeout
        self.simulation = simulation
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.host = host
        self.launcher = list(launcher)
        self.cli_launcher = list(cli_launcher)
        self.address = ""
        self.process: subprocess.Popen | None = None
        self.adopted: list[subprocess.Popen] = []
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
        http_port, control_port, fleet_port = free_port(), free_port(), free_port()
        self.address = f"{self.host}:{http_port}"
        # Flower 1.41 serves the Control, Fleet and Runtime APIs on this one HTTP(S) port; the
        # deprecated flags only move its legacy gRPC servers (else on 0.0.0.0:9092/9093) to free ports.
        connection: dict[str, Any] = {"address": self.address}
        flags = [
            "--host", self.host, "--port", str(http_port),
            "--control-api-address", f"127.0.0.1:{control_port}", "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        ]
        if self.tls is None:
            connection["insecure"] = True
            flags.append("--insecure")
        else:
            connection["root-certificates"] = str(self.tls.ca_cert)
            flags += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                      "--ssl-keyfile", str(self.tls.server_key)]
        flags += ["--simulation"] if self.simulation else []
        flags += ["--enable-supernode-auth"] if self.supernode_auth else []
        (self.flwr_home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": self.CONNECTION, self.CONNECTION: connection}})
        )
        self.log_path = self.flwr_home / "superlink.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [*self.launcher, str(BIN_DIR / "flower-superlink"), *flags, "--isolation", "subprocess",
                 "--disable-runtime-dependency-installation"],
                cwd=self.flwr_home,
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        deadline = time.monotonic() + self.startup_timeout
        ready = f"Uvicorn running on {'http' if self.tls is None else 'https'}://{self.address}"
        while ready not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_path.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"flower-superlink did not start:\n{log_tail}")
            time.sleep(0.2)

    def adopt(self, process: subprocess.Popen) -> None:
        """Stop ``process`` (e.g. a SuperNode, started with ``start_new_session=True``: its process
        group is its own) and everything below it together with the SuperLink."""
        if os.getpgid(process.pid) != process.pid:
            raise ValueError("an adopted process must lead its own process group (start_new_session=True)")
        self.adopted.append(process)
        self.record_tree()

    def _signal_groups(self, signum: int) -> None:
        for process in self.adopted:
            try:
                os.killpg(process.pid, signum)
            except (ProcessLookupError, PermissionError):  # the whole group is gone already
                pass

    def record_tree(self) -> None:
        """Remember every process below the SuperLink and the adopted ones (so a re-parented one is
        still stopped)."""
        for root_process in [self.process, *self.adopted]:
            if root_process is None:
                continue
            try:
                root = psutil.Process(root_process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    self.tree.setdefault(proc.pid, proc)
            except psutil.NoSuchProcess:
                pass

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """One ``flwr`` CLI command against this SuperLink (e.g. ``"supernode", "register", key``)."""
        return subprocess.run(
            [*self.cli_launcher, str(BIN_DIR / "flwr"), *args], env=self.environment, capture_output=True, text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> None:
        """Admit a SuperNode's public key (``flwr supernode register``; needs ``supernode_auth``)."""
        done = self.flwr("supernode", "register", str(public_key), self.CONNECTION)
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed: {(done.stdout + done.stderr).strip()}")

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        num_supernodes: int | None = None,
        client_cpus: int = 1,
        client_gpus: float = 0.0,
        timeout: float | None = None,
        on_line: Callable[[str], None] | None = None,
        ray_cpus: int | None = None,
    ) -> tuple[int, str]:
        """``flwr run <app_dir>`` through :class:`~fedlora_flwr.runner.FlwrRun`, streamed; returns
        (the run's exit status, whole output); a run Flower refused to start is (1, its message).

        ``run_config`` (run-config keys → values) is written to a TOML file for ``--run-config``
        (Flower takes one TOML file or ``k=v`` pairs; the file quotes every value correctly).
        ``on_line`` sees each output line as it arrives (progress reporting).
        ``ray_cpus`` caps the CPUs of the run's Ray instance (``init-args-num-cpus``; default: all
        of the machine's), e.g. to run several simulations side by side.
        ``num_supernodes`` and the resources apply to simulation only (leave it None in deployment:
        the SuperNodes that connected are the federation). TimeoutError after ``timeout`` seconds.
        """
        fd, config_file = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=self.flwr_home)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(tomli_w.dumps(dict(run_config)))
        federation = []
        if num_supernodes is not None:
            federation.append(federation_config(num_supernodes, client_cpus, client_gpus, ray_cpus))
        run = FlwrRun(app_dir, self.CONNECTION, [config_file], federation, env=self.environment,
                      launcher=self.cli_launcher)
        try:
            outcome = run(on_line=on_line, timeout=timeout, tick=self.record_tree)
        except FlwrError as err:
            message = f"flwr run {app_dir}: {err}"
            if on_line:
                on_line(message)
            return OTHER_FAILURE, message + "\n"
        return outcome.exit_code, outcome.output

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
        """Terminate the SuperLink and every process seen below it, by PID, and the process group
        of each adopted process (its orphans too: a SuperNode refused at start leaves its SuperExec)."""
        self.record_tree()
        for proc in self.tree.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        self._signal_groups(signal.SIGTERM)
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self._signal_groups(signal.SIGKILL)
        self.tree.clear()
        self.process = None
        self.adopted.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
