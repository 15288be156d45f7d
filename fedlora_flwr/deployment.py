"""A real Flower federation on this machine: a deployment SuperLink and N SuperNodes as processes.

What ``deploy/local_federation.py`` and ``tests/test_deployment.py`` start, in one of three modes:

- ``insecure``: plain HTTP on 127.0.0.1, for a first try;
- ``tls``: a test CA signs the SuperLink's certificate for 127.0.0.1/localhost
  (:func:`make_tls`); SuperNodes and ``flwr`` trust that CA (``--root-certificates``,
  ``root-certificates`` in the connection of ``$FLWR_HOME/config.toml``);
- ``tls-auth``: TLS and SuperNode authentication (``flower-superlink --enable-supernode-auth``):
  each SuperNode has an EC P-384 key pair (:func:`make_node_key`, OpenSSH format as Flower
  reads it), its public key is registered with ``flwr supernode register`` and the SuperNode
  signs with ``--auth-supernode-private-key``; a key that was not registered is refused.

Each SuperNode gets node config ``partition-id``, ``num-partitions``, ``data-dir`` (its own data)
and ``state-dir`` (its own personal-state folder: ``<state-dir>/<run-name>/<partition-id>/``), its
own ``FLWR_HOME``, a free Runtime API port and one torch thread (``OMP_NUM_THREADS=1``: several
SuperNodes share this machine's cores). Every process is adopted by the
:class:`~fedlora_flwr.superlink.LocalSuperLink` and stopped by PID with it.

On one host everything listens on 127.0.0.1. Across hosts (``tests/test_netns_federation.py``:
network namespaces) the SuperLink serves on ``host`` and ``launcher(role)`` gives the command
prefix that runs a process on its host (``ip netns exec NAME``), for the roles ``superlink``,
``cli`` (the ``flwr`` commands) and ``node-<partition-id>``.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import tomli_w

from fedlora_flwr.superlink import BIN_DIR, LocalSuperLink, TlsFiles, free_port

MODES = ("insecure", "tls", "tls-auth")

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_tls(folder: Path, hosts: tuple[str, ...] = LOOPBACK_NAMES, days: int = 30) -> TlsFiles:
    """A test CA (``ca.pem``) and a server certificate for ``hosts`` signed by it
    (``server.pem``, ``server.key``), EC P-384 keys, valid ``days`` days. For tests and first
    deployments: real ones use certificates from the organisation's CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora-flwr test CA")])
    ca_usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(ca_cert=folder / "ca.pem", server_cert=folder / "server.pem", server_key=folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return files


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair ``<name>`` (private, OpenSSH PEM, mode 600) and
    ``<name>.pub`` (OpenSSH ``ecdsa-sha2-nistp384``): what ``flwr supernode register`` and
    ``flower-supernode --auth-supernode-private-key`` read (as ``ssh-keygen -t ecdsa -b 384``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


class LocalFederation:
    """``with LocalFederation(workdir, num_nodes, mode) as federation: federation.run(app, config)``.

    ``workdir`` receives ``tls/`` (certificates), ``keys/`` (node key pairs), ``superlink/``
    (its FLWR_HOME and log) and ``nodes/<partition-id>/`` (each SuperNode's FLWR_HOME, log and
    ``state/``). ``data_dir`` goes into every SuperNode's node config (one machine, one copy of
    the data; on real machines each SuperNode names its own). ``host`` (the SuperLink's address,
    in its certificate) and ``launcher``: see the module docstring.
    """

    def __init__(
        self, workdir: Path, num_nodes: int, mode: str = "insecure", data_dir: Path | None = None,
        startup_timeout: float = 60, host: str = "127.0.0.1",
        launcher: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.mode = mode
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.launcher = launcher or (lambda role: ())
        hosts = LOOPBACK_NAMES if host in LOOPBACK_NAMES else (host,)
        tls = make_tls(self.workdir / "tls", hosts=hosts) if mode != "insecure" else None
        self.link = LocalSuperLink(
            flwr_home=self.workdir / "superlink", startup_timeout=startup_timeout, simulation=False,
            tls=tls, supernode_auth=mode == "tls-auth", host=host, launcher=self.launcher("superlink"),
            cli_launcher=self.launcher("cli"),
        )

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def node_dir(self, partition_id: int) -> Path:
        return self.workdir / "nodes" / str(partition_id)

    def state_dir(self, partition_id: int) -> Path:
        return self.node_dir(partition_id) / "state"

    def start(self) -> None:
        """The SuperLink, then (after registering their keys) one SuperNode per partition."""
        self.link.start()
        try:
            for partition_id in range(self.num_nodes):
                key = None
                if self.mode == "tls-auth":
                    key, public = make_node_key(self.workdir / "keys", f"node-{partition_id}")
                    self.link.register(public)
                self.start_supernode(partition_id, key)
        except BaseException:
            self.stop()
            raise

    def start_supernode(
        self, partition_id: int, private_key: Path | None = None, root_certificates: Path | None = None,
        insecure: bool | None = None, **flags: str,
    ) -> subprocess.Popen:
        """One SuperNode for ``partition_id`` (its log: ``nodes/<id>/supernode.log``), on the host of
        ``launcher("node-<id>")``. It trusts the SuperLink's CA, or speaks plaintext to an insecure
        one, unless ``root_certificates`` (another CA) or ``insecure`` say otherwise (a test of a
        misconfigured node). Extra ``flags`` become ``--flag value`` (e.g. ``max_retries="0"``)."""
        node = self.node_dir(partition_id)
        (node / "home").mkdir(parents=True, exist_ok=True)
        node_config: dict[str, Any] = {
            "partition-id": partition_id, "num-partitions": self.num_nodes, "state-dir": str(self.state_dir(partition_id)),
        }
        if self.data_dir is not None:
            node_config["data-dir"] = str(self.data_dir)
        (node / "node-config.toml").write_text(tomli_w.dumps(node_config))
        command = [
            *self.launcher(f"node-{partition_id}"), str(BIN_DIR / "flower-supernode"), "--superlink", self.link.address,
            "--node-config", str(node / "node-config.toml"),
            "--host", "127.0.0.1", "--port", str(free_port()),
        ]
        if insecure is None:
            insecure = self.link.tls is None
        if insecure:
            command.append("--insecure")
        elif root_certificates or self.link.tls:
            command += ["--root-certificates", str(root_certificates or self.link.tls.ca_cert)]
        else:
            raise ValueError("insecure=False on an insecure SuperLink needs root_certificates")
        command += ["--auth-supernode-private-key", str(private_key)] if private_key else []
        for flag, value in flags.items():
            command += [f"--{flag.replace('_', '-')}", value]
        environment = {**self.link.environment, "FLWR_HOME": str(node / "home"), "OMP_NUM_THREADS": "1"}
        with (node / "supernode.log").open("w") as log:
            process = subprocess.Popen(
                command, cwd=node, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.link.adopt(process)
        return process

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout: float | None = None, on_line=None) -> tuple[int, str]:
        """``flwr run <app_dir>`` on this federation, streamed; returns (exit code, output)."""
        return self.link.run(app_dir, run_config, timeout=timeout, on_line=on_line)

    def stop(self) -> None:
        """Stop the SuperLink, the SuperNodes and everything below them, by PID."""
        self.link.stop()
