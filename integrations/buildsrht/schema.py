"""builds.sr.ht's tables, as far as the runner stand-in needs them (same shapes as the real ones).

One addition: ``UNIQUE (job_id, path)`` on ``artifact``, so that recording an artifact again
(after a COMMIT whose outcome was unknown) is a no-op (``ON CONFLICT DO NOTHING``) instead of a
duplicate row. ``create(engine)`` makes the tables; ``submit(conn, manifest)`` queues a job the
way the web application does.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
)

from srht_readonly.sqlalchemy import create_engine

metadata = MetaData()

#: builds.sr.ht's job statuses; a task is pending, running, success, failed or skipped.
JOB_STATUSES = ("pending", "queued", "running", "success", "failed", "timeout", "cancelled")

job = Table(
    "job", metadata,
    Column("id", Integer, primary_key=True),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("updated", DateTime, nullable=False, server_default=func.now()),
    Column("manifest", Text, nullable=False),
    Column("note", Text),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("runner", String(256)),
)

task = Table(
    "task", metadata,
    Column("id", Integer, primary_key=True),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("updated", DateTime, nullable=False, server_default=func.now()),
    Column("name", String(256), nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("job_id", Integer, ForeignKey("job.id", ondelete="CASCADE"), nullable=False),
    UniqueConstraint("job_id", "name"),
)

artifact = Table(
    "artifact", metadata,
    Column("id", Integer, primary_key=True),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("job_id", Integer, ForeignKey("job.id", ondelete="CASCADE"), nullable=False),
    Column("path", String(4096), nullable=False),
    Column("name", String(4096), nullable=False),
    Column("url", String(4096), nullable=False),
    Column("size", Integer, nullable=False),
    UniqueConstraint("job_id", "path"),
)


def create(engine: Engine) -> None:
    """Create the tables (idempotent) on a writable database."""
    metadata.create_all(engine)


def submit(conn: Connection, manifest: dict[str, Any], *, note: str | None = None) -> int:
    """Queue a job for ``manifest`` (its tasks pending) and return its id; the caller commits.

    ``manifest`` is builds.sr.ht's shape: ``{"tasks": [{"name": "script"}, ...],
    "artifacts": ["relative/path", ...]}``.
    """
    job_id = int(conn.execute(
        insert(job).values(manifest=json.dumps(manifest), note=note, status="queued").returning(job.c.id)
    ).scalar_one())
    for step in manifest.get("tasks", []):
        (name,) = step.keys()
        conn.execute(insert(task).values(job_id=job_id, name=name, status="pending"))
    return job_id


def connect(url: str, **options: Any) -> Engine:
    """An engine for the service's connection URL, safe behind PgBouncer in transaction mode
    (``srht_readonly.sqlalchemy.create_engine``: a bare ``postgresql://`` uses psycopg2, as
    SourceHut does)."""
    return create_engine(url, **options)
