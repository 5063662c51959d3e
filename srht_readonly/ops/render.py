"""Text and JSON for what the procedures return: rendering kept apart from doing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from .status import Status


def to_json(obj: Any) -> str:
    """``obj`` (dataclasses, dicts, lists) as indented JSON."""
    return json.dumps(_plain(obj), indent=2, default=str)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def size(n: int | None) -> str:
    """Bytes for humans: ``0 B``, ``12.3 kB``, ``4.5 MB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def table(rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def status_text(status: Status) -> str:
    """The ``status`` command's report."""
    lines = [f"inventory {status.inventory}", ""]
    rows: list[list[object]] = [["NODE", "ROLE", "TL", "POSITION", "LAG", "UPSTREAM", "SLOTS"]]
    for n in status.nodes:
        lag = "-" if n.role != "standby" else f"{size(n.lag_bytes)} / " + (
            f"{n.lag_seconds:.1f} s" if n.lag_seconds is not None else "? s")
        slots = ", ".join(f"{s.name} ({'active' if s.active else 'INACTIVE'}, holds {size(s.retained_bytes)})"
                          for s in n.slots) or "-"
        rows.append([n.name, n.role, n.timeline or "-", n.position or "-", lag, n.upstream or "-", slots])
    lines += table(rows)
    if status.pgbouncers:
        lines.append("")
        rows = [["PGBOUNCER", "TARGET", "PAUSED", "LOGIN_RETRY", "AUTH", "ON DISK"]]
        for b in status.pgbouncers:
            if not b.reachable:
                rows.append([b.name, "UNREACHABLE", "-", "-", "-", "-"])
                continue
            rows.append([b.name, b.target or "-", "yes" if b.paused else "no",
                         b.settings.get("server_login_retry", "?"), b.settings.get("auth_type", "?"),
                         b.file_target if b.file_target != b.target else "same"])
        lines += table(rows)
    lines.append("")
    if status.commit_seconds is not None:
        lines += [f"a tiny commit on the primary: {status.commit_seconds * 1000:.1f} ms", ""]
    if status.past.get("text"):
        lines += [f"past data: {status.past['text']}", ""]
    if status.etcd is not None:
        healthy = sum(1 for e in status.etcd if e["healthy"])
        lines += [f"etcd: {healthy} of {len(status.etcd)} endpoint(s) healthy", ""]
    if status.fleet_state:
        f = status.fleet_state
        lines += [f"fleet state in etcd: generation {f['generation']}, primary {f['primary'] or 'none'} on timeline "
                  f"{f['timeline'] if f['timeline'] is not None else '?'}, by {f['by']}", ""]
    if status.agents:
        rows = [["AGENT", "STATE", "POINTS AT", "SEES", "HEARTBEAT", "HOST"]]
        for name, a in sorted(status.agents.items()):
            sees = ", ".join(f"{n} {s}" for n, s in (a.get("sees") or {}).items()) or "-"
            rows.append([name, a.get("state", "?"), a.get("points_at") or "-", sees, f"{a.get('age', '?')} s ago",
                         a.get("host", "?")])
        lines += [*table(rows), ""]
    if status.announcement:
        a = status.announcement
        window = " ".join(f"{k} {a[k]}" for k in ("starts", "ends") if a[k])
        lines += [f"announcement ({'IN EFFECT' if a['in_effect'] else 'not in effect'}{', ' + window if window else ''}"
                  f"): {a['message']}", ""]
    serious = [p for p in status.problems if p.severity != "info"]
    expected = [p for p in status.problems if p.severity == "info"]
    if not serious:
        lines.append("no problems")
    else:
        lines.append(f"{len(serious)} problem(s):")
        lines += [f"  {p.severity:<8}  {p.subject}: {p.message}" for p in serious]
    if expected:
        lines.append(f"{len(expected)} expected (pages nobody):")
        lines += [f"  {p.severity:<8}  {p.subject}: {p.message}" for p in expected]
    return "\n".join(lines)


def plan_text(title: str, steps: Sequence[str], warnings: Sequence[str] = ()) -> str:
    """A numbered plan, with warnings after it."""
    lines = [f"plan: {title}"] + [f"  {i}. {step}" for i, step in enumerate(steps, 1)]
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines)
