"""Separate hosts on one machine for the tests: Linux network namespaces on a private bridge.

:class:`PrivateNetwork` makes a bridge in this machine's namespace (with no address of its own: nothing of
the machine is reachable from the hosts, nor they from it) and, per host, a namespace with its loopback up,
a veth pair whose one end is the host's ``eth0`` (an address of ``SUBNET``) and whose other end hangs on
the bridge, and ``/etc/netns/<namespace>/hosts`` naming every host (``ip netns exec`` mounts it over
``/etc/hosts``, so a kit's server name resolves there as DNS would resolve it). :meth:`PrivateNetwork.prefix`
is the command prefix that runs a program on a host; :meth:`PrivateNetwork.cut` and
:meth:`PrivateNetwork.mend` take a host's link down and up again at the bridge.

Names carry this process's id: tests running side by side (or a CI run beside a developer's) never share a
namespace, a bridge or a veth. :meth:`PrivateNetwork.close` removes everything it made, whatever failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

SUBNET = "10.88.0"
NETNS_ETC = Path("/etc/netns")


def cannot_make_namespaces() -> str | None:
    """Why network namespaces cannot be made here (``None`` when they can): no ``ip`` command, not root, or
    no CAP_NET_ADMIN (a container without it refuses ``ip netns add``)."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run the test as root"
    probe = f"consortium-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' fails here (no CAP_NET_ADMIN?): {made.stderr.strip()}"
    entered = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    if entered.returncode != 0:
        return f"'ip netns exec' fails here (no CAP_SYS_ADMIN to mount?): {entered.stderr.strip()}"
    bridge = f"cbp{os.getpid()}"
    made = subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip link add ... type bridge' fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


class PrivateNetwork:
    """A bridge and one namespace per host (``hosts``: host name -> DNS names it answers to)."""

    def __init__(self, hosts: dict[str, list[str]]) -> None:
        tag = os.getpid()
        self.bridge = f"cbr{tag}"
        self.namespaces = {host: f"consortium-{tag}-{i}" for i, host in enumerate(hosts)}
        self.veths = {host: f"cv{tag}x{i}" for i, host in enumerate(hosts)}
        self.addresses = {host: f"{SUBNET}.{i + 10}" for i, host in enumerate(hosts)}
        self.names = hosts
        self._made: list[tuple[str, str]] = []  # ("netns" | "link" | "etc", name), undone in reverse

    def __enter__(self) -> PrivateNetwork:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{self.addresses[host]} {' '.join(names)}\n" for host, names in self.names.items() if names
        )
        for host, namespace in self.namespaces.items():
            veth, peer = self.veths[host], f"{self.veths[host]}p"
            _ip("netns", "add", namespace)
            self._made.append(("netns", namespace))
            etc = NETNS_ETC / namespace
            etc.mkdir(parents=True, exist_ok=True)
            self._made.append(("etc", str(etc)))
            (etc / "hosts").write_text(hosts_file)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            self._made.append(("link", veth))
            _ip("link", "set", peer, "netns", namespace)
            _ip("link", "set", peer, "name", "eth0", namespace=namespace)
            _ip("addr", "add", f"{self.addresses[host]}/24", "dev", "eth0", namespace=namespace)
            _ip("link", "set", "eth0", "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)  # FLARE's job processes talk to their parent on it
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host``: in its namespace, with its ``/etc/hosts``."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down at the bridge: its packets go nowhere, its processes run on."""
        _ip("link", "set", self.veths[host], "down")

    def mend(self, host: str) -> None:
        """Bring ``host``'s link up again."""
        _ip("link", "set", self.veths[host], "up")

    def close(self) -> None:
        """Remove the namespaces, veths, bridge and hosts files made (a veth goes with its namespace's end)."""
        while self._made:
            kind, name = self._made.pop()
            with contextlib.suppress(OSError):
                if kind == "etc":
                    shutil.rmtree(name, ignore_errors=True)
                elif kind == "netns":
                    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
                else:
                    subprocess.run(["ip", "link", "delete", name], capture_output=True)

    def leftovers(self) -> list[str]:
        """What of this network is still on the machine (empty after :meth:`close`)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found = [ns for ns in self.namespaces.values() if ns in names or (NETNS_ETC / ns).exists()]
        return found + [
            link for link in [self.bridge, *self.veths.values()] if f" {link}:" in links or f" {link}@" in links
        ]
