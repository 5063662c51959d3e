"""The services a drill sends traffic for, found through an entry point.

The drill package never imports ``integrations/`` (docs/architecture.md's layers): a package that has
services to drill registers a factory in the ``srht_readonly.drill`` entry-point group, e.g. in
setup.cfg::

    [options.entry_points]
    srht_readonly.drill =
        local = integrations.drill:LocalServices

The factory is called once per drill with a ``DrillEnvironment`` and returns a ``ServiceSet``:
its ``sources`` are started and stopped around every scenario (``runner.TrafficSource``), and
``close()`` stops whatever it started (web servers, sshd, workers), even after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .runner import TrafficSource

logger = logging.getLogger(__name__)

GROUP = "srht_readonly.drill"


@dataclass(frozen=True)
class DrillEnvironment:
    """What a service factory gets to set itself up."""

    database_url: str  # postgresql:// URL of the application database, through PgBouncer
    directory: Path  # scratch space of its own, removed after the drill
    load: str  # "typical" or "excessive"
    duration: float  # seconds each scenario holds a state (traffic should be steady well below it)
    sabotage: str | None = None  # `drill --sabotage NAME`: the part to break on purpose (see drill.sabotage)
    only: frozenset[str] | None = None  # the services to run (a sabotage of one plays that one); None: all


class ServiceSet(Protocol):
    sources: Sequence[TrafficSource]

    def close(self) -> None: ...


Factory = Callable[[DrillEnvironment], ServiceSet]


def registered() -> dict[str, Factory]:
    """Every factory in the ``srht_readonly.drill`` group, by entry-point name."""
    found: dict[str, Factory] = {}
    for ep in entry_points(group=GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken plug-in must say so, not hide the others
            raise RuntimeError(f"drill services {ep.name!r} ({ep.value}) failed to load: {exc}; install what they "
                               "need (pip install 'srht-readonly[drill]') or run the drill with --no-services") from exc
    return found
