"""Re-running work that lost its database connection before it could have changed anything.

A web request whose query dies with its connection (the primary crashed, PgBouncer dropped the
server connection) can simply be run again on a fresh connection, provided that doing it twice
cannot do anything twice. This module holds what decides that, with no web framework:

* a :class:`Ledger` records what one unit of work (a request) did to the database so far:
  whether it ran a statement that writes, and whether a transaction that wrote reached COMMIT.
  ``srht_readonly.sqlalchemy.track_writes(engine)`` feeds the ledger :func:`recording` made
  current (a ``contextvars`` variable: one per thread or task);
* :func:`why_not` is **the rule** (documented in docs/flask.md#transparent-retry);
* :class:`RetryBudget` spaces the attempts (jittered, doubling) within a total budget.

The Flask adapter (``srht_readonly.flask``) puts them together around each request.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from .errors import Failure

__all__ = ["LEDGER", "SAFE_METHODS", "Ledger", "RetryBudget", "current", "is_write", "recording", "why_not"]

#: HTTP methods that must not change anything (RFC 9110 "safe"): re-run even after a statement
#: that wrote, as long as no transaction that wrote reached COMMIT.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Statements that only read, by their first keyword; anything else counts as a write. Within
# them, a write keyword anywhere (``WITH ... INSERT``, ``EXPLAIN ANALYZE UPDATE``, ``SELECT ...
# FOR UPDATE``, ``nextval``) makes the statement count as a write all the same: wrong only on
# the side of not re-running.
_LEADING = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*([a-z]+)", re.IGNORECASE | re.DOTALL)
_READ_FIRST = frozenset({
    "select", "show", "values", "table", "with", "explain", "fetch", "move", "close", "declare",
    "begin", "start", "savepoint", "release", "rollback", "set", "reset", "prepare", "deallocate",
    "listen", "unlisten", "discard",
})
_WRITE_WORD = re.compile(r"\b(insert|update|delete|merge|truncate|nextval|setval|into)\b",
                         re.IGNORECASE)


@functools.lru_cache(maxsize=2048)
def is_write(statement: str) -> bool:
    """Whether ``statement`` may change the database (conservatively: unknown means yes).

    A ``SELECT`` that calls a function which writes is not recognised: mark such a view
    ``no_retry`` (the web adapter's decorator).
    """
    match = _LEADING.match(statement)
    if match is None or match.group(1).lower() not in _READ_FIRST:
        return True
    return _WRITE_WORD.search(statement) is not None


class Ledger:
    """What one unit of work did to the database so far (fed by ``track_writes``).

    ``wrote``: a statement that writes was sent (committed or not). ``committed``: a COMMIT was
    attempted on a connection whose transaction had written, so the write may be saved (or its
    outcome is unknown). A ROLLBACK forgets the uncommitted write of its connection.
    """

    __slots__ = ("committed", "wrote", "_dirty")

    def __init__(self) -> None:
        self.wrote = False
        self.committed = False
        self._dirty: set[int] = set()

    def statement(self, connection: object, statement: str) -> None:
        """Record ``statement`` about to be sent on ``connection`` (a DBAPI connection)."""
        if is_write(statement):
            self.write(connection)

    def write(self, connection: object) -> None:
        """Record a statement that writes, about to be sent on ``connection``."""
        self.wrote = True
        self._dirty.add(id(connection))

    def commit(self, connection: object) -> None:
        """Record a COMMIT about to be sent on ``connection``."""
        if id(connection) in self._dirty:
            self.committed = True
            self._dirty.discard(id(connection))

    def rollback(self, connection: object) -> None:
        """Record a ROLLBACK of ``connection``'s transaction."""
        self._dirty.discard(id(connection))

    def __repr__(self) -> str:
        return f"<Ledger wrote={self.wrote} committed={self.committed}>"


#: The ledger of the unit of work running in this context (``None``: nothing records). Set it
#: with :func:`recording`, or ``LEDGER.set``/``LEDGER.reset`` where every microsecond counts.
LEDGER: ContextVar[Ledger | None] = ContextVar("srht_readonly_ledger", default=None)
_LEDGER = LEDGER


def current() -> Ledger | None:
    """The ledger of the unit of work running in this context, if one is recording."""
    return _LEDGER.get()


@contextlib.contextmanager
def recording(ledger: Ledger | None = None) -> Iterator[Ledger]:
    """Make ``ledger`` (a new one by default) the current one for the block."""
    ledger = ledger if ledger is not None else Ledger()
    token = _LEDGER.set(ledger)
    try:
        yield ledger
    finally:
        _LEDGER.reset(token)


def why_not(failure: Failure | None, ledger: Ledger | None, *, method: str, opted_out: bool = False) -> str | None:
    """Why work that failed with ``failure`` must not be re-run; ``None`` if it may be.

    The rule, in order:

    1. only a lost connection: ``Failure.UNAVAILABLE``, or ``Failure.COMMIT_UNKNOWN`` when the
       committing transaction had not written (its outcome does not matter). Never a read-only
       refusal, an unknown COMMIT of a write, or any other error;
    2. never when the work opted out (``opted_out``);
    3. never without a ledger (nothing was recording what the work did);
    4. never once a transaction that wrote reached COMMIT (``ledger.committed``);
    5. a safe ``method`` (GET, HEAD, OPTIONS) may be re-run even though it sent a statement that
       writes: that transaction died with its connection, so PostgreSQL rolled it back; any other
       method only if it has run nothing but read-only statements so far (``not ledger.wrote``).

    The caller adds its own conditions: nothing of the response sent yet, budget left.
    """
    if failure not in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
        return "not a lost connection" if failure is not None else "not a database failover error"
    if opted_out:
        return "the view opted out"
    if ledger is None:
        return "its database work was not recorded"
    if ledger.committed:
        return "a transaction that wrote reached COMMIT: the write may be saved"
    if failure is Failure.COMMIT_UNKNOWN and ledger.wrote:
        return "a COMMIT of a write has an unknown outcome"
    if method.upper() not in SAFE_METHODS and ledger.wrote:
        return f"a {method} request that already sent a write"
    return None


class RetryBudget:
    """Jittered, doubling waits between attempts, all within ``seconds`` from the first failure.

    ``next_wait()`` returns the seconds to sleep before the next attempt, or ``None`` when the
    budget is spent (no new attempt starts after it; one already running is bounded only by its
    own timeouts). The first wait is drawn from ``[first / 2, first]``, each next one from
    ``[w / 2, w]`` with ``w`` doubled, capped at the time left. The budget itself is drawn from
    ``[(1 - jitter) * seconds, seconds]``, so a crowd of requests that failed together does not
    give up together either.
    """

    def __init__(
        self,
        seconds: float,
        *,
        first: float = 0.05,
        jitter: float = 0.15,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if seconds < 0 or first <= 0 or not 0 <= jitter < 1:
            raise ValueError("a retry budget needs seconds >= 0, first > 0 and jitter in [0, 1)")
        self.seconds = seconds * (1 - jitter * rng())
        self.clock = clock
        self.rng = rng
        self.started = clock()
        self.attempts = 1  # the one that failed
        self._step = first

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def next_wait(self) -> float | None:
        left = self.seconds - self.elapsed
        if left <= 0:
            return None
        wait = min(left, self._step * (0.5 + self.rng() / 2))
        self._step *= 2
        self.attempts += 1
        return wait
