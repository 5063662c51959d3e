"""SshHost against a real OpenSSH sshd on loopback: the same interface and guarantees as LocalHost."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.ops.errors import CommandFailed, OpsError, Refused, Unreachable
from srht_readonly.ops.lock import OperatorLock
from srht_readonly.ops.postgres import PostgresServer
from srht_readonly.ops.remote import _ATOMIC_WRITE, _RENAME, LocalHost, SshHost
from srht_readonly.testing import factories
from srht_readonly.testing.sshd import Sshd
from tests._fakes import FsyncRecorder, identity


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    base = tmp_path_factory.mktemp("sshd")
    sshd = Sshd(base / "sshd")
    sshd.start()
    host = SshHost("lab-host", ssh_config=sshd.client_config(base / "ssh_config", "lab-host"))
    try:
        yield host
    finally:
        host.close()
        sshd.stop()


kill_lab = factories.lab("function", standby=False, pgbouncer=False)


def test_runs_commands_as_the_login_user_and_as_another_user(ssh):
    assert ssh.run(["id", "-un"]).stdout.strip() == "root"
    assert ssh.run(["id", "-un"], user="postgres").stdout.strip() == "postgres"
    assert ssh.run(["printenv", "GREETING"], env={"GREETING": "a b'c"}).stdout == "a b'c\n"


def test_env_given_to_run_never_appears_on_any_command_line(ssh):
    import threading
    import uuid

    secret = f"pw-{uuid.uuid4().hex}"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every process's argv on this machine, both ends of the ssh connection
        while not stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if secret in cmdline:
                    seen.append(cmdline.replace("\0", " "))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        shown = ssh.run(["sh", "-c", 'sleep 0.5; printf %s "$PGPASSWORD"'], env={"PGPASSWORD": secret}, user="postgres")
        piped = ssh.run(["cat"], env={"PGPASSWORD": secret}, input="the command's own stdin")
    finally:
        stop.set()
        watcher.join()
    assert shown.stdout == secret and piped.stdout == "the command's own stdin"
    assert seen == []


def test_failed_command_raises_with_its_status_and_stderr(ssh):
    with pytest.raises(CommandFailed) as info:
        ssh.run(["sh", "-c", "echo nope >&2; exit 7"])
    assert info.value.returncode == 7 and "nope" in str(info.value) and "lab-host" in str(info.value)
    assert ssh.run(["false"], check=False).returncode == 1


def test_atomic_write_keeps_mode_and_owner_and_never_shows_half_a_file(ssh, tmp_path):
    path = tmp_path / "pgbouncer.ini"
    path.write_text("[databases]\nold = host=a\n")
    os.chmod(path, 0o640)
    pg = pwd.getpwnam("postgres")
    os.chown(path, pg.pw_uid, pg.pw_gid)
    ssh.write_text_atomic(path, "[databases]\nnew = host=b\n")
    st = path.stat()
    assert path.read_text() == "[databases]\nnew = host=b\n"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, pg.pw_uid, pg.pw_gid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgbouncer.ini"]  # no temporary file left


def test_local_atomic_write_flushes_the_file_then_after_the_rename_its_directory(tmp_path, monkeypatch):
    # Without the directory's fsync a crash after the rename can bring the old file back.
    path = tmp_path / "pgbouncer.ini"
    path.write_text("old\n")
    fsyncs = FsyncRecorder(monkeypatch, watch=path)
    LocalHost().write_text_atomic(path, "new\n")
    assert [kind for kind, _, _ in fsyncs.calls] == ["file", "dir"]
    (_, file_id, before), (_, dir_id, after) = fsyncs.calls
    assert file_id == identity(path) and before == "old\n"  # the new file, flushed before the rename
    assert dir_id == identity(tmp_path) and after == "new\n"  # its directory, after the rename


def test_local_atomic_write_whose_directory_cannot_be_flushed_warns_and_reports_it_written(
        tmp_path, monkeypatch, caplog):
    # The rename is made and visible: an exception would make phase one leave this file unrestored.
    path = tmp_path / "pgbouncer.ini"
    path.write_text("old\n")
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with caplog.at_level("WARNING", logger="srht_readonly.ops.remote"):
        LocalHost().write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} was replaced, but flushing {tmp_path} to disk failed (a crash now could undo it): "
        "[Errno 5] Input/output error"]


def test_local_rename_flushes_both_directories_after_the_rename(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "data").write_text("x")
    fsyncs = FsyncRecorder(monkeypatch, watch=tmp_path / "b" / "moved")
    LocalHost().rename(tmp_path / "a" / "data", tmp_path / "b" / "moved")
    assert fsyncs.calls == [("dir", identity(tmp_path / "b"), "x"), ("dir", identity(tmp_path / "a"), "x")]


def recording_sync(bin_dir: Path) -> Path:
    """A ``sync`` for $PATH that logs each operand (``dir`` or ``file``, and what $WATCH holds
    then) to the returned file, then runs the real sync."""
    real = shutil.which("sync")
    assert real, "sync (GNU coreutils) is needed"
    bin_dir.mkdir()
    log = bin_dir / "sync.log"
    script = bin_dir / "sync"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  [ "$a" = -- ] && continue
  if [ -d "$a" ]; then kind=dir; else kind=file; fi
  printf '%s %s %s\\n' "$kind" "$a" "$(cat -- "$WATCH" 2>/dev/null || echo -)" >> {log}
done
exec {real} "$@"
""")
    script.chmod(0o755)
    return log


def test_ssh_atomic_write_script_flushes_the_directory_after_the_rename(tmp_path):
    # The script SshHost runs on the other host, run here with a sync that logs what it flushes.
    path = tmp_path / "conf" / "pgbouncer.ini"
    path.parent.mkdir()
    path.write_text("old")
    log = recording_sync(tmp_path / "bin")
    LocalHost().run(["sh", "-c", _ATOMIC_WRITE, "sh", str(path), "", ""], input="new",
                    env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "WATCH": str(path)})
    first, second = log.read_text().splitlines()
    assert first.startswith(f"file {path.parent}/.pgbouncer.ini.") and first.endswith(" old")  # before mv
    assert second == f"dir {path.parent} new"  # after mv
    assert path.read_text() == "new" and os.listdir(path.parent) == ["pgbouncer.ini"]


def test_ssh_rename_script_flushes_both_directories_after_the_rename(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "data").write_text("x")
    log = recording_sync(tmp_path / "bin")
    dst = tmp_path / "b" / "moved"
    LocalHost().run(["sh", "-c", _RENAME, "sh", str(tmp_path / "a" / "data"), str(dst)],
                    env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "WATCH": str(dst)})
    assert log.read_text().splitlines() == [f"dir {tmp_path / 'b'} x", f"dir {tmp_path / 'a'} x"]
    failed = LocalHost().run(["sh", "-c", _RENAME, "sh", str(tmp_path / "nothing"), str(dst)], check=False)
    assert failed.returncode != 0 and "nothing" in failed.stderr  # mv's failure is the script's


def test_ssh_atomic_write_and_rename_scripts_work_where_sync_is_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "mktemp", "dirname", "basename", "cat", "chmod", "chown", "stat", "id", "mv", "rm"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed"
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir)}
    path = tmp_path / "pgbouncer.ini"
    path.write_text("old")
    LocalHost().run(["sh", "-c", _ATOMIC_WRITE, "sh", str(path), "640", ""], input="new", env=env)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    LocalHost().run(["sh", "-c", _RENAME, "sh", str(path), str(tmp_path / "moved")], env=env)
    assert (tmp_path / "moved").read_text() == "new" and not path.exists()


def test_file_operations_mirror_localhost(ssh, tmp_path):
    local = LocalHost()
    (tmp_path / "a").write_text("x")
    assert ssh.read_text(tmp_path / "a") == local.read_text(tmp_path / "a") == "x"
    assert ssh.exists(tmp_path / "a") and not ssh.exists(tmp_path / "b")
    assert ssh.listdir(tmp_path) == local.listdir(tmp_path) == ["a"]
    assert ssh.owner(tmp_path / "a") == local.owner(tmp_path / "a") == "root"
    with pytest.raises(FileNotFoundError):
        ssh.read_text(tmp_path / "b")
    ssh.make_dir(tmp_path / "d" / "e", owner="postgres", mode=0o750)
    assert (tmp_path / "d" / "e").stat().st_mode & 0o777 == 0o750
    ssh.rename(tmp_path / "a", tmp_path / "c")
    ssh.remove(tmp_path / "c")
    assert ssh.listdir(tmp_path) == ["d"]


def test_tunnel_reaches_a_port_as_the_remote_host_sees_it(ssh):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        target = server.getsockname()[1]
        directory, port = ssh.tunnel("127.0.0.1", target)
        assert port == target  # libpq's host=<directory> port=<port> names the socket below
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(os.path.join(directory, f".s.PGSQL.{port}"))
            peer, _ = server.accept()
            peer.sendall(b"hello")
            assert client.recv(5) == b"hello"
            peer.close()
    assert ssh.tunnel("127.0.0.1", target) == (directory, port)  # one forward per target


def test_tunnel_is_a_unix_socket_of_ours_alone_and_libpq_reaches_the_servers_through_it(ssh, srht_lab):
    # A TCP port on loopback would let every local user reach, say, a PgBouncer admin console.
    host = SshHost("lab-host", ssh_config=ssh.ssh_config)  # a master connection of its own, closed below
    forwards: dict[str, tuple[str, int]] = {}
    try:
        primary, bouncer = srht_lab.primary, srht_lab.pgbouncer
        forwards = {
            "primary over tcp": host.tunnel(primary.host, primary.port),
            "primary's unix socket": host.tunnel(str(srht_lab.directory / primary.name), primary.port),
            "pgbouncer console": host.tunnel(bouncer.host, bouncer.port),
        }
        for what, (directory, port) in forwards.items():
            st = os.lstat(directory)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, what
            assert st.st_uid == os.geteuid(), what
            assert os.listdir(directory) == [f".s.PGSQL.{port}"], what
            assert stat.S_ISSOCK(os.lstat(os.path.join(directory, f".s.PGSQL.{port}")).st_mode), what
        # The same port through two targets: two directories, no collision.
        assert len({directory for directory, _ in forwards.values()}) == 3
        for what, expected in (("primary over tcp", "127.0.0.1"), ("primary's unix socket", None)):
            directory, port = forwards[what]
            conn = psycopg2.connect(host=directory, port=port, user="postgres", dbname="postgres", connect_timeout=5)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT current_setting('port'), host(inet_server_addr()), pg_is_in_recovery()")
                    assert cur.fetchone() == (str(primary.port), expected, False), what
            finally:
                conn.close()
        directory, port = forwards["pgbouncer console"]
        conn = psycopg2.connect(host=directory, port=port, user="postgres", dbname="pgbouncer", connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                names = [row[0] for row in cur.fetchall()]
            assert "srht" in names and "pgbouncer" in names
        finally:
            conn.close()
    finally:
        host.close()
    assert len(forwards) == 3
    for directory, _ in forwards.values():
        assert not os.path.exists(directory)  # close() removed the sockets and their directories


def test_commands_reuse_one_connection(ssh):
    ssh.run(["true"])
    start = time.monotonic()
    for _ in range(3):
        ssh.run(["true"])
    assert (time.monotonic() - start) / 3 < 1.0


def test_unreachable_host_says_which_and_how_to_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = SshHost(f"ssh://root@127.0.0.1:{port}", name="git.sr.ht", connect_timeout=2)
    with pytest.raises(Unreachable) as info:
        host.run(["true"])
    assert "git.sr.ht" in str(info.value) and "ssh" in str(info.value) and "true` works" in str(info.value)


def test_operator_lock_refuses_a_second_operator_and_names_the_first(tmp_path):
    path = tmp_path / "lock"
    with OperatorLock(path, "switchover --to konpaku"), pytest.raises(Refused) as info:
        OperatorLock(path, "failover --to konpaku").acquire()
    assert "switchover --to konpaku" in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    with OperatorLock(path, "failover --to konpaku"):
        pass  # released: the next operator gets it


def test_operator_lock_never_follows_a_symlink_nor_uses_a_file_of_someone_else(tmp_path):
    victim = tmp_path / "shadow"
    victim.write_text("precious\n")
    link = tmp_path / "lock-link"
    link.symlink_to(victim)
    with pytest.raises(Refused, match="it is a symlink: remove it"):
        OperatorLock(link, "switchover --to konpaku").acquire()
    assert victim.read_text() == "precious\n"  # not truncated, not written
    other = tmp_path / "lock-other"
    other.write_text("")
    os.chown(other, 65534, 65534)  # nobody's (the tests run as root)
    with pytest.raises(Refused, match="not a regular file of yours"):
        OperatorLock(other, "switchover --to konpaku").acquire()
    fifo = tmp_path / "lock-fifo"
    os.mkfifo(fifo)
    with pytest.raises(Refused, match="not a regular file of yours"):
        OperatorLock(fifo, "switchover --to konpaku").acquire()


def test_operator_lock_is_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "lock"
    code = ("import sys, time; from srht_readonly.ops.lock import OperatorLock; "
            f"OperatorLock({str(path)!r}, 'demote remilia').acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(Refused, match="demote remilia"):
            OperatorLock(path, "promote konpaku").acquire()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with OperatorLock(path, "promote konpaku"):
        pass


def alive(pid: int) -> bool:
    """Whether ``pid`` runs here (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_over_ssh_returns_once_the_postmaster_is_gone(ssh, kill_lab):
    node = kill_lab.primary
    local = node.server
    pid = local.postmaster_pid()
    assert pid is not None and alive(pid)
    remote = PostgresServer(local.data, bin=local.bin, host=ssh, os_user=local.os_user)  # type: ignore[arg-type]
    remote.kill()
    assert not alive(pid), "kill() returned while the postmaster was still running"
    assert not local.is_running()
    remote.kill()  # the stale postmaster.pid names a process that is gone: nothing to do
    local.start()  # crash recovery, and the lab is whole again for its teardown


def test_kill_over_ssh_that_is_refused_raises_naming_the_host(ssh, tmp_path):
    # postmaster.pid naming a process the OS user may not signal (root's): kill -9 fails.
    data = tmp_path / "data"
    data.mkdir()
    victim = subprocess.Popen(["sleep", "60"])
    try:
        (data / "postmaster.pid").write_text(f"{victim.pid}\n{data}\n")
        remote = PostgresServer(data, bin=Path("/usr/bin"), host=ssh, os_user="postgres")  # type: ignore[arg-type]
        with pytest.raises(OpsError, match=rf"kill -9 {victim.pid} on lab-host failed: .*ermitted"):
            remote.kill()
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
