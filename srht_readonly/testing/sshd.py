"""OpenSSH's sshd on a free loopback port, so the lab can reach "remote" hosts over real ssh.

The daemon runs as root (sshd needs to, to switch users) from a private ``sshd_config`` with its
own host key, and accepts one client key for root (``StrictModes no`` because the files live in
a temporary directory). ``client_config()`` writes the matching ``ssh_config``: a ``Host`` alias
with the port, the key and a ``known_hosts`` holding the real host key, so host key checking
stays on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ..ops.errors import OpsError, Timeout, ToolMissing
from ..ops.ports import free_port

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"


class Sshd:
    """An sshd in ``directory`` (created), listening on ``127.0.0.1:port``.

    Controlled like the lab's other servers: ``start(timeout)``, ``stop()``, ``is_running()``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.host_key = self.directory / "ssh_host_ed25519_key"
        self.client_key = self.directory / "id_ed25519"
        self.config = self.directory / "sshd_config"
        self.log = self.directory / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Sshd 127.0.0.1:{self.port}>"

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise OpsError("the lab's sshd must be started as root (it logs in as root); run the tests as root")
        if not os.path.exists(SSHD):
            raise ToolMissing("sshd", "openssh-server", SSHD)
        if not shutil.which("ssh-keygen"):
            raise ToolMissing("ssh-keygen", "openssh-client")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "srht-readonly-lab",
                                "-f", str(key)], check=True, capture_output=True)
        (self.directory / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        host_pub = Path(f"{self.host_key}.pub").read_text().split()[:2]
        (self.directory / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub)}\n")
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "AllowTcpForwarding yes\n"
            "AllowStreamLocalForwarding yes\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "MaxSessions 50\n"
            "MaxStartups 50\n"
            "LogLevel INFO\n"
        )
        # Debian's sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def start(self, *, timeout: float = 10) -> None:
        """Start ``sshd -D`` in the foreground of a child process and wait until it answers."""
        if self.is_running():
            return
        self._prepare()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise OpsError(f"sshd exited {self.process.returncode}: {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise Timeout(f"sshd did not answer on port {self.port} within {timeout:g} s")
            time.sleep(0.02)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Terminate the daemon (sessions it forked end with it)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def client_config(self, path: str | os.PathLike[str], alias: str) -> Path:
        """Write an ``ssh_config`` in which ``alias`` reaches this daemon as root; returns ``path``."""
        path = Path(path)
        block = (
            f"Host {alias}\n"
            "    HostName 127.0.0.1\n"
            f"    Port {self.port}\n"
            "    User root\n"
            f"    IdentityFile {self.client_key}\n"
            "    IdentitiesOnly yes\n"
            "    StrictHostKeyChecking yes\n"
            f"    UserKnownHostsFile {self.directory / 'known_hosts'}\n"
            "    LogLevel ERROR\n"
        )
        existing = path.read_text() if path.exists() else ""
        path.write_text(existing + block)
        os.chmod(path, 0o600)
        return path
