"""Helpers shared by the operations CLI tests (tests/test_ops_*.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psycopg2

from srht_readonly.ops.console import Admin
from srht_readonly.testing.deployment import LabFleet
from srht_readonly.testing.lab import APP_DB


def q(dsn: str, statement: str, params: tuple = ()) -> list[tuple]:
    """Run one statement in its own autocommit connection."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def running_ports(fleet: LabFleet) -> dict[str, int]:
    """Which port each PgBouncer's application database points at, per SHOW DATABASES."""
    return {b.name: int(Admin(b.admin_dsn).databases()[APP_DB]["port"]) for b in fleet.lab.bouncers}


def file_ports(fleet: LabFleet) -> dict[str, set[str]]:
    """Which ports each PgBouncer's config file names."""
    return {b.name: set(re.findall(r"port=(\d+)", Path(b.config_path).read_text().split("[pgbouncer]")[0]))
            for b in fleet.lab.bouncers}


def reloads(fleet: LabFleet) -> dict[str, int]:
    """How many RELOADs each PgBouncer has logged so far."""
    return {b.name: Path(b.config_path).with_name("pgbouncer.log").read_text().count("RELOAD command issued")
            for b in fleet.lab.bouncers}


def status(fleet: LabFleet) -> dict[str, Any]:
    proc = fleet.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def roles(fleet: LabFleet) -> dict[str, str]:
    return {n: fleet.lab.nodes[n].role() for n in fleet.lab.nodes}


def out(proc: Any) -> str:
    """stdout and stderr of a CLI run, for assertions and failure messages."""
    return f"{proc.stdout}\n{proc.stderr}"


def unchanged(fleet: LabFleet) -> None:
    """Nothing moved: roles, running targets, config files, no PgBouncer paused, no stray slot."""
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
    port = str(fleet.lab.nodes["remilia"].port)
    assert set(running_ports(fleet).values()) == {int(port)}
    assert all(port in ports for ports in file_ports(fleet).values())
    for b in fleet.lab.bouncers:
        assert not any(int(r["paused"]) for r in Admin(b.admin_dsn).show("DATABASES"))
        assert q(b.dsn, "SELECT 1") == [(1,)]  # not left paused: a query goes through at once
    slots = q(fleet.lab.nodes["konpaku"].admin_dsn, "SELECT slot_name FROM pg_replication_slots")
    assert slots == []
