"""The shipped Prometheus alert rules (contrib/prometheus/), proven with ``promtool test rules``.

promtool is Debian's ``prometheus`` package (scripts/bootstrap installs it); without it this test
fails, it is never skipped. Every rule must have a case where it fires and one where it does not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib" / "prometheus"
RULES = CONTRIB / "srht-readonly.rules.yml"
TESTS = sorted((CONTRIB / "tests").glob("*.yml"))


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (scripts/bootstrap does)"
    return found


def test_rules_are_valid():
    proc = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts()) + len(_records())} rules found" in proc.stdout


def test_promtool_unit_tests_pass():
    assert TESTS, "no promtool test files in contrib/prometheus/tests"
    proc = subprocess.run([_promtool(), "test", "rules", *map(str, TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=CONTRIB / "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(TESTS), proc.stdout


def test_every_rule_has_a_firing_and_a_non_firing_case():
    cases: dict[str, set[str]] = {}
    for path in TESTS:
        for name, empty in re.findall(r"alertname: (\S+)\n\s+exp_alerts:( \[\])?", path.read_text()):
            cases.setdefault(name, set()).add("quiet" if empty else "fires")
    for alert in _alerts():
        assert cases.get(alert) == {"fires", "quiet"}, f"{alert}: {sorted(cases.get(alert, ()))}"
    assert set(cases) <= set(_alerts()), "a test names a rule that does not exist"


def test_every_recording_rule_is_evaluated_by_a_test():
    tested = {name for path in TESTS for name in re.findall(r"- expr: (\S+)$", path.read_text(), re.M)}
    assert set(_records()) <= tested, sorted(set(_records()) - tested)


def _alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\S+)$", RULES.read_text(), re.M)


def _records() -> list[str]:
    return re.findall(r"^\s*- record: (\S+)$", RULES.read_text(), re.M)
