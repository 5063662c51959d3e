"""Webhook deliveries of a push: recorded in the database first, then POSTed.

``record`` INSERTs one ``repo_webhook_delivery`` row per subscription inside
``drop_on_read_only``: while the database is read-only the rows cannot be written, so the
deliveries are dropped (the plan: webhooks are only generated when the database is updated,
and a delivery nobody can record is one nobody can inspect or redeliver) and the pusher gets
**one** warning however many subscriptions there are. ``deliver`` then POSTs each recorded
delivery (timeout ``webhook-timeout``) and saves the response, silently dropping that UPDATE
if the database turned read-only (or went away) meanwhile.

The real git.sr.ht does this in a background "stage 3" that dies on the first error; here the
rows are written by the hook itself, so the warning can still reach the pusher.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, update

from srht_readonly import classify, drop_on_read_only
from srht_readonly.ssh import warn

from .. import schema

__all__ = ["EVENT", "READ_ONLY_WARNING", "Delivery", "Subscription", "deliver", "record"]

logger = logging.getLogger(__name__)

EVENT = "repo:post-update"
READ_ONLY_WARNING = (
    "git.sr.ht is in read-only mode for database maintenance, so the webhooks for this push "
    "were not delivered. Your push itself was saved."
)
#: How much of a receiver's answer is kept.
RESPONSE_LIMIT = 65536


@dataclass(frozen=True)
class Subscription:
    """A webhook subscription of the repository."""

    id: int
    url: str


@dataclass(frozen=True)
class Delivery:
    """A recorded delivery, ready to POST."""

    id: int
    uuid: str
    url: str
    payload: str


def record(conn: Connection, subscriptions: Sequence[Subscription], payload: Mapping[str, object]) -> list[Delivery]:
    """INSERT a delivery per subscription; [] (and one warning) if the database refuses."""
    if not subscriptions:
        return []
    body = json.dumps(payload, sort_keys=True)
    planned = [(s, str(uuid.uuid4())) for s in subscriptions]
    rows = [
        {"subscription_id": s.id, "uuid": key, "event": EVENT, "url": s.url, "payload": body}
        for s, key in planned
    ]
    d = schema.webhook_delivery.c
    ids: dict[str, int] = {}
    with drop_on_read_only(conn) as write:
        result = conn.execute(schema.webhook_delivery.insert().returning(d.uuid, d.id), rows)
        ids.update((key, ident) for key, ident in result.tuples())
    if write.dropped:
        warn(READ_ONLY_WARNING)
        logger.info("dropped %d webhook deliveries: database read-only", len(rows))
        return []
    return [Delivery(ids[key], key, s.url, body) for s, key in planned]


def _post(delivery: Delivery, timeout: float) -> tuple[int | None, str]:
    request = urllib.request.Request(
        delivery.url, data=delivery.payload.encode(), method="POST",
        headers={"Content-Type": "application/json", "X-Webhook-Event": EVENT,
                 "X-Webhook-Delivery": delivery.uuid},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(RESPONSE_LIMIT).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(RESPONSE_LIMIT).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        logger.warning("webhook %s to %s failed: %s", delivery.uuid, delivery.url, exc)
        return None, f"delivery failed: {exc}"


def deliver(engine: Engine, deliveries: Iterable[Delivery], *, timeout: float) -> None:
    """POST each delivery, then save the answers (dropped silently if read-only by now)."""
    results = [(delivery, *_post(delivery, timeout)) for delivery in deliveries]
    if not results:
        return
    d = schema.webhook_delivery.c
    try:
        with engine.connect() as conn:
            with drop_on_read_only(conn):
                for delivery, status, text in results:
                    conn.execute(update(schema.webhook_delivery).where(d.id == delivery.id)
                                 .values(response_status=status, response=text))
            conn.commit()
    except Exception as exc:  # delivered all the same: only the record of the answers is lost
        if classify(exc) is None:
            raise
        logger.warning("webhook answers not saved, database unreachable: %s", exc)
