"""srht-readonly: keep SourceHut's services useful while PostgreSQL is read-only.

The application side (this package's top level) classifies database failures, tracks whether
the database is read-only, and offers the plan's four policies (abort, drop, retry, fail).
Framework adapters live in ``srht_readonly.flask``, ``.sqlalchemy``, ``.celery`` and ``.ssh``
and are imported only by the services that use them. ``srht_readonly.ops`` holds the
operations side (CLI and procedures); ``srht_readonly.testing`` the lab and pytest plugin.
"""

from __future__ import annotations

import logging

from ._root import SrhtReadOnlyError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["SrhtReadOnlyError"]
