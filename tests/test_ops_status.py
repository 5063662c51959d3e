"""``status``: observed roles, lag, slots, PgBouncer targets; unreachable things reported; problems flagged."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from srht_readonly.ops.cli import main
from srht_readonly.ops.console import Admin
from srht_readonly.ops.pgbouncer import repoint
from srht_readonly.testing.deployment import fleet_fixture
from tests._fleet import out, q, status

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})


def test_json_has_the_documented_fields_with_observed_roles(fleet):
    doc = status(fleet)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["remilia"]["role"] == "primary" and nodes["konpaku"]["role"] == "standby"
    assert nodes["konpaku"]["lag_bytes"] == 0 or nodes["konpaku"]["lag_bytes"] < 1024 * 1024
    assert nodes["konpaku"]["upstream"] == "remilia"
    assert nodes["remilia"]["timeline"] == nodes["konpaku"]["timeline"] == 1
    assert [s["name"] for s in nodes["remilia"]["slots"]] == ["konpaku"]
    bouncers = {b["name"]: b for b in doc["pgbouncers"]}
    assert set(bouncers) == {"pgbouncer", "git.sr.ht", "meta.sr.ht"}
    assert {b["target"] for b in bouncers.values()} == {"remilia"}
    assert not any(b["paused"] for b in bouncers.values())
    assert bouncers["meta.sr.ht"]["entries"].keys() == {"srht"}  # databases = srht, over ssh
    # No [backup]: the plan's "how far into the past can we peek?" answered plainly.
    assert doc["past"]["engine"] is None and doc["past"]["wal_keep"] == "wal_keep_size = 64 MB"
    assert "no backup engine ([backup]): nothing in the past can be opened" in doc["past"]["text"]


def test_text_report_flags_settings_that_hurt_a_failover_and_check_exits_1(fleet):
    proc = fleet.cli("status", "--check")
    assert proc.returncode == 1, out(proc)
    assert "git.sr.ht: server_login_retry = 15" in proc.stdout
    assert "auth_type = trust" in proc.stdout
    assert "pgbouncer: server_login_retry" not in proc.stdout  # the lab's own has 1 s
    plain = fleet.cli("status")
    assert plain.returncode == 0 and "NODE" in plain.stdout and "PGBOUNCER" in plain.stdout


def test_healthy_pair_without_pgbouncers_passes_check(fleet, tmp_path):
    text = fleet.inventory.read_text().split("[pgbouncer")[0] + "[replication]\nuser = replicator\n"
    (tmp_path / "nodes.ini").write_text(text)
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nodes.ini"), "status", "--check"])
    assert result.exit_code == 0, result.output
    assert "no problems" in result.output


def test_unreachable_pgbouncer_host_and_stopped_standby_are_reported_not_fatal(fleet):
    fleet.sshd.stop()
    fleet.lab.nodes["konpaku"].stop()
    try:
        proc = fleet.cli("status", "--json")
        assert proc.returncode == 0, out(proc)
        doc = json.loads(proc.stdout)
    finally:
        fleet.lab.nodes["konpaku"].start()
        fleet.sshd.start()
    nodes = {n["name"]: n for n in doc["nodes"]}
    bouncers = {b["name"]: b for b in doc["pgbouncers"]}
    assert nodes["konpaku"]["role"] == "down" and "Connection refused" in nodes["konpaku"]["error"]
    assert bouncers["meta.sr.ht"]["reachable"] is False and "meta.sr.ht" in bouncers["meta.sr.ht"]["error"]
    assert bouncers["git.sr.ht"]["target"] == "remilia"
    critical = [(p["subject"], p["message"]) for p in doc["problems"] if p["severity"] == "critical"]
    assert ("node konpaku", nodes["konpaku"]["error"]) in [(s, m.split("does not answer: ")[-1]) for s, m in critical]
    assert any(s == "pgbouncer meta.sr.ht" for s, _ in critical)


def test_inactive_slot_retaining_wal_is_flagged_with_the_command_to_drop_it(fleet):
    primary = fleet.lab.nodes["remilia"].admin_dsn
    q(primary, "SELECT pg_create_physical_replication_slot('ghost', true)")
    try:
        q(primary, "SELECT pg_switch_wal()")
        proc = fleet.cli("status")
    finally:
        q(primary, "SELECT pg_drop_replication_slot('ghost')")
    assert "ghost (INACTIVE" in proc.stdout
    assert "slot 'ghost' has no consumer" in proc.stdout and "pg_drop_replication_slot('ghost')" in proc.stdout


def test_paused_and_not_reloaded_pgbouncers_are_flagged(fleet):
    git = fleet.lab.extra_bouncers["git.sr.ht"]
    original = git.config_path.read_text()
    git.config_path.write_text(repoint(original, fleet.lab.nodes["konpaku"].target))
    # PgBouncer 1.18 reports a paused database (a global PAUSE needs SHOW STATE, 1.19+).
    Admin(git.admin_dsn).pause("srht")
    try:
        doc = status(fleet)
    finally:
        Admin(git.admin_dsn).resume("srht")
        git.config_path.write_text(original)
    g = next(b for b in doc["pgbouncers"] if b["name"] == "git.sr.ht")
    assert g["paused"] is True and g["target"] == "remilia" and g["file_target"] == "konpaku"
    messages = [p["message"] for p in doc["problems"] if p["subject"] == "pgbouncer git.sr.ht"]
    assert any("PAUSED" in m for m in messages) and any("not reloaded" in m for m in messages)


def test_the_slot_query_of_each_major_runs_on_the_lab_and_wal_status_only_from_13(fleet):
    """Before PostgreSQL 13, pg_replication_slots has no wal_status: selecting it made every node observe
    as down. The query for a server below 13 (no such server here) runs on the lab's and gives NULL."""
    from srht_readonly.ops.observe import slots_query

    remilia = fleet.lab.nodes["remilia"].admin_dsn
    (version,) = q(remilia, "SELECT current_setting('server_version_num')::int")[0]
    assert version >= 130000
    assert "wal_status" not in slots_query("pg_current_wal_lsn()", 120000)
    old = q(remilia, slots_query("pg_current_wal_lsn()", 120000))
    new = q(remilia, slots_query("pg_current_wal_lsn()", version))
    assert [r[0] for r in old] == [r[0] for r in new] == ["konpaku"]
    assert old[0][4] is None and new[0][4] == "reserved"
    assert {s["name"]: s["wal_status"] for s in
            {n["name"]: n for n in status(fleet)["nodes"]}["remilia"]["slots"]} == {"konpaku": "reserved"}


def test_slow_primary_is_a_warning_above_the_inventorys_slow_commit_and_nothing_below():
    from srht_readonly.ops.inventory import InventoryError, parse
    from srht_readonly.ops.status import commit_problems

    (slow,) = commit_problems("remilia", 0.35, 0.1)
    assert slow.severity == "warning" and slow.subject == "node remilia"
    assert slow.message.startswith("is slow: a tiny commit takes 350 ms (median of 3; [status] slow-commit = 0.1 s)")
    assert commit_problems("remilia", 0.002, 0.1) == [] and commit_problems("remilia", 0.1, 0.1) == []
    node = "[node remilia]\ndsn = host=127.0.0.1 port=5432\ndata = /var/lib/postgresql/15/main\n"
    assert parse(node).status.slow_commit == 0.1  # the default
    assert parse(node + "[status]\nslow-commit = 0.5   ; a ZFS pool\n").status.slow_commit == 0.5
    for bad in ("0", "-1", "fast"):
        with pytest.raises(InventoryError, match="slow-commit must be a number of seconds above 0"):
            parse(node + f"[status]\nslow-commit = {bad}\n")
    with pytest.raises(InventoryError, match="unknown key 'slow-commits' in \\[status\\]; did you mean 'slow-commit'"):
        parse(node + "[status]\nslow-commits = 0.5\n")


def test_status_times_a_commit_on_the_primary(fleet):
    doc = status(fleet)
    assert 0 < doc["commit_seconds"] < 1, doc["commit_seconds"]
    assert not [p for p in doc["problems"] if "a tiny commit" in p["message"]]
