"""``upgrade --minor`` and ``upgrade --host``: work on each node while it is the standby, on real servers.

One lab for the module: a primary, a streaming standby, three PgBouncers (one over a real sshd).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.load import WriteLoad
from tests._fleet import out, q, roles, unchanged
from tests._majors import new_major_bin

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})


def test_minor_refuses_binaries_of_another_major(fleet):
    proc = fleet.cli("upgrade", "--minor", "remilia", "--bin", str(new_major_bin()), "--yes")
    assert proc.returncode == 1, out(proc)
    assert "holds PostgreSQL 18 and remilia's data is 15: that is a major upgrade" in proc.stderr
    unchanged(fleet)


def test_host_needs_a_command_or_the_operator(fleet):
    proc = fleet.cli("upgrade", "--host", "konpaku", "--yes")
    assert proc.returncode == 2 and "--run COMMAND or --wait" in proc.stderr, out(proc)


def test_minor_all_under_8_writers_restarts_both_nodes_with_no_failed_write_and_roles_as_before(fleet):
    before = {n: fleet.lab.nodes[n].server.postmaster_pid() for n in fleet.lab.nodes}
    WriteLoad.create_table(fleet.lab.nodes["remilia"].dsn)
    load = WriteLoad([b.dsn for b in fleet.lab.bouncers], clients=8, pause=0.01)
    load.start()
    time.sleep(0.5)
    try:
        proc = fleet.cli("upgrade", "--minor", "remilia", "--bin", "/usr/lib/postgresql/15/bin", "--all",
                         "--yes", "--json")
    finally:
        time.sleep(0.5)
        report = load.stop()
    assert proc.returncode == 0, out(proc)
    result = json.loads(proc.stdout)
    lost = report.lost(fleet.lab.nodes["remilia"].dsn)
    print(f"\nminor --all: switchovers {result['switchovers']}, {report.acknowledged} writes, "
          f"{len(report.failures)} failed, {len(lost)} lost")
    assert report.failures == [] and lost == [] and report.acknowledged > 100
    assert [(s["from"], s["to"]) for s in result["switchovers"]] == [("remilia", "konpaku"), ("konpaku", "remilia")]
    after = {n: fleet.lab.nodes[n].server.postmaster_pid() for n in fleet.lab.nodes}
    assert all(after[n] != before[n] for n in before), "each node was restarted"
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    fleet.lab.wait_caught_up()


def test_host_stops_postgresql_and_the_pgbouncer_on_that_host_while_the_command_runs(fleet, tmp_path):
    """konpaku and meta.sr.ht's PgBouncer share a host (one ssh destination): both are stopped while the
    command runs there, both run again afterwards, and writes through the other PgBouncers never fail."""
    text = Path(fleet.inventory).read_text()
    alias = re.search(r"\[pgbouncer meta\.sr\.ht\]\nssh = (\S+)", text).group(1)
    shared = tmp_path / "shared-host.ini"
    shared.write_text(text.replace("[node konpaku]\n", f"[node konpaku]\nssh = {alias}\n"))
    konpaku = fleet.lab.nodes["konpaku"]
    meta = next(b for b in fleet.lab.bouncers if b.name == "meta.sr.ht")
    seen = tmp_path / "seen"
    seen.touch(mode=0o666)
    check = (f"test -e {konpaku.server.data}/postmaster.pid && echo pg-running || echo pg-stopped; "
             f"test -e {Path(meta.config_path).parent}/pgbouncer.pid && echo bouncer-running || echo bouncer-stopped")
    others = [b.dsn for b in fleet.lab.bouncers if b.name != "meta.sr.ht"]
    WriteLoad.create_table(fleet.lab.nodes["remilia"].dsn)
    load = WriteLoad(others, clients=4, pause=0.01)
    load.start()
    try:
        proc = fleet.cli("--config", str(shared), "upgrade", "--host", "konpaku", "--run",
                         f"({check}) > {seen}; sleep 1", "--yes")
    finally:
        report = load.stop()
    assert proc.returncode == 0, out(proc)
    assert seen.read_text().split() == ["pg-stopped", "bouncer-stopped"]
    assert report.failures == [] and report.lost(fleet.lab.nodes["remilia"].dsn) == []
    assert q(meta.dsn, "SELECT 1") == [(1,)]  # started again
    assert q(konpaku.admin_dsn, "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
    unchanged(fleet)
