"""pytest plugin (entry point ``pytest11``): the lab as fixtures, for any test suite.

Fixtures:

* ``srht_lab`` (session): a primary, a streaming hot standby and a PgBouncer, shared; tests
  must leave roles as they found them.
* ``srht_fresh_lab`` (function): the same, new for one test: stop, kill, promote at will.
* ``srht_readonly_db`` (function): a database on the shared primary that refuses writes with
  SQLSTATE 25006 (``default_transaction_read_only``), the cheap way to simulate a standby.

Settings, each an ini key and a flag: ``srht_lab_pg_bin``/``--srht-lab-pg-bin``,
``srht_lab_os_user``/``--srht-lab-os-user``.

``--srht-audit``: every lab the fixtures start logs the application's statements, SQLAlchemy's
are recorded with their Python frame, and the summary lists what would break behind PgBouncer
in transaction mode (``srht_readonly.audit``, imported only then; docs/audit.md).
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from . import factories

AUDIT = pytest.StashKey[Any]()  # the LabWatcher of --srht-audit

srht_lab = factories.lab("session")
srht_fresh_lab = factories.lab("function")
srht_readonly_db = factories.readonly_database("srht_lab")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("srht-readonly", "srht-readonly lab")
    for name, help_text in factories.OPTIONS.items():
        parser.addini(f"srht_lab_{name}", help_text)
        group.addoption(f"--srht-lab-{name.replace('_', '-')}", dest=f"srht_lab_{name}", help=help_text)
    group.addoption("--srht-audit", action="store_true", dest="srht_audit",
                    help="record the statements sent to every lab and report, at the end, each session-level "
                         "use that breaks behind PgBouncer in transaction mode (docs/audit.md)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: the test runs against the real-server lab")
    if config.getoption("srht_audit", False):
        from ..audit.watch import LabWatcher  # the audit sits above the lab: loaded only when asked for

        watcher = LabWatcher()
        factories.WATCHERS.append(watcher)
        config.stash[AUDIT] = watcher


def pytest_unconfigure(config: pytest.Config) -> None:
    watcher = config.stash.get(AUDIT, None)
    if watcher is not None:
        watcher.close()
        factories.WATCHERS.remove(watcher)
        del config.stash[AUDIT]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    times = factories.STARTED
    if times:
        terminalreporter.write_line(
            f"srht-readonly lab: {len(times)} started; primary+standby+pgbouncer up in "
            f"{statistics.median(times):.2f} s median, {max(times):.2f} s max"
        )
    watcher = terminalreporter.config.stash.get(AUDIT, None)
    if watcher is not None:
        from ..audit.report import pytest_summary

        terminalreporter.section("srht-readonly audit")
        for line in pytest_summary(watcher).splitlines():
            terminalreporter.write_line(line)
