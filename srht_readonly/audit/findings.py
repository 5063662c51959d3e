"""What the audit reports: the kinds of session-level use that break behind PgBouncer's transaction pooling.

In transaction mode PgBouncer gives a client a server connection for one transaction only; the
next transaction may run on another one, and the connection goes on to serve other clients.
Anything a statement leaves in the *server session* (a setting, a lock, a prepared statement, a
temporary table, a cursor, a LISTEN) is therefore lost to its client and leaked to the others.
Each ``Kind`` has its explanation (``why``) and its fix; a ``Finding`` is one statement of one
kind, where it came from, and how many times it was seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

__all__ = ["FIX", "TITLE", "WHY", "Finding", "Kind"]


class Kind(StrEnum):
    SESSION_SET = "session-set"  # SET / SET SESSION / RESET / set_config(..., false)
    LISTEN = "listen"  # LISTEN, UNLISTEN
    ADVISORY_LOCK = "advisory-lock"  # pg_advisory_lock, pg_try_advisory_lock (and _shared)
    PREPARED_STATEMENT = "prepared-statement"  # SQL PREPARE; protocol-level named statements
    TEMP_TABLE = "temp-table"  # CREATE TEMP TABLE (VIEW, SEQUENCE) without ON COMMIT DROP; SELECT INTO TEMP
    WITH_HOLD_CURSOR = "with-hold-cursor"  # DECLARE ... CURSOR WITH HOLD
    DISCARD = "discard"  # DISCARD ALL / PLANS / SEQUENCES / TEMP
    LOAD = "load"  # LOAD 'library'


TITLE: dict[Kind, str] = {
    Kind.SESSION_SET: "session-level setting (SET, SET SESSION, RESET, set_config(..., false))",
    Kind.LISTEN: "LISTEN / UNLISTEN",
    Kind.ADVISORY_LOCK: "session-level advisory lock",
    Kind.PREPARED_STATEMENT: "named prepared statement",
    Kind.TEMP_TABLE: "temporary table that outlives its transaction",
    Kind.WITH_HOLD_CURSOR: "WITH HOLD cursor",
    Kind.DISCARD: "DISCARD",
    Kind.LOAD: "LOAD",
}

WHY: dict[Kind, str] = {
    Kind.SESSION_SET: (
        "A SET without LOCAL (also SET SESSION, RESET, set_config(name, value, false)) changes the server "
        "connection, not the transaction, and outlives it. In transaction mode PgBouncer hands that server "
        "connection to other clients once the transaction ends: the setting leaks into their transactions, "
        "and your own next transaction may run on another server connection, without it. (PgBouncer "
        "itself carries client_encoding, DateStyle, TimeZone, standard_conforming_strings and "
        "application_name from client to server connection: those are not reported.)"
    ),
    Kind.LISTEN: (
        "LISTEN subscribes the server connection, not your client: after the transaction PgBouncer gives "
        "that connection to other clients, so notifications go to whoever holds it (and are dropped by "
        "them), never reliably to you; UNLISTEN acts on whichever server connection you happen to get."
    ),
    Kind.ADVISORY_LOCK: (
        "A session-level advisory lock belongs to the server connection until it is unlocked or the "
        "connection closes: it outlives the transaction that took it, even when taken inside one. In "
        "transaction mode the unlock may run on another server connection (the lock is then never "
        "released), and every client that gets the first connection silently holds the lock too."
    ),
    Kind.PREPARED_STATEMENT: (
        "A named prepared statement (SQL PREPARE, or a named statement of the extended protocol) lives in "
        "the server connection that parsed it. In transaction mode the next EXECUTE or Bind may reach "
        "another server connection: 'prepared statement ... does not exist', or a statement of the same "
        "name prepared by another client for another query. PgBouncer before 1.21 does not track them "
        "(Debian ships 1.18)."
    ),
    Kind.TEMP_TABLE: (
        "A temporary table (view, sequence) belongs to the server connection and outlives the "
        "transaction that created it: your next transaction may run on another connection and not see "
        "it, while other clients that get this connection see yours, or fail creating theirs with "
        "'relation already exists'."
    ),
    Kind.WITH_HOLD_CURSOR: (
        "A WITH HOLD cursor survives its transaction in the server connection: the next FETCH may reach "
        "another server connection ('cursor ... does not exist'), while the cursor and its materialised "
        "result stay held in the first one, visible to whoever gets it."
    ),
    Kind.DISCARD: (
        "DISCARD resets whichever server connection you hold at that moment (DISCARD ALL cannot even run "
        "inside a transaction block): the state it means to clear lives in other connections, and it "
        "wipes state of the connection's other clients."
    ),
    Kind.LOAD: (
        "LOAD loads a library into the current server connection only: your next transaction may run on "
        "another connection without it."
    ),
}

FIX: dict[Kind, str] = {
    Kind.SESSION_SET: (
        "SET LOCAL inside the transaction that needs it (or set_config(name, value, true)); a value every "
        "connection needs goes on the role or the database (ALTER ROLE ... SET, ALTER DATABASE ... SET)."
    ),
    Kind.LISTEN: (
        "LISTEN on a dedicated connection straight to PostgreSQL (or through a PgBouncer pool in session "
        "mode); NOTIFY through PgBouncer is fine, it is delivered at commit."
    ),
    Kind.ADVISORY_LOCK: (
        "pg_advisory_xact_lock / pg_try_advisory_xact_lock (or their _shared variants), taken inside the "
        "transaction that does the work and released when it ends."
    ),
    Kind.PREPARED_STATEMENT: (
        "Unnamed statements: psycopg 3 with prepare_threshold=None (srht_readonly.sqlalchemy.create_engine "
        "does it) and never prepare=True; psycopg2 never prepares. SQL PREPARE only with its EXECUTE and "
        "DEALLOCATE in the same transaction, or a plain query instead."
    ),
    Kind.TEMP_TABLE: (
        "CREATE TEMP TABLE ... ON COMMIT DROP inside the transaction that uses it (or DROP it before that "
        "transaction ends)."
    ),
    Kind.WITH_HOLD_CURSOR: (
        "A cursor without WITH HOLD, read to the end inside one transaction (a psycopg2 named cursor with "
        "withhold=False, the default), or CLOSE it before the transaction ends."
    ),
    Kind.DISCARD: (
        "Keep no session state, then there is nothing to discard: remove the DISCARD (resetting server "
        "connections is PgBouncer's business, server_reset_query)."
    ),
    Kind.LOAD: (
        "Load the library for every connection on the server: shared_preload_libraries, or "
        "session_preload_libraries (ALTER ROLE ... SET session_preload_libraries)."
    ),
}


@dataclass(frozen=True)
class Finding:
    """One statement of one ``kind``, seen ``count`` times.

    ``statement`` is the first occurrence (whitespace collapsed); ``where`` the Python frame that
    sent it (``file:line in function``), or None when only the server saw it.
    """

    kind: Kind
    statement: str
    where: str | None
    count: int = 1
    normalized: str = ""

    @property
    def title(self) -> str:
        return TITLE[self.kind]

    @property
    def why(self) -> str:
        return WHY[self.kind]

    @property
    def fix(self) -> str:
        return FIX[self.kind]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data.update(title=self.title, why=self.why, fix=self.fix)
        return data
