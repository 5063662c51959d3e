"""The public surface: what ``import srht_readonly`` offers and pulls in, and the documented
examples of docs/errors.md, monitor.md, policies.md and sqlalchemy.md, run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import srht_readonly

ROOT = Path(__file__).resolve().parent.parent
DESIGN_NAMES = {
    "classify", "Failure", "ReadOnlyError", "DatabaseUnavailable", "DeadlineExceeded",
    "ReadOnlyMonitor", "abort_on_read_only", "drop_on_read_only", "retry_until_writable", "Deadline",
}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, **env},
    )


def test_import_pulls_in_neither_flask_nor_celery_nor_sqlalchemy():
    result = run_python(
        "import json, sys, srht_readonly\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('flask', 'werkzeug', 'celery', 'kombu', 'sqlalchemy'))))"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_sqlalchemy_adapter_pulls_in_neither_flask_nor_celery():
    result = run_python(
        "import json, sys, srht_readonly.sqlalchemy\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'flask', 'werkzeug', 'celery', 'kombu'})))"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_public_names_are_those_of_the_design():
    assert set(srht_readonly.__all__) == DESIGN_NAMES | {"SrhtReadOnlyError"}
    for name in srht_readonly.__all__:
        thing = getattr(srht_readonly, name)
        assert thing.__doc__, f"{name} has no docstring"
        assert thing.__module__.startswith("srht_readonly")
    from srht_readonly.sqlalchemy import instrument

    assert instrument.__doc__


def test_package_logger_has_a_null_handler():
    import logging

    handlers = logging.getLogger("srht_readonly").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


# --- documentation ---------------------------------------------------------------------------

PAGES = ["errors.md", "monitor.md", "policies.md", "sqlalchemy.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples(page: str) -> list[str]:
    return BLOCK.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_every_public_name_has_a_section_with_an_example(page):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert sections
    for section in sections:
        assert "```python" in section, f"{page}: section {section.splitlines()[0]!r} has no example"


def test_docs_cover_every_public_name():
    text = "".join((ROOT / "docs" / page).read_text(encoding="utf-8") for page in PAGES)
    headings = set(re.findall(r"^## `?([A-Za-z_.]+)", text, flags=re.MULTILINE))
    assert DESIGN_NAMES | {"instrument"} <= {h.split(".")[-1] for h in headings}


@pytest.mark.lab
@pytest.mark.parametrize("page", PAGES)
def test_documented_examples_run(page, srht_lab, srht_readonly_db, tmp_path):
    blocks = examples(page)
    assert blocks
    env = {
        "DATABASE_URL": srht_lab.primary.url,
        "READ_ONLY_DATABASE_URL": srht_readonly_db.url,
        "STANDBY_URL": srht_lab.standby.url,
        "SRHT_READONLY_ANNOUNCE_FILE": str(tmp_path / "announce"),
    }
    for number, code in enumerate(blocks, 1):
        result = run_python(code, **env)
        assert result.returncode == 0, f"{page} example {number} failed:\n{code}\n{result.stderr}"
