"""The soft-outage alert tried on what a drill measured: a ``promtool test rules`` case built from it.

The soft-outage scenario times tiny commits on the primary before and while it is throttled
(the same measurement as the exporter's ``srht_readonly_primary_commit_seconds``). ``run``
writes two promtool unit tests of the shipped rules (contrib/prometheus/srht-readonly.rules.yml)
from those times and runs ``promtool test rules`` on them:

* **throttled**: the series, one sample per ``SCRAPE`` (the exporter's default interval), holds
  ``BASELINE_MINUTES`` of the "before" values (cycled through), enough for the rule's one-hour
  baseline, then ``OUTAGE_MINUTES`` of the "during" values; SrhtSoftOutage must fire at the end;
* **baseline**: the "before" values alone for as long: it must not fire.

promtool is Debian's ``prometheus`` package (scripts/bootstrap installs it); without it, or
without the rules file, the result says so and the verdict fails: never skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import Any

#: The shipped rules, from a checkout (the drill runs from one).
RULES = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "srht-readonly.rules.yml"
ALERT = "SrhtSoftOutage"
METRIC = "srht_readonly_primary_commit_seconds"
SCRAPE_SECONDS = 15
BASELINE_MINUTES = 70
OUTAGE_MINUTES = 15


def _alert_block(rules: str) -> tuple[str, str]:
    """The severity label and summary annotation of ``ALERT`` in ``rules`` (what a firing case must expect)."""
    block = rules.split(f"- alert: {ALERT}", 1)[1].split("- alert:", 1)[0].split("- record:", 1)[0]
    severity = re.search(r"^\s*severity:\s*(\S+)\s*$", block, re.M)
    summary = re.search(r'^\s*summary:\s*"(.*)"\s*$', block, re.M)
    if not severity or not summary:
        raise ValueError(f"{ALERT} in {RULES} has no severity label or no quoted summary")
    return severity.group(1), summary.group(1)


def _values(before: Sequence[float], during: Sequence[float], *, outage: bool) -> str:
    per_minute = 60 // SCRAPE_SECONDS
    head = list(islice(cycle(before), BASELINE_MINUTES * per_minute))
    tail = list(islice(cycle(during if outage else before), OUTAGE_MINUTES * per_minute))
    return " ".join(f"{v:.6g}" for v in head + tail)


def case(before: Sequence[float], during: Sequence[float], *, outage: bool, rules: Path = RULES) -> str:
    """The promtool test file (YAML) of one case: ``outage`` (fires) or the baseline alone (quiet)."""
    severity, summary = _alert_block(rules.read_text())
    end = BASELINE_MINUTES + OUTAGE_MINUTES - 1
    expected = (f"""
        exp_alerts:
          - exp_labels: {{severity: {severity}}}
            exp_annotations:
              summary: "{summary}"
""" if outage else "\n        exp_alerts: []\n")
    return f"""# Built by srht-readonly drill (soft-outage) from the commit times it measured.
rule_files:
  - {rules}
evaluation_interval: {SCRAPE_SECONDS}s
tests:
  - interval: {SCRAPE_SECONDS}s
    input_series:
      - series: '{METRIC}'
        values: '{_values(before, during, outage=outage)}'
    alert_rule_test:
      - eval_time: {BASELINE_MINUTES - 1}m
        alertname: {ALERT}
        exp_alerts: []
      - eval_time: {end}m
        alertname: {ALERT}{expected}"""


def run(before: Sequence[float], during: Sequence[float], *, rules: Path = RULES,
        promtool: str | None = None) -> dict[str, Any]:
    """Both cases through ``promtool test rules``: ``{"fires": bool, "quiet": bool, ...}`` with what
    promtool said; ``{"error": ...}`` when they cannot be run (no promtool, no rules, no values)."""
    found = promtool or shutil.which("promtool")
    summary: dict[str, Any] = {"before": len(before), "during": len(during),
                               "before_median": _median(before), "during_mean": _mean(during)}
    if not found:
        return {**summary, "error": "promtool is missing: apt-get install prometheus (scripts/bootstrap does)"}
    if not rules.is_file():
        return {**summary, "error": f"no rules file at {rules} (the drill runs from a checkout)"}
    if not before or not during:
        return {**summary, "error": "no commit times measured " + ("before" if not before else "during")
                + " the throttle: no case to build"}
    with tempfile.TemporaryDirectory(prefix="srht-promcase-") as tmp:
        out = dict(summary)
        for name, outage in (("fires", True), ("quiet", False)):
            path = Path(tmp) / f"{'throttled' if outage else 'baseline'}.yml"
            path.write_text(case(before, during, outage=outage, rules=rules))
            proc = subprocess.run([found, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
            out[name] = proc.returncode == 0
            out[f"{name}_output"] = (proc.stdout + proc.stderr).strip()[-1500:]
    return out


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
