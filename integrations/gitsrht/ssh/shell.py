"""The forced command of every git.sr.ht key: ``shell USER_ID USERNAME`` (or ``--unavailable``).

It reads ``SSH_ORIGINAL_COMMAND`` (``git-receive-pack '~owner/name'``, ``git-upload-pack``,
``git-upload-archive``; a bare ``name`` means the pusher's own namespace), finds the repository
with one SELECT, checks access, and replaces itself with ``git receive-pack`` (or
``upload-pack``...) on the repository, passing the hook what it needs in ``SRHT_*`` variables.

A push to a repository that does not exist yet, in the pusher's own namespace, creates it: the
INSERT is committed first, the directory made after, so while the database is read-only the
push is refused with the reason (``abort_on_read_only``) and nothing appears on disk. The real
git.sr.ht says "Repository not found." then, which sends people looking for typos.

Cost: one SELECT; an auto-creation adds one INSERT and COMMIT. Reads (clone, fetch) never write,
so they work unchanged on a standby.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, delete, select
from sqlalchemy.exc import IntegrityError

from srht_readonly import DatabaseUnavailable, ReadOnlyMonitor, abort_on_read_only

from .. import schema
from . import config as _config
from . import repos
from .database import connect

__all__ = ["COMMANDS", "NOT_FOUND", "Request", "Repository", "main", "parse", "read_only_create_message"]

logger = logging.getLogger(__name__)

#: What sshd may ask for, and the git command that serves it.
COMMANDS = {
    "git-receive-pack": "receive-pack",
    "git-upload-pack": "upload-pack",
    "git-upload-archive": "upload-archive",
}
NOT_FOUND = "Repository not found."


def read_only_create_message(owner: str, name: str) -> str:
    """What a pusher reads when a new repository cannot be created while read-only."""
    return (
        f"git.sr.ht is in read-only mode for database maintenance, so the new repository "
        f"~{owner}/{name} cannot be created right now and nothing was pushed. Pushes to "
        f"existing repositories still work; please push this one again later."
    )


@dataclass(frozen=True)
class Request:
    """What the pusher asked for: a git command on ``~owner/name``."""

    command: str
    owner: str
    name: str

    @property
    def writes(self) -> bool:
        return self.command == "git-receive-pack"


@dataclass(frozen=True)
class Repository:
    """The row the shell needs."""

    id: int
    owner: str
    name: str
    path: str
    visibility: str


class Refused(Exception):
    """A request the pusher cannot make; ``str()`` is what they are told."""


def parse(original: str, pusher: str) -> Request:
    """Turn ``SSH_ORIGINAL_COMMAND`` into a :class:`Request`, or raise :class:`Refused`."""
    try:
        words = shlex.split(original)
    except ValueError as exc:
        raise Refused("Unrecognised command.") from exc
    if len(words) != 2 or words[0] not in COMMANDS:
        raise Refused("git.sr.ht only serves git over SSH; there is no shell access.")
    path = words[1].strip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    if path.startswith("~"):
        owner, _, name = path[1:].partition("/")
    else:
        owner, name = pusher, path
    if not owner or not repos.valid_name(name):
        raise Refused(NOT_FOUND)
    return Request(words[0], owner, name)


def find(conn: Connection, owner: str, name: str) -> Repository | None:
    """The repository ``~owner/name``, or None."""
    r, u = schema.repository.c, schema.user.c
    row = conn.execute(
        select(r.id, u.username, r.name, r.path, r.visibility)
        .join(schema.user, u.id == r.owner_id)
        .where(u.username == owner, r.name == name)
    ).one_or_none()
    return Repository(*row) if row is not None else None


def create(
    conn: Connection, cfg: _config.Config, monitor: ReadOnlyMonitor, owner_id: int, request: Request
) -> Repository:
    """Auto-create ``request``'s repository: row first (aborts while read-only), then disk."""
    path = cfg.repo_path(request.owner, request.name)
    with abort_on_read_only(read_only_create_message(request.owner, request.name), monitor=monitor):
        try:
            repo_id = conn.execute(
                schema.repository.insert()
                .values(owner_id=owner_id, name=request.name, path=str(path), visibility="public")
                .returning(schema.repository.c.id)
            ).scalar_one()
            conn.commit()
        except IntegrityError:  # a concurrent push created it first
            conn.rollback()
            existing = find(conn, request.owner, request.name)
            if existing is None:
                raise
            return existing
    try:
        repos.create_on_disk(path, cfg.post_update_script)
    except BaseException:
        repos.remove_from_disk(path)
        conn.execute(delete(schema.repository).where(schema.repository.c.id == repo_id))
        conn.commit()
        raise
    logger.info("created ~%s/%s at %s", request.owner, request.name, path)
    return Repository(repo_id, request.owner, request.name, str(path), "public")


def _check_access(repo: Repository, request: Request, pusher: str) -> None:
    if repo.owner == pusher:
        return
    if repo.visibility == "private":
        raise Refused(NOT_FOUND)
    if request.writes:
        raise Refused(f"You do not have permission to push to ~{repo.owner}/{repo.name}.")


def main(argv: list[str] | None = None) -> int:
    """``shell USER_ID USERNAME``: serve ``SSH_ORIGINAL_COMMAND`` or say why not."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--unavailable"]:  # the keys program could not reach the database either
        raise DatabaseUnavailable("the database was unreachable when the key was checked")
    if len(args) != 2 or not args[0].isdigit():
        logger.error("expected: shell USER_ID USERNAME, got %r", args)
        sys.exit("git.sr.ht is misconfigured (bad forced command); please tell the administrators.")
    user_id, pusher = int(args[0]), args[1]
    try:
        request = parse(os.environ.get("SSH_ORIGINAL_COMMAND", ""), pusher)
    except Refused as exc:
        sys.exit(str(exc))
    cfg = _config.load()
    engine, monitor = connect(cfg)
    created = False
    try:
        with engine.connect() as conn:
            repo = find(conn, request.owner, request.name)
            if repo is None:
                if not (request.writes and request.owner == pusher):
                    sys.exit(NOT_FOUND)
                repo = create(conn, cfg, monitor, user_id, request)
                created = True
    finally:
        engine.dispose()
    try:
        _check_access(repo, request, pusher)
    except Refused as exc:
        sys.exit(str(exc))
    if not Path(repo.path).is_dir():
        logger.error("~%s/%s has a row but no directory at %s", repo.owner, repo.name, repo.path)
        sys.exit(NOT_FOUND)
    env = dict(os.environ)
    env.update({
        "SRHT_PUSH": str(uuid.uuid4()),
        "SRHT_PUSHER": pusher,
        "SRHT_PUSHER_ID": str(user_id),
        "SRHT_REPO_ID": str(repo.id),
        "SRHT_AUTOCREATED": "1" if created else "",
    })
    logger.info("%s ~%s/%s for ~%s", request.command, repo.owner, repo.name, pusher)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("git", ["git", COMMANDS[request.command], repo.path], env)
