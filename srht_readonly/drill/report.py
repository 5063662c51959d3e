"""The drill's report: ``report.json`` and ``index.html`` with a timeline picture per scenario.

The picture has one lane per service; each lane stacks, per time slice, how many operations went
``ok`` (green), ``dropped`` (blue), ``explained`` (amber) and ``error`` (red), with the
procedure's steps drawn as labelled vertical lines. A scenario that slows the database
(``soft-outage``) also gets **latency lanes**: per service, each operation's latency as a dot at its
start (log scale, 1 ms to 60 s), the throttle's phases shaded, and a table of p50/p95/p99 before,
during and after (``drill.latency``). Each expectation opens (``<details>``) the
list of operations that decided it: kind, start, end, outcome, the state it met, detail. Plain
HTML and SVG, no script, no dependency.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from .recorder import Event, Mark, Outcome

COLOURS = {Outcome.OK: "#3a9d5d", Outcome.DROPPED: "#5b8def", Outcome.EXPLAINED: "#f0a500", Outcome.ERROR: "#d64545"}
ORDER = (Outcome.OK, Outcome.DROPPED, Outcome.EXPLAINED, Outcome.ERROR)


def timeline(events: list[Event], *, slice_s: float = 0.25) -> dict[str, Any]:
    """Events binned per service and slice: {"slice": s, "end": t, "lanes": {svc: [[ok, drop, expl, err]...]}}."""
    end = max((e.t for e in events), default=0.0)
    n = int(end / slice_s) + 1
    lanes: dict[str, list[list[int]]] = {}
    for e in events:
        lane = lanes.setdefault(e.service, [[0, 0, 0, 0] for _ in range(n)])
        lane[min(int(e.t / slice_s), n - 1)][ORDER.index(e.outcome)] += 1
    return {"slice": slice_s, "end": end, "lanes": lanes}


def svg_timeline(tl: dict[str, Any], marks: list[Mark], *, width: int = 960, lane_h: int = 56) -> str:
    """The timeline as an SVG: a lane per service, stacked outcome bars, steps as lines."""
    lanes: dict[str, list[list[int]]] = tl["lanes"]
    left, top, bottom = 110, 18, 40
    height = top + bottom + lane_h * max(len(lanes), 1)
    plot_w = width - left - 10
    end = max(tl["end"], max((m.t for m in marks), default=0.0), 1e-3)
    x_of = plot_w / end
    bar_w = max(tl["slice"] * x_of - 0.5, 0.8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
           f'role="img" font-family="sans-serif" font-size="11">']
    for i, (service, bins) in enumerate(sorted(lanes.items())):
        y0 = top + i * lane_h
        peak = max((sum(b) for b in bins), default=1) or 1
        out.append(f'<text x="{left - 8}" y="{y0 + lane_h / 2 + 4}" text-anchor="end">{html.escape(service)}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y0 + lane_h - 4}" y2="{y0 + lane_h - 4}" '
                   'stroke="#ccc"/>')
        for j, counts in enumerate(bins):
            x = left + j * tl["slice"] * x_of
            y: float = y0 + lane_h - 4
            for outcome, count in zip(ORDER, counts, strict=True):
                if count:
                    h = (lane_h - 10) * count / peak
                    y -= h
                    out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                               f'fill="{COLOURS[outcome]}"><title>{service} {outcome.value}: {count} '
                               f'at {j * tl["slice"]:.2f} s</title></rect>')
    for k, m in enumerate(marks):
        x = left + m.t * x_of
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height - bottom + 4}" stroke="#333" '
                   'stroke-dasharray="3,3"/>')
        # Labels alternate above and below the plot; one that would run off the right edge ends at its line.
        anchor = "end" if x + 5.5 * len(m.label) > left + plot_w else "start"
        y = top - 6 if k % 2 == 0 else height - bottom + 14
        out.append(f'<text x="{x + (-3 if anchor == "end" else 3):.1f}" y="{y}" text-anchor="{anchor}" '
                   f'font-size="10">{html.escape(m.label)}</text>')
    step = _tick_step(end)
    t = 0.0
    while t <= end:
        x = left + t * x_of
        out.append(f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle" fill="#777">{t:g} s</text>')
        t += step
    out.append("</svg>")
    return "\n".join(out)


#: The latency lanes' scale, seconds (log): 1 ms to 60 s.
LATENCY_RANGE = (0.001, 60.0)
PHASE_SHADES = {"before": "#eef5ee", "during": "#fbe3e3", "after": "#e8eef9"}


def svg_latency(points: dict[str, list[list[Any]]], facts: dict[str, Any], marks: list[Mark], *, width: int = 960,
                lane_h: int = 90) -> str:
    """Per service, each operation's latency (log scale) as a dot at its start; the throttle shaded."""
    left, top, bottom = 110, 18, 24
    lanes = sorted(points.items())
    height = top + bottom + lane_h * max(len(lanes), 1)
    plot_w = width - left - 10
    end = max([p[0] + p[1] for _, ps in lanes for p in ps] + [m.t for m in marks] + [1e-3])
    x_of = plot_w / end
    lo, hi = (math.log10(v) for v in LATENCY_RANGE)
    lo_t, hi_t = facts.get("slow_from"), facts.get("slow_until")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" '
           'font-family="sans-serif" font-size="11" class="latency">']
    if lo_t is not None and hi_t is not None:
        for phase, a, b in (("before", 0.0, lo_t), ("during", lo_t, hi_t), ("after", hi_t, end)):
            out.append(f'<rect x="{left + a * x_of:.1f}" y="{top}" width="{max(0.0, (b - a) * x_of):.1f}" '
                       f'height="{height - top - bottom}" fill="{PHASE_SHADES[phase]}"><title>{phase}</title></rect>')
            out.append(f'<text x="{left + a * x_of + 3:.1f}" y="{top - 4}" font-size="10" fill="#777">{phase}</text>')
    for i, (service, ps) in enumerate(lanes):
        y0 = top + i * lane_h

        def y_of(seconds: float, y0: float = y0) -> float:
            v = min(max(math.log10(max(seconds, 1e-6)), lo), hi)
            return y0 + lane_h - 6 - (lane_h - 12) * (v - lo) / (hi - lo)
        out.append(f'<text x="{left - 8}" y="{y0 + lane_h / 2 + 4}" text-anchor="end">{html.escape(service)}</text>')
        for tick, label in ((0.001, "1 ms"), (0.01, "10 ms"), (0.1, "100 ms"), (1.0, "1 s"), (10.0, "10 s")):
            y = y_of(tick)
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                       f'<text x="{left + 2}" y="{y - 1:.1f}" font-size="8" fill="#999">{label}</text>')
        for start, latency, outcome in ps:
            colour = COLOURS.get(Outcome(outcome), "#333")
            out.append(f'<circle cx="{left + start * x_of:.1f}" cy="{y_of(latency):.1f}" r="1.6" fill="{colour}" '
                       f'fill-opacity="0.6"/>')
    for m in marks:
        x = left + m.t * x_of
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#333" '
                   f'stroke-dasharray="3,3"><title>{html.escape(m.label)}</title></line>')
    step = _tick_step(end)
    t = 0.0
    while t <= end:
        out.append(f'<text x="{left + t * x_of:.1f}" y="{height - 6}" text-anchor="middle" fill="#777">{t:g} s</text>')
        t += step
    out.append("</svg>")
    return "\n".join(out)


def _latency_table(latency: dict[str, dict[str, dict[str, Any]]]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"
    head = "".join(f"<th>{p} p50</th><th>p95</th><th>p99</th><th>n</th>" for p in ("before", "during", "after"))
    rows = "\n".join(
        f"<tr><td>{html.escape(lane)}</td>"
        + "".join(f"<td>{ms(ph[p].get('p50'))}</td><td>{ms(ph[p].get('p95'))}</td><td>{ms(ph[p].get('p99'))}</td>"
                  f"<td>{ph[p].get('n', 0)}</td>" for p in ("before", "during", "after")) + "</tr>"
        for lane, ph in latency.items())
    return (f"<p>Latency per service, milliseconds (during: ran while the primary was throttled, at least in part; "
            f"after: began 2 s or more after the release)</p><table><tr><th>lane</th>{head}</tr>\n{rows}</table>")


def _tick_step(end: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 15, 30, 60):
        if end / step <= 12:
            return step
    return 120


def write(report: dict[str, Any], directory: Path) -> Path:
    """Write ``report.json`` and ``index.html`` into ``directory``; return the HTML's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    page = directory / "index.html"
    page.write_text(render_html(report))
    return page


def render_html(report: dict[str, Any]) -> str:
    cards = "\n".join(_card(s) for s in report["scenarios"])
    verdict = "every expectation held" if report["passed"] else "some expectations failed"
    legend = " ".join(f'<span class="key" style="background:{COLOURS[o]}"></span>{o.value}' for o in ORDER)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>srht-readonly drill</title>
<style>
body {{ font-family: sans-serif; max-width: 1040px; margin: 2em auto; color: #222; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 1em 1.2em; margin: 1.2em 0; }}
.pass {{ color: #2d7a47; }} .fail {{ color: #b83232; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ padding: 2px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.key {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
ul {{ font-size: 14px; }} code {{ font-size: 12px; }}
details {{ margin: 2px 0 6px 1.2em; }} summary {{ cursor: pointer; color: #555; font-size: 12px; }}
table.ops td {{ text-align: left; font-size: 12px; }} td.detail {{ color: #555; max-width: 480px; }}
</style></head><body>
<h1>srht-readonly drill: <span class="{'pass' if report['passed'] else 'fail'}">{verdict}</span></h1>
{_sabotage(report.get('sabotage'))}
<p>{html.escape(report.get('environment', ''))} &middot; load <b>{html.escape(str(report.get('load')))}</b>
&middot; {report.get('seconds', 0):.0f} s in all. Legend: {legend}</p>
{cards}
</body></html>
"""


def _sabotage(sabotage: dict[str, Any] | None) -> str:
    if not sabotage:
        return ""
    caught = ", ".join(f"&laquo;{html.escape(t)}&raquo;" for t in sabotage["caught"]) or "NOTHING"
    return (f"<p><b>Sabotaged on purpose</b> ({html.escape(sabotage['name'])}: {html.escape(sabotage['what'])}); "
            f"caught by {caught}.</p>")


def _operations(e: dict[str, Any]) -> str:
    """The operations that decided expectation ``e``, as a table inside ``<details>``."""
    ops = e.get("operations") or []
    if not ops:
        return ""
    rows = "\n".join(
        f"<tr><td>{html.escape(o['service'])} {html.escape(o['op'])}</td><td>{o['start']:.2f}</td>"
        f"<td>{o['end']:.2f}</td><td>{html.escape(o['outcome'])}</td><td>{html.escape(o['met'] or '-')}</td>"
        f"<td class=\"detail\">{html.escape(o['detail'])}</td></tr>" for o in ops)
    total = e.get("operations_total", len(ops))
    more = f" (the first {len(ops)} of {total}, wrong ones first)" if total > len(ops) else ""
    return (f"<details><summary>{total} operations decided it{more}</summary><table class=\"ops\">"
            "<tr><th>kind</th><th>start s</th><th>end s</th><th>outcome</th><th>state met</th><th>detail</th></tr>"
            f"\n{rows}</table></details>")


def _latency(s: dict[str, Any], marks: list[Mark]) -> str:
    """The latency lanes and table of a scenario that slowed the database, if it did."""
    if not s.get("latency_points"):
        return ""
    return svg_latency(s["latency_points"], s.get("facts", {}), marks) + "\n" + _latency_table(s.get("latency", {}))


def _card(s: dict[str, Any]) -> str:
    state = '<span class="pass">passed</span>' if s["passed"] else '<span class="fail">FAILED</span>'
    expectations = "\n".join(
        f'<li class="{"pass" if e["passed"] else "fail"}">{"&#10003;" if e["passed"] else "&#10007;"} '
        f'{html.escape(e["text"])} <small>(observed: {html.escape(str(e["observed"]))})</small>{_operations(e)}</li>'
        for e in s["expectations"])
    rows = "\n".join(
        f"<tr><td>{html.escape(svc)}</td><td>{c.get('ok', 0)}</td><td>{c.get('dropped', 0)}</td>"
        f"<td>{c.get('explained', 0)}</td><td>{c.get('error', 0)}</td>"
        f"<td>{c.get('longest_write_gap', 0):.2f} s</td></tr>"
        for svc, c in sorted(s["services"].items()))
    marks = [Mark(m["t"], m["label"]) for m in s["steps"]]
    lost = s.get("ledger", {}).get("lost_writes") or []
    lost_html = ""
    if lost:
        lost_html = (f"<p><b>Acknowledged writes lost: {s['ledger']['lost']}</b>. "
                     f"{html.escape(s.get('lost_because', ''))}</p><p><code>"
                     + ", ".join(f"writer {w['writer']} #{w['seq']} @ {w['lsn']}"
                                 + (f" (committed before {w['committed_before']})" if w.get("committed_before") else "")
                                 for w in lost[:20])
                     + (" ..." if len(lost) > 20 else "") + "</code></p>")
    return f"""<div class="card">
<h2>{html.escape(s['title'])} &mdash; {state}</h2>
<p>{html.escape(s.get('description', ''))}</p>
{svg_timeline(s['timeline'], marks)}
{_latency(s, marks)}
<ul>{expectations}</ul>
<table><tr><th>service</th><th>ok</th><th>dropped</th><th>explained</th><th>error</th><th>longest write gap</th></tr>
{rows}</table>
{lost_html}
</div>"""
