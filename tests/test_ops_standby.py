"""``standby prepare``: the plan's steps 1-8; refusals never touch a primary; the password stays secret."""

from __future__ import annotations

import os
from pathlib import Path

from srht_readonly.testing.deployment import fleet_fixture
from tests._fleet import out, q, roles
from tests._secrets import ArgvWatcher

# konpaku is reached over ssh: the base backup streams its progress back through sshd.
fleet = fleet_fixture("function", extra=(), over_ssh=("konpaku",))

SECRET = "correct horse battery staple"


def _use_password_file(fleet) -> Path:
    path = fleet.lab.directory / "replication.password"
    path.write_text(SECRET + "\n")
    os.chmod(path, 0o600)
    text = fleet.inventory.read_text().replace("user = replicator\n", f"user = replicator\npassword-file = {path}\n")
    fleet.inventory.write_text(text)
    return path


def _drop_replication_access(dsn: str) -> tuple[Path, str]:
    hba = Path(q(dsn, "SHOW hba_file")[0][0])
    original = hba.read_text()
    hba.write_text("\n".join(line for line in original.splitlines() if "replication" not in line) + "\n")
    q(dsn, "SELECT pg_reload_conf()")
    return hba, original


def test_refusals_never_touch_a_primary_and_a_streaming_standby_needs_nothing(fleet):
    proc = fleet.cli("standby", "prepare", "remilia", "--from", "konpaku", "--force", "--yes")
    assert proc.returncode == 1 and "konpaku is not a primary" in proc.stderr
    proc = fleet.cli("standby", "prepare", "remilia", "--from", "remilia", "--yes")
    assert proc.returncode == 1 and "cannot be a standby of itself" in proc.stderr
    proc = fleet.cli("standby", "prepare", "konpaku", "--from", "remilia", "--yes")
    assert proc.returncode == 0 and "already streams from remilia: nothing to do" in proc.stdout
    fleet.lab.nodes["konpaku"].stop()
    proc = fleet.cli("standby", "prepare", "konpaku", "--from", "remilia", "--yes")
    assert proc.returncode == 1 and "is not empty; pass --force" in proc.stderr
    fleet.lab.nodes["konpaku"].start()
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}


def test_prepare_rebuilds_a_standby_with_its_own_hba_line_and_a_secret_password(fleet):
    remilia, konpaku = fleet.lab.nodes["remilia"], fleet.lab.nodes["konpaku"]
    _use_password_file(fleet)
    hba, _ = _drop_replication_access(remilia.admin_dsn)
    q(remilia.admin_dsn, "ALTER SYSTEM SET log_statement = 'ddl'")  # ALTER ROLE ... PASSWORD would be logged
    q(remilia.admin_dsn, "SELECT pg_reload_conf()")
    q(remilia.dsn, "CREATE TABLE written_before (v int)")
    q(remilia.dsn, "INSERT INTO written_before VALUES (42)")
    plan = fleet.cli("standby", "prepare", "konpaku", "--from", "remilia", "--force", "--dry-run")
    assert plan.returncode == 0, out(plan)
    assert "add 'host replication replicator 127.0.0.1/32 scram-sha-256'" in plan.stderr
    assert "move konpaku's data directory aside" in plan.stderr
    with ArgvWatcher(SECRET) as argv:  # ps on this machine, both ends of the ssh connection
        proc = fleet.cli("-vv", "standby", "prepare", "konpaku", "--from", "remilia", "--force", "--yes")
    assert proc.returncode == 0, out(proc)
    assert argv.seen == [] and argv.scans > 10, argv.seen
    assert "konpaku is a streaming hot standby of remilia (timeline 1, same databases)" in proc.stdout
    assert "ssh = konpaku.lab-ssh" in fleet.inventory.read_text()
    assert "base backup (kB)" in proc.stderr  # pg_basebackup's progress, streamed back through sshd
    assert SECRET not in out(proc)  # not in output nor in debug logs
    log = remilia.server.log.read_text()
    assert "ALTER ROLE" in log or "CREATE ROLE" in log  # the statement was logged...
    assert SECRET not in log  # ...with a SCRAM verifier, not the password
    (verifier,) = q(remilia.admin_dsn, "SELECT rolpassword FROM pg_authid WHERE rolname = 'replicator'")[0]
    assert verifier.startswith("SCRAM-SHA-256$")
    added = [line for line in hba.read_text().splitlines() if "replication" in line and not line.startswith("#")]
    assert added == ["host replication replicator 127.0.0.1/32 scram-sha-256"]  # this address only
    aside = next(konpaku.server.data.parent.glob("data.before-prepare-*"))
    assert (aside / "PG_VERSION").exists()  # the old directory is kept
    assert not list(konpaku.server.data.parent.glob(".srht-readonly-pgpass-*"))  # temporary passfile removed
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    assert q(konpaku.dsn, "SELECT v FROM written_before") == [(42,)]
    receiver = q(konpaku.admin_dsn, "SELECT status, slot_name FROM pg_stat_wal_receiver")
    assert receiver == [("streaming", "konpaku")]
    # It authenticated with the password: pg_hba.conf has no trust line for replication any more.
    assert q(remilia.admin_dsn, "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'konpaku'") \
        == [(1,)]


def test_no_password_on_any_command_line_through_every_procedure(fleet):
    """prepare, failover, promote, demote, switchover: konpaku (over ssh) and remilia (local) each follow
    the other, authenticating with the password, and no process on this machine shows it in its argv."""
    _use_password_file(fleet)
    _drop_replication_access(fleet.lab.nodes["remilia"].admin_dsn)
    with ArgvWatcher(SECRET) as argv:
        prepared = fleet.cli("standby", "prepare", "konpaku", "--from", "remilia", "--force", "--yes")
        assert prepared.returncode == 0, out(prepared)
        konpaku = fleet.lab.nodes["konpaku"].admin_dsn  # remilia will follow it: with the password only
        hba, _ = _drop_replication_access(konpaku)
        hba.write_text(hba.read_text() + "host replication replicator 127.0.0.1/32 scram-sha-256\n")
        q(konpaku, "SELECT pg_reload_conf()")
        # The unplanned path (failover, promote, demote), then the planned one back (switchover).
        failover = fleet.cli("failover", "--to", "konpaku", "--yes")
        assert failover.returncode == 0, out(failover)
        fleet.lab.nodes["remilia"].stop()
        for step in (("promote", "konpaku"), ("demote", "remilia", "--primary", "konpaku"),
                     ("switchover", "--to", "remilia")):
            done = fleet.cli(*step, "--yes")
            assert done.returncode == 0, out(done)
    assert argv.seen == [] and argv.scans > 10, argv.seen
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    # Streaming again, and only the password lets it: no pg_hba.conf has a trust line for replication.
    for node in fleet.lab.nodes.values():
        hba = Path(q(node.admin_dsn, "SHOW hba_file")[0][0]).read_text().splitlines()
        assert not [line for line in hba if "replication" in line and "trust" in line and not line.startswith("#")]
    assert q(fleet.lab.nodes["remilia"].admin_dsn, "SELECT count(*) FROM pg_stat_replication") == [(1,)]
