"""pytest plugin (entry point ``pytest11``): the lab as fixtures, for any test suite.

Fixtures:

* ``srht_lab`` (session): a primary, a streaming hot standby and a PgBouncer, shared; tests
  must leave roles as they found them.
* ``srht_fresh_lab`` (function): the same, new for one test: stop, kill, promote at will.
* ``srht_readonly_db`` (function): a database on the shared primary that refuses writes with
  SQLSTATE 25006 (``default_transaction_read_only``), the cheap way to simulate a standby.

Settings, each an ini key and a flag: ``srht_lab_pg_bin``/``--srht-lab-pg-bin``,
``srht_lab_os_user``/``--srht-lab-os-user``.
"""

from __future__ import annotations

import statistics

import pytest

from . import factories

srht_lab = factories.lab("session")
srht_fresh_lab = factories.lab("function")
srht_readonly_db = factories.readonly_database("srht_lab")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("srht-readonly", "srht-readonly lab")
    for name, help_text in factories.OPTIONS.items():
        parser.addini(f"srht_lab_{name}", help_text)
        group.addoption(f"--srht-lab-{name.replace('_', '-')}", dest=f"srht_lab_{name}", help=help_text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: the test runs against the real-server lab")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    times = factories.STARTED
    if times:
        terminalreporter.write_line(
            f"srht-readonly lab: {len(times)} started; primary+standby+pgbouncer up in "
            f"{statistics.median(times):.2f} s median, {max(times):.2f} s max"
        )
