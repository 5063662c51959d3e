"""``srht-readonly agent --auto-promote AFTER`` against real servers: a primary, its streaming standby,
three PgBouncers (one over a real sshd) with an agent beside each, a real etcd, a fence command.

The primary ``kill -9``'d: exactly one agent (the promotion leader) fences it and promotes the
standby; writes work again through every PgBouncer within 10 s of the kill. A fence command
that fails: nothing is promoted. ``votes`` (pure) on its own.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.ops.autopromote import HEARTBEAT_FRESH, votes
from srht_readonly.ops.etcd import FleetLock
from srht_readonly.ops.inventory import AgentSpec, EtcdSpec, InventoryError, parse
from srht_readonly.testing.agents import LAB_FENCE, Agents, write_fence, writes_restored
from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.etcd import EtcdCluster
from srht_readonly.testing.load import TABLE, WriteLoad
from tests._fleet import q, roles

fleet = fleet_fixture("function")

def _with_etcd_and_fence(fleet, tmp_path: Path, etcd: EtcdCluster, fence: str = LAB_FENCE) -> Path:
    """``[etcd]`` and ``[agent] fence`` in the fleet's inventory; the file each fencing's node is logged to."""
    script = write_fence(tmp_path / "fence", fence, log=tmp_path / "fenced.log")
    with fleet.inventory.open("a") as inventory:
        inventory.write(f"\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\n\n[agent]\nfence = {script}\n")
    return tmp_path / "fenced.log"


def test_auto_promote_fences_the_dead_primary_and_promotes_once_writes_back_within_10_s(fleet, tmp_path):
    lab = fleet.lab
    remilia, konpaku = lab.nodes["remilia"], lab.nodes["konpaku"]
    WriteLoad.create_table(remilia.dsn)
    with EtcdCluster(tmp_path / "etcd") as etcd:
        fenced = _with_etcd_and_fence(fleet, tmp_path, etcd)
        with Agents(fleet, tmp_path, "--dwell", "0", "--auto-promote", "3") as agents:
            agents.wait_for("expect:", timeout=30)
            time.sleep(1.5)  # every agent's heartbeat in etcd
            with WriteLoad([b.dsn for b in lab.bouncers], clients=3, pause=0.05) as load:
                time.sleep(1.0)
                killed = time.monotonic()
                remilia.kill()
                agents.wait_for("on konpaku (primary", timeout=20)  # adopted, or converged to the new state
                time.sleep(1.0)
            back = writes_restored(load, killed)
    print(f"\nauto-promote 3 s: writes back through every PgBouncer {back} s after the kill")
    logs = agents.logs()
    assert back is not None and 3.0 < back < 10.0, (back, logs)  # not before AFTER: nothing promotes sooner
    assert sum(agents.count("promote:").values()) == 1, logs  # one leader, one promotion
    # The promotion was recorded in the fleet's state (generation 1), and every agent followed it.
    assert agents.count("converge:") == dict.fromkeys(agents.names, 1), logs
    assert all("generation 1, by agent " in agents.log(n).split("converge:")[1] for n in agents.names), logs
    assert roles(fleet) == {"remilia": "down", "konpaku": "primary"}
    assert fenced.read_text().split() == ["remilia"], logs
    q(konpaku.dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (99, 1)")
    for bouncer in lab.bouncers:
        q(bouncer.dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (98, %s)", (lab.bouncers.index(bouncer),))


def test_a_fence_that_fails_means_no_promotion(fleet, tmp_path):
    lab = fleet.lab
    with EtcdCluster(tmp_path / "etcd") as etcd:
        fenced = _with_etcd_and_fence(fleet, tmp_path, etcd, "#!/bin/sh\necho 'the PDU does not answer' >&2\nexit 1\n")
        with Agents(fleet, tmp_path, "--dwell", "0", "--auto-promote", "2") as agents:
            agents.wait_for("expect:", timeout=30)
            time.sleep(1.5)
            lab.nodes["remilia"].kill()
            agents.wait_for("away:", timeout=10)
            deadline = time.monotonic() + 15
            while "fence-failed:" not in agents.logs():
                assert time.monotonic() < deadline, agents.logs()
                time.sleep(0.2)
            time.sleep(2.0)
            assert roles(fleet)["konpaku"] == "standby", agents.logs()
    logs = agents.logs()
    assert "the PDU does not answer" in logs and "promote:" not in logs, logs
    assert fenced.read_text().split()[0] == "remilia"
    with pytest.raises(psycopg2.Error) as refused:  # still read-only: the services explain it
        q(lab.bouncers[0].dsn, f"CREATE TABLE {TABLE}_x (i int)")
    assert refused.value.pgcode == "25006"


def test_while_an_operator_holds_the_fleet_lock_nothing_is_promoted_then_it_is(fleet, tmp_path):
    """An operator's command under way (here: the fleet lock held by this process) decides, not the agents."""
    lab = fleet.lab
    with EtcdCluster(tmp_path / "etcd") as etcd:
        fenced = _with_etcd_and_fence(fleet, tmp_path, etcd)
        with Agents(fleet, tmp_path, "--dwell", "0", "--auto-promote", "2") as agents:
            agents.wait_for("expect:", timeout=30)
            time.sleep(1.5)
            lock = FleetLock(EtcdSpec(tuple(etcd.endpoints)), "demote remilia --primary konpaku")
            lock.acquire()
            try:
                lab.nodes["remilia"].kill()
                deadline = time.monotonic() + 15
                while "the fleet lock is not free" not in agents.logs():
                    assert time.monotonic() < deadline, agents.logs()
                    time.sleep(0.2)
                time.sleep(1.0)
                assert roles(fleet)["konpaku"] == "standby" and not fenced.exists(), agents.logs()
            finally:
                lock.release()
            agents.wait_for("on konpaku (primary", timeout=20)  # adopted, or converged to the new state
    logs = agents.logs()
    assert "`demote remilia --primary konpaku`" in logs and sum(agents.count("promote:").values()) == 1, logs
    assert roles(fleet)["konpaku"] == "primary"


def test_auto_promote_without_etcd_or_a_fence_is_refused_at_start(fleet, tmp_path):
    proc = fleet.cli("agent", "--pgbouncer", fleet.lab.bouncers[0].name, "--auto-promote", "5", timeout=30)
    assert proc.returncode != 0 and "--auto-promote needs an [etcd] section" in proc.stderr, proc.stderr
    proc = fleet.cli("agent", "--pgbouncer", fleet.lab.bouncers[0].name, "--auto-promote", "0.5", timeout=30)
    assert proc.returncode == 2 and "under --confirm" in proc.stderr, proc.stderr


# --- votes, on its own --------------------------------------------------------------------------------


def _beat(silent: float | None, age: float = 0.5, primary: str = "remilia", lsn: int | None = 100) -> dict:
    return {"primary": primary, "primary_silent_for": silent, "age": age, "primary_lsn": lsn}


def test_votes_count_fresh_agents_of_the_same_fleet_that_saw_the_primary_silent_long_enough():
    names = ["a", "b", "c"]
    assert votes({n: _beat(3.5) for n in names}, names, "remilia", 3) == (3, 2, 100)
    # The heartbeat's age is a freshness cutoff, never added to the silence (another host's clock).
    assert votes({"a": _beat(2.5, age=1.0), "b": _beat(2.9)}, names, "remilia", 3) == (0, 2, None)
    assert votes({"a": _beat(9.0, lsn=300), "b": _beat(None)}, names, "remilia", 3) == (1, 2, 300)  # b: answers
    stale = HEARTBEAT_FRESH + 0.5
    assert votes({"a": _beat(9.0), "b": _beat(9.0, age=stale)}, names, "remilia", 3) == (1, 2, 100)
    assert votes({"a": _beat(9.0), "b": _beat(9.0, primary="konpaku")}, names, "remilia", 3) == (1, 2, 100)
    # The furthest WAL position any voter saw written: the standby is measured against that.
    assert votes({"a": _beat(9.0, lsn=100), "b": _beat(9.0, lsn=700)}, names, "remilia", 3)[2] == 700
    # The majority is of every PgBouncer: two beating agents of four are not one.
    assert votes({"a": _beat(9.0), "b": _beat(9.0)}, [*names, "d"], "remilia", 3) == (2, 3, 100)


NODES = ("[node remilia]\ndsn = host=10.0.0.2 port=5432\ndata = /srv/pg\n"
         "[node konpaku]\ndsn = host=10.0.0.3 port=5432\ndata = /srv/pg\n")


@pytest.mark.parametrize(("text", "message"), [
    ("fence-timeout = 5", "[agent] has no 'fence'; it is required"),
    ("fence = ", "'fence' is empty"),
    ("fence = x\nfence-timeout = 0.5", "fence-timeout must be seconds from 1 to 300"),
    ("fence = x\nmax-lag = 16 megabytes", "max-lag must be a size such as 16MB"),
    ("fence = x\nmaxlag = 1", "maxlag"),
])
def test_agent_sections_are_checked(text, message):
    with pytest.raises(InventoryError, match=re.escape(message)):
        parse(f"{NODES}[agent]\n{text}\n")


def test_the_documented_inventory_reads_its_section_headers_with_comments_after_them():
    text = Path(__file__).resolve().parent.parent.joinpath("docs", "cli.md").read_text()
    example = text.split("```ini\n", 1)[1].split("```", 1)[0]
    inventory = parse(example)
    assert inventory.agent == AgentSpec("/usr/local/bin/fence-postgres", 10.0, 16 * 1024**2, inventory.agent.line)
    assert inventory.etcd is not None and inventory.backup is not None


def test_an_agent_section_reads_as_documented_its_fence_kept_whole():
    inventory = parse(f"{NODES}[agent]\nfence = ssh db ; systemctl kill postgresql # now\nmax-lag = 2MB\n")
    assert inventory.agent == AgentSpec("ssh db ; systemctl kill postgresql # now", 10.0, 2 * 1024**2, 7)
    assert parse(NODES).agent is None

