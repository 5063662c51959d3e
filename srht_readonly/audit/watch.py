"""An audit of a whole test run: every lab the fixtures start, and every SQLAlchemy engine of the process.

The pytest plugin's ``--srht-audit`` makes one ``LabWatcher``: ``factories`` tells it when a lab
has started (statement logging goes on on each of its nodes) and when it is about to close (the
nodes' logs are read, before the lab's directory goes away); the SQLAlchemy hook, installed on the
``Engine`` class for the run, adds the Python frame of what engines connected to a lab's
PgBouncer send. As in ``srht-readonly audit``, only traffic through PgBouncer is audited. ``findings()`` is the
analysis of it all.
"""

from __future__ import annotations

import logging
from typing import Any

from .analyse import Statement, analyse, combine
from .findings import Finding
from .recorder import ServerLog, SqlAlchemyRecorder

__all__ = ["LabWatcher"]

logger = logging.getLogger(__name__)


class LabWatcher:
    """Records the application's statements on every lab from ``lab_started`` to ``lab_closing``."""

    def __init__(self, *, python_hook: bool = True) -> None:
        self.server: list[Statement] = []
        self.labs = 0
        self.problems: list[str] = []
        self._logs: dict[int, list[ServerLog]] = {}
        self.addresses: set[str] = set()  # every lab PgBouncer's host:port: what the Python hook records
        self.python: SqlAlchemyRecorder | None = None
        if python_hook:
            try:
                self.python = SqlAlchemyRecorder(addresses=self.addresses).install()
            except ImportError:  # no SQLAlchemy in this environment: the server log only
                self.python = None

    def lab_started(self, lab: Any) -> None:
        self.addresses.update(f"{b.host}:{b.port}" for b in lab.bouncers)
        logs = []
        for node in lab.nodes.values():
            log = ServerLog(node, bouncers=lab.bouncers)
            try:
                log.start()
            except Exception as exc:  # the run goes on; the summary says what was not audited
                self.problems.append(f"{lab.directory} {node.name}: statement logging not turned on: {exc}")
                continue
            logs.append(log)
        self._logs[id(lab)] = logs
        self.labs += 1

    def lab_closing(self, lab: Any) -> None:
        for log in self._logs.pop(id(lab), []):
            log.bouncers = list(lab.bouncers)  # those the test added too
            try:
                self.server.extend(log.statements())
                log.stop()
            except Exception as exc:
                self.problems.append(f"{lab.directory} {log.node.name}: log not read: {exc}")

    def close(self) -> None:
        if self.python is not None:
            self.python.uninstall()

    def findings(self) -> list[Finding]:
        seen = self.python.statements if self.python is not None else []
        return combine(analyse(seen), analyse(self.server), seen)
