"""OpenSSH's sshd in front of the git.sr.ht pipeline, on a loopback port, for tests and drills.

``GitSshd(connection_string=..., meta_origin=...)`` makes a private directory holding
everything sshd and the pipeline need, and runs ``/usr/sbin/sshd -D`` from it:

* ``bin/gitsrht-{keys,shell,update-hook}``: small ``/bin/sh`` wrappers that set ``SRHT_CONFIG``,
  ``SRHT_SSH_LOG`` and ``PYTHONPATH`` and exec this interpreter (``python``, an absolute path)
  on ``python -m integrations.gitsrht.ssh PROGRAM``: sshd and git start programs with an almost
  empty environment;
* ``config.ini`` (sr.ht's format, see ``config.py``), ``sshd_config``, a host key,
  ``repos/`` and ``log/{sshd,pipeline}.log``.

sshd refuses an ``AuthorizedKeysCommand`` unless the program and **every directory above it**
are root-owned and writable by nobody else, so the directory is made under ``/opt`` (or
``/var/lib``), not under ``/tmp``, and removed by ``stop()``. That needs root, as sshd does.

The account git connects as is ``os_user``: in production a ``git`` user; by default here the
user running the tests (root), because the pipeline must run with this interpreter and a venv
under ``/root`` is out of any other user's reach. Root may then log in only through the forced
command (``PermitRootLogin forced-commands-only``).
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from srht_readonly.ops.ports import free_port

__all__ = ["SSHD", "GitSshd", "SshdError", "make_key"]

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"
#: Where the root-owned directory may go, first suitable wins.
PARENTS = ("/opt", "/var/lib")
PROGRAMS = {"keys": "gitsrht-keys", "shell": "gitsrht-shell", "post-update": "gitsrht-update-hook"}
# The directory holding the ``integrations`` package: the wrappers put it on PYTHONPATH.
SOURCE_ROOT = Path(__file__).resolve().parents[3]


class SshdError(Exception):
    """sshd could not be set up or started; the message says what to fix."""


def make_key(path: str | os.PathLike[str], comment: str = "") -> str:
    """Generate an ed25519 key pair at ``path`` (no passphrase); the public key's text."""
    path = Path(path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, text=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def unsafe_ancestor(path: str | os.PathLike[str]) -> str | None:
    """The first of ``path`` and its parents sshd would refuse (not root's, or writable by others)."""
    current = Path(path).resolve()
    for directory in (current, *current.parents):
        st = directory.stat()
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return str(directory)
    return None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (per-connection sshd processes), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class GitSshd:
    """sshd + the git.sr.ht pipeline, listening on ``127.0.0.1:port``.

    ``start(timeout)`` / ``stop()`` / ``is_running()``, or ``with GitSshd(...) as sshd:``.
    ``env`` adds variables to every pipeline program (e.g. ``SRHT_READONLY_ANNOUNCE_FILE``).
    """

    def __init__(
        self,
        *,
        connection_string: str,
        meta_origin: str,
        os_user: str | None = None,
        origin: str = "http://git.sr.ht.localhost",
        python: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        sshd: str = SSHD,
        webhook_timeout: float = 5.0,
    ) -> None:
        self.connection_string = connection_string
        self.meta_origin = meta_origin
        self.os_user = os_user or pwd.getpwuid(os.geteuid()).pw_name
        self.origin = origin
        self.python = os.path.abspath(python or sys.executable)
        self.env = dict(env or {})
        self.sshd = sshd
        self.webhook_timeout = webhook_timeout
        self.port = 0
        self.base: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<GitSshd {self.os_user}@{HOST}:{self.port} in {self.base}>"

    # --- paths -------------------------------------------------------------------------------

    def _path(self, *parts: str) -> Path:
        if self.base is None:
            raise SshdError("GitSshd is not started")
        return self.base.joinpath(*parts)

    @property
    def repos(self) -> Path:
        return self._path("repos")

    @property
    def config_path(self) -> Path:
        return self._path("config.ini")

    @property
    def sshd_log(self) -> Path:
        return self._path("log", "sshd.log")

    @property
    def pipeline_log(self) -> Path:
        return self._path("log", "pipeline.log")

    def program(self, name: str) -> Path:
        """The wrapper of ``keys``, ``shell`` or ``post-update``."""
        return self._path("bin", PROGRAMS[name])

    def repo_path(self, owner: str, name: str) -> Path:
        """Where ``~owner/name`` lives (the same rule as ``Config.repo_path``)."""
        return self.repos / f"~{owner}" / name

    # --- what a git client needs -------------------------------------------------------------

    def url(self, owner: str, name: str) -> str:
        """scp-style remote of ``~owner/name``."""
        return f"{self.os_user}@{HOST}:~{owner}/{name}"

    def ssh_command(self, key: str | os.PathLike[str]) -> str:
        """``GIT_SSH_COMMAND`` that logs in with private key ``key`` and nothing else."""
        return shlex.join([
            "ssh", "-i", os.fspath(key), "-p", str(self.port),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
        ])

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Write the directory, check the config with ``sshd -t``, start sshd, wait for it."""
        if os.geteuid() != 0:
            raise SshdError("sshd must be started as root (it switches to the pushing user)")
        if not os.path.isfile(self.sshd):
            raise SshdError(f"{self.sshd} not found: install openssh-server")
        try:
            pw = pwd.getpwnam(self.os_user)
        except KeyError:
            raise SshdError(f"no OS user {self.os_user!r}: create it (useradd) or pass os_user") from None
        self.base = self._make_base()
        try:
            self._write_files(pw)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
            config = str(self._path("sshd_config"))
            check = subprocess.run([self.sshd, "-t", "-f", config], capture_output=True, text=True)
            if check.returncode:
                raise SshdError(f"sshd refused its configuration: {check.stderr.strip()}")
            with open(self.sshd_log, "ab") as log:
                self.process = subprocess.Popen(
                    [self.sshd, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/",
                )
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("sshd for the git.sr.ht pipeline on %s:%d (%s)", HOST, self.port, self.base)

    def _make_base(self) -> Path:
        for parent in PARENTS:
            if os.path.isdir(parent) and unsafe_ancestor(parent) is None:
                base = Path(tempfile.mkdtemp(prefix="srht-readonly-sshd-", dir=parent))
                os.chmod(base, 0o755)
                return base
        raise SshdError(
            f"none of {', '.join(PARENTS)} is root-owned and unwritable by others all the way "
            "up, as sshd requires for an AuthorizedKeysCommand"
        )

    def _write_files(self, pw: pwd.struct_passwd) -> None:
        assert self.base is not None
        self.port = free_port()
        for sub in ("bin", "log", "repos"):
            self._path(sub).mkdir(mode=0o755)
        for sub in ("log", "repos"):
            os.chown(self._path(sub), pw.pw_uid, pw.pw_gid)
        for log in (self.sshd_log, self.pipeline_log):
            log.touch(mode=0o644)
            os.chown(log, pw.pw_uid, pw.pw_gid)
        env = {
            "SRHT_CONFIG": str(self.config_path),
            "SRHT_SSH_LOG": str(self.pipeline_log),
            "PYTHONPATH": str(SOURCE_ROOT),
            **self.env,
        }
        exports = "".join(f"{k}={shlex.quote(v)}; export {k}\n" for k, v in env.items())
        for program in PROGRAMS:
            wrapper = self.program(program)
            wrapper.write_text(
                f"#!/bin/sh\n# git.sr.ht {program} for the sshd in {self.base} (integrations.gitsrht.ssh.sshd)\n"
                # -P: the hook runs inside the repository and the shell in the account's home;
                # no file there may shadow a module.
                f"{exports}exec {shlex.quote(self.python)} -P -m integrations.gitsrht.ssh {program} \"$@\"\n"
            )
            wrapper.chmod(0o755)
        self.config_path.write_text(
            "[git.sr.ht]\n"
            f"origin = {self.origin}\n"
            f"connection-string = {self.connection_string}\n"
            f"repos = {self.repos}\n"
            f"ssh-user = {self.os_user}\n"
            f"shell = {self.program('shell')}\n"
            f"post-update-script = {self.program('post-update')}\n"
            f"webhook-timeout = {self.webhook_timeout:g}\n"
            "\n[meta.sr.ht]\n"
            f"origin = {self.meta_origin}\n"
        )
        self.config_path.chmod(0o644)
        host_key = self._path("ssh_host_ed25519_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                       check=True, capture_output=True)
        unsafe = unsafe_ancestor(self.program("keys"))
        if unsafe is not None:
            raise SshdError(f"sshd would refuse the keys program: {unsafe} is not root's alone")
        root_login = "forced-commands-only" if pw.pw_uid == 0 else "no"
        self._path("sshd_config").write_text(
            f"""# sshd for the git.sr.ht pipeline stand-in (integrations.gitsrht.ssh.sshd)
Port {self.port}
ListenAddress {HOST}
HostKey {host_key}
PidFile {self._path("sshd.pid")}
AllowUsers {self.os_user}
PermitRootLogin {root_login}
AuthorizedKeysFile none
AuthorizedKeysCommand {self.program("keys")} %u %h %t %k
AuthorizedKeysCommandUser {self.os_user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment no
PermitTTY no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 100:30:200
LogLevel VERBOSE
# bash sources ~/.bashrc when sshd starts it, unless it is a nested shell: keep the account's
# dotfiles (slow, and chatty on the pusher's terminal) out of the forced command.
SetEnv SHLVL=1
"""
        )

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SshdError(f"sshd exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise SshdError(f"sshd did not listen on {HOST}:{self.port} within {timeout:g} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.sshd_log.read_text().strip().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sshd and its connections, and remove the directory. Never raises."""
        process, self.process = self.process, None
        if process is not None:
            stragglers = _children(process.pid) if process.poll() is None else []
            try:
                process.terminate()
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            except OSError as exc:
                logger.warning("stopping sshd %d: %s", process.pid, exc)
            for pid in stragglers:  # per-connection sshd processes outlive the listener
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd"):
                        os.kill(pid, signal.SIGTERM)
                except (OSError, ProcessLookupError):
                    pass  # gone already
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> GitSshd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
