"""The package's root exception, shared by the application side and by ``ops``.

It lives in its own module so that ``ops`` (which never imports the application side) and
``errors`` can both derive from it without importing each other.
"""

from __future__ import annotations


class SrhtReadOnlyError(Exception):
    """Root of every exception this package raises on purpose."""
