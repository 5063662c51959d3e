"""Deliberately broken parts, to prove the drill catches them: ``srht-readonly drill --sabotage NAME``.

A drill that passes proves something only if the same drill fails when a part is broken. Each
sabotage breaks one part the way it would break in real life, plays only the scenario that
exercises it, and must end with exit 1 and the expectation named in ``caught_by`` failed:

* ``no-resume``: the switchover leaves one PgBouncer paused (its RESUME never arrived);
* ``slow-login-retry``: the read-only failover after a crash leaves PgBouncer's
  ``server_login_retry`` at its default 15 s instead of lowering it;
* ``web-500``: the web front runs without its read-only handling, so writes end in 500s;
* ``store-keys``: the SSH pipeline stores unknown keys with a plain INSERT while read-only;
* ``no-backoff``: the build runner gives up at its first refused update instead of waiting.

The first two are done to the fleet by ``procedures.InventoryProcedures``; the others are
handed to the stand-in services (``services.DrillEnvironment.sabotage``), so they exist on the
embedded lab only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SABOTAGES", "Sabotage", "with_setting"]


@dataclass(frozen=True)
class Sabotage:
    name: str
    scenario: str  # the only scenario played
    what: str
    caught_by: str  # the start of the expectation that must fail
    services: bool = False  # broken in the stand-in services (embedded lab only)

    @property
    def service(self) -> str | None:
        """The one stand-in service it breaks (the drill plays only that one), from ``caught_by``."""
        return self.caught_by.split(":", 1)[0] if self.services else None


SABOTAGES = {s.name: s for s in (
    Sabotage("no-resume", "switchover", "the switchover leaves one PgBouncer paused",
             "longest write gap under 1 s"),
    Sabotage("slow-login-retry", "primary-crash",
             "the failover leaves PgBouncer's server_login_retry at its default 15 s",
             "reads restored within 2 s of the failover"),
    Sabotage("web-500", "readonly-failover", "the web front runs without its read-only handling",
             "web: traffic ran and no user saw an unexplained error", services=True),
    Sabotage("store-keys", "readonly-failover", "the SSH pipeline stores unknown keys while read-only",
             "ssh: in the read-only state, unknown keys worked and were not stored", services=True),
    Sabotage("no-backoff", "readonly-failover", "the build runner does not wait for writes",
             "builds: none aborted", services=True),
)}


def with_setting(text: str, key: str, value: str) -> str:
    """PgBouncer config ``text`` with ``key = value`` in its ``[pgbouncer]`` section (replaced or added)."""
    line = re.compile(rf"^\s*{re.escape(key)}\s*=.*$", re.MULTILINE)
    if line.search(text):
        return line.sub(f"{key} = {value}", text, count=1)
    return re.sub(r"^\[pgbouncer\][^\n]*\n", lambda m: f"{m.group(0)}{key} = {value}\n", text, count=1,
                  flags=re.MULTILINE)
