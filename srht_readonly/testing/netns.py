"""A network namespace joined to this host by a veth pair, for partition tests.

``Netns()`` creates a namespace (``ip netns``) and a veth pair: the host's end holds
``host_address`` (the source of what this host sends inside) and ``host_addresses`` (two more
addresses of the same private /24, for servers to listen on: each can be cut on its own), the
namespace's end ``inside``. ``run`` starts a process inside;
``cut(address)`` makes one host address a black hole for the namespace (a route of type
``blackhole``: packets vanish, nothing answers, as when a link or a firewall drops them) and
``heal(address)`` removes it. ``close()`` deletes the veth pair and the namespace (stop the
processes started inside first: a namespace lasts while one runs in it).

Traffic only goes between the namespace and this host's end of the pair: no address outside
the /24 is routed, nothing leaves the machine::

    with Netns() as ns:
        primary_via, standby_via = ns.host_addresses
        ns.run(["srht-readonly", "--config", inventory, "agent", "--pgbouncer", "cut-off"])
        ns.cut(primary_via)       # this "host" no longer reaches the primary, everyone else does
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["Netns"]


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no route of this host covers."""
    routes = _ip("-4", "route", "show", "table", "all")
    used = [ipaddress.ip_network(w, strict=False) for line in routes.splitlines()
            for w in line.split()[:2] if "/" in w or w.count(".") == 3]
    for i in range(os.getpid() % 200, os.getpid() % 200 + 250):
        net = ipaddress.IPv4Network(f"10.213.{i % 250}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /24 in 10.213.0.0/16 for a test namespace")


class Netns:
    """A namespace ``name`` and its veth pair; see the module's docstring."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"srht-part-{os.getpid()}"
        net = _free_subnet()
        hosts = list(net.hosts())
        # .1 is the host's own address on the link (the source of what this host sends inside, so it is
        # never cut: a cut route would swallow the replies too); .3 and .4 are for servers to listen on.
        self.host_address, self.inside = str(hosts[0]), str(hosts[1])
        self.host_addresses = (str(hosts[2]), str(hosts[3]))
        self.prefix = net.prefixlen
        tag = self.name[-8:]
        self.host_link, self.inside_link = f"vh{tag}", f"vn{tag}"
        self._created = False
        for leftover in (["ip", "link", "del", self.host_link], ["ip", "netns", "del", self.name]):
            subprocess.run(leftover, capture_output=True, timeout=10)  # of a crashed run with the same pid
        try:
            _ip("netns", "add", self.name)
            self._created = True
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inside_link)
            _ip("link", "set", self.inside_link, "netns", self.name)
            for address in (self.host_address, *self.host_addresses):
                _ip("addr", "add", f"{address}/{self.prefix}", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("addr", "add", f"{self.inside}/{self.prefix}", "dev", self.inside_link, netns=self.name)
            _ip("link", "set", self.inside_link, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.close()
            raise

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(argv), **popen)

    def cut(self, address: str) -> None:
        """From inside, ``address`` no longer answers (its packets are dropped)."""
        _ip("route", "add", "blackhole", f"{address}/32", netns=self.name)

    def heal(self, address: str) -> None:
        _ip("route", "del", "blackhole", f"{address}/32", netns=self.name)

    def close(self) -> None:
        if self._created:
            subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self._created = False

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
