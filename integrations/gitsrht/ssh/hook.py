"""Each repository's ``post-update`` hook: bump the mtime, record and send the webhooks.

git runs it after the refs were updated, with the ref names as arguments and the shell's
``SRHT_*`` variables in the environment; everything it prints reaches the pusher as
``remote: ...``. The real git.sr.ht reads what the hook needs with the mtime's own
``UPDATE ... RETURNING``, so on a read-only database the hook dies before any webhook. Here:

1. one SELECT reads the repository, its owner and its webhook subscriptions;
2. ``UPDATE repository SET updated = now()`` runs in ``drop_on_read_only``: silently dropped;
3. the deliveries are recorded (``webhooks.record``: dropped with one warning), committed, and
   then POSTed.

The push itself is never undone: by now git has stored it. So if the database cannot be
reached at all, the pusher is told that the push was saved and its webhooks were not (one
warning), rather than ``run()``'s "nothing was changed". Cost while writable: the SELECT, a
SAVEPOINT/UPDATE/RELEASE, a SAVEPOINT/INSERT/RELEASE when there are subscriptions, a COMMIT;
then per webhook a POST, and one UPDATE + COMMIT for all their answers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Connection, Engine, and_, func, select, update

from srht_readonly import ReadOnlyMonitor, classify, drop_on_read_only
from srht_readonly.ssh import say, warn

from .. import schema
from . import config as _config
from . import webhooks
from .database import connect

__all__ = ["UNREACHABLE_WARNING", "main"]

logger = logging.getLogger(__name__)

UNREACHABLE_WARNING = (
    "git.sr.ht could not reach its database after your push. The push itself was saved, but "
    "the repository's webhooks were not delivered."
)


def _read(conn: Connection, repo_id: int | None, path: str) -> tuple[dict[str, object], list[webhooks.Subscription]]:
    """The repository (by id from the shell, else by path) and its post-update subscriptions."""
    r, u, s = schema.repository.c, schema.user.c, schema.webhook_subscription.c
    query = (
        select(r.id, r.name, u.username, s.id.label("sub_id"), s.url)
        .join(schema.user, u.id == r.owner_id)
        .outerjoin(schema.webhook_subscription,
                   and_(s.repo_id == r.id, s.events.contains(webhooks.EVENT)))
        .where(r.id == repo_id if repo_id is not None else r.path == path)
        .order_by(s.id)
    )
    rows = conn.execute(query).all()
    if not rows:
        return {}, []
    first = rows[0]
    repo = {"id": first.id, "name": first.name, "owner": first.username}
    return repo, [webhooks.Subscription(row.sub_id, row.url) for row in rows if row.sub_id is not None]


def _refs(names: list[str]) -> list[dict[str, object]]:
    """Each updated ref with the commit it points at now."""
    if not names:
        return []
    out = subprocess.run(["git", "rev-parse", *names], capture_output=True, text=True)
    ids = out.stdout.split() if out.returncode == 0 else [""] * len(names)
    return [{"name": name, "new": {"id": commit}} for name, commit in zip(names, ids, strict=False)]


def main(argv: list[str] | None = None) -> int:
    """``post-update REF...``: run by git in the repository after a push."""
    refs = sys.argv[1:] if argv is None else argv
    cfg = _config.load()
    env_id = os.environ.get("SRHT_REPO_ID", "")
    repo_id = int(env_id) if env_id.isdigit() else None
    path = str(Path(os.environ.get("GIT_DIR", ".")).resolve())
    engine, monitor = connect(cfg)
    try:
        _record_push(engine, monitor, cfg, refs, repo_id, path)
    except Exception as exc:
        if classify(exc) is None:
            raise
        logger.warning("post-update: database failure after the push: %s", exc)
        warn(UNREACHABLE_WARNING)
    finally:
        engine.dispose()
    return 0


def _record_push(
    engine: Engine, monitor: ReadOnlyMonitor, cfg: _config.Config, refs: list[str], repo_id: int | None, path: str
) -> None:
    with engine.connect() as conn:
        repo, subscriptions = _read(conn, repo_id, path)
        if not repo:
            logger.error("post-update in %s: no such repository (id %s)", path, repo_id)
            return
        with drop_on_read_only(conn, monitor=monitor) as mtime:
            conn.execute(update(schema.repository).where(schema.repository.c.id == repo["id"])
                         .values(updated=func.now()))
        payload = {
            "event": webhooks.EVENT,
            "push": os.environ.get("SRHT_PUSH", ""),
            "pusher": {"canonical_name": f"~{os.environ.get('SRHT_PUSHER', '')}"},
            "repository": repo,
            "refs": _refs(refs) if subscriptions else [],
        }
        deliveries = webhooks.record(conn, subscriptions, payload)
        conn.commit()
    if mtime.dropped:
        logger.info("~%s/%s: mtime update dropped, database read-only", repo["owner"], repo["name"])
    if os.environ.get("SRHT_AUTOCREATED"):
        where = f" To configure it, visit {cfg.origin}/~{repo['owner']}/{repo['name']}/settings" if cfg.origin else ""
        say(f"You created a new repository, ~{repo['owner']}/{repo['name']}.{where}")
    webhooks.deliver(engine, deliveries, timeout=cfg.webhook_timeout)
