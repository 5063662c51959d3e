"""The lab is real: replication, PgBouncer, read-only refusals, promotion, teardown."""

from __future__ import annotations

import json
import subprocess
import time

import psycopg2
import pytest

from srht_readonly.ops import sql
from srht_readonly.ops.errors import ToolMissing
from srht_readonly.ops.inventory import load
from srht_readonly.ops.postgres import find_bin_dir
from srht_readonly.testing import Lab, LabNode
from tests._majors import new_major_bin


def _exec(dsn: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


def test_write_on_primary_is_readable_on_standby_within_one_second(srht_lab):
    _exec(srht_lab.primary.dsn, "CREATE TABLE IF NOT EXISTS lab_rep (v text)")
    marker = f"m{time.monotonic_ns()}"
    _exec(srht_lab.primary.dsn, "INSERT INTO lab_rep VALUES (%s)", (marker,))
    written = time.monotonic()
    while time.monotonic() - written < 1.0:
        try:
            if _exec(srht_lab.standby.dsn, "SELECT 1 FROM lab_rep WHERE v = %s", (marker,)):
                break
        except psycopg2.errors.UndefinedTable:
            pass  # the CREATE TABLE itself is not replayed yet: that is part of the same second
        time.sleep(0.01)
    else:
        pytest.fail("the standby did not show the primary's write within 1 s")


def test_write_through_pgbouncer_lands_on_primary(srht_lab):
    (port,) = _exec(srht_lab.pgbouncer.dsn, "SELECT inet_server_port()")[0]
    assert port == srht_lab.primary.port
    _exec(srht_lab.pgbouncer.dsn, "CREATE TABLE IF NOT EXISTS lab_bouncer (v text)")
    _exec(srht_lab.pgbouncer.dsn, "INSERT INTO lab_bouncer VALUES ('through-pgbouncer')")
    assert _exec(srht_lab.primary.dsn, "SELECT count(*) FROM lab_bouncer WHERE v = 'through-pgbouncer'")[0][0] >= 1


def test_pgbouncer_pools_in_transaction_mode(srht_lab):
    assert srht_lab.pgbouncer.admin.config()["pool_mode"] == "transaction"


def test_standby_refuses_writes_with_25006(srht_lab):
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction) as info:
        _exec(srht_lab.standby.dsn, "CREATE TABLE refused (v int)")
    assert info.value.pgcode == "25006"


def test_readonly_db_fixture_refuses_writes_with_25006(srht_readonly_db):
    with pytest.raises(psycopg2.Error) as info:
        _exec(srht_readonly_db.dsn, "CREATE TABLE refused (v int)")
    assert info.value.pgcode == "25006"
    assert _exec(srht_readonly_db.dsn, "SELECT 1") == [(1,)]


def test_promotion_makes_standby_writable_and_bumps_timeline(srht_fresh_lab):
    lab = srht_fresh_lab
    standby = lab.standby
    before = sql.timeline(standby.admin_dsn)
    promotion = lab.promote(standby)
    assert promotion.timeline_before == before
    assert promotion.timeline_after == before + 1
    assert standby.role() == "primary"
    _exec(standby.dsn, "CREATE TABLE after_promotion (v int)")
    _exec(standby.dsn, "INSERT INTO after_promotion VALUES (1)")


def test_pgbouncer_follows_a_repoint(srht_fresh_lab):
    lab = srht_fresh_lab
    new = lab.standby
    lab.promote(new)
    lab.pgbouncer.point_at(new)
    assert _exec(lab.pgbouncer.dsn, "SELECT inet_server_port()")[0][0] == new.port


def test_killed_primary_rejoins_as_standby_with_pg_rewind(srht_fresh_lab):
    lab = srht_fresh_lab
    old, new = lab.primary, lab.standby
    _exec(old.dsn, "CREATE TABLE diverge (v int)")
    old.kill()
    assert old.role() == "down"
    lab.promote(new)
    _exec(new.dsn, "CREATE TABLE IF NOT EXISTS diverge (v int)")
    _exec(new.dsn, "INSERT INTO diverge VALUES (42)")
    lab.rejoin(old)
    assert old.role() == "standby"
    deadline = time.monotonic() + 5
    while not _exec(old.dsn, "SELECT 1 FROM diverge WHERE v = 42"):
        assert time.monotonic() < deadline, "the rejoined node did not replay the new primary's write"
        time.sleep(0.05)


def test_teardown_after_a_failing_test_leaves_nothing_running(pytester, tmp_path):
    marker = tmp_path / "lab-dir"
    pytester.makepyfile(
        f"""
        def test_fails(srht_fresh_lab):
            open({str(marker)!r}, "w").write(str(srht_fresh_lab.directory))
            assert False, "deliberate"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    directory = marker.read_text()
    leftovers = subprocess.run(["pgrep", "-f", directory], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running from {directory}: {leftovers}"
    assert not __import__("os").path.exists(directory)


def test_base_backup_reports_progress_to_its_callback(srht_lab, tmp_path):
    from srht_readonly.ops import replication
    from srht_readonly.ops.postgres import PostgresServer

    target = PostgresServer(srht_lab.directory / "extra-backup", bin=srht_lab.bin, os_user=srht_lab.os_user)
    seen: list[tuple[int, int]] = []
    try:
        replication.base_backup(target, srht_lab.replication_conninfo(srht_lab.primary) % "extra",
                                progress=lambda done, total: seen.append((done, total)))
        assert seen, "pg_basebackup reported no progress"
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1][0] == seen[-1][1] > 0
        assert (target.data / "PG_VERSION").exists()
    finally:
        import shutil

        shutil.rmtree(target.data, ignore_errors=True)


def test_a_base_backup_that_stalls_without_a_word_is_killed_at_its_timeout(tmp_path):
    import socket

    from srht_readonly.ops import replication
    from srht_readonly.ops.errors import CommandFailed
    from srht_readonly.ops.postgres import PostgresServer

    # A "primary" that accepts the connection and never answers: pg_basebackup prints nothing at all.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        target = PostgresServer(tmp_path / "data", os_user="root")
        started = time.monotonic()
        with pytest.raises(CommandFailed, match="no progress: killed after 2 s"):
            replication.base_backup(target, f"host=127.0.0.1 port={port} user=x connect_timeout=0", timeout=2)
        assert time.monotonic() - started < 10


def test_on_the_new_major_the_lab_replicates_promotes_and_rejoins_a_killed_primary_with_pg_rewind():
    """The lab on PostgreSQL 18 (scripts/bootstrap installs it): the version-gated settings, checksums off as on
    the default major, and the lab's own procedures (promote; crash recovery and pg_rewind for the rejoin)."""
    bin_dir = new_major_bin()
    with Lab(pg_bin=bin_dir) as lab:
        old, new = lab.primary, lab.standby
        assert {n.server.bin for n in lab.nodes.values()} == {bin_dir}
        for node in (old, new):
            assert _exec(node.admin_dsn, "SELECT current_setting('server_version_num')::int / 10000, "
                                         "current_setting('data_checksums'), current_setting('wal_keep_size')") \
                == [(18, "off", "64MB")]
        _exec(lab.pgbouncer.dsn, "CREATE TABLE on_18 (v int)")
        lab.wait_caught_up(timeout=10)
        assert lab.promote(new).timeline_after == 2
        _exec(old.dsn, "CREATE TABLE diverge (v int)")  # after the fork: only the old primary has it
        old.kill()
        lab.pgbouncer.point_at(new)
        _exec(lab.pgbouncer.dsn, "INSERT INTO on_18 VALUES (42)")
        lab.rejoin(old)
        assert old.role() == "standby"
        lab.wait_caught_up(timeout=10)
        assert _exec(old.dsn, "SELECT v FROM on_18") == [(42,)]
        assert _exec(old.dsn, "SELECT to_regclass('diverge') IS NULL") == [(True,)]  # rewound away
        attached = Lab.attach(lab.directory)
        assert {n.server.bin for n in attached.nodes.values()} == {bin_dir}


def test_each_node_keeps_its_own_binaries_in_lab_json_and_in_the_inventory(tmp_path):
    """After one node's major upgrade (``set_bin``), ``Lab.attach`` (``lab down``) and the inventory drive each
    node with its own binaries; a lab.json from before per-node binaries still attaches."""
    default, new = find_bin_dir(None), new_major_bin()
    lab = Lab(tmp_path, pg_bin=default)
    lab.nodes = {name: LabNode(lab, name, port) for name, port in (("remilia", 5001), ("konpaku", 5002))}
    lab.set_bin("konpaku", new)
    state = json.loads((tmp_path / "lab.json").read_text())
    assert state["nodes"] == {"remilia": {"port": 5001, "bin": str(default)},
                              "konpaku": {"port": 5002, "bin": str(new)}}
    attached = Lab.attach(tmp_path)
    assert {name: n.server.bin for name, n in attached.nodes.items()} == {"remilia": default, "konpaku": new}
    inventory = load(attached.write_inventory(tmp_path / "readonly.ini"))
    assert {name: spec.bin for name, spec in inventory.nodes.items()} == {"remilia": str(default), "konpaku": str(new)}
    with pytest.raises(ToolMissing):
        lab.set_bin("remilia", tmp_path)  # no pg_ctl there: refused, nothing saved
    assert json.loads((tmp_path / "lab.json").read_text()) == state
    state["nodes"] = {"remilia": 5001, "konpaku": 5002}  # the format before
    (tmp_path / "lab.json").write_text(json.dumps(state))
    assert {n.server.bin for n in Lab.attach(tmp_path).nodes.values()} == {default}
