"""A real primary, hot standby and PgBouncer on loopback, for tests and drills.

``Lab`` is built from ``srht_readonly.ops`` primitives; the pytest plugin
(``srht_readonly.testing.plugin``, loaded through the ``pytest11`` entry point) offers it as
fixtures to this project's tests and to SourceHut services' own test suites.
"""

from __future__ import annotations

from .lab import Lab, LabBouncer, LabNode

__all__ = ["Lab", "LabBouncer", "LabNode"]
