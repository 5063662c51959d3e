"""srht-readonly: keep SourceHut's services useful while PostgreSQL is read-only.

The application side (this package's top level) classifies database failures, tracks whether
the database is read-only, and offers the plan's four policies (abort, drop, retry, fail).
Framework adapters live in ``srht_readonly.flask``, ``.sqlalchemy``, ``.celery`` and ``.ssh``
and are imported only by the services that use them. ``srht_readonly.ops`` holds the
operations side (CLI and procedures); ``srht_readonly.testing`` the lab and pytest plugin.
"""

from __future__ import annotations

import logging

from ._root_error import SrhtReadOnlyError
from .errors import DatabaseUnavailable, DeadlineExceeded, Failure, ReadOnlyError, classify
from .monitor import ReadOnlyMonitor
from .policies import Deadline, abort_on_read_only, drop_on_read_only, retry_until_writable

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DatabaseUnavailable",
    "Deadline",
    "DeadlineExceeded",
    "Failure",
    "ReadOnlyError",
    "ReadOnlyMonitor",
    "SrhtReadOnlyError",
    "abort_on_read_only",
    "classify",
    "drop_on_read_only",
    "retry_until_writable",
]
