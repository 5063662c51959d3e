"""``srht-readonly lab up|down`` as a user runs it: a subprocess that returns, servers left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2

from srht_readonly.ops.inventory import load
from srht_readonly.testing.lab import Lab
from tests._majors import new_major_bin

CLI = [str(Path(sys.executable).with_name("srht-readonly"))]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_lab_up_prints_roles_and_urls_and_down_removes_everything():
    # Not pytest's tmp_path: its parents are private to root, and the servers run as postgres.
    directory = Path(tempfile.mkdtemp(prefix="srht-cli-lab-"))
    up = _cli("lab", "up", "--dir", str(directory), "--json")
    assert up.returncode == 0, up.stderr
    desc = json.loads(up.stdout)
    roles = {s["name"]: s["role"] for s in desc["servers"]}
    assert roles == {"remilia": "primary", "konpaku": "standby", "pgbouncer": "pgbouncer -> remilia"}
    assert all(s["url"].startswith("postgresql://") for s in desc["servers"])
    assert set(load(desc["inventory"]).nodes) == {"remilia", "konpaku"}  # an inventory for --config
    assert load(desc["inventory"]).backup is not None  # Barman runs: backup and past can be tried
    try:
        bouncer = next(s for s in desc["servers"] if s["name"] == "pgbouncer")
        with psycopg2.connect(bouncer["url"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            assert cur.fetchone() == (False,)
        conn.close()
        again = _cli("lab", "up", "--dir", str(directory))
        assert again.returncode == 0 and "already up" in again.stdout
        assert f"inventory: {desc['inventory']}" in again.stdout
    finally:
        down = _cli("lab", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not directory.exists()
    leftovers = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, text=True).stdout
    assert leftovers == ""  # Barman's receive-wal and pg_receivewal among them
    assert not Path(f"/dev/shm/srht-readonly-past-{directory.name}").exists()


def test_lab_up_agents_the_agent_beats_fails_the_pgbouncer_over_and_down_stops_it_and_etcd():
    """``--agents``: etcd and an agent beside the PgBouncer, left running; ``status`` through the printed
    inventory shows the agent's heartbeat; the primary killed, the agent points the PgBouncer at the
    standby; ``lab down`` leaves no process behind."""
    directory = Path(tempfile.mkdtemp(prefix="srht-cli-lab-"))
    try:
        up = _cli("lab", "up", "--dir", str(directory), "--no-backup", "--agents", "--json")
        assert up.returncode == 0, up.stderr
        desc = json.loads(up.stdout)
        assert set(desc["agents"]) == {"pgbouncer"} and len(desc["etcd"]) == 1, desc
        assert load(desc["inventory"]).etcd.endpoints == tuple(desc["etcd"])
        again = _cli("lab", "up", "--dir", str(directory), "--agents")
        assert again.returncode == 0 and "already up" in again.stdout and "agent      beside pgbouncer" in again.stdout
        assert json.loads((directory / "agents.json").read_text())["agents"] == desc["agents"]  # not started twice

        def status() -> dict:
            proc = _cli("--config", desc["inventory"], "status", "--json")
            assert proc.returncode in (0, 1), proc.stderr
            return json.loads(proc.stdout)

        deadline = time.monotonic() + 10
        while (status()["agents"] or {}).get("pgbouncer", {}).get("state") != "home":
            assert time.monotonic() < deadline, status()
            time.sleep(0.3)
        Lab.attach(directory).nodes["remilia"].kill()
        deadline = time.monotonic() + 15
        while [b["target"] for b in status()["pgbouncers"]] != ["konpaku"]:
            assert time.monotonic() < deadline, (directory / "agents" / "pgbouncer.log").read_text()
            time.sleep(0.5)
        assert "away: pgbouncer -> konpaku" in (directory / "agents" / "pgbouncer.log").read_text()
        beat = status()["agents"]["pgbouncer"]
        assert beat["state"] == "away" and "remilia has not answered for 1 s" in beat["why"], beat  # why it moved
    finally:
        down = _cli("lab", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not directory.exists()
    leftovers = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True).stdout
    assert leftovers == "", leftovers  # etcd and the agent among them


def test_lab_up_with_pg_bin_runs_that_postgresql_and_its_inventory_drives_the_cli():
    """``--pg-bin``: every node runs PostgreSQL 18; ``--json``'s inventory names that bin for each node, and
    ``srht-readonly --config INVENTORY status`` sees the lab through it."""
    bin_dir = new_major_bin()
    directory = Path(tempfile.mkdtemp(prefix="srht-cli-lab-"))
    try:
        up = _cli("lab", "up", "--dir", str(directory), "--pg-bin", str(bin_dir), "--no-backup", "--json")
        assert up.returncode == 0, up.stderr
        desc = json.loads(up.stdout)
        assert {s["name"]: s.get("bin") for s in desc["servers"]} == {
            "remilia": str(bin_dir), "konpaku": str(bin_dir), "pgbouncer": None}
        assert {spec.bin for spec in load(desc["inventory"]).nodes.values()} == {str(bin_dir)}
        status = _cli("--config", desc["inventory"], "status", "--json")
        assert status.returncode == 0, status.stderr
        nodes = {n["name"]: n for n in json.loads(status.stdout)["nodes"]}
        assert {n: (s["role"], int(s["settings"]["server_version_num"]) // 10000) for n, s in nodes.items()} == {
            "remilia": ("primary", 18), "konpaku": ("standby", 18)}
    finally:
        down = _cli("lab", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not directory.exists()


def test_lab_up_with_a_pg_bin_that_holds_no_postgresql_says_so(tmp_path):
    up = _cli("lab", "up", "--dir", str(tmp_path / "lab"), "--pg-bin", str(tmp_path))
    assert up.returncode != 0 and "pg_ctl" in up.stderr and str(tmp_path) in up.stderr
    assert "Traceback" not in up.stderr and not (tmp_path / "lab").exists()


def test_lab_down_without_a_lab_says_so(tmp_path):
    down = _cli("lab", "down", "--dir", str(tmp_path / "nothing"))
    assert down.returncode == 0
    assert "no lab in" in down.stderr


def test_lab_help_explains_with_an_example():
    out = _cli("lab", "--help").stdout
    assert "srht-readonly lab up" in out and "down" in out
    assert os.path.basename(CLI[0]) == "srht-readonly"


def test_lab_up_in_a_directory_the_servers_cannot_reach_says_why(tmp_path):
    up = _cli("lab", "up", "--dir", str(tmp_path / "lab"))
    assert up.returncode != 0
    assert "cannot write" in up.stderr and "/tmp" in up.stderr
    assert "Traceback" not in up.stderr
