"""``backup`` and ``past``: a real Barman (streaming WAL, pg_basebackup) backing up the lab's primary, and
the database opened as it was at a given moment, on real servers.

One lab for the module (``Lab(backup=True)``), its inventory with ``[backup]``; the instances of the
past go to ``/dev/shm`` (another file system than the lab's data, as production should have it).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.testing.lab import Lab
from tests._fleet import q
from tests._majors import new_major_bin

CLI = str(Path(sys.executable).with_name("srht-readonly"))


@pytest.fixture(scope="module")
def lab():
    the_lab = Lab(backup=True)
    try:
        the_lab.start()
        the_lab.inventory = the_lab.write_inventory(the_lab.directory / "readonly.ini")
        q(the_lab.primary.dsn, "CREATE TABLE events (n int PRIMARY KEY)")
        yield the_lab
    finally:
        the_lab.close()


def cli(lab, *args: str, config: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SRHT_READONLY_LOCK_DIR": str(lab.directory)}
    return subprocess.run([CLI, "-c", str(config or lab.inventory), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def clock(lab) -> str:
    return q(lab.primary.dsn, "SELECT clock_timestamp()")[0][0].isoformat()


def insert(lab, numbers) -> None:
    conn = psycopg2.connect(lab.pgbouncer.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for n in numbers:
            cur.execute("INSERT INTO events VALUES (%s)", (n,))
    conn.close()


def in_past(instance: dict, statement: str) -> list[tuple]:
    return q(instance["dsn"].replace("dbname=postgres", "dbname=srht"), statement)


def listed(lab) -> list[dict]:
    proc = cli(lab, "past", "--list", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_backup_status_gives_the_recoverable_window(lab):
    proc = cli(lab, "backup", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    window = json.loads(proc.stdout)
    assert window["engine"] == "barman" and window["streaming"] is True
    assert window["earliest"] and window["latest"] and window["earliest"] < window["latest"]
    assert [b["status"] for b in window["backups"]] == ["DONE"]
    assert "RECOVERY WINDOW OF 7 DAYS" in window["retention"] and window["wal_files"] >= 1
    text = cli(lab, "backup", "status").stdout
    assert text.startswith("recoverable: ") and "WAL streams" in text


def test_backup_now_takes_another_base_backup(lab):
    before = json.loads(cli(lab, "backup", "status", "--json").stdout)["backups"]
    proc = cli(lab, "backup", "now", "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    after = json.loads(cli(lab, "backup", "status", "--json").stdout)
    assert made["status"] == "DONE" and made["id"] not in {b["id"] for b in before}
    assert [b["id"] for b in after["backups"]] == [b["id"] for b in before] + [made["id"]]
    assert after["last_success"] == made["end"]


def test_status_shows_the_window_and_flags_a_stopped_streaming(lab):
    proc = cli(lab, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    past = json.loads(proc.stdout)["past"]
    assert past["engine"] == "barman" and past["streaming"] is True and past["earliest"]
    assert "past data: recoverable: " in cli(lab, "status").stdout
    lab.barman.run("receive-wal", "--stop", "lab")
    try:
        flagged = cli(lab, "status", "--json")
    finally:
        lab.barman.run("cron")
        lab.barman.switch_wal()  # streaming again, and past the segment the stop left open
    doc = json.loads(flagged.stdout)
    assert doc["past"]["streaming"] is False
    assert any(p["subject"] == "backup" and "WAL does not stream to Barman" in p["message"] for p in doc["problems"])


def test_past_at_a_time_between_two_writes_has_exactly_the_rows_committed_by_then(lab):
    insert(lab, range(1, 51))
    q(lab.primary.dsn, "DELETE FROM events WHERE n <= 5")
    at = clock(lab)
    insert(lab, range(51, 81))
    q(lab.primary.dsn, "DELETE FROM events WHERE n <= 10")
    proc = cli(lab, "past", "--at", at, "--json")
    assert proc.returncode == 0, proc.stderr
    opened = json.loads(proc.stdout)
    assert set(opened) >= {"url", "recovered_to", "directory"}
    assert opened["recovered_to"] <= at.replace(" ", "T")
    print(f"\npast --at: opened in {opened['seconds']} s (restore + replay), recovered to {opened['recovered_to']}")
    (instance,) = [i for i in listed(lab) if i["id"] == opened["id"]]
    assert in_past(instance, "SELECT min(n), max(n), count(*) FROM events") == [(6, 50, 45)]
    assert in_past(instance, "SELECT pg_is_in_recovery()") == [(True,)]
    with pytest.raises(psycopg2.Error, match="read-only"):
        in_past(instance, "INSERT INTO events VALUES (1000)")
    assert q(lab.primary.dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name NOT IN ('konpaku', "
                              "'barman')") == [(0,)]  # it took no slot anywhere
    stopped = cli(lab, "past", "--stop", opened["id"])
    assert stopped.returncode == 0 and opened["id"] in stopped.stdout, stopped.stderr
    assert listed(lab) == [] and not Path(opened["directory"]).exists()


def test_refuses_a_time_before_the_earliest_point_or_in_the_future_printing_the_window(lab):
    early = cli(lab, "past", "--at", "2020-01-01T00:00:00Z")
    assert early.returncode == 1 and "before the earliest recoverable point" in early.stderr
    assert "recoverable: " in early.stderr  # the window, printed
    future = cli(lab, "past", "--at", "2099-01-01T00:00:00+00:00")
    assert future.returncode == 1 and "in the future" in future.stderr
    assert listed(lab) == []


def test_refuses_a_past_dir_on_a_nodes_data_volume_and_a_disk_too_small(lab, tmp_path):
    same = lab.directory / "past-here"  # the lab's data directories are on this file system
    same.mkdir()
    shutil.chown(same, lab.os_user)
    config = tmp_path / "same.ini"
    config.write_text(lab.inventory.read_text().replace(f"past-dir = {lab.barman.past_dir}", f"past-dir = {same}"))
    proc = cli(lab, "past", "--at", clock(lab), config=config)
    assert proc.returncode == 1 and "same file system as remilia's data directory" in proc.stderr, proc.stderr
    tiny = Path(tempfile.mkdtemp(prefix="srht-past-tiny-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(tiny)], check=True)
    try:
        shutil.chown(tiny, lab.os_user)
        config.write_text(lab.inventory.read_text().replace(f"past-dir = {lab.barman.past_dir}", f"past-dir = {tiny}"))
        proc = cli(lab, "past", "--at", clock(lab), config=config)
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)
        tiny.rmdir()
    assert proc.returncode == 1 and "not enough free disk" in proc.stderr and "recoverable: " in proc.stderr, \
        proc.stderr


def test_a_malformed_backup_section_is_a_configuration_error(lab, tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text(lab.inventory.read_text().replace("server = lab", "server = two words"))
    proc = cli(lab, "backup", "status", config=config)
    assert proc.returncode == 2 and "is not a Barman server name" in proc.stderr, proc.stderr


def test_a_crash_consistent_snapshot_taken_under_writes_opens_read_only_with_every_row_acknowledged_before(lab):
    """Stands in for a ZFS snapshot (atomic: the files as they are at one instant): every process of the primary
    is stopped with SIGSTOP while the data directory is copied, with a writer running (its INSERT waits), then
    SIGCONT. Without --at the copy opens as it was; with --at it replays Barman's WAL to a later time."""
    primary = lab.primary
    stop_writing = [False]
    acknowledged: list[int] = []

    def writer() -> None:
        conn = psycopg2.connect(lab.pgbouncer.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            n = 1000
            while not stop_writing[0]:
                cur.execute("INSERT INTO events VALUES (%s)", (n,))
                acknowledged.append(n)
                n += 1
        conn.close()

    import threading

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.5)
    snapshot = lab.directory / "snapshot"
    pids = [primary.server.postmaster_pid()] + [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(primary.server.postmaster_pid())], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        frozen = len(acknowledged)
        subprocess.run(["cp", "-a", str(primary.server.data), str(snapshot)], check=True)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)
    at = clock(lab)
    stop_writing[0] = True
    thread.join(10)
    by_then = set(acknowledged)
    proc = cli(lab, "past", "--from-snapshot", str(snapshot), "--json")
    assert proc.returncode == 0, proc.stderr
    (instance,) = listed(lab)
    rows = {r[0] for r in in_past(instance, "SELECT n FROM events WHERE n >= 1000")}
    assert set(acknowledged[:frozen]) <= rows <= by_then, (frozen, len(rows))
    assert in_past(instance, "SELECT pg_is_in_recovery()") == [(True,)]
    assert (snapshot / "PG_VERSION").exists() and not (snapshot / "standby.signal").exists()  # untouched
    later = cli(lab, "past", "--from-snapshot", str(snapshot), "--at", at, "--json")
    assert later.returncode == 0, later.stderr
    replayed = next(i for i in listed(lab) if i["id"] == json.loads(later.stdout)["id"])
    rows_at = {r[0] for r in in_past(replayed, "SELECT n FROM events WHERE n >= 1000")}
    assert rows <= rows_at <= by_then and len(rows_at) >= len(rows)
    assert cli(lab, "past", "--stop").returncode == 0 and listed(lab) == []


def test_the_exporter_serves_the_recoverable_window(lab):
    from srht_readonly.ops.cluster import Cluster
    from srht_readonly.ops.exporter import FleetExporter
    from srht_readonly.ops.inventory import load

    with Cluster(load(lab.inventory)) as cluster:
        exporter = FleetExporter(cluster)
        try:
            exporter.observe()
            metrics = {m.name: m.samples[0].value for m in exporter.collect() if m.samples}
        finally:
            exporter.close()
    assert metrics["srht_readonly_backup_streaming"] == 1
    assert metrics["srht_readonly_backup_window_seconds"] > 0
    assert metrics["srht_readonly_backup_latest_timestamp_seconds"] >= metrics[
        "srht_readonly_backup_earliest_timestamp_seconds"]
    assert time.time() - metrics["srht_readonly_backup_last_success_timestamp_seconds"] < 3600


def test_a_major_upgrades_plan_warns_that_barmans_server_stops_at_the_upgrade(lab):
    # The upgraded cluster has a new system identifier: the [backup] server's streaming ends there
    # (docs/upgrade.md, "Afterwards: the backups"); without a [backup] section no such warning
    # (test_ops_upgrade.py's dry run).
    proc = cli(lab, "upgrade", "--major", "--to-bin", str(new_major_bin()), "--drop-column-option", "pg_attver",
               "--dry-run")
    assert proc.returncode == 0 and "dry run: nothing was changed" in proc.stderr, proc.stdout + proc.stderr
    warning = " ".join(proc.stderr.split())
    assert "[backup]: Barman's server lab follows the cluster being replaced" in warning, proc.stderr
    assert "Afterwards: the backups" in warning


def test_with_no_primary_to_stream_from_a_time_after_the_archive_is_refused(lab):
    """Last in the module: it kills the primary. Barman cannot stream any more (no read-write node), so the
    window ends at the last archived segment, and a moment after it cannot be opened."""
    lab.nodes["remilia"].kill()
    proc = cli(lab, "past", "--at", datetime.datetime.now().astimezone().isoformat())
    assert proc.returncode == 1, proc.stderr
    assert "after the latest recoverable point (WAL does not stream to Barman)" in proc.stderr, proc.stderr
    assert "WAL does NOT stream" in proc.stderr  # the window, printed
    assert listed(lab) == []
