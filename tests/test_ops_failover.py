"""``failover``: the two-phase PgBouncer fleet switch, over local files and over a real sshd."""

from __future__ import annotations

import json
import os
import stat
import time

import psycopg2
import pytest

from srht_readonly.ops.cluster import Cluster
from srht_readonly.ops.console import Admin
from srht_readonly.ops.errors import OpsError, PartlyDone, Refused
from srht_readonly.ops.failover import check_failover, run_failover
from srht_readonly.ops.fleet import Fleet
from srht_readonly.ops.inventory import load
from srht_readonly.ops.lock import OperatorLock, lock_path
from srht_readonly.testing.deployment import fleet_fixture
from tests._fleet import file_ports, out, q, reloads, running_ports

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})


@pytest.fixture
def back_to_primary(fleet):
    """Whatever a test did, the fleet points at remilia again afterwards."""
    yield
    proc = fleet.cli("failover", "--to", "remilia", "--yes")
    assert proc.returncode == 0, out(proc)


def _modes(fleet):
    return {b.name: stat.S_IMODE(os.stat(b.config_path).st_mode) for b in fleet.lab.bouncers}


def test_dry_run_prints_the_plan_and_changes_nothing(fleet):
    before = {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers}
    reloaded = reloads(fleet)
    proc = fleet.cli("failover", "--to", "konpaku", "--dry-run")
    assert proc.returncode == 0, out(proc)
    assert "RELOAD all 3 PgBouncers at once" in proc.stderr and "nothing was changed" in proc.stderr
    assert "git.sr.ht: then SET server_login_retry = 1 (now 15)" in proc.stderr
    assert {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers} == before
    assert reloads(fleet) == reloaded


def test_failover_points_every_pgbouncer_at_the_standby_at_once(fleet, back_to_primary):
    modes = _modes(fleet)
    konpaku = fleet.lab.nodes["konpaku"]
    proc = fleet.cli("failover", "--to", "konpaku", "--yes", "--json")
    assert proc.returncode == 0, out(proc)
    result = json.loads(proc.stdout)
    assert sorted(result["written"]) == sorted(result["reloaded"]) == ["git.sr.ht", "meta.sr.ht", "pgbouncer"]
    assert sorted(result["login_retry_set"]) == ["git.sr.ht", "meta.sr.ht"]
    assert set(running_ports(fleet).values()) == {konpaku.port}
    assert _modes(fleet) == modes  # permissions kept, locally and over ssh
    for b in fleet.lab.bouncers:
        assert b.config_path.stat().st_uid == fleet.lab.nodes["remilia"].server.data.stat().st_uid
        assert Admin(b.admin_dsn).config()["server_login_retry"] == "1"
        # Read-only mode: reads work through every PgBouncer, writes get 25006.
        assert q(b.dsn, "SELECT pg_is_in_recovery()") == [(True,)]
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            q(b.dsn, "CREATE TABLE refused (v int)")
    # meta.sr.ht follows only its listed database; its "*" entry stays where it was.
    meta = fleet.lab.extra_bouncers["meta.sr.ht"]
    assert f"* = host=127.0.0.1 port={fleet.lab.nodes['remilia'].port}" in meta.config_path.read_text()
    again = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert again.returncode == 0 and "0 config(s) rewritten, 3 reloaded" in again.stdout


def test_unreachable_pgbouncer_host_refuses_and_reloads_no_host(fleet):
    before = {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers}
    reloaded = reloads(fleet)
    fleet.sshd.stop()
    try:
        proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    finally:
        fleet.sshd.start()
    assert proc.returncode == 1, out(proc)
    assert "meta.sr.ht" in proc.stderr and "cannot be reached" in proc.stderr and "nothing was changed" in proc.stderr
    assert {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers} == before
    assert reloads(fleet) == reloaded
    assert set(running_ports(fleet).values()) == {fleet.lab.nodes["remilia"].port}


def test_a_host_failing_phase_one_gets_every_written_file_put_back_and_nothing_reloaded(fleet, monkeypatch):
    before = {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers}
    modes = _modes(fleet)
    reloaded = reloads(fleet)
    monkeypatch.setenv("SRHT_READONLY_SSH_CONFIG", str(fleet.ssh_config))
    konpaku = fleet.lab.nodes["konpaku"].port
    with Cluster(load(fleet.inventory)) as cluster, Fleet(cluster) as pgbouncers:
        plan = check_failover(cluster, pgbouncers, "konpaku")
        meta = pgbouncers.members["meta.sr.ht"]
        real_write = meta.host.write_text_atomic
        written_elsewhere = []

        def failing_write(path, text, **kw):
            # Fail like a full disk, but only once the other two files (written in parallel) are new.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                others = {n: p for n, p in file_ports(fleet).items() if n != "meta.sr.ht"}
                if all(p == {str(konpaku)} for p in others.values()):
                    break
                time.sleep(0.01)
            written_elsewhere.append(others)
            raise OpsError("No space left on device")

        monkeypatch.setattr(meta.host, "write_text_atomic", failing_write)
        with pytest.raises(Refused) as info:
            run_failover(cluster, pgbouncers, plan)
        monkeypatch.setattr(meta.host, "write_text_atomic", real_write)
    assert written_elsewhere == [{"pgbouncer": {str(konpaku)}, "git.sr.ht": {str(konpaku)}}]
    assert "meta.sr.ht" in str(info.value) and "put back" in str(info.value) and "nothing" in str(info.value)
    assert {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers} == before
    assert _modes(fleet) == modes
    assert reloads(fleet) == reloaded
    assert set(running_ports(fleet).values()) == {fleet.lab.nodes["remilia"].port}


def test_failover_to_a_node_that_does_not_answer_is_refused(fleet):
    fleet.lab.nodes["konpaku"].stop()
    try:
        proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    finally:
        fleet.lab.nodes["konpaku"].start()
    assert proc.returncode == 1 and "konpaku does not answer" in proc.stderr and "--force" in proc.stderr


def test_a_second_operator_is_stopped_by_the_lock(fleet, monkeypatch):
    monkeypatch.setenv("SRHT_READONLY_LOCK_DIR", str(fleet.inventory.parent))
    with OperatorLock(lock_path(fleet.inventory), "switchover --to konpaku"):
        proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert proc.returncode == 1
    assert "another operator is running `switchover --to konpaku`" in proc.stderr


def test_unconfirmed_failover_changes_nothing(fleet):
    before = {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers}
    proc = fleet.cli("failover", "--to", "konpaku", input="n\n")
    assert proc.returncode == 1 and "Proceed?" in proc.stderr and "nothing was changed" in proc.stderr
    assert {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers} == before


def test_a_reload_that_fails_is_exit_3_naming_the_host_and_running_again_finishes(fleet, monkeypatch, back_to_primary):
    monkeypatch.setenv("SRHT_READONLY_SSH_CONFIG", str(fleet.ssh_config))
    git = fleet.lab.extra_bouncers["git.sr.ht"]
    konpaku = fleet.lab.nodes["konpaku"].port
    with Cluster(load(fleet.inventory)) as cluster, Fleet(cluster) as pgbouncers:
        plan = check_failover(cluster, pgbouncers, "konpaku")
        git.stop()  # dies between the checks and the switch
        try:
            with pytest.raises(PartlyDone) as info:
                run_failover(cluster, pgbouncers, plan)
        finally:
            git.start()
    assert "git.sr.ht" in info.value.hosts and "RELOAD failed" in info.value.hosts["git.sr.ht"]
    assert info.value.hosts["pgbouncer"] == "switched to konpaku"
    proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert proc.returncode == 0, out(proc)
    assert "0 config(s) rewritten, 3 reloaded" in proc.stdout  # the files were right already
    assert set(running_ports(fleet).values()) == {konpaku}
