"""The operations CLI on the second PostgreSQL major installed here, 18 (scripts/bootstrap installs it;
missing, the test fails and says so). Every other test runs on the default major, 15, where each of
these procedures has tests of its own; this walk on 15 too would repeat them (11 s of the suite).

One lab per major and one test that walks every procedure in turn on it, as an operator would run
them: ``status``, ``standby prepare``, ``switchover``, then the unplanned path back (``failover``,
the primary killed, ``promote``, ``demote`` with a rewind) and ``status`` again. Each procedure's
refusals and failure paths are tested, on the default major, in its own tests/test_ops_*.py.
"""

from __future__ import annotations

import json

import pytest

from srht_readonly.testing.deployment import LabFleet, fleet_fixture
from tests._fleet import out, q, roles, running_ports, status
from tests._majors import new_major_bin

# One PgBouncer over ssh; both nodes local (each procedure over ssh to a node costs seconds, and the
# ssh paths are the default major's tests' subject).
fleet = fleet_fixture("module", over_ssh=("meta.sr.ht",), databases={"meta.sr.ht": ["srht"]})

MAJORS = [pytest.param(new_major_bin, id="pg18")]


def _run(fleet: LabFleet, *args: str):  # type: ignore[no-untyped-def]
    proc = fleet.cli(*args, "--yes")
    assert proc.returncode == 0, out(proc)
    return proc


def _write(fleet: LabFleet, step: str) -> None:
    """A write through the default PgBouncer: it reaches a primary that takes writes."""
    q(fleet.lab.pgbouncer.dsn, "INSERT INTO walk VALUES (%s)", (step,))


@pytest.mark.parametrize("fleet", MAJORS, indirect=True)
def test_status_prepare_switchover_failover_promote_demote_in_turn(fleet):
    lab = fleet.lab
    remilia, konpaku = lab.nodes["remilia"], lab.nodes["konpaku"]
    major = remilia.server.major()

    doc = status(fleet)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert {name: (n["role"], int(n["settings"]["server_version_num"]) // 10000) for name, n in nodes.items()} \
        == {"remilia": ("primary", major), "konpaku": ("standby", major)}
    assert [(s["name"], s["wal_status"]) for s in nodes["remilia"]["slots"]] == [("konpaku", "reserved")]
    assert nodes["konpaku"]["upstream"] == "remilia"
    assert [p for p in doc["problems"] if p["severity"] == "critical"] == []

    q(lab.pgbouncer.dsn, "CREATE TABLE walk (step text)")
    _write(fleet, "before")
    prepared = _run(fleet, "standby", "prepare", "konpaku", "--from", "remilia", "--force")
    assert "konpaku is a streaming hot standby of remilia (timeline 1, same databases)" in prepared.stdout

    _run(fleet, "switchover", "--to", "konpaku")
    assert roles(fleet) == {"remilia": "standby", "konpaku": "primary"}
    _write(fleet, "switched")

    lab.wait_caught_up(timeout=10)
    _run(fleet, "failover", "--to", "remilia")
    assert set(running_ports(fleet).values()) == {remilia.port}
    konpaku.kill()
    promoted = json.loads(_run(fleet, "promote", "remilia", "--json").stdout)
    assert promoted["timeline_after"] == 3  # 1, the switchover's 2, this one
    _write(fleet, "promoted")
    demoted = _run(fleet, "demote", "konpaku", "--primary", "remilia")
    assert "konpaku streams from remilia and has caught up" in demoted.stdout, out(demoted)
    assert "rewound with pg_rewind" in demoted.stdout  # it had crashed: single-user recovery, then pg_rewind

    nodes = {n["name"]: n for n in status(fleet)["nodes"]}
    assert (nodes["remilia"]["role"], nodes["konpaku"]["role"], nodes["konpaku"]["upstream"]) \
        == ("primary", "standby", "remilia")
    assert nodes["remilia"]["timeline"] == nodes["konpaku"]["timeline"] == 3
    lab.wait_caught_up(timeout=10)
    assert q(konpaku.dsn, "SELECT step FROM walk ORDER BY step") == [("before",), ("promoted",), ("switched",)]
