"""Client load for failover drills: writers that count acknowledged writes, readers that time outages.

``WriteLoad`` runs N clients, each committing one INSERT at a time through a PgBouncer and
remembering which ones were acknowledged, so a drill can prove "0 failed transactions, 0 lost
acknowledged writes" and measure the longest time a client waited between two commits.
``ReadProbe`` does the same for reads. Both are plain threads over psycopg2 (which never
prepares statements, so PgBouncer's transaction pooling is safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg2

logger = logging.getLogger(__name__)

TABLE = "srht_drill_ledger"


@dataclass
class Failure:
    """One failed attempt: when, which client, the error's first line and SQLSTATE."""

    at: float
    client: int
    error: str
    pgcode: str | None


@dataclass
class ClientLog:
    """What one client saw: the sequence numbers acknowledged and when, and its failures."""

    acked: list[int] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


@dataclass
class LoadReport:
    """The load's outcome between ``started`` and ``stopped`` (``time.monotonic()`` clock)."""

    started: float
    stopped: float
    clients: list[ClientLog]

    @property
    def acknowledged(self) -> int:
        return sum(len(c.acked) for c in self.clients)

    @property
    def failures(self) -> list[Failure]:
        return sorted((f for c in self.clients for f in c.failures), key=lambda f: f.at)

    def longest_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest wait of any one client between two acknowledged writes overlapping [start, end]."""
        start = self.started if start is None else start
        end = self.stopped if end is None else end
        worst = 0.0
        for c in self.clients:
            times = [self.started, *c.ack_times, self.stopped]
            for a, b in zip(times, times[1:], strict=False):
                if b >= start and a <= end:
                    worst = max(worst, b - a)
        return worst

    def fleet_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest time during which *no* client got a write acknowledged, within [start, end]."""
        start = self.started if start is None else start
        end = self.stopped if end is None else end
        times = sorted(t for c in self.clients for t in c.ack_times if start <= t <= end)
        times = [start, *times, end]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def lost(self, dsn: str) -> list[tuple[int, int]]:
        """Acknowledged writes that ``dsn`` (the surviving primary) does not have: (client, seq)."""
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT client, seq FROM {TABLE}")
            present = set(cur.fetchall())
        conn.close()
        return [(i, s) for i, c in enumerate(self.clients) for s in c.acked if (i, s) not in present]


class WriteLoad:
    """``clients`` writers spread over ``dsns`` (PgBouncers), each committing an INSERT every ``pause`` s."""

    def __init__(self, dsns: Sequence[str], *, clients: int = 8, pause: float = 0.002) -> None:
        self.dsns = list(dsns)
        self.logs = [ClientLog() for _ in range(clients)]
        self.pause = pause
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    @staticmethod
    def create_table(primary_dsn: str) -> None:
        """The ledger the writers fill (on the primary; created once)."""
        with psycopg2.connect(primary_dsn) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (client int, seq int, at timestamptz DEFAULT now(),"
                        f" PRIMARY KEY (client, seq))")
            cur.execute(f"TRUNCATE {TABLE}")
        conn.close()

    def __enter__(self) -> WriteLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def start(self) -> None:
        self.started = time.monotonic()
        for i in range(len(self.logs)):
            t = threading.Thread(target=self._client, args=(i,), name=f"writer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> LoadReport:
        """Stop every client (each finishes its current write) and report."""
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return LoadReport(self.started, time.monotonic(), self.logs)

    def _client(self, i: int) -> None:
        log = self.logs[i]
        dsn = self.dsns[i % len(self.dsns)]
        seq = 0
        conn = None
        while not self._stop.is_set():
            seq += 1
            try:
                if conn is None:
                    conn = psycopg2.connect(dsn, connect_timeout=5)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {TABLE} (client, seq) VALUES (%s, %s)", (i, seq))
                log.acked.append(seq)
                log.ack_times.append(time.monotonic())
            except psycopg2.Error as exc:
                log.failures.append(Failure(time.monotonic(), i, str(exc).strip().split("\n")[0], exc.pgcode))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
            time.sleep(self.pause)
        if conn is not None:
            conn.close()


class ReadProbe:
    """One reader per DSN, each running ``SELECT 1`` in a loop; records when reads succeed."""

    def __init__(self, dsns: Sequence[str], *, pause: float = 0.01) -> None:
        self.dsns = list(dsns)
        self.ok_times: list[list[float]] = [[] for _ in self.dsns]
        self.failures: list[list[Failure]] = [[] for _ in self.dsns]
        self.pause = pause
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ReadProbe:
        for i in range(len(self.dsns)):
            t = threading.Thread(target=self._reader, args=(i,), name=f"reader-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def restored_after(self, moment: float) -> list[float | None]:
        """For each DSN, seconds from ``moment`` to its first successful read after it (None: none yet)."""
        return [next((t - moment for t in times if t >= moment), None) for times in self.ok_times]

    def _reader(self, i: int) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsns[i], connect_timeout=5)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                self.ok_times[i].append(time.monotonic())
            except psycopg2.Error as exc:
                self.failures[i].append(Failure(time.monotonic(), i, str(exc).strip().split("\n")[0], exc.pgcode))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(self.pause)
        if conn is not None:
            conn.close()
