"""The findings as text (one block per finding) and as JSON (a list), and the one-line verdicts."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .analyse import Statement
from .findings import Finding

if TYPE_CHECKING:
    from .watch import LabWatcher

__all__ = ["headline", "pytest_summary", "render_json", "render_text"]

WIDTH = 100


def render_text(findings: Sequence[Finding]) -> str:
    """One block per finding: kind, title and count; statement, where, why, fix."""
    blocks = []
    for f in findings:
        times = "once" if f.count == 1 else f"{f.count} times"
        blocks.append("\n".join([
            f"[{f.kind}] {f.title}, seen {times}",
            _field("statement", f.statement),
            _field("where", f.where or "not known (seen in the server log only)"),
            _field("why", f.why),
            _field("fix", f.fix),
        ]))
    return "\n\n".join(blocks)


def render_json(findings: Sequence[Finding]) -> str:
    """A JSON list; per finding ``kind``, ``title``, ``count``, ``statement``, ``where``, ``why``, ``fix``,
    ``normalized``."""
    return json.dumps([f.as_dict() for f in findings], indent=2)


def headline(findings: Sequence[Finding], statements: Sequence[Statement]) -> str:
    """One line: how many findings, of how many statements from how many sessions."""
    sessions = len({s.session for s in statements})
    seen = f"{len(statements)} statement(s) from {sessions} session(s)"
    if not findings:
        return f"no session-level use found in {seen}"
    kinds = ", ".join(dict.fromkeys(str(f.kind) for f in findings))
    return f"{len(findings)} finding(s) ({kinds}) in {seen}"


def pytest_summary(watcher: LabWatcher) -> str:
    """The ``--srht-audit`` section of pytest's summary."""
    lines = [f"not audited: {p}" for p in watcher.problems]
    if not watcher.labs:
        return "\n".join([*lines, "no lab was started: nothing was audited"])
    findings = watcher.findings()
    if findings:
        lines.append(render_text(findings))
        lines.append("")
    lines.append(f"srht-readonly audit: {headline(findings, watcher.server)} on {watcher.labs} lab(s)")
    return "\n".join(lines)


def _field(name: str, text: str) -> str:
    head = f"  {name + ':':<11}"
    return textwrap.fill(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head),
                         break_long_words=False, break_on_hyphens=False)
