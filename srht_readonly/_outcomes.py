"""What the policies did with each write, for observers such as ``srht_readonly.metrics``.

Every policy reports one outcome per write it handled: ``abort`` ``refused``, ``drop``
``dropped``, ``retry`` ``retried`` (each wait, with its ``wait`` in seconds) and ``gave_up``,
the Celery adapter ``failed``, ``deferred`` and ``gave_up``. Observers are called in the
thread of the write; an observer's exception is logged, never raised. No observer: nothing
happens beyond a tuple lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("srht_readonly.policies")

Observer = Callable[[str, str, dict[str, Any]], object]
_observers: tuple[Observer, ...] = ()


def add_observer(fn: Observer) -> Observer:
    """Call ``fn(policy, outcome, fields)`` for every outcome from now on; returns ``fn``."""
    global _observers
    _observers = (*_observers, fn)
    return fn


def remove_observer(fn: Observer) -> None:
    global _observers
    _observers = tuple(o for o in _observers if o is not fn)


def report(policy: str, outcome: str, **fields: Any) -> None:
    """Tell every observer that ``policy`` did ``outcome`` with a write."""
    for fn in _observers:
        try:
            fn(policy, outcome, fields)
        except Exception:  # noqa: BLE001 - metrics must never break a write path
            logger.exception("outcome observer %r failed", fn)
