"""``Fleet.keep_pools`` on a real PgBouncer 1.18: a held server keeps a repoint from turning clients away.

PgBouncer turns a client away ("server login has been failing") when the RELOAD of a repoint
closed a login under way and the pool has no other server. The first test builds exactly that
state, every time, with a proxy in front of the old target that stalls new connections: one
server connection logged in and idle, one login stuck. Without a keeper the next client is turned
away; with one it is served, and the keeper is held until a server of its pool has logged in to
the new target. The last test repoints standby <-> primary under refused writes, as at the end of
a read-only window.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import psycopg2
import pytest

from srht_readonly.ops import inventory
from srht_readonly.ops.cluster import Cluster
from srht_readonly.ops.console import Admin
from srht_readonly.ops.failover import check_failover, run_failover
from srht_readonly.ops.fleet import Fleet
from srht_readonly.ops.pgbouncer import repoint
from srht_readonly.testing.lab import Lab

FAST_FAIL = "server login has been failing"


class StallingProxy:
    """TCP forwarder to ``port``; while ``stall`` is set, new connections are accepted and never forwarded."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.stall = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(conn)
            if self.closed:
                conn.close()
                return
            if self.stall:
                continue  # a login that never gets an answer
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                conn.close()
                continue
            self.sockets.append(up)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # A thread blocked in accept() is not woken by close() on Linux, only by shutdown(); left
        # blocked, it would accept on whatever socket reuses the descriptor number later (it once
        # stole a later test's webhook delivery that way).
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(timeout=5)
        assert not self.acceptor.is_alive(), "the proxy's accepting thread did not stop"
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with Lab() as lab:
        path = lab.write_inventory(tmp_path_factory.mktemp("keeper") / "inventory.ini")
        lab.cluster = Cluster(inventory.load(path))  # type: ignore[attr-defined]
        yield lab
        lab.cluster.close()  # type: ignore[attr-defined]


def _pool(admin: Admin) -> dict:
    return next(r for r in admin.show("POOLS") if r["database"] == "srht")


def _wait(what: str, check, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _login_stuck_behind(lab: Lab, proxy: StallingProxy) -> None:
    """PgBouncer's ``srht`` pool through ``proxy``: one server logged in and idle, one login stuck."""
    bouncer, admin = lab.pgbouncer, lab.pgbouncer.admin
    path = bouncer.config_path
    lab.hostos.write_text_atomic(
        path, repoint(lab.hostos.read_text(path), {"host": "127.0.0.1", "port": str(proxy.port)})
    )
    admin.reload()
    _wait("the repoint to the proxy", lambda: int(admin.databases()["srht"]["port"]) == proxy.port)
    a = psycopg2.connect(bouncer.dsn)
    a.cursor().execute("SELECT 1")  # a transaction: holds the one server connection
    proxy.stall = True
    b = psycopg2.connect(bouncer.dsn)
    waiting = threading.Thread(target=lambda: b.cursor().execute("SELECT 1"))
    waiting.start()  # needs a second server: PgBouncer starts a login, which the proxy stalls
    _wait("a login under way", lambda: int(_pool(admin)["sv_login"]) == 1)
    a.rollback()  # the waiting client gets the released server
    waiting.join(5)
    b.rollback()
    a.close()
    b.close()
    pool = _pool(admin)
    assert (int(pool["sv_idle"]), int(pool["sv_login"]), int(pool["sv_active"])) == (1, 1, 0), pool


def _read(conn) -> str | None:
    """One read on a client connection opened before the repoint (a new client would wait for the
    pool's first login instead: PgBouncer needs its server parameters); the error, if any."""
    try:
        conn.cursor().execute("SELECT 1")
        conn.rollback()
    except psycopg2.Error as exc:
        return str(exc).strip()
    return None


def _servers_at(admin: Admin, port: int) -> list[dict]:
    return [r for r in admin.show("SERVERS") if r["database"] == "srht" and int(r["port"]) == port]


@pytest.mark.parametrize("keep", [False, True], ids=["reload-alone", "keeper"])
def test_a_login_closed_by_the_repoint_turns_the_next_client_away_unless_a_server_is_held(lab, keep):
    primary = lab.primary
    proxy = StallingProxy(lab.standby.port)
    log = lab.pgbouncer.config_path.with_name("pgbouncer.log")
    try:
        _login_stuck_behind(lab, proxy)
        spec = lab.cluster.node(primary.name)
        with Fleet(lab.cluster) as fleet:
            assert not fleet.open()
            fleet.write(fleet.plan_repoint(spec))
            seen = log.read_text().count(FAST_FAIL)
            reader = psycopg2.connect(lab.pgbouncer.dsn)
            if not keep:
                fleet.reload()  # closes the stuck login: PgBouncer marks the pool's last login failed
                error = _read(reader)
                assert error is not None and "server closed the connection unexpectedly" in error, error
                assert log.read_text().count(FAST_FAIL) > seen  # PgBouncer says why
                return
            admin = lab.pgbouncer.admin
            with fleet.keep_pools(spec, at_most=10) as keepers:
                fleet.reload()
                assert [(k.database, k.user) for k in keepers] == [("srht", "srht")]
                time.sleep(0.5)  # a janitor round closes the idle server connection to the old target
                # Held: the keeper's server (to the old target, in a transaction), and no login to the new one.
                assert [r["state"] for r in _servers_at(admin, proxy.port)] == ["active"]
                assert _servers_at(admin, primary.port) == []
                assert keepers[0].released is None
                assert _read(reader) is None  # as the reader turned away above
            assert keepers[0].released == f"a server of its pool logged in to {primary.name}"
            assert keepers[0].held < 10
            assert [r["state"] for r in _servers_at(admin, primary.port)] == ["idle"]
            _wait("the keeper's server closed", lambda: _servers_at(admin, proxy.port) == [])
            assert log.read_text().count(FAST_FAIL) == seen
            reader.close()
    finally:
        proxy.close()
        lab.pgbouncer.point_at(primary)


def test_a_pool_with_no_clients_is_not_held_and_the_repoint_goes_on(lab):
    primary = lab.primary
    with Fleet(lab.cluster) as fleet:
        assert not fleet.open()
        _wait(
            "idle pools",
            lambda: (
                not any(
                    int(_pool(lab.pgbouncer.admin)[k]) for k in ("cl_active", "cl_waiting", "sv_active", "sv_login")
                )
            ),
        )
        console = psycopg2.connect(lab.pgbouncer.admin_dsn)
        console.autocommit = True
        console.cursor().execute("KILL srht")  # no server connection left either
        console.cursor().execute("RESUME srht")
        console.close()
        with fleet.keep_pools(lab.cluster.node(primary.name)) as keepers:
            fleet.reload()
        assert keepers == []


def test_repoints_under_refused_writes_fail_no_read_with_keepers(lab):
    """Standby <-> primary 8 times, 4 readers, 4 writers closing their connection after each refusal."""
    primary, standby = lab.primary, lab.standby
    dsn = lab.pgbouncer.dsn
    setup = psycopg2.connect(dsn)
    setup.autocommit = True
    setup.cursor().execute("CREATE TABLE IF NOT EXISTS keeper_ledger (writer int, seq int)")
    setup.close()
    lab.wait_caught_up()
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        conn = None
        while not stop.is_set():
            try:
                conn = conn or psycopg2.connect(dsn, connect_timeout=2)
                conn.cursor().execute("SELECT count(*) FROM keeper_ledger")
                conn.rollback()
                reads[0] += 1
            except psycopg2.Error as exc:
                errors.append(str(exc).strip())
                conn = None
            stop.wait(0.02)

    def writer(i: int) -> None:
        conn = None
        while not stop.is_set():
            try:
                conn = conn or psycopg2.connect(dsn, connect_timeout=2)
                conn.cursor().execute("INSERT INTO keeper_ledger VALUES (%s, 1)", (i,))
                conn.commit()
            except psycopg2.Error:
                with contextlib.suppress(psycopg2.Error):
                    conn and conn.close()
                conn = None
                stop.wait(0.05)
            stop.wait(0.02)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        with Fleet(lab.cluster) as fleet:
            for _ in range(8):
                for to, churn in ((standby.name, 0.6), (primary.name, 0.3)):
                    run_failover(lab.cluster, fleet, check_failover(lab.cluster, fleet, to), keep_pools=True)
                    time.sleep(churn)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert reads[0] > 100
    assert errors == []
