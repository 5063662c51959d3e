"""One engine and one ``ReadOnlyMonitor`` per pipeline process.

Each program of the pipeline lives for one SSH connection or one hook run, so the engine has
no pool worth keeping (``NullPool``: the connection is closed when released, nothing lingers
in PgBouncer) and the monitor starts out believing the database writable: it learns otherwise
only from this process's own failures, or from an operator's announcement file
(``$SRHT_READONLY_ANNOUNCE_FILE``), which costs one ``stat()`` and no query.
"""

from __future__ import annotations

from sqlalchemy import URL, Engine
from sqlalchemy.pool import NullPool

from srht_readonly import ReadOnlyMonitor
from srht_readonly.sqlalchemy import create_engine, pgbouncer_safe_url

from .config import Config

__all__ = ["CONNECT_TIMEOUT", "connect", "url"]

#: Seconds to wait for the database (or PgBouncer) before telling the pusher it is away.
CONNECT_TIMEOUT = 5


def url(connection_string: str) -> URL:
    """The SQLAlchemy URL, safe behind PgBouncer (``srht_readonly.sqlalchemy.pgbouncer_safe_url``):
    a bare ``postgresql://`` means psycopg2, as sr.ht's services use."""
    return pgbouncer_safe_url(connection_string)


def connect(config: Config) -> tuple[Engine, ReadOnlyMonitor]:
    """An instrumented engine for ``config.connection_string`` and its monitor.

    Every process pays SQLAlchemy's first-connect queries once (server version, schema,
    isolation level, ``standard_conforming_strings``: one short transaction); the hstore
    lookup that psycopg2's dialect would add is switched off, as sr.ht has no hstore column.
    """
    target = url(config.connection_string)
    options: dict[str, object] = {}
    if target.get_driver_name() == "psycopg2":
        options["use_native_hstore"] = False
    monitor = ReadOnlyMonitor()
    engine = create_engine(
        target,
        monitor=monitor,
        poolclass=NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT, "application_name": "gitsrht-ssh"},
        **options,
    )
    return engine, monitor
