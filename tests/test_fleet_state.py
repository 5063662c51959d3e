"""The fleet's desired state in etcd (``ops.desired``): what ``failover``, ``switchover`` and ``promote``
write and the agents converge to.

Against real servers: a primary and its streaming standby, three PgBouncers (one reached over a
real sshd), a real one-member etcd, an ``srht-readonly agent`` process beside each PgBouncer.
"""

from __future__ import annotations

import contextlib
import json
import time

import psycopg2
import pytest

from srht_readonly.ops import desired
from srht_readonly.ops.errors import Refused
from srht_readonly.ops.inventory import load
from srht_readonly.testing.agents import Agents, start_again
from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.etcd import EtcdCluster
from srht_readonly.testing.load import TABLE, WriteLoad
from tests._fleet import out, q, roles, status

fleet = fleet_fixture("function")


def _targets(fleet) -> dict[str, str]:
    return {b["name"]: b["target"] for b in status(fleet)["pgbouncers"]}


def _with_etcd(fleet, etcd: EtcdCluster):
    with fleet.inventory.open("a") as inventory:
        inventory.write(f"\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\n")
    spec = load(fleet.inventory).etcd
    assert spec is not None
    return spec


def _beats(spec) -> dict[str, dict]:
    return desired.live_agents(spec)


def _wait_beats(spec, names, predicate, timeout: float = 10) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        beats = _beats(spec)
        if set(beats) >= set(names) and all(predicate(beats[n]) for n in names):
            return beats
        assert time.monotonic() < deadline, beats
        time.sleep(0.1)


@contextlib.contextmanager
def _agents_on_etcd(fleet, tmp_path, only=None):
    """A real etcd in the inventory and an agent beside every PgBouncer (or ``only`` these), each home."""
    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = _with_etcd(fleet, etcd)
        with Agents(fleet, tmp_path, "--dwell", "0", only=only) as agents:
            agents.wait_for("expect:", timeout=30)
            _wait_beats(spec, agents.names, lambda b: b.get("state") == "home")
            yield spec, agents


def test_failover_goes_through_every_agent_at_once_they_stay_there_then_follow_it_back(fleet, tmp_path):
    lab = fleet.lab
    WriteLoad.create_table(lab.nodes["remilia"].dsn)
    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = _with_etcd(fleet, etcd)
        # A state written before the agents start is where the fleet already is for them: never carried out.
        stale = desired.publish(spec, "a test, before the agents", primary="konpaku", timeline=9,
                                pgbouncers=dict.fromkeys(lab_names(fleet), "konpaku"))
        with Agents(fleet, tmp_path, "--dwell", "0") as agents:
            agents.wait_for("expect:", timeout=30)
            beats = _wait_beats(spec, agents.names, lambda b: b.get("generation") == stale.generation)
            time.sleep(1.0)
            assert set(_targets(fleet).values()) == {"remilia"} and "converge:" not in agents.logs(), agents.logs()
            seen = status(fleet)  # status shows the state and the PgBouncers that disagree with it
            assert seen["fleet_state"]["generation"] == stale.generation, seen["fleet_state"]
            disagree = [p for p in seen["problems"] if "the fleet's state in etcd" in p["message"]]
            assert {p["subject"] for p in disagree} == {f"pgbouncer {n}" for n in agents.names}, seen["problems"]

            proc = fleet.cli("failover", "--to", "konpaku", "--yes")
            assert proc.returncode == 0, out(proc)
            assert f"fleet state generation {stale.generation + 1}" in proc.stdout, out(proc)
            assert "by its agent: " in proc.stdout and "by this command" not in proc.stdout, out(proc)
            assert all(name in proc.stdout for name in agents.names), out(proc)
            assert set(_targets(fleet).values()) == {"konpaku"}
            assert agents.count("converge:") == dict.fromkeys(agents.names, 1), agents.logs()
            assert not [p for p in status(fleet)["problems"] if "the fleet's state in etcd" in p["message"]]
            state, _ = desired.read(spec)
            assert state is not None and state.primary == "remilia" and state.by.startswith("failover --to konpaku")
            assert state.pgbouncers == dict.fromkeys(agents.names, "konpaku")
            # The read-only window holds: the old primary still answers, and no agent points back at it.
            with pytest.raises(psycopg2.Error) as refused:
                q(lab.bouncers[0].dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, 0)")
            assert refused.value.pgcode == "25006", refused.value
            time.sleep(3.0)
            assert set(_targets(fleet).values()) == {"konpaku"} and "back:" not in agents.logs(), agents.logs()

            back = fleet.cli("failover", "--to", "remilia", "--yes")
            assert back.returncode == 0 and "by its agent: " in back.stdout, out(back)
            assert set(_targets(fleet).values()) == {"remilia"}
            assert agents.count("converge:") == dict.fromkeys(agents.names, 2), agents.logs()
            # Each agent expects remilia again: home, and the next generation in its heartbeat.
            beats = _wait_beats(spec, agents.names, lambda b: b.get("generation") == stale.generation + 2
                                and b.get("state") == "home" and b.get("points_at") == "remilia")
            assert agents.count("expect:") == dict.fromkeys(agents.names, 2), agents.logs()
            for bouncer in lab.bouncers:  # writable again through every PgBouncer
                q(bouncer.dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (1, %s)", (lab.bouncers.index(bouncer),))
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}, beats


def lab_names(fleet) -> list[str]:
    return list(load(fleet.inventory).pgbouncers)


def test_a_pgbouncer_whose_agent_does_not_run_is_repointed_by_the_command_itself(fleet, tmp_path):
    names = lab_names(fleet)
    alone, helped = names[-1], names[:-1]
    with _agents_on_etcd(fleet, tmp_path, only=helped) as (_, agents):
        proc = fleet.cli("failover", "--to", "konpaku", "--yes")
        assert proc.returncode == 0, out(proc)
        assert f"by this command (no agent reported it): {alone}" in proc.stdout, out(proc)
        assert f"{alone} (no agent beats for it)" in proc.stderr, out(proc)
        assert all(f"{n} (" in proc.stdout.split("by its agent: ")[1] for n in helped), out(proc)
        assert set(_targets(fleet).values()) == {"konpaku"}
        back = fleet.cli("failover", "--to", "remilia", "--yes")
        assert back.returncode == 0, out(back)
        assert set(_targets(fleet).values()) == {"remilia"}


def test_without_etcd_failover_is_the_command_s_own_and_names_no_agent(fleet):
    proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert proc.returncode == 0 and "fleet state" not in proc.stdout + proc.stderr, out(proc)
    assert "3 reloaded" in proc.stdout, out(proc)
    assert fleet.cli("failover", "--to", "remilia", "--yes").returncode == 0


def test_switchover_and_promote_write_the_new_primary_and_every_agent_follows_it(fleet, tmp_path):
    lab = fleet.lab
    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = _with_etcd(fleet, etcd)
        with Agents(fleet, tmp_path, "--dwell", "0") as agents:
            agents.wait_for("expect:", timeout=30)
            _wait_beats(spec, agents.names, lambda b: b.get("state") == "home")
            proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
            assert proc.returncode == 0, out(proc)
            state, _ = desired.read(spec)
            assert state is not None and (state.generation, state.primary) == (1, "konpaku"), state
            timeline = q(lab.nodes["konpaku"].dsn, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0]
            assert state.timeline == timeline and state.pgbouncers == dict.fromkeys(agents.names, "konpaku")
            assert "fleet state generation 1 written: primary konpaku" in proc.stderr, out(proc)
            assert desired.paused(spec) is None  # its pause flag was lowered after the RESUME
            _wait_beats(spec, agents.names, lambda b: b.get("generation") == 1 and b.get("state") == "home"
                        and b.get("points_at") == "konpaku" and b.get("primary") == "konpaku")
            # A crash: the agents move every PgBouncer to remilia (read-only), then the operator promotes it.
            # The state names every PgBouncer on remilia; none is sent back to the dead konpaku.
            time.sleep(1.5)  # the agents' probes see remilia stream from konpaku (the refusal's condition)
            lab.nodes["konpaku"].kill()
            agents.wait_for("away:", timeout=10)
            proc = fleet.cli("promote", "remilia", "--yes")
            assert proc.returncode == 0, out(proc)
            state, _ = desired.read(spec)
            assert state is not None and (state.generation, state.primary) == (2, "remilia"), state
            assert state.pgbouncers == dict.fromkeys(agents.names, "remilia")
            _wait_beats(spec, agents.names, lambda b: b.get("generation") == 2 and b.get("state") == "home"
                        and b.get("primary") == "remilia" and b.get("points_at") == "remilia")
            assert set(_targets(fleet).values()) == {"remilia"}
        demoted = fleet.cli("demote", "konpaku", "--primary", "remilia", "--yes")  # the killed one rejoins
        assert demoted.returncode == 0, out(demoted)


def test_an_operators_failover_over_the_agents_own_holds_them_there_when_the_primary_returns(fleet, tmp_path):
    """The agents moved every PgBouncer to the standby after a crash; the operator then runs the read-only
    failover themselves (the plan's path): the agents no longer go back when the old primary returns."""
    lab = fleet.lab
    with _agents_on_etcd(fleet, tmp_path) as (spec, agents):
        lab.nodes["remilia"].kill()
        agents.wait_for("away:", timeout=10)
        proc = fleet.cli("failover", "--to", "konpaku", "--yes")
        assert proc.returncode == 0 and "by its agent: " in proc.stdout, out(proc)
        assert all("already on konpaku" in agents.log(n).split("converge:")[-1] for n in agents.names), \
            agents.logs()
        start_again(lab.nodes["remilia"])
        time.sleep(4.0)  # --confirm 1 and --dwell 0: an agent still "away" would have gone back by now
        assert set(_targets(fleet).values()) == {"konpaku"} and "back:" not in agents.logs(), agents.logs()
        proc = fleet.cli("failover", "--to", "remilia", "--yes")
        assert proc.returncode == 0 and "by its agent: " in proc.stdout, out(proc)
        _wait_beats(spec, agents.names, lambda b: b.get("state") == "home" and b.get("points_at") == "remilia")
    assert roles(fleet) == {"remilia": "primary", "konpaku": "standby"}


def test_a_writer_that_got_in_between_makes_publish_refuse_and_write_nothing(tmp_path, monkeypatch):
    from srht_readonly.ops.inventory import parse

    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = parse(f"[node a]\ndsn = host=h\ndata = /d\n[etcd]\nendpoints = {etcd.endpoints[0]}\n", "x.ini").etcd
        assert spec is not None
        first = desired.publish(spec, "first", primary="a", timeline=1, pgbouncers={"p": "a"})
        real_read = desired.read
        raced = []

        def read_then_someone_else_writes(spec_, *, etcd=None):
            got = real_read(spec_, etcd=etcd)
            if not raced:
                raced.append(True)
                desired.publish(spec_, "the other writer", primary="a", timeline=2)
            return got

        monkeypatch.setattr(desired, "read", read_then_someone_else_writes)
        with pytest.raises(Refused, match="changed while this command wrote it"):
            desired.publish(spec, "loser", primary="b", timeline=3)
        monkeypatch.setattr(desired, "read", real_read)
        state, raw = desired.read(spec)
        assert state is not None and (state.generation, state.by.split(" (")[0]) == (first.generation + 1,
                                                                                     "the other writer")
        assert state.pgbouncers == {"p": "a"}  # None kept the targets
        assert json.loads(raw or "{}")["generation"] == 2


def test_with_etcd_the_announcement_is_kept_there_too_listed_compared_and_cleared(fleet, tmp_path):
    local = tmp_path / "announcement"
    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = _with_etcd(fleet, etcd)
        with fleet.inventory.open("a") as inventory:
            inventory.write(f"\n[service git.sr.ht]\nannouncement = {local}\n")
        proc = fleet.cli("announce", "Read-only from 10:00 UTC", "--from", "2030-06-08T10:00Z")
        assert proc.returncode == 0 and "git.sr.ht: ok" in proc.stdout and "etcd: ok" in proc.stdout, out(proc)
        listed = fleet.cli("announce", "--list", "--json")
        rows = {r["service"]: r for r in json.loads(listed.stdout)}
        assert set(rows) == {"git.sr.ht", "etcd"}, rows
        assert rows["etcd"]["announcement"] == rows["git.sr.ht"]["announcement"], rows
        assert not [p for p in status(fleet)["problems"] if p["subject"] == "announcement"]
        local.write_text("another message, written by hand\n")  # the host's file no longer matches etcd's copy
        differ = [p for p in status(fleet)["problems"] if p["subject"] == "announcement"]
        assert differ and "etcd's copy" in differ[0]["message"], differ
        cleared = fleet.cli("announce", "--clear")
        assert cleared.returncode == 0 and "etcd: ok" in cleared.stdout, out(cleared)
        from srht_readonly.ops.etcd import client
        assert client(spec).get(f"{spec.prefix}/announcement") == []


def test_the_pause_flag_is_shown_while_up_lowered_by_its_holder_and_gone_with_its_lease(fleet, tmp_path):
    with EtcdCluster(tmp_path / "etcd") as etcd:
        spec = _with_etcd(fleet, etcd)
        flag = desired.PauseFlag(spec, "switchover --to konpaku", 30)
        flag.raise_()
        up = desired.paused(spec)
        assert up is not None and up["by"].startswith("switchover --to konpaku (") and up["limit"] == 30, up
        seen = status(fleet)
        assert seen["pause"]["by"] == up["by"]
        assert [p for p in seen["problems"] if p["subject"] == "fleet" and "paused by switchover" in p["message"]]
        flag.lower()
        assert desired.paused(spec) is None
        assert not [p for p in status(fleet)["problems"] if p["subject"] == "fleet"]
        dead = desired.PauseFlag(spec, "switchover --to konpaku", 2)  # its holder dies: never lowered
        dead.raise_()
        assert desired.paused(spec) is not None
        deadline = time.monotonic() + 10
        while desired.paused(spec) is not None:
            assert time.monotonic() < deadline, "the flag outlived its lease"
            time.sleep(0.2)
        # A switchover raises it before its PAUSE and lowers it after the RESUME.
        proc = fleet.cli("switchover", "--to", "konpaku", "--yes")
        assert proc.returncode == 0 and "PAUSE 3 PgBouncer(s) (pause flag up in etcd)" in proc.stderr, out(proc)
        assert desired.paused(spec) is None


def test_a_state_towards_a_node_that_does_not_answer_waits_and_a_stale_one_is_left(fleet, tmp_path):
    lab = fleet.lab
    with _agents_on_etcd(fleet, tmp_path) as (spec, agents):
        # A stale state: konpaku named the primary while it is a standby. Left; nothing moves.
        stale = desired.publish(spec, "a stale writer", primary="konpaku", timeline=1,
                                pgbouncers=dict.fromkeys(agents.names, "konpaku"))
        agents.wait_for("(a stale state): left", timeout=10)
        _wait_beats(spec, agents.names, lambda b: b.get("generation") == stale.generation)
        assert set(_targets(fleet).values()) == {"remilia"} and "converge:" not in agents.logs(), agents.logs()
        # Towards konpaku while it does not answer: the agents wait, then carry it out once it does.
        lab.nodes["konpaku"].stop("fast")
        down = desired.publish(spec, "failover --to konpaku --force", primary="remilia", timeline=1,
                               pgbouncers=dict.fromkeys(agents.names, "konpaku"))
        agents.wait_for("which does not answer", timeout=10)
        time.sleep(2.5)  # at least one retry, still down
        assert set(_targets(fleet).values()) == {"remilia"} and "converge:" not in agents.logs(), agents.logs()
        lab.nodes["konpaku"].start()
        agents.wait_for("converge:", timeout=20)
        _wait_beats(spec, agents.names, lambda b: b.get("generation") == down.generation
                    and b.get("points_at") == "konpaku" and b.get("state") == "hands-off")
        assert set(_targets(fleet).values()) == {"konpaku"}
        back = fleet.cli("failover", "--to", "remilia", "--yes")
        assert back.returncode == 0 and "by its agent: " in back.stdout, out(back)
