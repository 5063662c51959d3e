"""Replication access in ``pg_hba.conf``: does a node let a standby stream from a given address?

Checked on the running server with ``pg_hba_file_rules`` (the file as PostgreSQL parses it), first
match wins as in PostgreSQL. ``allow_replication`` appends one line for exactly that address
(``/32`` or ``/128``, never a network) and reloads.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from . import sql
from .errors import OpsError
from .remote import Host

logger = logging.getLogger(__name__)

TCP_TYPES = ("host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")


@dataclass(frozen=True)
class Verdict:
    """Whether ``user`` may stream from ``address``, and which ``pg_hba.conf`` line decided it."""

    allowed: bool
    line: int | None
    method: str | None
    file: str

    def describe(self) -> str:
        if self.line is None:
            return f"no line of {self.file} matches"
        return f"{self.file} line {self.line} ({self.method})"


def resolve(address: str) -> str:
    """``address`` as an IP address (host names resolved here, as the server would see them)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(address, None)[0][4][0])
    except OSError as exc:
        raise OpsError(f"cannot resolve {address}: {exc}") from exc


def replication_access(dsn: str, user: str, address: str) -> Verdict:
    """Evaluate the server's ``pg_hba.conf`` for a replication connection of ``user`` from ``address``."""
    ip = ipaddress.ip_address(resolve(address))
    (hba_file,) = sql.query_one(dsn, "SHOW hba_file")
    rows = sql.query(dsn, "SELECT line_number, type, database, user_name, address, netmask, auth_method, error "
                          "FROM pg_hba_file_rules ORDER BY line_number")
    for line, kind, databases, users, addr, mask, method, error in rows:
        if error is not None or kind not in TCP_TYPES:
            continue
        if "replication" not in (databases or []):
            continue
        if not ({"all", user} & set(users or [])):
            continue
        if not _address_matches(ip, addr, mask):
            continue
        return Verdict(method != "reject", line, method, hba_file)
    return Verdict(False, None, None, hba_file)


def hba_line(user: str, address: str, method: str) -> str:
    """The line that admits ``user``'s replication connections from ``address`` only."""
    ip = ipaddress.ip_address(resolve(address))
    return f"host replication {user} {ip}/{ip.max_prefixlen} {method}"


def allow_replication(host: Host, dsn: str, user: str, address: str, *, method: str, comment: str,
                      os_user: str | None = None) -> str:
    """Append the line for ``address`` to the server's pg_hba.conf, reload, and check it took; returns it."""
    (hba_file,) = sql.query_one(dsn, "SHOW hba_file")
    line = hba_line(user, address, method)
    text = host.read_text(hba_file)
    if not text.endswith("\n"):
        text += "\n"
    host.write_text_atomic(hba_file, f"{text}# {comment}\n{line}\n", owner=os_user)
    sql.execute(dsn, "SELECT pg_reload_conf()")
    verdict = sql.wait_until(lambda: _allowed(dsn, user, address), timeout=10,
                             what=f"{hba_file} to admit replication from {address}")
    logger.info("pg_hba.conf: %s (%s)", line, verdict.describe())
    return line


def _allowed(dsn: str, user: str, address: str) -> Verdict | None:
    verdict = replication_access(dsn, user, address)
    return verdict if verdict.allowed else None


def _address_matches(ip: Any, addr: str | None, mask: str | None) -> bool:
    if addr in (None, "all"):
        return True
    if addr in ("samehost", "samenet"):
        return bool(ip.is_loopback)
    try:
        network = ipaddress.ip_network(f"{addr}/{mask}" if mask else addr, strict=False)
    except ValueError:
        try:
            return resolve(addr) == str(ip)  # a host name in pg_hba.conf
        except OpsError:
            return False
    return ip in network
