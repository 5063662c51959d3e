"""``srht-readonly agent``: one per PgBouncer, a read-only failover without an operator.

Against real servers (a primary, its streaming standby, three PgBouncers, one of them reached
over a real sshd, an agent process beside each): the primary ``kill -9``'d, reads through every
PgBouncer again within 2 s, nothing promoted; the primary back as it was, every PgBouncer back on
it. A standby that was not streaming is never pointed at; an operator's switchover is left alone.
``decide`` (pure) is tested on its own for each rule.
"""

from __future__ import annotations

import json
import time

import psycopg2
import pytest

from srht_readonly.ops.agent import Expected, Look, Seen, decide
from srht_readonly.ops.fleet import BouncerState
from srht_readonly.testing.agents import Agents, reads_restored, start_again
from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.etcd import EtcdCluster
from srht_readonly.testing.lab import APP_DB
from srht_readonly.testing.load import TABLE, ReadProbe, WriteLoad
from tests._fleet import out, q, roles, status

fleet = fleet_fixture("function")

def _targets(fleet) -> dict[str, str]:
    return {b["name"]: b["target"] for b in status(fleet)["pgbouncers"]}


def test_the_primary_killed_reads_back_through_every_pgbouncer_within_2_s_then_back_on_it(fleet, tmp_path):
    lab = fleet.lab
    remilia = lab.nodes["remilia"]
    WriteLoad.create_table(remilia.dsn)
    events = tmp_path / "events.jsonl"
    with fleet.inventory.open("a") as inventory:  # every decision also goes to the event hook
        inventory.write(f"\n[hooks]\ncommand = cat >> {events}\n")
    with Agents(fleet, tmp_path, "--dwell", "2") as agents:
        agents.wait_for("expect:", timeout=30)
        with ReadProbe([b.dsn for b in lab.bouncers]) as reads:
            time.sleep(0.5)
            killed = time.monotonic()
            remilia.kill()
            agents.wait_for("away:", timeout=6)
            time.sleep(0.5)
            restored = reads_restored(reads, killed)
        print(f"\nagent: kill -9 to reads through each PgBouncer: {restored} s")
        assert all(r is not None and r < 2.0 for r in restored), (restored, agents.logs())
        assert set(_targets(fleet).values()) == {"konpaku"}
        assert roles(fleet)["konpaku"] == "standby", "the agent promoted: it never may"
        # Writes through a PgBouncer meet the read-only state (SQLSTATE 25006: the services explain it).
        with pytest.raises(psycopg2.Error) as refused:
            q(lab.bouncers[0].dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, 0)")
        assert refused.value.pgcode == "25006", refused.value
        # The primary comes back without having been replaced: every PgBouncer goes back to it.
        start_again(remilia)
        agents.wait_for("back:", timeout=20)
        assert set(_targets(fleet).values()) == {"remilia"}
        assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}
        for bouncer in lab.bouncers:  # writable again through every PgBouncer
            q(bouncer.dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, %s)", (lab.bouncers.index(bouncer),))
    assert agents.count("away:") == dict.fromkeys(agents.names, 1), agents.logs()
    assert agents.count("back:") == dict.fromkeys(agents.names, 1), agents.logs()
    hooked = [json.loads(line) for line in events.read_text().splitlines()]
    assert {(e["event"], e["pgbouncer"], e["action"]) for e in hooked} >= {
        ("agent", n, a) for n in agents.names for a in ("expect", "away", "back")}, hooked
    assert all(e["command"] == f"agent --pgbouncer {e['pgbouncer']}" for e in hooked), hooked


def _streaming(dsn: str) -> bool:
    return q(dsn, "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0][0] == 1


def _status_json(fleet) -> dict:
    proc = fleet.cli("status", "--json")
    assert proc.returncode in (0, 1), out(proc)
    return json.loads(proc.stdout)


def test_with_etcd_each_agent_beats_and_status_shows_every_agent_its_failover_and_etcd_lost(fleet, tmp_path):
    lab = fleet.lab
    with EtcdCluster(tmp_path / "etcd") as etcd:
        with fleet.inventory.open("a") as inventory:
            inventory.write(f"\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\n")
        with Agents(fleet, tmp_path, "--dwell", "0") as agents:
            agents.wait_for("expect:", timeout=30)
            deadline = time.monotonic() + 10
            while len(_status_json(fleet)["agents"] or {}) < 3:
                assert time.monotonic() < deadline, "not every agent's heartbeat reached etcd"
                time.sleep(0.3)
            doc = _status_json(fleet)
            assert doc["etcd"] == [{"endpoint": etcd.endpoints[0], "answers": True, "healthy": True, "error": None}]
            assert set(doc["agents"]) == set(agents.names)
            for beat in doc["agents"].values():
                assert beat["state"] == "home" and beat["points_at"] == "remilia" and beat["age"] < 3, beat
                assert beat["sees"] == {"remilia": "primary", "konpaku": "standby"}, beat
            text = fleet.cli("status").stdout
            assert "AGENT" in text and "etcd: 1 of 1 endpoint(s) healthy" in text, text
            lab.nodes["remilia"].kill()
            agents.wait_for("away:", timeout=10)
            time.sleep(0.5)
            doc = _status_json(fleet)
            assert {b["state"] for b in doc["agents"].values()} == {"away"}, doc["agents"]
            assert {b["points_at"] for b in doc["agents"].values()} == {"konpaku"}, doc["agents"]
            moved = [p for p in doc["problems"] if p["subject"].startswith("agent ") and "moved" in p["message"]]
            assert len(moved) == 3 and all(p["severity"] == "warning" for p in moved), doc["problems"]
            # etcd lost: status says so (critical); the agents keep running (frozen).
            etcd.stop()
            doc = _status_json(fleet)
            assert [p["severity"] for p in doc["problems"] if p["subject"] == "etcd"][0] == "critical", doc["problems"]
            assert doc["agents"] is None
            time.sleep(1.5)
            assert all(p.poll() is None for p in agents.procs.values()), agents.logs()
    assert "heartbeat to etcd failed" in agents.logs()


def test_etcd_one_member_of_three_lost_changes_nothing_the_quorum_lost_freezes_every_agent(fleet, tmp_path):
    """Three etcd members. The first endpoint (the one every client tries first) killed: the primary's
    kill is still met within 2 s. A second one killed (no quorum): every agent freezes and ``status``
    says so; the primary back unchanged, no agent points back while frozen; the quorum back, each
    thaws and does."""
    lab = fleet.lab
    remilia = lab.nodes["remilia"]
    with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        with fleet.inventory.open("a") as inventory:
            inventory.write(f"\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\n")
        with Agents(fleet, tmp_path, "--dwell", "0") as agents:
            agents.wait_for("expect:", timeout=30)
            etcd.kill(0)
            with ReadProbe([b.dsn for b in lab.bouncers]) as reads:
                time.sleep(1.5)
                killed = time.monotonic()
                remilia.kill()
                agents.wait_for("away:", timeout=6)
                time.sleep(0.5)
                restored = reads_restored(reads, killed)
            print(f"\nagent, one etcd member of three down: kill -9 to reads through each PgBouncer: {restored} s")
            assert all(r is not None and r < 2.0 for r in restored), (restored, agents.logs())
            assert "frozen:" not in agents.logs()
            etcd.kill(1)
            agents.wait_for("frozen:", timeout=15)
            doc = _status_json(fleet)
            critical = [p["message"] for p in doc["problems"] if p["subject"] == "etcd" and p["severity"] == "critical"]
            assert critical and "every agent is frozen" in critical[0], doc["problems"]
            start_again(remilia)
            time.sleep(4.0)  # --confirm (1 s) four times over, the probes reconnected long since
            assert set(_targets(fleet).values()) == {"konpaku"}, agents.logs()
            assert "back:" not in agents.logs()
            etcd.start(1)
            agents.wait_for("thawed:", timeout=20)
            agents.wait_for("back:", timeout=15)
            assert set(_targets(fleet).values()) == {"remilia"}
    assert agents.count("frozen:") == dict.fromkeys(agents.names, 1), agents.logs()


def test_a_standby_that_was_not_streaming_is_never_pointed_at(fleet, tmp_path):
    lab = fleet.lab
    konpaku = lab.nodes["konpaku"]
    with Agents(fleet, tmp_path, "--dwell", "0") as agents:
        agents.wait_for("expect:", timeout=30)
        # The standby stops streaming (its upstream unreachable for it alone), then the primary dies.
        q(konpaku.admin_dsn, "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'")
        q(konpaku.admin_dsn, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 15
        while _streaming(konpaku.admin_dsn):
            assert time.monotonic() < deadline, "the standby kept streaming"
            time.sleep(0.2)
        time.sleep(2.5)  # longer than --confirm: its streaming is well in the past when the primary dies
        lab.nodes["remilia"].kill()
        agents.wait_for("was not streaming", timeout=10)
        time.sleep(1.0)
        assert set(_targets(fleet).values()) == {"remilia"}, agents.logs()
    assert "away:" not in agents.logs()


def test_a_paused_pgbouncer_is_left_alone_even_with_its_primary_gone_until_resumed(fleet, tmp_path):
    """A procedure under way (its PAUSE, per database as every PgBouncer version shows it), and the
    primary dies meanwhile: no agent moves its PgBouncer until it is resumed; then each does."""
    lab = fleet.lab
    with Agents(fleet, tmp_path, "--dwell", "0", "--confirm", "0.2") as agents:
        agents.wait_for("expect:", timeout=30)
        consoles = [psycopg2.connect(b.admin_dsn) for b in lab.bouncers]
        try:
            for console in consoles:
                console.autocommit = True
                console.cursor().execute(f"PAUSE {APP_DB}")
            agents.wait_for("hands-off:", timeout=5)
            lab.nodes["remilia"].kill()
            time.sleep(2.0)  # ten times --confirm
            assert "away:" not in agents.logs(), agents.logs()
            assert set(_targets(fleet).values()) == {"remilia"}
            for console in consoles:
                console.cursor().execute(f"RESUME {APP_DB}")
        finally:
            for console in consoles:
                console.close()
        agents.wait_for("away:", timeout=10)
        assert set(_targets(fleet).values()) == {"konpaku"}, agents.logs()
    assert agents.count("resume:") == dict.fromkeys(agents.names, 1), agents.logs()


def test_an_agent_started_beside_a_pgbouncer_on_the_standby_waits_and_says_so(fleet, tmp_path):
    """A maintenance window (or a failover the agent made before it was restarted): an operator decides."""
    proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert proc.returncode == 0, out(proc)
    with Agents(fleet, tmp_path) as agents:
        agents.wait_for("waiting:", timeout=30)
        time.sleep(1.0)
        assert set(_targets(fleet).values()) == {"konpaku"}
    logs = agents.logs()
    assert "which is not a primary" in logs and "expect:" not in logs and logs.count("waiting:") == 3, logs


def test_an_operators_switchover_is_left_alone_and_the_new_primary_expected(fleet, tmp_path):
    with Agents(fleet, tmp_path, "--dwell", "0") as agents:
        agents.wait_for("expect:", timeout=30)
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        assert proc.returncode == 0, out(proc)
        agents.wait_for("expect:", timeout=15, times=2)  # each learned the new primary
        assert all("on konpaku (primary" in agents.log(n).split("expect:")[-1] for n in agents.names), agents.logs()
        assert set(_targets(fleet).values()) == {"konpaku"}
    logs = agents.logs()
    assert "hands-off:" in logs and "away:" not in logs and "back:" not in logs, logs


# --- decide, on its own ------------------------------------------------------------------------------


def _seen(*looks: Look) -> Seen:
    seen = Seen()
    for look in looks:
        seen = seen.add(look)
    return seen


def _bouncer(target: str = "remilia", *, paused: bool = False) -> BouncerState:
    return BouncerState("git.sr.ht", True, target=target, paused=paused)


ALIVE = _seen(Look(0.0, "primary", timeline=1), Look(0.2, "primary", timeline=1))


def _standby(now: float, *, streamed: float | None = None) -> Seen:
    """A standby answering at ``now`` (fresh), last seen streaming at ``streamed`` (default: just now)."""
    streamed = now - 0.1 if streamed is None else streamed
    return _seen(Look(streamed, "standby", streaming=True), Look(now - 0.05, "standby", streaming=False))


def _dead(since: float, n: int) -> Seen:
    return _seen(Look(since - 0.2, "primary", timeline=1), *[Look(since + i * 0.2, None, error="refused")
                                                            for i in range(n)])


def test_decide_waits_for_both_the_confirmation_time_and_enough_failed_probes():
    e = Expected("remilia", 1, "konpaku")
    assert decide(e, ALIVE, _standby(0.5), _bouncer(), 0.5).action == "stay"
    # 1.05 s without an answer, but only 2 failed probes, the last one recent: not yet.
    assert decide(e, _dead(1.0, 2), _standby(1.85, streamed=0.7), _bouncer(), 1.85).action == "stay"
    assert decide(e, _dead(1.0, 3), _standby(1.5, streamed=0.7), _bouncer(), 1.5).action == "stay"  # 0.7 s only
    d = decide(e, _dead(1.0, 5), _standby(1.9, streamed=0.7), _bouncer(), 1.9)
    assert d.action == "away" and "konpaku streamed from it" in d.why


def test_decide_takes_a_probe_stuck_for_the_confirmation_time_as_a_dead_primary():
    e = Expected("remilia", 1, "konpaku")
    hung = _seen(Look(0.0, "primary", timeline=1))  # its next probe never came back: no failure counted
    assert decide(e, hung, _standby(0.9), _bouncer(), 0.9).action == "stay"
    assert decide(e, hung, _standby(1.2, streamed=0.1), _bouncer(), 1.2).action == "away"


def test_decide_never_points_at_a_standby_that_was_not_streaming_not_fresh_or_not_a_standby():
    e = Expected("remilia", 1, "konpaku")
    stale = _seen(Look(0.0, "standby", streaming=True), Look(4.9, "standby", streaming=False))
    assert "was not streaming" in decide(e, _dead(3.0, 5), stale, _bouncer(), 5.0).why
    down = _seen(Look(0.0, "standby", streaming=True), Look(3.0, None, error="refused"))
    assert "does not answer" in decide(e, _dead(1.0, 5), down, _bouncer(), 3.0).why
    old = _seen(Look(0.5, "standby", streaming=True))  # its last answer is 2.5 s old: not known now
    assert "does not answer" in decide(e, _dead(1.0, 5), old, _bouncer(), 3.0).why
    same = _seen(Look(2.9, "primary", timeline=1))  # a primary on the old timeline: not a promoted standby
    assert "is not a standby" in decide(e, _dead(1.0, 5), same, _bouncer(), 3.0).why
    split = decide(e, ALIVE, _seen(Look(0.1, "primary", timeline=2)), _bouncer(), 0.3)
    assert split.action == "stay" and "split brain" in split.why


def test_decide_goes_back_only_to_the_same_primary_while_the_standby_is_still_one_after_the_dwell():
    e = Expected("remilia", 1, "konpaku", away=True, switched_at=0.0)
    back = _seen(Look(5.0, None), Look(5.2, "primary", timeline=1), Look(6.4, "primary", timeline=1))
    on_standby = _bouncer("konpaku")
    assert decide(e, back, _standby(6.0), on_standby, 6.0).action == "stay"  # back for 0.8 s only
    assert decide(e, back, _standby(6.5), on_standby, 6.5, dwell=10).action == "stay"  # dwell
    d = decide(e, back, _standby(6.5), on_standby, 6.5, dwell=2)
    assert d.action == "back" and "konpaku is still a standby" in d.why
    replaced = _seen(Look(5.2, "primary", timeline=2), Look(6.4, "primary", timeline=2))
    assert decide(e, replaced, _standby(7.0), on_standby, 7.0, dwell=0).action == "stay"
    # The standby not seen now (it may have been promoted meanwhile): never back.
    silent = _seen(Look(6.0, "standby"), Look(6.4, None, error="timeout"))
    assert "may have been promoted" in decide(e, back, silent, on_standby, 6.5, dwell=0).why
    assert decide(e, back, _seen(Look(6.0, "primary", timeline=2)), on_standby, 6.5).action == "adopt"


def test_decide_leaves_a_paused_or_moved_pgbouncer_alone_then_resumes():
    e = Expected("remilia", 1, "konpaku")
    assert decide(e, _dead(1.0, 9), _standby(9.0), _bouncer(paused=True), 9.0).action == "hands-off"
    moved = decide(e, ALIVE, _standby(1.0), _bouncer("konpaku"), 1.0)
    assert moved.action == "hands-off" and "an operator moved it" in moved.why
    e.hands_off = moved.why  # moved elsewhere: what to expect is learned again from where it points
    assert decide(e, ALIVE, _standby(1.2), _bouncer("konpaku"), 1.2).action == "relearn"
    e.hands_off = "the PgBouncer is paused (a procedure under way?)"
    assert decide(e, ALIVE, _standby(1.2), _bouncer(paused=True), 1.2).action == "stay"
    assert decide(e, ALIVE, _standby(1.4), _bouncer(), 1.4).action == "resume"


def test_decide_with_a_short_confirm_never_takes_a_probe_in_flight_for_a_dead_primary():
    """--confirm 0.2 with probes every 0.2 s: the last answers are a few tenths old at any moment."""
    e = Expected("remilia", 1, "konpaku")
    healthy = _seen(Look(0.0, "primary", timeline=1), Look(0.2, "primary", timeline=1))
    assert decide(e, healthy, _standby(0.6), _bouncer(), 0.6, confirm=0.2).action == "stay"  # next probe under way
    gone = _dead(0.4, 3)  # ok at 0.2, failed at 0.4, 0.6, 0.8
    standby = _seen(Look(0.1, "standby", streaming=True), Look(0.5, "standby"))  # answered 0.5 s ago: still now
    assert decide(e, gone, standby, _bouncer(), 1.0, confirm=0.2).action == "away"


def test_decide_follows_a_standby_promoted_while_the_pgbouncer_stayed_on_the_dead_primary():
    """Not away (it was paused, frozen, or the dwell held it), the primary gone, the standby promoted."""
    e = Expected("remilia", 1, "konpaku")
    promoted = _seen(Look(2.9, "primary", timeline=2))
    d = decide(e, _dead(1.0, 5), promoted, _bouncer(), 3.0)
    assert d.action == "follow" and "timeline 2" in d.why
    assert decide(e, ALIVE, _seen(Look(0.3, "primary", timeline=2)), _bouncer(), 0.3).action == "stay"  # split brain?

