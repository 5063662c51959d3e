"""One agent's host cut off from the primary only, by a real network partition.

A lab primary and its streaming standby also listen on the host's end of a veth pair into a
network namespace (``testing.netns``), the primary on one address, the standby on another. In
the namespace, a "host" of its own: a PgBouncer and its agent, reaching the nodes through the
pair. Beside it, on this host, the lab's own PgBouncer and its agent. The namespace's route to
the primary's address becomes a black hole: only that PgBouncer goes read-only (onto the
standby), the other stays on the primary, nothing is promoted; the route healed, it comes back.

Both agents run with ``--auto-promote`` and a real etcd (reachable from both sides). The cut-off
one, away, takes the promotion lease (the other, at home, does not seek it): it sees the primary
dead, but one agent of two is no majority, so nothing is promoted.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.ops.console import Admin
from srht_readonly.ops.errors import OpsError
from srht_readonly.ops.pgbouncer import PgBouncerProcess
from srht_readonly.ops.ports import free_port
from srht_readonly.testing.agents import Agents, reads_restored
from srht_readonly.testing.etcd import EtcdCluster
from srht_readonly.testing.lab import APP_DB, APP_USER, REPLICATION_USER, Lab
from srht_readonly.testing.load import TABLE, ReadProbe, WriteLoad
from srht_readonly.testing.netns import Netns
from srht_readonly.testing.servers import LabBouncer
from tests._fleet import q

INSIDE = "cut-off"


def _streaming(dsn: str) -> bool:
    return q(dsn, "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0][0] == 1


def _wait(check, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


@pytest.fixture
def partition(tmp_path):
    """(lab, netns, the namespace's PgBouncer, its console's DSN, its inventory, this host's inventory, etcd),
    both inventories with ``[etcd]`` and an ``[agent]`` fence."""
    with Lab() as lab, Netns() as ns, EtcdCluster(tmp_path / "etcd", host=ns.host_address) as etcd:
        via = dict(zip(("remilia", "konpaku"), ns.host_addresses, strict=True))
        for node in lab.nodes.values():  # each node also reachable from the namespace, on its own address
            hba = Path(node.server.data, "pg_hba.conf").read_text()
            node.server.write_file("pg_hba.conf", hba + f"host all all {ns.inside}/32 trust\n", mode=0o600)
            q(node.admin_dsn, f"ALTER SYSTEM SET listen_addresses = '127.0.0.1,{via[node.name]}'")
            node.stop("fast")
            node.start()
        _wait(lambda: _streaming(lab.nodes["konpaku"].admin_dsn), timeout=30, what="the standby streams again")
        # The namespace's PgBouncer: the lab's settings, listening inside, its databases on the primary's address.
        bouncer = LabBouncer(lab, free_port(), "remilia", name=INSIDE, settings={"listen_addr": ns.inside})
        bouncer.write_config()
        primary = lab.nodes["remilia"]
        text = bouncer.config_path.read_text().replace(f"host={primary.host} port={primary.port}",
                                                       f"host={via['remilia']} port={primary.port}")
        lab.hostos.write_text_atomic(bouncer.config_path, text, owner=lab.os_user, mode=0o640)
        pgbouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        subprocess.run(ns.argv(["runuser", "-u", lab.os_user, "--", pgbouncer, "-d", str(bouncer.config_path)]),
                       check=True, timeout=10)
        process = PgBouncerProcess(bouncer.config_path, bouncer.config_path.with_name("pgbouncer.pid"),
                                   os_user=lab.os_user)
        admin = f"host={ns.inside} port={bouncer.port} user=postgres dbname=pgbouncer"
        try:
            _wait(lambda: _answers(admin), timeout=10, what="the namespace's PgBouncer answers")
            inside = tmp_path / "inside.ini"
            lines = []
            for node in lab.nodes.values():
                at = f"host={via[node.name]} port={node.port}"
                lines += [f"[node {node.name}]", f"dsn = {at} user=postgres dbname=postgres",
                          f"data = {node.server.data}", f"bin = {node.server.bin}", f"os-user = {lab.os_user}",
                          f"target = {at}", ""]
            shared = ["", "[etcd]", f"endpoints = {etcd.endpoints[0]}", "", "[agent]",
                      f"fence = echo \"$SRHT_READONLY_FENCE_NODE\" >> {tmp_path / 'fenced.log'}", ""]
            ours = [f"[pgbouncer {INSIDE}]", f"config = {bouncer.config_path}", f"admin = {admin}", ""]
            theirs = [f"[pgbouncer {lab.pgbouncer.name}]", f"config = {lab.pgbouncer.config_path}",
                      f"admin = {lab.pgbouncer.admin_dsn}", ""]  # every PgBouncer, as on every real host
            lines += [*ours, *theirs, "[replication]", f"user = {REPLICATION_USER}", *shared]
            inside.write_text("\n".join(lines))
            host = lab.write_inventory(tmp_path / "host.ini")
            with host.open("a") as f:
                f.write("\n".join(["", *ours, *shared]))
            yield lab, ns, bouncer, admin, inside, host, etcd
        finally:
            process.stop()


def _answers(admin: str) -> bool:
    try:
        return bool(Admin(admin).databases())
    except (psycopg2.Error, OpsError):
        return False


def _target_port(admin: str) -> int:
    return int(Admin(admin).databases()[APP_DB]["port"])


def test_one_host_cut_off_from_the_primary_only_its_pgbouncer_alone_goes_read_only_nothing_promoted(partition,
                                                                                                 tmp_path):
    lab, ns, bouncer, admin, inside, host, etcd = partition
    WriteLoad.create_table(lab.nodes["remilia"].dsn)
    inside_dsn = f"host={ns.inside} port={bouncer.port} user={APP_USER} dbname={APP_DB}"
    promoting = ("--dwell", "0", "--auto-promote", "2")
    with Agents(inside, tmp_path, *promoting, wrap=ns.argv, only=[INSIDE]) as cut_off, \
            Agents(host, tmp_path, *promoting, only=[lab.pgbouncer.name]) as beside:
        cut_off.wait_for("expect:", timeout=30)
        beside.wait_for("expect:", timeout=30)
        assert _leader(etcd) is None  # nobody seeks the promotion lease while at home
        _partitioned(lab, ns, bouncer, admin, inside_dsn, cut_off, beside, etcd)
    assert "away:" not in beside.logs() and "back:" not in beside.logs(), beside.logs()
    assert cut_off.count("away:") == {INSIDE: 1} and cut_off.count("back:") == {INSIDE: 1}, cut_off.logs()
    assert "promote:" not in cut_off.logs() + beside.logs() and not (tmp_path / "fenced.log").exists()


def _leader(etcd: EtcdCluster) -> str | None:
    from srht_readonly.ops.etcd import client
    from srht_readonly.ops.inventory import EtcdSpec

    values = client(EtcdSpec(tuple(etcd.endpoints))).get("/srht-readonly/leader")
    return values[0].decode() if values else None


def _partitioned(lab, ns, bouncer, admin, inside_dsn, cut_off, beside, etcd) -> None:
    remilia, konpaku = lab.nodes["remilia"], lab.nodes["konpaku"]
    with ReadProbe([inside_dsn, lab.pgbouncer.dsn]) as reads:
        time.sleep(1.0)
        cut = time.monotonic()
        ns.cut(ns.host_addresses[0])  # the primary's address: packets from inside vanish
        cut_off.wait_for("away:", timeout=10)
        away = time.monotonic() - cut
        # A read sent to the primary just after the cut waits until PgBouncer's tcp_user_timeout (the lab's
        # 2 s) makes TCP give up, about 5.8 s here; the reader then connects again and reads the standby.
        _wait(lambda: reads.restored_after(cut + away + 2.0)[0] is not None, timeout=15,
              what=f"reads through the cut-off PgBouncer\n{cut_off.logs()}")
        time.sleep(0.5)
        restored = reads_restored(reads, cut)
    times = reads.ok_times[1]
    other = max(b - a for a, b in zip(times, times[1:], strict=False) if b >= cut)
    print(f"\nagent behind a black hole to the primary: away {away:.2f} s after the cut, reads through its "
          f"PgBouncer back at {restored[0]:.2f} s; through the other PgBouncer the longest gap was {other:.2f} s")
    assert other < 2.0, f"reads through the PgBouncer that still reaches the primary stopped for {other:.2f} s"
    assert away < 5.0, cut_off.logs()
    failures = [(round(f.at - cut, 2), f.error) for f in reads.failures[0] if f.at >= cut]
    assert restored[0] is not None and restored[0] < 10.0, (restored, failures, cut_off.logs())
    assert _target_port(admin) == konpaku.port, cut_off.logs()
    assert _target_port(lab.pgbouncer.admin_dsn) == remilia.port
    assert "away:" not in beside.logs(), beside.logs()
    # With --auto-promote 2, the cut-off agent (away: it took the promotion lease, which the other, at home,
    # does not seek) saw the primary silent, alone: no majority, no promotion.
    cut_off.wait_for("no-promotion: 1 of 2 agents have seen remilia silent for 2 s; 2 needed", timeout=10)
    assert _leader(etcd) == INSIDE
    assert {n: lab.nodes[n].role() for n in lab.nodes} == {"remilia": "primary", "konpaku": "standby"}
    # Writes: refused through the cut-off PgBouncer with the read-only SQLSTATE, taken beside it.
    with pytest.raises(psycopg2.Error) as refused:
        q(inside_dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, 0)")
    assert refused.value.pgcode == "25006", refused.value
    q(lab.pgbouncer.dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, 1)")
    # The link healed: the primary answers again, unchanged; the cut-off PgBouncer goes back to it.
    ns.heal(ns.host_addresses[0])
    cut_off.wait_for("back:", timeout=20)
    assert _target_port(admin) == remilia.port
    q(inside_dsn, f"INSERT INTO {TABLE} (client, seq) VALUES (0, 2)")
