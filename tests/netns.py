"""Several hosts on one machine for the multi-host tests: one network namespace per role
(``ip netns``), each with a veth pair to a bridge in the first role's namespace and an address of a
private /24 that nothing on this machine uses (10.231.x.0/24). Needs root and iproute2's ``ip``
(:func:`skip_reason` says which is missing). Whoever creates :class:`Hosts` deletes them."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CANDIDATES = [ipaddress.ip_network(f"10.231.{third}.0/24") for third in range(1, 255)]


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network with an address or a route here or in any network namespace."""
    listings = [_ip("-4", "-o", "addr", "show"), _ip("-4", "route", "show", "table", "all")]
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0]
        listings += [_ip("-n", name, "-4", "-o", "addr", "show"), _ip("-n", name, "-4", "route", "show", "table", "all")]
    networks = []
    for listing in listings:
        for word in listing.split():
            try:
                networks.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    return [network for network in networks if network.version == 4 and network.prefixlen > 0]


def free_subnet() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for candidate in CANDIDATES:
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError("every 10.231.x.0/24 is in use on this machine")


class Hosts:
    """One network namespace per role, ``<tag>-<role>``, each with a veth pair to a bridge in the
    first role's namespace and an address of ``subnet``; nothing in the root namespace."""

    def __init__(self, roles: list[str], subnet: ipaddress.IPv4Network) -> None:
        self.tag = f"fl{os.getpid()}"
        self.hub = roles[0]
        self.namespaces = {role: f"{self.tag}-{role}" for role in roles}
        addresses = subnet.hosts()
        self.addresses = {role: str(next(addresses)) for role in roles}
        self.prefix = subnet.prefixlen

    def launcher(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[role]]

    def create(self) -> None:
        for namespace in self.namespaces.values():
            _ip("netns", "add", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        hub = self.namespaces[self.hub]
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.addresses[self.hub]}/{self.prefix}", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for number, (role, namespace) in enumerate(self.namespaces.items()):
            if role == self.hub:
                continue
            port = f"port{number}"
            _ip("link", "add", port, "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[role]}/{self.prefix}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")

    def delete(self) -> list[str]:
        """SIGKILL whatever still runs in the namespaces (only this test starts processes there),
        delete them (their veths go with them); returns the namespaces of this test still listed."""
        existing = set(_ip("netns", "list").split())
        for namespace in self.namespaces.values():
            if namespace not in existing:
                continue
            for pid in _ip("netns", "pids", namespace).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", namespace)
        return [name for name in _ip("netns", "list").split() if name.startswith(f"{self.tag}-")]


@contextmanager
def created_hosts(roles: list[str]) -> Iterator[Hosts]:
    """``roles`` as hosts on a free subnet, deleted on exit; fails if a namespace is left behind."""
    hosts = Hosts(roles, free_subnet())
    try:
        hosts.create()
        yield hosts
    finally:
        left = hosts.delete()
    assert not left, f"namespaces left behind: {left}"
