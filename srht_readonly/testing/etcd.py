"""A real etcd for tests: one member, or a cluster of three, on loopback ports, data in a directory.

``EtcdCluster(directory, members=1)`` starts ``etcd`` (Debian's ``etcd-server``, 3.4) for each
member, waits until the cluster answers, and ``stop()``s them all (``kill(i)`` one, as a crash
would; ``start(i)`` brings it back). ``endpoints`` are the client URLs, in the inventory's ``[etcd] endpoints`` format::

    with EtcdCluster(tmp_path / "etcd") as etcd:
        inventory.write_text(... + f"[etcd]\\nendpoints = {', '.join(etcd.endpoints)}\\n")

A missing ``etcd`` binary raises (``scripts/bootstrap`` installs it): a test that needs etcd
fails, never skips.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from ..ops.ports import free_port

__all__ = ["EtcdCluster"]

HOST = "127.0.0.1"


class EtcdCluster:
    """``members`` etcd processes forming one cluster on loopback."""

    def __init__(self, directory: str | Path, *, members: int = 1, timeout: float = 30, detach: bool = False,
                 host: str = HOST) -> None:
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not Path(binary).exists():
            raise RuntimeError("etcd is not installed (apt-get install etcd-server; scripts/bootstrap does)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.names = [f"etcd{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.host = host  # where the members listen (a namespace's veth address, for partition tests)
        self.endpoints = [f"http://{host}:{p}" for p in self.client_ports]
        self.binary = binary
        self.detach = detach  # each member in a session of its own: it outlives this process (``lab up``)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        try:
            for i in range(members):
                self.start(i)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def start(self, index: int) -> None:
        """Start member ``index`` (again, after ``kill``: its data directory makes it rejoin as it was)."""
        name, client, peer = self.names[index], self.client_ports[index], self.peer_ports[index]
        host = self.host
        cluster = ",".join(f"{n}=http://{host}:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        with (self.directory / f"{name}.log").open("a") as log:
            self.procs[index] = subprocess.Popen(
                [self.binary, "--name", name, "--data-dir", str(self.directory / name),
                 "--listen-client-urls", f"http://{host}:{client}",
                 "--advertise-client-urls", f"http://{host}:{client}",
                 "--listen-peer-urls", f"http://{host}:{peer}",
                 "--initial-advertise-peer-urls", f"http://{host}:{peer}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", self.directory.name,
                 "--heartbeat-interval", "50", "--election-timeout", "500"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=self.detach)

    def healthy(self, index: int = 0) -> bool:
        """Whether member ``index`` says the cluster is healthy (it has a leader and can commit)."""
        try:
            with urllib.request.urlopen(f"{self.endpoints[index]}/health", timeout=2) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def wait_healthy(self, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(self.healthy(i) for i, p in enumerate(self.procs) if p is not None):
            dead = [n for n, p in zip(self.names, self.procs, strict=False) if p is not None and p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join((self.directory / f"{n}.log").read_text()[-1500:] for n in self.names)
                raise RuntimeError(f"etcd did not become healthy within {timeout} s (exited: {dead}):\n{logs}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """``kill -9`` member ``index``."""
        proc = self.procs[index]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[index] = None

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
