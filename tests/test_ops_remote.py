"""SshHost against a real OpenSSH sshd on loopback: the same interface and guarantees as LocalHost."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srht_readonly.ops.errors import CommandFailed, OpsError, Refused, Unreachable
from srht_readonly.ops.lock import OperatorLock
from srht_readonly.ops.postgres import PostgresServer
from srht_readonly.ops.remote import LocalHost, SshHost
from srht_readonly.testing import factories
from srht_readonly.testing.sshd import Sshd


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
        host, port = ssh.tunnel("127.0.0.1", target)
        assert host == "127.0.0.1" and port != server.getsockname()[1]
        with socket.create_connection((host, port), timeout=5) as client:
            peer, _ = server.accept()
            peer.sendall(b"hello")
            assert client.recv(5) == b"hello"
            peer.close()
    assert ssh.tunnel("127.0.0.1", target) == (host, port)  # one forward per target


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
