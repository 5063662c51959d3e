"""``promote`` and ``demote``: every refusal changes nothing; the plan's procedures in the plan's order work."""

from __future__ import annotations

import json
from pathlib import Path

from srht_readonly.testing.deployment import fleet_fixture
from tests._fleet import out, q, roles, running_ports, status

fleet = fleet_fixture("module")
# remilia's server is driven over ssh here: stop, pg_controldata, settings, start all go through sshd.
fresh_fleet = fleet_fixture("function", over_ssh=("meta.sr.ht", "remilia"))

HEALTHY = {"remilia": "primary", "konpaku": "standby"}


def test_promote_refuses_a_node_that_is_already_primary(fleet):
    proc = fleet.cli("promote", "remilia", "--yes")
    assert proc.returncode == 1 and "remilia is already a primary" in proc.stderr
    assert roles(fleet) == HEALTHY


def test_promote_refuses_split_brain_while_the_old_primary_accepts_writes(fleet):
    proc = fleet.cli("promote", "konpaku", "--yes")
    assert proc.returncode == 1, out(proc)
    assert "split brain" in proc.stderr and "Stop remilia first" in proc.stderr and "--force" in proc.stderr
    assert roles(fleet) == HEALTHY


def test_promote_refuses_a_standby_that_has_not_replayed_what_it_received(fleet):
    konpaku, remilia = fleet.lab.nodes["konpaku"].admin_dsn, fleet.lab.nodes["remilia"].admin_dsn
    q(konpaku, "SELECT pg_wal_replay_pause()")
    try:
        q(remilia, "CREATE TABLE IF NOT EXISTS unreplayed (v int)")
        q(remilia, "INSERT INTO unreplayed SELECT generate_series(1, 1000)")
        q(remilia, "SELECT pg_switch_wal()")
        proc = fleet.cli("promote", "konpaku", "--force", "--replay-timeout", "0.5", "--yes")
    finally:
        q(konpaku, "SELECT pg_wal_replay_resume()")
    assert proc.returncode == 1, out(proc)
    assert "received WAL up to" in proc.stderr and "replayed only up to" in proc.stderr
    assert "pg_wal_replay_resume()" in proc.stderr
    assert roles(fleet) == HEALTHY


def test_promote_refuses_a_node_that_does_not_answer(fleet):
    fleet.lab.nodes["konpaku"].stop()
    try:
        proc = fleet.cli("promote", "konpaku", "--force", "--yes")
    finally:
        fleet.lab.nodes["konpaku"].start()
    assert proc.returncode == 1 and "konpaku does not answer" in proc.stderr


def test_promote_dry_run_shows_the_timeline_bump_and_changes_nothing(fleet):
    proc = fleet.cli("promote", "konpaku", "--force", "--dry-run")
    assert proc.returncode == 0, out(proc)
    assert "timeline 1 -> 2" in proc.stderr and "warning: --force" in proc.stderr
    assert roles(fleet) == HEALTHY


def test_demote_of_a_node_already_following_does_nothing(fleet):
    proc = fleet.cli("demote", "konpaku", "--primary", "remilia", "--yes")
    assert proc.returncode == 0 and "already streams from remilia: nothing to do" in proc.stdout


def test_demote_refuses_to_follow_a_node_that_is_not_primary(fleet):
    proc = fleet.cli("demote", "remilia", "--primary", "konpaku", "--yes")
    assert proc.returncode == 1 and "konpaku is not a primary" in proc.stderr and "promote konpaku" in proc.stderr
    proc = fleet.cli("demote", "remilia", "--primary", "remilia", "--yes")
    assert proc.returncode == 1 and "cannot follow itself" in proc.stderr
    assert roles(fleet) == HEALTHY


def test_the_plans_procedures_in_order_failover_promote_demote(fresh_fleet):
    """Failover (read-only) -> shut off the master -> promote -> demote: no rewind after a clean stop."""
    f = fresh_fleet
    remilia, konpaku = f.lab.nodes["remilia"], f.lab.nodes["konpaku"]
    q(f.lab.pgbouncer.dsn, "CREATE TABLE before_switch (v int)")
    hba = Path(q(remilia.admin_dsn, "SHOW hba_file")[0][0])
    original = hba.read_text()
    hba.write_text("host all postgres 127.0.0.1/32 reject\n" + original)  # remilia runs, but ops cannot see it
    q(remilia.admin_dsn, "SELECT pg_reload_conf()")
    try:
        unfenced = f.cli("promote", "konpaku", "--yes")
    finally:
        hba.write_text(original)
        remilia.server.run("pg_ctl", "reload", "-D", remilia.server.data)
    assert unfenced.returncode == 1, out(unfenced)
    assert "remilia does not answer but its postmaster runs" in unfenced.stderr
    remilia.stop("fast")
    elsewhere = f.cli("promote", "konpaku", "--dry-run")  # the plan's order: failover first
    assert "point at remilia, not konpaku: their services will not use it" in elsewhere.stderr, out(elsewhere)
    assert f.cli("failover", "--to", "konpaku", "--yes").returncode == 0
    proc = f.cli("promote", "konpaku", "--yes", "--json")
    assert proc.returncode == 0, out(proc)
    promoted = json.loads(proc.stdout)
    assert (promoted["timeline_before"], promoted["timeline_after"]) == (1, 2)
    q(f.lab.pgbouncer.dsn, "INSERT INTO before_switch VALUES (1)")  # writable again, through PgBouncer
    plan = f.cli("demote", "remilia", "--primary", "konpaku", "--dry-run")
    assert "no pg_rewind needed: its last checkpoint" in plan.stderr, out(plan)
    proc = f.cli("demote", "remilia", "--primary", "konpaku", "--yes")
    assert proc.returncode == 0, out(proc)
    assert "remilia streams from konpaku and has caught up (no pg_rewind needed" in proc.stdout
    assert q(remilia.dsn, "SELECT v FROM before_switch") == [(1,)]
    doc = status(f)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["remilia"]["role"] == "standby" and nodes["remilia"]["upstream"] == "konpaku"
    assert set(running_ports(f).values()) == {konpaku.port}


def test_split_brain_is_resolved_by_forced_promote_then_forced_demote_with_rewind(fresh_fleet):
    f = fresh_fleet
    konpaku = f.lab.nodes["konpaku"]
    proc = f.cli("promote", "konpaku", "--force", "--yes")
    assert proc.returncode == 0, out(proc)
    assert roles(f) == {"remilia": "primary", "konpaku": "primary"}
    q(f.lab.nodes["remilia"].dsn, "CREATE TABLE only_on_remilia (v int)")  # diverge
    refused = f.cli("standby", "prepare", "remilia", "--from", "konpaku", "--force", "--yes")
    assert refused.returncode == 1 and "remilia is running as a primary; refusing to overwrite it" in refused.stderr
    refused = f.cli("demote", "remilia", "--primary", "konpaku", "--yes")
    assert refused.returncode == 1 and "running as a primary" in refused.stderr
    for to in ("konpaku", "remilia"):  # failover looks at every node, not only at its target
        refused = f.cli("failover", "--to", to, "--yes")
        assert refused.returncode == 1 and "are both primaries (a split brain)" in refused.stderr, out(refused)
    hba = Path(q(konpaku.admin_dsn, "SHOW hba_file")[0][0])
    original = hba.read_text()
    hba.write_text("\n".join(line for line in original.splitlines() if "replication" not in line) + "\n")
    q(konpaku.admin_dsn, "SELECT pg_reload_conf()")
    try:
        refused = f.cli("demote", "remilia", "--primary", "konpaku", "--force", "--yes")
    finally:
        hba.write_text(original)
        q(konpaku.admin_dsn, "SELECT pg_reload_conf()")
    assert refused.returncode == 1, out(refused)
    assert "does not let replicator stream from 127.0.0.1" in refused.stderr
    assert "host replication replicator 127.0.0.1/32 trust" in refused.stderr
    assert roles(f) == {"remilia": "primary", "konpaku": "primary"}
    proc = f.cli("demote", "remilia", "--primary", "konpaku", "--force", "--yes")
    assert proc.returncode == 0, out(proc)
    assert "rewound with pg_rewind" in proc.stdout
    assert roles(f) == {"remilia": "standby", "konpaku": "primary"}
    assert q(f.lab.nodes["remilia"].dsn, "SELECT to_regclass('only_on_remilia') IS NULL") == [(True,)]


def test_demote_refuses_a_node_that_runs_but_does_not_answer_unless_forced(fresh_fleet):
    f = fresh_fleet
    konpaku = f.lab.nodes["konpaku"]
    hba = Path(q(konpaku.admin_dsn, "SHOW hba_file")[0][0])
    original = hba.read_text()
    hba.write_text("host all postgres 127.0.0.1/32 reject\n" + original)  # running, but not for ops
    q(konpaku.admin_dsn, "SELECT pg_reload_conf()")
    try:
        refused = f.cli("demote", "konpaku", "--primary", "remilia", "--yes")
        assert refused.returncode == 1, out(refused)
        assert "konpaku does not answer over its dsn" in refused.stderr and "its postmaster runs" in refused.stderr
        assert konpaku.is_running()  # not stopped, not rewound
    finally:
        hba.write_text(original)
        konpaku.server.run("pg_ctl", "reload", "-D", konpaku.server.data)
    assert roles(f) == {"remilia": "primary", "konpaku": "standby"}
