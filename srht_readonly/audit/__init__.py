"""The transaction-mode audit: what in a service breaks behind PgBouncer's transaction pooling.

``recorder`` sees every statement (the lab server's statement log, and a SQLAlchemy hook that
knows the Python frame); ``analyse`` turns them into ``findings`` (session-level SET, LISTEN,
session advisory locks, named prepared statements, temporary tables, WITH HOLD cursors, DISCARD,
LOAD), each with why it breaks and the fix; ``report`` prints them; ``command`` is
``srht-readonly audit -- COMMAND``; ``watch`` is the pytest plugin's ``--srht-audit``. It sits
beside the drill: it uses ``ops`` and ``testing``, and neither they nor the application side
import it (docs/audit.md).
"""

from __future__ import annotations

from .analyse import Statement, analyse, combine
from .findings import Finding, Kind

__all__ = ["Finding", "Kind", "Statement", "analyse", "combine"]
