"""The delivery table of the webhook stand-in, shaped like core.sr.ht's ``*_webhook_delivery``.

``create(engine)`` makes it; ``new_delivery(conn, url, payload, ...)`` inserts a row as the web
application does when it queues a delivery, and returns its id.
"""

from __future__ import annotations

import uuid as _uuid
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
)

from srht_readonly.sqlalchemy import create_engine

metadata = MetaData()

TABLE = "webhook_delivery"

delivery = Table(
    TABLE, metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("event", String(256), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("payload", Text, nullable=False),
    Column("payload_headers", Text, nullable=False, server_default=""),
    Column("response", Text),
    Column("response_status", Integer),
    Column("response_headers", Text),
)


def create(engine: Engine) -> None:
    """Create the table (idempotent) on a writable database."""
    metadata.create_all(engine)


def new_delivery(conn: Connection, url: str, payload: str, *, event: str = "repo:post-update") -> int:
    """Insert a pending delivery (no response yet) and return its id; the caller commits."""
    row = conn.execute(
        insert(delivery).values(uuid=str(_uuid.uuid4()), event=event, url=url, payload=payload)
        .returning(delivery.c.id)
    )
    return int(row.scalar_one())


def connect(url: str, **options: Any) -> Engine:
    """An engine for the service's connection URL, safe behind PgBouncer in transaction mode
    (``srht_readonly.sqlalchemy.create_engine``: a bare ``postgresql://`` uses psycopg2, as
    SourceHut does)."""
    return create_engine(url, **options)
