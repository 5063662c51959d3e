"""sshd's ``AuthorizedKeysCommand``: which git.sr.ht user, if any, may log in with this key.

sshd runs ``keys %u %h %t %k`` (user, home, key type, base64 key) and reads authorized_keys
lines from stdout; stderr goes to sshd's log, never to the pusher. For the key:

* known (one SELECT): print the line that forces the pipeline's shell for its owner;
* unknown: fetch it from meta.sr.ht (``GET /api/ssh-key/<b64>``), look its owner's id up with
  a SELECT of its own, print the line, and store the key only if the database takes the
  INSERT (``drop_on_read_only``): while read-only the key works for this connection and is
  fetched again next time. Authorisation never depends on the INSERT (the real git.sr.ht
  takes the user id from ``INSERT ... RETURNING``, so a read-only database locks out every
  key it has not seen yet).

If the database cannot be reached at all, every key gets a line whose forced command is
``shell --unavailable``: it runs nothing, it only tells the pusher that git.sr.ht cannot reach
its database, which beats the "Permission denied (publickey)" that would send them checking
their keys.

With ``GITSRHT_STORE_KEYS_ALWAYS=1`` in its environment (the drill's ``--sabotage store-keys``,
to prove the drill catches it), an unknown key is stored as sr.ht did before the plan: a plain
INSERT whose failure fails the login.

Cost: a known key, one SELECT; an unknown key, one HTTP request, two SELECTs, and a
SAVEPOINT/INSERT/RELEASE/COMMIT (the INSERT fails at once while read-only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert

from srht_readonly import Failure, classify, drop_on_read_only

from .. import schema
from . import config as _config
from .database import connect

__all__ = ["STORE_ALWAYS_ENV", "UNAVAILABLE_FLAG", "Owner", "authorized_line", "fingerprint", "main", "normalise",
           "unavailable_line"]

logger = logging.getLogger(__name__)

#: Seconds to wait for meta.sr.ht.
META_TIMEOUT = 5
#: The shell's argument that makes it say "database unreachable" and do nothing else.
UNAVAILABLE_FLAG = "--unavailable"
#: Set to 1: store unknown keys as sr.ht did before the plan (the drill's sabotage ``store-keys``).
STORE_ALWAYS_ENV = "GITSRHT_STORE_KEYS_ALWAYS"
_USERNAME = re.compile(r"[a-z_][a-z0-9_-]{0,255}")
_KEY_TYPE = re.compile(r"[a-z0-9@.-]{1,64}")


@dataclass(frozen=True)
class Owner:
    """The git.sr.ht user a key belongs to."""

    id: int
    username: str


def normalise(key_type: str, b64: str) -> str:
    """The form keys are stored and looked up in: ``"<type> <base64>"``, no comment."""
    return f"{key_type} {b64}"


def fingerprint(b64: str) -> str:
    """OpenSSH's SHA256 fingerprint of a base64 public key blob."""
    digest = hashlib.sha256(base64.b64decode(b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def authorized_line(shell: str, owner: Owner, key_type: str, b64: str) -> str:
    """The authorized_keys line: nothing but the pipeline's shell, run for ``owner``."""
    command = f"{shlex.quote(shell)} {owner.id} {owner.username}"
    return f'restrict,command="{command}" {key_type} {b64}'


def unavailable_line(shell: str, key_type: str, b64: str) -> str:
    """The line for any key while the database is unreachable: the shell only says so."""
    return f'restrict,command="{shlex.quote(shell)} {UNAVAILABLE_FLAG}" {key_type} {b64}'


def _known(conn: Connection, key: str) -> Owner | None:
    row = conn.execute(
        select(schema.user.c.id, schema.user.c.username)
        .join(schema.sshkey, schema.sshkey.c.user_id == schema.user.c.id)
        .where(schema.sshkey.c.key == key)
    ).one_or_none()
    return Owner(row.id, row.username) if row is not None else None


def _owner_named(conn: Connection, username: str) -> Owner | None:
    row = conn.execute(
        select(schema.user.c.id, schema.user.c.username).where(schema.user.c.username == username)
    ).one_or_none()
    return Owner(row.id, row.username) if row is not None else None


def fetch_from_meta(origin: str, b64: str) -> dict[str, object] | None:
    """meta.sr.ht's record of the key (``id``, ``key``, ``fingerprint``, ``owner``), or None."""
    url = f"{origin}/api/ssh-key/{urllib.parse.quote(b64, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=META_TIMEOUT) as response:
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            logger.warning("meta.sr.ht answered %s for %s", exc.code, url)
        return None
    except (OSError, ValueError) as exc:
        logger.warning("cannot ask meta.sr.ht about a key: %s", exc)
        return None
    return data if isinstance(data, dict) else None


def _meta_owner(record: dict[str, object], key_type: str, b64: str) -> str | None:
    """The owner's username from meta's record, if the record really is this key."""
    key = str(record.get("key", "")).split()
    owner = record.get("owner")
    name = owner.get("name") if isinstance(owner, dict) else None
    if key[:2] != [key_type, b64] or not isinstance(name, str):
        logger.warning("meta.sr.ht returned a record that does not match the key asked for")
        return None
    return name.lstrip("~")


def _store(conn: Connection, owner: Owner, record: dict[str, object], key_type: str, b64: str) -> bool:
    """INSERT the key unless the database is read-only; True if it is stored now."""
    meta_id = record.get("id")
    if not isinstance(meta_id, int):
        logger.warning("meta.sr.ht's record of a key has no id; not storing it")
        return False
    statement = (insert(schema.sshkey)
                 .values(user_id=owner.id, meta_id=meta_id, key=normalise(key_type, b64),
                         fingerprint=str(record.get("fingerprint") or fingerprint(b64)))
                 .on_conflict_do_nothing())
    if os.environ.get(STORE_ALWAYS_ENV) == "1":
        conn.execute(statement)
        conn.commit()
        return True
    with drop_on_read_only(conn) as write:
        conn.execute(statement)
    return not write.dropped


def authorise(conn: Connection, cfg: _config.Config, key_type: str, b64: str) -> Owner | None:
    """The owner to log in as with this key, storing a newly fetched key when writable."""
    key = normalise(key_type, b64)
    owner = _known(conn, key)
    if owner is not None:
        return owner
    record = fetch_from_meta(cfg.meta_origin, b64)
    if record is None:
        logger.info("unknown key %s", fingerprint(b64))
        return None
    username = _meta_owner(record, key_type, b64)
    owner = _owner_named(conn, username) if username else None
    if owner is None:
        logger.info("key %s belongs to ~%s, who has no git.sr.ht account", fingerprint(b64), username)
        return None
    try:
        stored = _store(conn, owner, record, key_type, b64)
        conn.commit()
    except Exception as exc:  # authorisation must not depend on the INSERT, whatever its fate
        if classify(exc) is None or os.environ.get(STORE_ALWAYS_ENV) == "1":
            raise
        logger.warning("storing key %s failed (%s); using it anyway", fingerprint(b64), exc)
        stored = False
    logger.info("key %s of ~%s fetched from meta.sr.ht, %s", fingerprint(b64), owner.username,
                "stored" if stored else "used but not stored (database read-only)")
    return owner


def main(argv: list[str] | None = None) -> int:
    """``keys USER HOME TYPE BASE64``: print the authorized_keys line, or nothing."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        logger.error("expected: keys %%u %%h %%t %%k, got %d arguments", len(args))
        return 2
    user, _home, key_type, b64 = args
    cfg = _config.load()
    if user != cfg.ssh_user:
        return 0  # not the git user: this program has nothing to say about other accounts
    try:
        base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        logger.warning("not a base64 key: %r", b64[:80])
        return 0
    if not _KEY_TYPE.fullmatch(key_type):
        logger.warning("odd key type %r", key_type[:80])
        return 0
    engine, _monitor = connect(cfg)
    try:
        with engine.connect() as conn:
            owner = authorise(conn, cfg, key_type, b64)
    except Exception as exc:
        if classify(exc) not in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
            raise
        logger.warning("database unreachable; key %s may only hear so: %s", fingerprint(b64),
                       str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        print(unavailable_line(cfg.shell, key_type, b64), flush=True)
        return 0
    finally:
        engine.dispose()
    if owner is None:
        return 0
    if not _USERNAME.fullmatch(owner.username):
        logger.error("refusing a key of user %r: the name is unsafe in a command line", owner.username)
        return 0
    print(authorized_line(cfg.shell, owner, key_type, b64), flush=True)
    return 0
