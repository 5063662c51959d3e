"""Fixture factories: build lab fixtures with the scope and options a test suite wants.

``plugin.py`` makes the default ones (``srht_lab``, ``srht_fresh_lab``, ``srht_readonly_db``);
a service's suite can make more, e.g. ``my_lab = factories.lab(scope="module")``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from .lab import APP_USER, HOST, Lab

logger = logging.getLogger(__name__)

# Every lab started in this pytest process, with how long it took to come up (for the summary).
STARTED: list[float] = []


class LabWatcher(Protocol):
    """Told when a fixture's lab has started and when it is about to close (``--srht-audit``'s recorder)."""

    def lab_started(self, lab: Lab) -> None: ...
    def lab_closing(self, lab: Lab) -> None: ...


# Watchers of every lab the fixtures start; the plugin adds one for ``--srht-audit``.
WATCHERS: list[LabWatcher] = []


def lab(scope: str = "session", *, standby: bool = True, pgbouncer: bool = True) -> Any:
    """A fixture yielding a started ``Lab``, torn down (never raising) after its scope."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload, misc]
    def _lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
        config = request.config
        the_lab = Lab(
            os_user=_option(config, "os_user"),
            pg_bin=_option(config, "pg_bin"),
            standby=standby,
            pgbouncer=pgbouncer,
        )
        try:
            the_lab.start()
        except BaseException:
            the_lab.close()
            raise
        STARTED.append(the_lab.timings["total"])
        watchers = list(WATCHERS)
        for watcher in watchers:
            _quietly(watcher.lab_started, the_lab)
        try:
            yield the_lab
        finally:
            for watcher in watchers:
                _quietly(watcher.lab_closing, the_lab)
            the_lab.close()

    return _lab


@dataclass(frozen=True)
class Database:
    """A database made for one test: its name, libpq DSN and URL."""

    name: str
    host: str
    port: int
    user: str

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={self.name}"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"


def readonly_database(lab_fixture: str = "srht_lab") -> Any:
    """A fixture yielding a fresh database on the lab's primary where writes fail with 25006.

    ``default_transaction_read_only = on`` makes the primary answer like a hot standby, at the
    cost of a CREATE DATABASE instead of a whole replica. Created and dropped by
    pytest-postgresql's ``DatabaseJanitor``.
    """

    @pytest.fixture
    def _readonly_db(request: pytest.FixtureRequest) -> Iterator[Database]:
        from pytest_postgresql.janitor import DatabaseJanitor

        the_lab: Lab = request.getfixturevalue(lab_fixture)
        primary = the_lab.primary
        name = f"readonly_{uuid.uuid4().hex[:12]}"
        janitor = DatabaseJanitor(user="postgres", host=HOST, port=primary.port, dbname=name)
        janitor.init()
        try:
            with janitor.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{name}" OWNER TO {APP_USER}')
                cur.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            yield Database(name, HOST, primary.port, APP_USER)
        finally:
            try:
                janitor.drop()
            except Exception as exc:  # a finalizer logs, never raises
                logger.warning("could not drop %s: %s", name, exc)

    return _readonly_db


OPTIONS = {
    "pg_bin": "directory of PostgreSQL's programs (default: pg_ctl on $PATH, else the newest "
              "/usr/lib/postgresql/*/bin)",
    "os_user": "OS user that runs the lab's servers (default: postgres when root, else yourself)",
}


def _quietly(call: Any, the_lab: Lab) -> None:
    try:
        call(the_lab)
    except Exception as exc:  # a watcher never fails a test nor stops a teardown
        logger.warning("lab watcher %r failed: %s", call, exc)


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(f"srht_lab_{name}") or config.getini(f"srht_lab_{name}")
    return str(value) if value else None
