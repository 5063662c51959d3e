"""git.sr.ht's tables, as far as the stand-ins need them (same shapes as the real schema).

Shared by the web front and the SSH pipeline; ``create(engine)`` makes them on a primary.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy import Table as _Table

metadata = MetaData()

user = _Table(
    "user", metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(256), nullable=False, unique=True),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("last_seen", DateTime),
)

sshkey = _Table(
    "sshkey", metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("user.id"), nullable=False),
    Column("meta_id", Integer, nullable=False, unique=True),
    Column("key", Text, nullable=False, unique=True),
    Column("fingerprint", String(512), nullable=False),
)

repository = _Table(
    "repository", metadata,
    Column("id", Integer, primary_key=True),
    Column("owner_id", Integer, ForeignKey("user.id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("description", String(1024)),
    Column("visibility", String(16), nullable=False, server_default="public"),
    Column("path", String(1024), nullable=False),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("updated", DateTime, nullable=False, server_default=func.now()),
    UniqueConstraint("owner_id", "name"),
)

webhook_subscription = _Table(
    "repo_webhook_subscription", metadata,
    Column("id", Integer, primary_key=True),
    Column("repo_id", Integer, ForeignKey("repository.id"), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("events", String(256), nullable=False, server_default="repo:post-update"),
)

webhook_delivery = _Table(
    "repo_webhook_delivery", metadata,
    Column("id", Integer, primary_key=True),
    Column("subscription_id", Integer, ForeignKey("repo_webhook_subscription.id"), nullable=False),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("event", String(256), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created", DateTime, nullable=False, server_default=func.now()),
    Column("response_status", Integer),
    Column("response", Text),
)


def create(engine: Engine) -> None:
    """Create the tables (idempotent) on a writable database."""
    metadata.create_all(engine)
