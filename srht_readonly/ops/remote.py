"""Where a command runs and a file is written: this machine (``LocalHost``) or another one.

PostgreSQL and PgBouncer refuse to run as root, and the files of a data directory must belong
to its OS user, so every operation takes the OS user to act as; when we are root we switch with
``runuser`` (util-linux), otherwise we must already be that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CommandFailed, OpsError, ToolMissing


class LocalHost:
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
        """Run to completion, capturing output; raise ``CommandFailed`` on failure if ``check``."""
        full = self.command(argv, user=user)
        try:
            proc = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                env=_merged_env(env),
                timeout=timeout,
                cwd=cwd if cwd is not None else "/",
            )
        except FileNotFoundError as exc:
            raise OpsError(f"{full[0]}: not found on {self.name}") from exc
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout, self.name)
        return proc

    def popen(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` and return at once (for streamed output such as progress)."""
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

    def write_text_atomic(
        self,
        path: str | os.PathLike[str],
        text: str,
        *,
        owner: str | None = None,
        mode: int | None = None,
    ) -> None:
        """Replace ``path`` atomically (temp file in the same directory, fsync, rename).

        The new file keeps the old one's mode and ownership unless ``owner``/``mode`` are given,
        so a reader never sees half a file and a service never loses access to its config.
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

    def make_dir(self, path: str | os.PathLike[str], *, owner: str | None = None, mode: int = 0o755) -> None:
        """Create ``path`` (and parents) owned by ``owner``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if owner is not None:
            chown(path, owner)


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
