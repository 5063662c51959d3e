"""Where a command runs and a file is written: this machine (``LocalHost``) or another one (``SshHost``).

PostgreSQL and PgBouncer refuse to run as root, and the files of a data directory must belong
to its OS user, so every operation takes the OS user to act as; when we are root we switch with
``runuser`` (util-linux), otherwise we must already be that user.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CommandFailed, OpsError, ToolMissing, Unreachable

logger = logging.getLogger(__name__)


class Host:
    """Anything that runs commands and writes files on one machine: ``LocalHost`` or ``SshHost``.

    ``run`` is written once here; each kind of host says how it executes (``_execute``).
    """

    name: str

    def run(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion as ``user``, capturing output; raise ``CommandFailed`` on failure if ``check``."""
        argv = [str(a) for a in argv]
        proc = self._execute(argv, user=user, input=input, env=env, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout, self.name)
        return proc

    def popen(self, argv: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen[str]:
        """Start ``argv`` as ``user`` and return at once (for streamed output such as progress)."""
        return self._start([str(a) for a in argv], user=user, env=env, kwargs=dict(kwargs))

    def _execute(self, argv: list[str], *, user: str | None, input: str | None, env: Mapping[str, str] | None,
                 timeout: float | None, cwd: str | os.PathLike[str] | None) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def _start(self, argv: Sequence[str], *, user: str | None, env: Mapping[str, str] | None,
               kwargs: dict[str, object]) -> subprocess.Popen[str]:
        raise NotImplementedError

    # The rest of the interface, each host's own:

    def read_text(self, path: str | os.PathLike[str]) -> str:
        raise NotImplementedError

    def exists(self, path: str | os.PathLike[str]) -> bool:
        raise NotImplementedError

    def write_text_atomic(self, path: str | os.PathLike[str], text: str, *, owner: str | None = None,
                          mode: int | None = None) -> None:
        raise NotImplementedError

    def tunnel(self, host: str, port: int | str) -> tuple[str, int]:
        """Where this machine reaches ``host:port`` as seen from that host, as libpq's ``(host, port)``:
        ``host`` may be a Unix socket directory (the socket ``.s.PGSQL.<port>`` in it), on either side."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LocalHost(Host):
    """This machine. ``name`` appears in messages (``local`` unless told otherwise)."""

    def __init__(self, name: str = "local") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"LocalHost({self.name!r})"

    def command(self, argv: Sequence[str], *, user: str | None = None) -> list[str]:
        """The argv that runs ``argv`` as ``user`` on this host."""
        argv = [str(a) for a in argv]
        if user is None or user == _current_user():
            return argv
        if os.geteuid() != 0:
            raise OpsError(f"cannot run {argv[0]} as {user}: run this as root or as {user}")
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        if not os.path.exists(runuser):
            raise ToolMissing("runuser", "util-linux")
        return [runuser, "-u", user, "--", *argv]

    def _execute(self, argv: list[str], *, user: str | None, input: str | None, env: Mapping[str, str] | None,
                 timeout: float | None, cwd: str | os.PathLike[str] | None) -> subprocess.CompletedProcess[str]:
        full = self.command(argv, user=user)
        try:
            return subprocess.run(full, input=input, capture_output=True, text=True, env=_merged_env(env),
                                  timeout=timeout, cwd=cwd if cwd is not None else "/")
        except FileNotFoundError as exc:
            raise OpsError(f"{full[0]}: not found on {self.name}") from exc

    def _start(self, argv: Sequence[str], *, user: str | None, env: Mapping[str, str] | None,
               kwargs: dict[str, object]) -> subprocess.Popen[str]:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            self.command(argv, user=user), env=_merged_env(env), text=True, cwd="/", **kwargs
        )

    def read_text(self, path: str | os.PathLike[str]) -> str:
        return Path(path).read_text()

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return Path(path).exists()

    def owner(self, path: str | os.PathLike[str]) -> str:
        """The OS user owning ``path``."""
        return pwd.getpwuid(Path(path).stat().st_uid).pw_name

    def write_text_atomic(self, path: str | os.PathLike[str], text: str, *, owner: str | None = None,
                          mode: int | None = None) -> None:
        """Replace ``path`` atomically (temp file in the same directory, fsync, rename, fsync the directory).

        The new file keeps the old one's mode and ownership unless ``owner``/``mode`` are given,
        so a reader never sees half a file and a service never loses access to its config; once
        it returns, the new file survives a crash (the rename is on disk too; if the directory
        cannot be flushed, that is logged as a warning, not raised: the file is replaced).
        """
        path = Path(path)
        try:
            st: os.stat_result | None = path.stat()
        except FileNotFoundError:
            st = None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            elif st is not None:
                os.chmod(tmp, st.st_mode & 0o7777)
            else:
                os.chmod(tmp, 0o644)
            if owner is not None:
                chown(tmp, owner)
            elif st is not None and os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _flush_after_rename(path.parent, f"{path} was replaced")

    def make_dir(self, path: str | os.PathLike[str], *, owner: str | None = None, mode: int = 0o755) -> None:
        """Create ``path`` (and parents) owned by ``owner``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if owner is not None:
            chown(path, owner)

    def listdir(self, path: str | os.PathLike[str]) -> list[str]:
        """Names in directory ``path`` (``FileNotFoundError`` if there is none)."""
        return sorted(os.listdir(path))

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Delete the file ``path`` if it exists."""
        Path(path).unlink(missing_ok=True)

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Rename ``src`` to ``dst``, flushing the directories involved (the rename survives a crash)."""
        os.rename(src, dst)
        for directory in dict.fromkeys((Path(dst).parent, Path(src).parent)):
            _flush_after_rename(directory, f"{src} was renamed {dst}")

    def tunnel(self, host: str, port: int | str) -> tuple[str, int]:
        """Where to connect to reach ``host:port`` as this host sees it: here, the same place."""
        return host, int(port)

    def close(self) -> None:
        """Nothing to release for this machine (``SshHost`` closes its connection)."""


#: Reads ``size`` bytes of ``export`` lines from stdin (byte by byte: the rest is the command's),
#: sources them and runs the command.
_ENV_FROM_STDIN = ('f=$(mktemp) || exit 125; dd bs=1 count={size} of="$f" 2>/dev/null; . "$f"; rm -f "$f"; '
                   'exec "$@"')


class SshHost(Host):
    """Another machine, reached with OpenSSH's client; the same interface as ``LocalHost``.

    ``destination`` is what you would type after ``ssh`` (``[user@]host`` or a ``Host`` alias);
    ``ssh_config`` is passed with ``-F``. The first use opens one master connection
    (``ControlMaster``) that every later command and port forward reuses, so a command costs
    milliseconds, not a handshake. ``close()`` ends it. Authentication must not prompt
    (``BatchMode``): use keys or an agent.
    """

    def __init__(self, destination: str, *, name: str | None = None,
                 ssh_config: str | os.PathLike[str] | None = None, connect_timeout: int = 5) -> None:
        self.destination = destination
        self.name = name or destination
        self.ssh_config = str(ssh_config) if ssh_config else None
        self.connect_timeout = connect_timeout
        self._control: str | None = None
        self._login_user: str | None = None
        self._forwards: dict[tuple[str, int], tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._forward_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SshHost({self.destination!r})"

    def _ssh(self, *options: str) -> list[str]:
        argv = [shutil.which("ssh") or "ssh"]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        return argv + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", *options]

    def connect(self) -> None:
        """Open the master connection (idempotent); ``Unreachable`` saying why when it fails."""
        with self._lock:
            if self._control is not None:
                return
            if not shutil.which("ssh"):
                raise ToolMissing("ssh", "openssh-client")
            directory = tempfile.mkdtemp(prefix="srht-ssh-")
            control = os.path.join(directory, "master")
            log = os.path.join(directory, "log")
            # -f backgrounds the master once authenticated; its output goes to a file, not to
            # our pipes, or we would wait for it to exit. Idle masters end after 300 s.
            argv = self._ssh("-o", "ControlMaster=yes", "-o", f"ControlPath={control}",
                             "-o", "ControlPersist=300", "-o", "ServerAliveInterval=5",
                             "-E", log, "-f", "-N", self.destination)
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=self.connect_timeout + 15)
            if proc.returncode != 0:
                why = Path(log).read_text().strip() if os.path.exists(log) else ""
                shutil.rmtree(directory, ignore_errors=True)
                raise Unreachable(
                    f"cannot reach {self.name} over ssh ({self.destination}): {why or f'ssh exited {proc.returncode}'}"
                    f"; check that `ssh {self.destination} true` works without a password prompt"
                )
            self._control = control

    def close(self) -> None:
        """End the master connection and every forward through it (their sockets and directories removed)."""
        with self._lock:
            control, self._control = self._control, None
            self._forwards.clear()
        if control is None:
            return
        subprocess.run(self._ssh("-o", f"ControlPath={control}", "-O", "exit", self.destination),
                       capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        shutil.rmtree(os.path.dirname(control), ignore_errors=True)

    def login_user(self) -> str:
        """The user ssh logs in as (``ssh -G``)."""
        if self._login_user is None:
            out = subprocess.run(self._ssh("-G", self.destination), capture_output=True, text=True,
                                 timeout=15).stdout
            users = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("user ")]
            self._login_user = users[0] if users else _current_user()
        return self._login_user

    def remote_command(self, argv: Sequence[str], *, user: str | None = None,
                       env: Mapping[str, str] | None = None) -> str:
        """The shell command line run on the other side (argv quoted; as ``user``; with ``env``, which
        is then visible in ``ps``: ``run`` sends its ``env`` over stdin instead, so pass secrets there)."""
        words = [str(a) for a in argv]
        if env:
            words = ["env", *(f"{k}={v}" for k, v in env.items()), *words]
        if user is not None and user != self.login_user():
            words = (["runuser", "-u", user, "--", *words] if self.login_user() == "root"
                     else ["sudo", "-n", "-u", user, "--", *words])
        return shlex.join(words)

    def command(self, argv: Sequence[str], *, user: str | None = None,
                env: Mapping[str, str] | None = None) -> list[str]:
        """The local argv that runs ``argv`` as ``user`` on the other host."""
        self.connect()
        assert self._control is not None
        return [*self._ssh("-o", f"ControlPath={self._control}", "-o", "ControlMaster=no"),
                self.destination, self.remote_command(argv, user=user, env=env)]

    def _execute(self, argv: list[str], *, user: str | None, input: str | None, env: Mapping[str, str] | None,
                 timeout: float | None, cwd: str | os.PathLike[str] | None) -> subprocess.CompletedProcess[str]:
        if cwd is not None:
            argv = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd), *argv]
        if env:
            # Never on the command line (ps, sudo logs, on both hosts): the variables travel first on
            # stdin, into a file of the remote user's own (mode 600) that is read and removed at once.
            exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
            argv = ["sh", "-c", _ENV_FROM_STDIN.format(size=len(exports.encode())), "sh", *argv]
            input = exports + (input or "")
        proc = subprocess.run(self.command(argv, user=user), input=input if input is not None else "",
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 255:
            raise Unreachable(f"ssh to {self.name} failed: {proc.stderr.strip() or 'exit 255'}")
        return proc

    def _start(self, argv: Sequence[str], *, user: str | None, env: Mapping[str, str] | None,
               kwargs: dict[str, object]) -> subprocess.Popen[str]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)  # its pipes are ssh's
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            self.command(argv, user=user, env=env), text=True, **kwargs
        )

    def _file_command(self, argv: Sequence[str], path: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        proc = self.run(argv, check=False)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "No such file" in err:
                raise FileNotFoundError(2, f"{err} on {self.name}", str(path))
            if "Permission denied" in err:
                raise PermissionError(13, f"{err} on {self.name}", str(path))
            raise CommandFailed(argv, proc.returncode, err, self.name)
        return proc

    def read_text(self, path: str | os.PathLike[str]) -> str:
        return self._file_command(["cat", "--", str(path)], path).stdout

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.run(["test", "-e", str(path)], check=False).returncode == 0

    def owner(self, path: str | os.PathLike[str]) -> str:
        """The OS user owning ``path``."""
        return self._file_command(["stat", "-c", "%U", "--", str(path)], path).stdout.strip()

    def listdir(self, path: str | os.PathLike[str]) -> list[str]:
        """Names in directory ``path`` (``FileNotFoundError`` if there is none)."""
        return sorted(self._file_command(["ls", "-A", "--", str(path)], path).stdout.splitlines())

    def remove(self, path: str | os.PathLike[str]) -> None:
        self.run(["rm", "-f", "--", str(path)])

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Rename ``src`` to ``dst`` on the other host, then flush the directories involved (as ``LocalHost``)."""
        self.run(["sh", "-c", _RENAME, "sh", str(src), str(dst)])

    def write_text_atomic(self, path: str | os.PathLike[str], text: str, *, owner: str | None = None,
                          mode: int | None = None) -> None:
        """Replace ``path`` atomically on the other host, keeping its mode and owner (as ``LocalHost``)."""
        self.run(["sh", "-c", _ATOMIC_WRITE, "sh", str(path), "" if mode is None else f"{mode:o}", owner or ""],
                 input=text)

    def make_dir(self, path: str | os.PathLike[str], *, owner: str | None = None, mode: int = 0o755) -> None:
        """Create ``path`` (and parents) owned by ``owner``."""
        self.run(["sh", "-c", 'mkdir -p -- "$1" && chmod "$2" "$1" && { [ -z "$3" ] || chown "$3:" "$1"; }',
                  "sh", str(path), f"{mode:o}", owner or ""])

    def tunnel(self, host: str, port: int | str) -> tuple[str, int]:
        """Where this machine reaches ``host:port`` as the other host sees it: an ssh forward to a Unix socket.

        Returned the way libpq takes a socket, as ``(directory, port)``: the socket is
        ``<directory>/.s.PGSQL.<port>``, so ``host=<directory> port=<port>`` reaches it. The
        directory is ours alone (mode 0700, inside the master connection's own 0700 directory),
        so no other user of this machine can reach, say, a PgBouncer admin console through it, as
        they could a TCP port on loopback. ``host`` may be a Unix socket directory (libpq style)
        on the other host: the socket ``.s.PGSQL.<port>`` in it is forwarded. Forwards live until
        ``close()``, which removes their sockets and directories.
        """
        port = int(port)
        key = (host, port)
        with self._forward_lock:
            if key in self._forwards:
                return self._forwards[key]
            self.connect()
            assert self._control is not None
            if host.startswith("/"):
                remote = f"{host}/.s.PGSQL.{port}"
            else:
                remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            directory = tempfile.mkdtemp(prefix="fwd-", dir=os.path.dirname(self._control))  # mode 0700
            local = os.path.join(directory, f".s.PGSQL.{port}")
            if ":" in local or len(local.encode()) > _MAX_SOCKET_PATH:
                shutil.rmtree(directory, ignore_errors=True)
                raise OpsError(f"cannot forward {remote} through {self.name} to {local}: a Unix socket path must "
                               f"hold no ':' and at most {_MAX_SOCKET_PATH} bytes (set TMPDIR to a shorter directory)")
            proc = subprocess.run(
                self._ssh("-o", f"ControlPath={self._control}", "-O", "forward",
                          "-L", f"{local}:{remote}", self.destination),
                capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                shutil.rmtree(directory, ignore_errors=True)
                raise Unreachable(f"cannot forward {remote} through {self.name}: {proc.stderr.strip()}")
            self._forwards[key] = (directory, port)
            return directory, port


#: Room in ``sockaddr_un.sun_path`` (108 bytes on Linux, 104 on the BSDs), with its final NUL.
_MAX_SOCKET_PATH = 103


# mv, then flush both directories (tolerant where sync cannot take a directory, as below).
_RENAME = r"""mv -- "$1" "$2" || exit
sync -- "$(dirname -- "$2")" "$(dirname -- "$1")" 2>/dev/null || true
"""

# Write to a temporary file next to the target, copy the old file's mode and owner (or apply
# the ones given), flush, then rename over it: readers see the old file or the new one, never
# half of one; then flush the directory, so the rename survives a crash too (GNU coreutils'
# `sync FILE` fsyncs a directory as well; where sync is missing or takes no operand, the rename is
# done all the same, only not flushed at once). Works with GNU coreutils and BusyBox.
_ATOMIC_WRITE = r"""set -e
p=$1; mode=$2; owner=$3
t=$(mktemp "$(dirname -- "$p")/.$(basename -- "$p").XXXXXX")
trap 'rm -f -- "$t"' EXIT
cat > "$t"
if [ -n "$mode" ]; then chmod "$mode" "$t"
elif [ -e "$p" ]; then chmod "$(stat -c %a -- "$p")" "$t"
else chmod 644 "$t"; fi
if [ -n "$owner" ]; then chown "$owner:" "$t"
elif [ -e "$p" ] && [ "$(id -u)" = 0 ]; then chown "$(stat -c %u:%g -- "$p")" "$t"; fi
sync -- "$t" 2>/dev/null || true
mv -f -- "$t" "$p"
trap - EXIT
sync -- "$(dirname -- "$p")" 2>/dev/null || true
"""




def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush directory ``path`` to disk, so a rename or a new file in it survives a crash.

    Where the file system cannot fsync a directory (``EINVAL``, ``EBADF``, as PostgreSQL's
    ``fsync_fname`` also tolerates) nothing more can be done; any other error is raised.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _flush_after_rename(directory: str | os.PathLike[str], done: str) -> None:
    # The rename is made and visible: raising now would tell the caller it was not (and a config
    # written in phase one would not be put back), so a failed flush is a warning, as over ssh.
    try:
        fsync_directory(directory)
    except OSError as exc:
        logger.warning("%s, but flushing %s to disk failed (a crash now could undo it): %s", done, directory, exc)


def chown(path: str | os.PathLike[str], user: str) -> None:
    """Give ``path`` to ``user`` and its primary group (a no-op when it is ours already)."""
    pw = pwd.getpwnam(user)
    if os.geteuid() != 0:
        if pw.pw_uid != os.geteuid():
            raise OpsError(f"cannot give {path} to {user}: run this as root or as {user}")
        return
    os.chown(path, pw.pw_uid, grp.getgrgid(pw.pw_gid).gr_gid)


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    merged = dict(os.environ)
    merged.update(env)
    return merged
