"""Numbered writes through PgBouncer, and the proof of which acknowledged ones survived.

Each writer thread inserts ``(writer, seq)`` rows and remembers every one whose COMMIT was
acknowledged, with the WAL position it was written at. After the scenario, ``verify`` reads the
final primary: an acknowledged row that is missing is a **lost write**, reported with its LSN so
the report can say why (typically: committed on the old primary after the last WAL the standby
received before it was promoted). Readers run alongside, so read availability is measured too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from ..ops import sql
from .recorder import Outcome, Recorder, State

TABLE = "drill_ledger"
SERVICE = "database"
KINDS = ("write", "read")
#: Seconds ``stop`` waits for the threads: one stuck on a paused PgBouncer is left behind (it was
#: recorded as hung) rather than holding the drill until ``query_wait_timeout``.
STOP_WAIT = 3.0


@dataclass
class LedgerResult:
    """What ``verify`` found: acknowledged, present, lost (with LSNs), commit-unknown."""

    acknowledged: int
    lost: list[dict[str, Any]] = field(default_factory=list)
    commit_unknown: int = 0
    unknown_applied: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"acknowledged": self.acknowledged, "lost": len(self.lost), "lost_writes": self.lost[:50],
                "commit_unknown": self.commit_unknown, "commit_unknown_applied": self.unknown_applied}


def prepare(primary_dsn: str) -> None:
    """(Re)create the ledger table on the primary."""
    sql.execute(primary_dsn, f"DROP TABLE IF EXISTS {TABLE}")
    sql.execute(primary_dsn, f"CREATE TABLE {TABLE} (writer int, seq int, lsn pg_lsn, "
                             "at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (writer, seq))")


class Ledger:
    """``writers`` writing and ``readers`` reading through ``dsn`` (PgBouncer) until ``stop()``."""

    def __init__(self, dsn: str, recorder: Recorder, *, writers: int = 4, readers: int = 4,
                 pause: float = 0.02, first_writer: int = 0) -> None:
        self.dsn = dsn
        self.recorder = recorder
        self.pause = pause
        # (writer, seq) -> (the row's LSN, a WAL position past its commit record, when it could be read)
        self.acked: dict[tuple[int, int], tuple[str, str | None]] = {}
        self.unknown: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(first_writer + i,), daemon=True,
                                          name=f"ledger-writer-{i}") for i in range(writers)]
        self._threads += [threading.Thread(target=self._read, args=(first_writer + i,), daemon=True,
                                           name=f"ledger-reader-{i}") for i in range(readers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        give_up = time.monotonic() + STOP_WAIT
        for t in self._threads:
            t.join(timeout=max(0.0, give_up - time.monotonic()))

    def _write(self, writer: int) -> None:
        conn = None
        seq = 0
        while not self._stop.is_set():
            seq += 1
            op = self.recorder.begin(SERVICE, "write", write=True)
            committing = False
            try:
                conn = conn or psycopg2.connect(self.dsn, connect_timeout=2)
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {TABLE} (writer, seq, lsn) VALUES (%s, %s, "
                                "pg_current_wal_insert_lsn()) RETURNING lsn::text", (writer, seq))
                    (lsn,) = cur.fetchone()
                committing = True
                conn.commit()
                with self._lock:
                    self.acked[(writer, seq)] = (lsn, None)
                self.recorder.end(op, Outcome.OK, met=State.WRITABLE)
                self._note_commit_end(conn, (writer, seq))
            except psycopg2.Error as exc:
                if committing:
                    with self._lock:
                        self.unknown.add((writer, seq))
                # A read-only refusal is what a service built with srht-readonly turns into an explanation.
                read_only = exc.pgcode == "25006"
                self.recorder.end(op, Outcome.EXPLAINED if read_only else Outcome.ERROR, detail=_detail(exc),
                                  met=State.READ_ONLY if read_only else State.UNAVAILABLE)
                _discard(conn)
                conn = None
                self._stop.wait(0.05)
            self._stop.wait(self.pause)
        _discard(conn)

    def _note_commit_end(self, conn: Any, key: tuple[int, int]) -> None:
        """Remember a WAL position past this write's commit record (the server's insert position now).

        The row's own LSN comes before its commit record, by however much WAL other writers
        (full-page images after a checkpoint, say) put in between: only a position read after the
        acknowledgement proves the standby had received the commit of a write it then lacked.
        """
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_current_wal_insert_lsn()::text")
                (after,) = cur.fetchone()
            conn.rollback()
        except psycopg2.Error:  # e.g. PgBouncer now on the standby: the write stays judged by its own LSN
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()  # the next write must not find this transaction aborted
            return
        with self._lock:
            self.acked[key] = (self.acked[key][0], after)

    def _read(self, writer: int) -> None:
        conn = None
        while not self._stop.is_set():
            op = self.recorder.begin(SERVICE, "read")
            try:
                conn = conn or psycopg2.connect(self.dsn, connect_timeout=2)
                with conn.cursor() as cur:
                    cur.execute(f"SELECT max(seq) FROM {TABLE} WHERE writer = %s", (writer,))
                    cur.fetchone()
                conn.rollback()
                self.recorder.end(op, Outcome.OK)
            except psycopg2.Error as exc:
                self.recorder.end(op, Outcome.ERROR, detail=_detail(exc), met=State.UNAVAILABLE)
                _discard(conn)
                conn = None
                self._stop.wait(0.05)
            self._stop.wait(self.pause)
        _discard(conn)

    def verify(self, primary_dsn: str) -> LedgerResult:
        """Compare what was acknowledged with what the (new) primary holds.

        What was acknowledged is taken first: a writer left behind by ``stop`` may still commit,
        and a row acknowledged after the table was read would look lost.
        """
        with self._lock:
            acked = dict(self.acked)
            unknown = set(self.unknown)
        present = {(w, s) for w, s in sql.query(primary_dsn, f"SELECT writer, seq FROM {TABLE}")}
        lost = [{"writer": w, "seq": s, "lsn": lsn, "committed_before": after}
                for (w, s), (lsn, after) in sorted(acked.items()) if (w, s) not in present]
        return LedgerResult(len(acked), lost, len(unknown), len(unknown & present))


def _detail(exc: BaseException) -> str:
    code = getattr(exc, "pgcode", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{code}: {first}" if code else first


def _discard(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg2.Error):
            conn.close()
