"""``srht-readonly lab up|down`` as a user runs it: a subprocess that returns, servers left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2

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
    try:
        bouncer = next(s for s in desc["servers"] if s["name"] == "pgbouncer")
        with psycopg2.connect(bouncer["url"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            assert cur.fetchone() == (False,)
        conn.close()
        again = _cli("lab", "up", "--dir", str(directory))
        assert again.returncode == 0 and "already up" in again.stdout
    finally:
        down = _cli("lab", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not directory.exists()
    leftovers = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, text=True).stdout
    assert leftovers == ""


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
