"""``switchover``: refusals that change nothing, then the acceptance run under 8 writing clients, there and back."""

from __future__ import annotations

import json
import time

import psycopg2
import pytest

from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.load import WriteLoad
from tests._fleet import out, q, roles, status
from tests._fleet import unchanged as _unchanged

fleet = fleet_fixture("module", databases={"meta.sr.ht": ["srht"]})


def test_refuses_when_the_target_is_already_the_primary(fleet):
    proc = fleet.cli("switchover", "--to", "remilia", "--yes")
    assert proc.returncode == 1 and "remilia is already the primary; nothing to do" in proc.stderr


def test_refuses_while_replay_is_paused_on_the_target(fleet):
    konpaku = fleet.lab.nodes["konpaku"].admin_dsn
    q(konpaku, "SELECT pg_wal_replay_pause()")
    try:
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
    finally:
        q(konpaku, "SELECT pg_wal_replay_resume()")
    assert proc.returncode == 1 and "pg_wal_replay_resume()" in proc.stderr
    _unchanged(fleet)


def test_refuses_with_an_unreachable_pgbouncer_naming_it(fleet):
    fleet.sshd.stop()
    try:
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
    finally:
        fleet.sshd.start()
    assert proc.returncode == 1 and "meta.sr.ht" in proc.stderr and "nothing was changed" in proc.stderr
    _unchanged(fleet)


@pytest.mark.parametrize("name", ["git.sr.ht", "meta.sr.ht"])  # global PAUSE locally; PAUSE srht over ssh
def test_a_pause_that_times_out_switches_back_without_hanging(fleet, name):
    """A long transaction holds PAUSE: after --pause-timeout everything is resumed and put back (issue 715)."""
    bouncer = fleet.lab.extra_bouncers[name]
    holder = psycopg2.connect(bouncer.dsn)
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT 1")  # a transaction is open: PAUSE must wait for it
    try:
        started = time.monotonic()
        proc = fleet.cli("switchover", "--to", "konpaku", "--pause-timeout", "1", "--yes")
        took = time.monotonic() - started
        assert proc.returncode == 1, out(proc)
        assert f"PAUSE did not finish on {name}" in proc.stderr and "Switched back" in proc.stderr
        assert took < 15
        holder.commit()  # the transaction could finish, and the pooler serves it
        _unchanged(fleet)
    finally:
        holder.close()


def test_dry_run_lists_the_steps_and_changes_nothing(fleet):
    proc = fleet.cli("switchover", "--to", "konpaku", "--dry-run")
    assert proc.returncode == 0, out(proc)
    for words in ("PAUSE all 3 PgBouncers", "shutdown checkpoint", "RESUME every PgBouncer", "make remilia follow"):
        assert words in proc.stderr
    _unchanged(fleet)


def _switch_under_load(fleet, to: str, figures: dict) -> None:
    old = "remilia" if to == "konpaku" else "konpaku"
    WriteLoad.create_table(fleet.lab.nodes[old].dsn)
    load = WriteLoad([b.dsn for b in fleet.lab.bouncers], clients=8)
    load.start()
    time.sleep(1.0)
    start = time.monotonic()
    proc = fleet.cli("switchover", "--to", to, "--yes", "--json")
    end = time.monotonic()
    time.sleep(1.0)
    report = load.stop()
    assert proc.returncode == 0, out(proc)
    result = json.loads(proc.stdout)
    lost = report.lost(fleet.lab.nodes[to].dsn)
    figures[f"{old}->{to}"] = {
        "write_pause_cli": round(result["write_pause"], 3),
        "longest_client_gap": round(report.longest_gap(start, end), 3),
        "longest_fleet_gap": round(report.fleet_gap(start, end), 3),
        "acknowledged": report.acknowledged,
        "failed": len(report.failures),
        "lost": len(lost),
        "phases": {k: round(v, 3) for k, v in result["phases"].items()},
    }
    print(f"\nswitchover {old} -> {to}: {figures[f'{old}->{to}']}")
    assert report.failures == [], report.failures[:5]
    assert lost == []
    assert report.longest_gap(start, end) < 1.0
    assert report.acknowledged > 1000
    assert result["demote"]["rewound"] is False  # the shutdown checkpoint was replayed: nothing to rewind
    doc = status(fleet)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes[to]["role"] == "primary" and nodes[old]["role"] == "standby" and nodes[old]["upstream"] == to
    assert {b["target"] for b in doc["pgbouncers"]} == {to}
    assert all(s["active"] is not False for s in nodes[to]["slots"]), nodes[to]["slots"]
    assert nodes[old]["slots"] == []  # the new primary's old slot on the demoted node was dropped


def test_switchover_under_8_writers_loses_nothing_and_pauses_writes_under_a_second_there_and_back(fleet):
    figures: dict = {}
    _switch_under_load(fleet, "konpaku", figures)
    _switch_under_load(fleet, "remilia", figures)
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}


def test_after_a_failure_past_the_promotion_running_again_says_what_is_left(fleet, monkeypatch):
    """Exit 3 names the old primary; the re-run refuses harmlessly and points at demote, which finishes."""
    from srht_readonly.ops import switchover
    from srht_readonly.ops.cluster import Cluster
    from srht_readonly.ops.errors import OpsError, PartlyDone
    from srht_readonly.ops.fleet import Fleet
    from srht_readonly.ops.inventory import load

    def broken_demote(*args, **kwargs):
        raise OpsError("the old primary's disk is full")

    monkeypatch.setenv("SRHT_READONLY_SSH_CONFIG", str(fleet.ssh_config))
    monkeypatch.setattr(switchover, "run_demote", broken_demote)
    with Cluster(load(fleet.inventory)) as cluster, Fleet(cluster) as pgbouncers:
        plan = switchover.check_switchover(cluster, pgbouncers, "konpaku")
        with pytest.raises(PartlyDone) as info:
            switchover.run_switchover(cluster, pgbouncers, plan)
    assert "remilia" in info.value.hosts and "demote remilia --primary konpaku" in str(info.value)
    again = fleet.cli("switchover", "--to", "konpaku", "--yes")
    assert again.returncode == 1 and "demote remilia --primary konpaku" in again.stderr, out(again)
    finish = fleet.cli("demote", "remilia", "--primary", "konpaku", "--yes")
    assert finish.returncode == 0 and "no pg_rewind needed" in finish.stdout, out(finish)
    back = fleet.cli("switchover", "--to", "remilia", "--yes")
    assert back.returncode == 0, out(back)
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
