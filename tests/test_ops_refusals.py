"""Refusals and failure paths of the procedures, on real servers: each names its cause and changes nothing.

Every test breaks one thing on the lab (a server stopped, replication cut or held back, a wrong
inventory, a PgBouncer left paused, ``wal_log_hints`` off, a split brain), runs the command as an
operator would, puts the lab back in ``finally`` (remilia primary, konpaku streaming from it,
every PgBouncer on remilia and running), and only then judges: the exit status, the words naming
the cause, and that nothing moved (``unchanged``). The fixture is shared by the whole module.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from srht_readonly.ops import replication, sql
from srht_readonly.ops.console import Admin
from srht_readonly.ops.ports import free_port
from srht_readonly.testing.deployment import LabFleet, fleet_fixture
from srht_readonly.testing.servers import LabNode
from tests._fleet import file_ports, out, q, reloads, roles, running_ports, unchanged

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})

BOTH_PRIMARY = {"remilia": "primary", "konpaku": "primary"}


@pytest.fixture(scope="module", autouse=True)
def quick_reconnect(fleet):
    """konpaku retries a lost primary every 0.2 s instead of 5 s: only so this file runs faster."""
    konpaku = fleet.lab.nodes["konpaku"]
    konpaku.server.set_settings({"wal_retrieve_retry_interval": "200ms"})
    q(konpaku.admin_dsn, "SELECT pg_reload_conf()")
    yield
    konpaku.server.set_settings({"wal_retrieve_retry_interval": None})
    if konpaku.is_running():
        q(konpaku.admin_dsn, "SELECT pg_reload_conf()")


# --- breaking one thing, and putting it back --------------------------------------------------


@contextlib.contextmanager
def settings(node: LabNode, changes: dict[str, object], *, restart: bool = False) -> Iterator[None]:
    """``changes`` in ``node``'s postgresql.auto.conf (reloaded, or restarted), the file put back after."""
    original = (node.server.data / "postgresql.auto.conf").read_text()
    node.server.set_settings(changes)
    _apply(node, restart)
    try:
        yield
    finally:
        node.server.write_file("postgresql.auto.conf", original)
        _apply(node, restart)


def _apply(node: LabNode, restart: bool) -> None:
    if restart:
        node.stop("fast")
        node.start()
    else:
        q(node.admin_dsn, "SELECT pg_reload_conf()")


@contextlib.contextmanager
def stopped(node: LabNode) -> Iterator[None]:
    node.stop("fast")
    try:
        yield
    finally:
        node.start()


@contextlib.contextmanager
def receiver_stopped(node: LabNode) -> Iterator[None]:
    """``node``'s WAL receiver stopped (``primary_conninfo = ''``, reloaded); it streams again after."""
    with settings(node, {"primary_conninfo": ""}):
        sql.wait_until(lambda: sql.query(node.admin_dsn, "SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)],
                       timeout=15, what=f"{node.name}'s WAL receiver to stop")
        yield


def wait_control(node: LabNode, key: str, value: str) -> None:
    """Wait until ``node``'s pg_controldata says ``key: value``."""
    sql.wait_until(lambda: node.server.controldata().get(key) == value, timeout=30,
                   what=f"{node.name}'s control file to say {key}: {value}")


def inventory_with(fleet: LabFleet, path: Path, node: str, values: dict[str, str]) -> Path:
    """A copy of the fleet's inventory with ``values`` replacing those of ``[node NAME]``."""
    lines, section, replaced = [], None, set()
    for line in fleet.inventory.read_text().splitlines():
        if line.startswith("["):
            section = line.strip()
        key = line.partition("=")[0].strip()
        if section == f"[node {node}]" and key in values:
            line = f"{key} = {values[key]}"
            replaced.add(key)
        lines.append(line)
    assert replaced == set(values), f"the inventory has no {set(values) - replaced} in [node {node}]"
    path.write_text("\n".join(lines) + "\n")
    return path


def restored(fleet: LabFleet) -> None:
    """The lab is as the module found it: konpaku streams from remilia and caught up, and ``unchanged``."""
    remilia, konpaku = fleet.lab.nodes["remilia"], fleet.lab.nodes["konpaku"]
    upstream = replication.wait_streaming(konpaku.admin_dsn, timeout=30)
    assert upstream == f"{remilia.host}:{remilia.port}", upstream
    replication.wait_caught_up(remilia.admin_dsn, konpaku.admin_dsn, timeout=30)
    unchanged(fleet)


# --- switchover ---------------------------------------------------------------------------------


def test_switchover_refuses_a_target_that_does_not_answer(fleet):
    konpaku = fleet.lab.nodes["konpaku"]
    with stopped(konpaku):
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        assert not konpaku.is_running()  # not started behind our back
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert "konpaku does not answer" in proc.stderr and "a switchover needs a healthy standby" in proc.stderr
    assert "Connection refused" in proc.stderr


def test_switchover_refuses_when_no_primary_answers_and_points_at_the_unplanned_path(fleet):
    remilia = fleet.lab.nodes["remilia"]
    with stopped(remilia):
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        assert fleet.lab.nodes["konpaku"].role() == "standby"  # not promoted
        assert not remilia.is_running()  # not started again either
        assert set(running_ports(fleet).values()) == {remilia.port}
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert "no primary answers: this is not a planned switchover" in proc.stderr
    assert "failover --to konpaku, then promote konpaku" in proc.stderr


def test_switchover_refuses_a_standby_that_does_not_stream(fleet):
    konpaku = fleet.lab.nodes["konpaku"]
    with receiver_stopped(konpaku):
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        assert konpaku.role() == "standby"
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert "konpaku is not streaming from remilia (receiver: none, upstream: none)" in proc.stderr
    assert "fix replication first" in proc.stderr


def test_switchover_refuses_a_standby_lagging_beyond_max_lag(fleet):
    """Replay held back (not paused) by recovery_min_apply_delay at a commit, 3 MB of WAL written after it."""
    remilia, konpaku = fleet.lab.nodes["remilia"], fleet.lab.nodes["konpaku"]
    with settings(konpaku, {"recovery_min_apply_delay": "1h"}):
        sql.wait_until(lambda: sql.query(konpaku.admin_dsn, "SHOW recovery_min_apply_delay") == [("1h",)],
                       timeout=10, what="konpaku to reload")
        time.sleep(0.5)  # the startup process reloads on its own signal, right after the backends
        q(remilia.admin_dsn, "SELECT txid_current()")  # a commit: replay waits before it for an hour
        (after_commit,) = q(remilia.admin_dsn, "SELECT pg_current_wal_insert_lsn()::text")[0]  # not flushed yet
        q(remilia.admin_dsn, "SELECT pg_logical_emit_message(false, 'srht-test', repeat('x', 3 * 1024 * 1024))")
        (written,) = q(remilia.admin_dsn, "SELECT pg_current_wal_insert_lsn()::text")[0]
        sql.wait_until(lambda: sql.query(konpaku.admin_dsn, "SELECT pg_last_wal_receive_lsn() >= %s::pg_lsn",
                                         (written,)) == [(True,)], timeout=10, what="konpaku to receive the WAL")
        held = q(konpaku.admin_dsn, "SELECT pg_last_wal_replay_lsn() < %s::pg_lsn, pg_is_wal_replay_paused()",
                 (after_commit,))
        proc = fleet.cli("switchover", "--to", "konpaku", "--max-lag", "1", "--yes")
        within = fleet.cli("switchover", "--to", "konpaku", "--dry-run")  # the default 16 MB lets it through
    restored(fleet)
    assert held == [(True, False)], "replay was not held back (or was paused): the test proves nothing"
    assert proc.returncode == 1, out(proc)
    behind = re.search(r"konpaku is (\d+\.\d) MB behind remilia; the pause would last until it catches up", proc.stderr)
    assert behind and float(behind.group(1)) >= 3.0, out(proc)
    assert "raise --max-lag" in proc.stderr
    assert within.returncode == 0 and "dry run: nothing was changed" in within.stderr, out(within)


def test_switchover_refuses_when_the_old_primary_cannot_be_driven(fleet, tmp_path):
    """The inventory names a data directory where remilia's is not: pg_controldata cannot run there."""
    wrong = fleet.lab.nodes["remilia"].server.data.with_name("data-moved")
    inventory = inventory_with(fleet, tmp_path / "wrong-data.ini", "remilia", {"data": str(wrong)})
    proc = fleet.cli("--config", str(inventory), "switchover", "--to", "konpaku", "--yes")
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert f"cannot drive remilia's server ({wrong})" in proc.stderr and "pg_controldata" in proc.stderr


def test_switchover_refuses_while_a_pgbouncer_is_already_paused(fleet):
    git = Admin(fleet.lab.extra_bouncers["git.sr.ht"].admin_dsn)
    git.pause("srht")  # PgBouncer 1.18 shows a per-database PAUSE in SHOW DATABASES
    try:
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        left_paused = int(git.databases()["srht"]["paused"])
        assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    finally:
        git.resume("srht")
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert "PgBouncer git.sr.ht is already paused" in proc.stderr and "RESUME it on its console" in proc.stderr
    assert left_paused == 1  # neither resumed nor switched: the operator decides


# --- demote -------------------------------------------------------------------------------------


def test_demote_refuses_an_unreadable_control_file_and_stops_nothing(fleet, tmp_path):
    """konpaku stopped streaming; the inventory's data directory for it holds a pg_control it cannot read."""
    konpaku = fleet.lab.nodes["konpaku"]
    unreadable = konpaku.server.data.with_name("data-unreadable")
    (unreadable / "global").mkdir(parents=True)
    control = unreadable / "global" / "pg_control"
    shutil.copyfile(konpaku.server.data / "global" / "pg_control", control)
    control.chmod(0)
    for path in (unreadable, unreadable / "global", control):
        shutil.chown(path, user=fleet.lab.os_user)
    inventory = inventory_with(fleet, tmp_path / "unreadable.ini", "konpaku", {"data": str(unreadable)})
    try:
        with receiver_stopped(konpaku):
            proc = fleet.cli("--config", str(inventory), "demote", "konpaku", "--primary", "remilia", "--yes")
            assert konpaku.is_running() and konpaku.role() == "standby"  # not stopped, not rewound
    finally:
        shutil.rmtree(unreadable)
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert f"cannot read konpaku's control file in {unreadable}" in proc.stderr
    assert "Permission denied" in proc.stderr


def test_demote_refuses_when_a_rewind_would_be_impossible(fleet):
    """remilia runs without wal_log_hints (no checksums in the lab): konpaku's control file says so once it
    replayed the parameter change, and a demote that may need pg_rewind is refused, konpaku left running."""
    remilia, konpaku = fleet.lab.nodes["remilia"], fleet.lab.nodes["konpaku"]
    assert konpaku.server.controldata()["Data page checksum version"] == "0"
    with settings(remilia, {"wal_log_hints": False}, restart=True):
        wait_control(konpaku, "wal_log_hints setting", "off")
        with receiver_stopped(konpaku):
            proc = fleet.cli("demote", "konpaku", "--primary", "remilia", "--yes")
            assert konpaku.is_running() and konpaku.role() == "standby"
    wait_control(konpaku, "wal_log_hints setting", "on")
    restored(fleet)
    assert proc.returncode == 1, out(proc)
    assert "konpaku has neither wal_log_hints = on nor data checksums" in proc.stderr, out(proc)
    assert "standby prepare konpaku --from remilia --force" in proc.stderr


# --- failover and status on a node whose server does not answer --------------------------------


def test_forced_failover_to_a_node_that_does_not_answer_points_every_pgbouncer_and_warns(fleet):
    remilia, konpaku = fleet.lab.nodes["remilia"], fleet.lab.nodes["konpaku"]
    reloaded = reloads(fleet)
    with stopped(konpaku):
        try:
            proc = fleet.cli("failover", "--to", "konpaku", "--force", "--yes")
            running, files = running_ports(fleet), file_ports(fleet)
        finally:
            back = fleet.cli("failover", "--to", "remilia", "--yes")
            assert back.returncode == 0, out(back)
    restored(fleet)
    assert proc.returncode == 0, out(proc)
    assert "warning: --force: konpaku does not answer; clients will fail until it does" in proc.stderr
    assert "every PgBouncer points at konpaku" in proc.stdout
    assert set(running.values()) == {konpaku.port}
    assert all(ports == {str(konpaku.port)} for name, ports in files.items() if name != "meta.sr.ht")
    assert files["meta.sr.ht"] == {str(konpaku.port), str(remilia.port)}  # its "*" entry stays on remilia
    assert all(reloads(fleet)[n] >= reloaded[n] + 2 for n in reloaded)  # there and back


def test_a_node_on_a_wrong_port_is_reported_by_status_and_refused_by_failover(fleet, tmp_path):
    """Its PostgreSQL does not answer where the inventory says (stopped or moved: the same to ops)."""
    nowhere = free_port()
    inventory = inventory_with(fleet, tmp_path / "wrong-port.ini", "konpaku", {
        "dsn": f"host=127.0.0.1 port={nowhere} user=postgres dbname=postgres",
        "target": f"host=127.0.0.1 port={nowhere}",
    })
    before = {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers}
    reloaded = reloads(fleet)
    report = fleet.cli("--config", str(inventory), "status", "--json")
    proc = fleet.cli("--config", str(inventory), "failover", "--to", "konpaku", "--yes")
    restored(fleet)
    assert report.returncode == 0, out(report)
    doc = json.loads(report.stdout)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["konpaku"]["role"] == "down" and f"port {nowhere} failed" in nodes["konpaku"]["error"]
    assert nodes["remilia"]["role"] == "primary"
    critical = {p["subject"]: p["message"] for p in doc["problems"] if p["severity"] == "critical"}
    assert critical.get("node konpaku", "").startswith("does not answer"), doc["problems"]
    assert {b["target"] for b in doc["pgbouncers"]} == {"remilia"}
    assert proc.returncode == 1, out(proc)
    assert "konpaku does not answer" in proc.stderr and "--force" in proc.stderr
    assert {b.name: b.config_path.read_bytes() for b in fleet.lab.bouncers} == before
    assert reloads(fleet) == reloaded


# --- a split brain (last: it is restored with a forced demote and pg_rewind) --------------------


def test_switchover_refuses_two_primaries_naming_the_split_brain(fleet):
    """konpaku promoted while remilia still takes writes: whichever --to, the refusal must say split brain."""
    fleet.lab.promote("konpaku")
    try:
        procs = {to: fleet.cli("switchover", "--to", to, "--yes") for to in ("konpaku", "remilia")}
        assert roles(fleet) == BOTH_PRIMARY  # nothing stopped, nothing demoted
        assert set(running_ports(fleet).values()) == {fleet.lab.nodes["remilia"].port}
    finally:
        back = fleet.cli("demote", "konpaku", "--primary", "remilia", "--force", "--yes")
        assert back.returncode == 0, out(back)
    restored(fleet)
    for to, proc in procs.items():
        assert proc.returncode == 1, out(proc)
        assert "both primaries" in proc.stderr and "split brain" in proc.stderr, f"--to {to}:\n{out(proc)}"
