"""A switchover whose own process is stopped: SIGTERM, SIGINT, SIGHUP at each stage, and ``kill -9`` while paused.

Against the lab's real primary, standby, PgBouncers (one local, one over ssh) and the real CLI
process. Afterwards there is exactly one primary, every PgBouncer is unpaused and points at it,
the exit status is 3 (the plan was accepted) and the output says what state was left.

Each stage is held open by a real condition where one exists: a transaction through PgBouncer
holds the PAUSE; replay paused on the standby holds the wait for the shutdown checkpoint. The
promotion stage has none (it takes milliseconds), so there the CLI runs with ``fast_promote``
made slow in its own process (``_WRAPPER``): the signal lands while the promotion's outcome is
pending, everything else is the real procedure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.ops import deadman
from srht_readonly.ops.console import Admin
from srht_readonly.ops.ports import free_port
from srht_readonly.ops.remote import LocalHost
from srht_readonly.testing.deployment import LabFleet, fleet_fixture
from tests._fleet import out, q, roles, running_ports, status, unchanged

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})

# Runs the CLI with fast_promote changed in this process only: "sent" calls on_sent and never
# answers (pg_promote's outcome unknown); "held" promotes for real, then holds before returning.
_WRAPPER = r"""
import sys, time
from srht_readonly.ops import switchover
from srht_readonly.ops.cli import main
real = switchover.fast_promote
def fast_promote(dsn, **kwargs):
    if sys.argv[1] == "sent":
        kwargs["on_sent"]()
        print("... test: pg_promote went out, its answer never comes", file=sys.stderr, flush=True)
        time.sleep(600)
    result = real(dsn, **kwargs)
    print("... test: promoted, holding", file=sys.stderr, flush=True)
    time.sleep(600)
    return result
switchover.fast_promote = fast_promote
main(args=sys.argv[2:], prog_name="srht-readonly")
"""


class Cli:
    """The CLI as a running process: its stderr read line by line, its prompt answered, signals sent."""

    def __init__(self, fleet: LabFleet, *args: str, patched: str | None = None) -> None:
        script = Path(sys.executable).with_name("srht-readonly")
        argv = [sys.executable, "-c", _WRAPPER, patched, *args] if patched else [str(script), *args]
        self.proc = subprocess.Popen(argv, env=fleet.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.text = ""  # all of stderr so far (the prompt ends no line: read by character)
        self.pos = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while char := self.proc.stderr.read(1):
            self.text += char

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        """Until stderr shows ``needle`` after what earlier waits found."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.text.find(needle, self.pos)
            if found >= 0:
                self.pos = found + len(needle)
                return
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"the CLI never printed {needle!r}; it printed:\n{self.text}")

    def confirm(self) -> None:
        self.wait_for("Proceed?")
        assert self.proc.stdin is not None
        self.proc.stdin.write("y\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        stdout = self.proc.stdout.read() if self.proc.stdout else ""
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, self.text)


def _switchover(fleet: LabFleet, *extra: str, patched: str | None = None) -> Cli:
    # --pause-timeout/limit: the long transaction below holds PAUSE; the timers must not fire first.
    return Cli(fleet, "switchover", "--to", "konpaku", "--pause-timeout", "10", "--pause-limit", "30", *extra,
               patched=patched)


def _one_primary_every_pgbouncer_on_it(fleet: LabFleet, primary: str) -> None:
    """Exactly one primary; every PgBouncer answers at once (not paused) and runs pointing at it."""
    assert [n for n, r in roles(fleet).items() if r == "primary"] == [primary]
    port = fleet.lab.nodes[primary].port
    assert set(running_ports(fleet).values()) == {port}
    for b in fleet.lab.bouncers:
        assert not any(int(r["paused"]) for r in Admin(b.admin_dsn).show("DATABASES"))
    for b in fleet.lab.bouncers:
        started = time.monotonic()
        assert q(b.dsn, "SELECT 1") == [(1,)]
        assert time.monotonic() - started < 2


def _back_to_remilia(fleet: LabFleet) -> None:
    """After a stop past the promotion: remilia follows konpaku, then the primary switches back."""
    demoted = fleet.cli("demote", "remilia", "--primary", "konpaku", "--yes")
    assert demoted.returncode == 0, out(demoted)
    back = fleet.cli("switchover", "--to", "remilia", "--yes")
    assert back.returncode == 0, out(back)
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}


class _LongTransaction:
    """A transaction open through a PgBouncer: PAUSE waits for it."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn, connect_timeout=5)
        with self.conn.cursor() as cur:
            cur.execute("SELECT 1")

    def end(self) -> None:
        self.conn.rollback()
        self.conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_pause_is_pending_switches_back_and_exits_3(fleet, sig):
    git = next(b for b in fleet.lab.bouncers if b.name == "git.sr.ht")
    cli = _switchover(fleet)
    cli.confirm()
    holder = _LongTransaction(git.dsn)
    try:
        cli.wait_for("... PAUSE ")
        time.sleep(0.5)  # the PAUSE is pending on git.sr.ht: its clients queue
        cli.proc.send_signal(sig)
        proc = cli.finish()
    finally:
        holder.end()
    assert proc.returncode == 3, out(proc)
    assert f"interrupted by {sig.name} during the pause stage" in proc.stderr, out(proc)
    assert "remilia is the primary again" in proc.stderr and "partly done" in proc.stderr
    unchanged(fleet)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_old_primary_stopped_starts_it_again_and_puts_everything_back(fleet, sig):
    konpaku = fleet.lab.nodes["konpaku"].admin_dsn
    cli = _switchover(fleet)
    cli.confirm()  # checked first (replay running); paused now, so the wait below holds
    q(konpaku, "SELECT pg_wal_replay_pause()")
    try:
        cli.wait_for("waiting for konpaku to replay")
        assert not fleet.lab.nodes["remilia"].server.is_running()  # stopped, and the fleet is paused
        cli.proc.send_signal(sig)
        proc = cli.finish()
    finally:
        q(konpaku, "SELECT pg_wal_replay_resume()")
    assert proc.returncode == 3, out(proc)
    assert f"interrupted by {sig.name} during the replay stage" in proc.stderr, out(proc)
    assert "remilia is the primary again" in proc.stderr
    unchanged(fleet)


def test_sighup_while_the_promotion_is_pending_never_starts_the_old_primary_again(fleet):
    """The operator's ssh session dies just after pg_promote went out and konpaku cannot be reached."""
    konpaku = fleet.lab.nodes["konpaku"]
    cli = _switchover(fleet, patched="sent")
    cli.confirm()
    cli.wait_for("test: pg_promote went out")
    pid = konpaku.server.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # no new connection gets an answer: the outcome is unknown
    try:
        cli.proc.send_signal(signal.SIGHUP)
        proc = cli.finish()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 3, out(proc)
    assert "interrupted by SIGHUP during the promote stage" in proc.stderr, out(proc)
    assert "remilia stays stopped" in proc.stderr and "NOT restarted" in proc.stderr
    assert "srht-readonly promote konpaku" in proc.stderr
    assert not fleet.lab.nodes["remilia"].server.is_running()  # never two primaries
    assert set(running_ports(fleet).values()) == {konpaku.port}  # reads at least, from konpaku
    promoted = fleet.cli("promote", "konpaku", "--yes")  # the next command it named
    assert promoted.returncode == 0, out(promoted)
    _one_primary_every_pgbouncer_on_it(fleet, "konpaku")
    _back_to_remilia(fleet)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_promotion_points_every_pgbouncer_at_the_new_primary(fleet, sig):
    cli = _switchover(fleet, patched="held")
    cli.confirm()
    cli.wait_for("test: promoted, holding")
    cli.proc.send_signal(sig)
    proc = cli.finish()
    assert proc.returncode == 3, out(proc)
    assert f"interrupted by {sig.name} during the promote stage" in proc.stderr, out(proc)
    assert "demote remilia --primary konpaku" in proc.stderr
    _one_primary_every_pgbouncer_on_it(fleet, "konpaku")
    _back_to_remilia(fleet)


def test_kill_9_while_paused_every_pgbouncer_answers_within_the_pause_limit(fleet):
    limit = 8.0
    git = next(b for b in fleet.lab.bouncers if b.name == "git.sr.ht")
    cli = Cli(fleet, "switchover", "--to", "konpaku", "--pause-timeout", "2", "--pause-limit", f"{limit:g}")
    cli.confirm()
    holder = _LongTransaction(git.dsn)
    try:
        cli.wait_for("... PAUSE ")
        time.sleep(0.3)
        cli.proc.kill()
        killed = time.monotonic()
        cli.finish()
    finally:
        holder.end()  # PAUSE completes now: git.sr.ht stays paused, nobody left to RESUME it
    assert any(int(r["paused"]) for b in fleet.lab.bouncers for r in Admin(b.admin_dsn).show("DATABASES"))
    answered = {}

    def ask(b) -> None:  # a paused PgBouncer does not even finish the login: wait for both
        conn = psycopg2.connect(b.dsn, connect_timeout=int(limit) + 10)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            answered[b.name] = time.monotonic() - killed
        finally:
            conn.close()

    askers = [threading.Thread(target=ask, args=(b,)) for b in fleet.lab.bouncers]
    for t in askers:
        t.start()
    for t in askers:
        t.join(timeout=limit + 10)
    assert set(answered) == {b.name for b in fleet.lab.bouncers}, (answered, cli.text)
    assert max(answered.values()) <= limit + 1, answered
    seen = status(fleet)
    records = {b["name"]: b["resumed_by_timer"] for b in seen["pgbouncers"]}
    assert all(r and "RESUMEd after" in r for r in records.values()), records
    assert any("dead-man timer" in p["message"] for p in seen["problems"])
    # The configs on disk were written for konpaku but never reloaded: status says so, failover fixes it.
    assert any("not reloaded" in p["message"] for p in seen["problems"]), seen["problems"]
    fixed = fleet.cli("failover", "--to", "remilia", "--yes")
    assert fixed.returncode == 0, out(fixed)
    q(fleet.lab.nodes["konpaku"].admin_dsn, "SELECT pg_drop_replication_slot('remilia')")
    # The next switchover finishes and clears the records.
    there = fleet.cli("switchover", "--to", "konpaku", "--yes")
    assert there.returncode == 0, out(there)
    assert all(b["resumed_by_timer"] is None for b in status(fleet)["pgbouncers"])
    back = fleet.cli("switchover", "--to", "remilia", "--yes")
    assert back.returncode == 0, out(back)
    unchanged(fleet)


def test_a_fired_timer_is_seen_only_by_its_own_pgbouncer_not_a_same_named_one_of_another_fleet():
    """Two fleets on one host may both name a PgBouncer "git.sr.ht": each reads only its own timer's record."""
    host = LocalHost()
    port = free_port()  # nothing listens there: the timer's RESUME fails, and says so in its record
    ours, theirs = (f"host=127.0.0.1 port={p} dbname=pgbouncer user=pgbouncer" for p in (port, port + 1))
    timer = deadman.arm(host, "git.sr.ht", ours, ["RESUME"], 0.2)
    try:
        deadline = time.monotonic() + 20
        while deadman.record(host, "git.sr.ht", ours) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "could NOT RESUME it after 0.2 s" in (deadman.record(host, "git.sr.ht", ours) or "")
        assert deadman.record(host, "git.sr.ht", theirs) is None
    finally:
        fired = deadman.disarm(timer)
    assert fired and "could NOT RESUME" in fired
    assert deadman.record(host, "git.sr.ht", ours) is None  # disarming clears it


def test_a_pause_limit_that_leaves_no_time_is_refused(fleet):
    proc = fleet.cli("switchover", "--to", "konpaku", "--pause-timeout", "5", "--pause-limit", "8", "--yes")
    assert proc.returncode == 1 and "give at least 11 s" in proc.stderr, out(proc)
    unchanged(fleet)


def test_a_failed_preparation_whose_restore_fails_is_partly_done_and_drops_the_slot(fleet, monkeypatch):
    """CHECKPOINT fails after the configs were written and the slot made; one config cannot be put back."""
    from srht_readonly.ops import switchover
    from srht_readonly.ops.cluster import Cluster
    from srht_readonly.ops.errors import OpsError, PartlyDone
    from srht_readonly.ops.fleet import Fleet
    from srht_readonly.ops.inventory import load

    real_execute, real_write = switchover.sql.execute, Fleet._write

    def execute(dsn, statement, *args, **kwargs):
        if statement == "CHECKPOINT":
            raise OpsError("could not write to file \"pg_wal/xlogtemp.1\": No space left on device")
        return real_execute(dsn, statement, *args, **kwargs)

    written: list[str] = []

    def write(self, name, text):
        if name == "meta.sr.ht" and name in written:  # the new config went in; putting the old one back fails
            return "meta.sr.ht: Permission denied"
        written.append(name)
        return real_write(self, name, text)

    monkeypatch.setenv("SRHT_READONLY_SSH_CONFIG", str(fleet.ssh_config))
    monkeypatch.setattr(switchover.sql, "execute", execute)
    monkeypatch.setattr(Fleet, "_write", write)
    with Cluster(load(fleet.inventory)) as cluster, Fleet(cluster) as pgbouncers:
        plan = switchover.check_switchover(cluster, pgbouncers, "konpaku")
        with pytest.raises(PartlyDone) as info:
            switchover.run_switchover(cluster, pgbouncers, plan)
    monkeypatch.undo()
    assert "switching back failed" in str(info.value), str(info.value)
    assert info.value.hosts == {"meta.sr.ht": "NEW config left on disk (not reloaded): meta.sr.ht: Permission denied"}
    assert q(fleet.lab.nodes["konpaku"].admin_dsn, "SELECT slot_name FROM pg_replication_slots") == []
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    assert set(running_ports(fleet).values()) == {fleet.lab.nodes["remilia"].port}  # nothing was reloaded
    # status sees the file left behind; failover --to remilia writes it back.
    assert any("not reloaded" in p["message"] for p in status(fleet)["problems"])
    fixed = fleet.cli("failover", "--to", "remilia", "--yes")
    assert fixed.returncode == 0, out(fixed)
    unchanged(fleet)


def _api_switchover(fleet, monkeypatch, **kwargs):
    """``check_switchover`` and ``run_switchover`` in this process (for faults only a patch can make)."""
    from srht_readonly.ops import switchover
    from srht_readonly.ops.cluster import Cluster
    from srht_readonly.ops.fleet import Fleet
    from srht_readonly.ops.inventory import load

    monkeypatch.setenv("SRHT_READONLY_SSH_CONFIG", str(fleet.ssh_config))
    with Cluster(load(fleet.inventory)) as cluster, Fleet(cluster) as pgbouncers:
        plan = switchover.check_switchover(cluster, pgbouncers, "konpaku")
        return switchover.run_switchover(cluster, pgbouncers, plan, **kwargs)


def test_a_replay_check_that_fails_switches_back_and_changes_nothing(fleet, monkeypatch):
    from srht_readonly.ops.errors import Refused

    konpaku = fleet.lab.nodes["konpaku"].admin_dsn
    from srht_readonly.ops import replication

    real_ensure = replication.ensure_slot

    def ensure_then_pause(dsn, name, **kwargs):  # after the check, before the pause: replay stops
        created = real_ensure(dsn, name, **kwargs)
        q(konpaku, "SELECT pg_wal_replay_pause()")
        return created

    monkeypatch.setattr(replication, "ensure_slot", ensure_then_pause)
    try:
        with pytest.raises(Refused) as info:
            _api_switchover(fleet, monkeypatch, catchup_timeout=1)
    finally:
        q(konpaku, "SELECT pg_wal_replay_resume()")
    monkeypatch.undo()
    assert "replay failed" in str(info.value) and "did not replay" in str(info.value), str(info.value)
    assert "remilia is the primary again" in str(info.value)
    unchanged(fleet)


@pytest.mark.parametrize("fault", ["stop fails", "stop times out"])
def test_a_stop_that_fails_or_times_out_switches_back_and_changes_nothing(fleet, monkeypatch, fault):
    """``subprocess.TimeoutExpired`` (a host that hangs) gets the same recovery as a failed step."""
    from srht_readonly.ops import switchover
    from srht_readonly.ops.errors import OpsError, Refused

    real_stop, calls = switchover.stop_primary, []

    def stop(server, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # the switchover's own stop; the recovery's goes through
            if fault == "stop fails":
                raise OpsError("pg_ctl stop failed on local: could not send stop signal")
            raise subprocess.TimeoutExpired(["pg_ctl", "stop"], 5)
        return real_stop(server, **kwargs)

    monkeypatch.setattr(switchover, "stop_primary", stop)
    with pytest.raises(Refused) as info:
        _api_switchover(fleet, monkeypatch)
    monkeypatch.undo()
    assert "stop failed" in str(info.value) and "remilia is the primary again" in str(info.value), str(info.value)
    unchanged(fleet)


@pytest.mark.parametrize("step", ["RELOAD", "RESUME"])
def test_a_reload_or_resume_that_fails_after_the_promotion_is_partly_done_naming_the_pgbouncer(
        fleet, monkeypatch, step):
    from srht_readonly.ops import console
    from srht_readonly.ops.errors import PartlyDone

    real_execute = console.execute

    def execute(consoles, command, **kwargs):  # git.sr.ht's console never gets the command; it fails
        consoles = list(consoles)
        text = command if isinstance(command, str) else command.get("git.sr.ht", "")
        refused = [c for c in consoles if c.key == "git.sr.ht" and text.startswith(step)]
        results = real_execute([c for c in consoles if c not in refused], command, **kwargs)
        results.update({c.key: console.Outcome(False, error=f"{step} refused (test)") for c in refused})
        return results

    monkeypatch.setattr(console, "execute", execute)
    with pytest.raises(PartlyDone) as info:
        _api_switchover(fleet, monkeypatch)
    monkeypatch.undo()
    assert "git.sr.ht" in info.value.hosts, str(info.value)
    assert f"{step} refused (test)" in info.value.hosts["git.sr.ht"]
    if step == "RESUME":
        assert "still PAUSED" in str(info.value) and "timers stay armed" in str(info.value)
        git = next(b for b in fleet.lab.bouncers if b.name == "git.sr.ht")
        with pytest.raises(psycopg2.OperationalError):  # a global PAUSE: a client does not even log in
            psycopg2.connect(git.dsn, connect_timeout=2).close()
        Admin(next(b for b in fleet.lab.bouncers if b.name == "git.sr.ht").admin_dsn).resume()
    else:
        assert "failover --to konpaku" in str(info.value)
    assert roles(fleet)["konpaku"] == "primary" and fleet.lab.nodes["remilia"].server.is_running() is False
    fixed = fleet.cli("failover", "--to", "konpaku", "--yes")  # what the message says to run
    assert fixed.returncode == 0, out(fixed)
    _one_primary_every_pgbouncer_on_it(fleet, "konpaku")
    _back_to_remilia(fleet)
