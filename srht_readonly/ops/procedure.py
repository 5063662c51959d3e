"""The shape every procedure has: ``check_X(...) -> Plan``, then ``run_X(cluster, plan) -> Result``.

``check_X`` looks at the fleet and refuses (``Refused``: nothing changed) or returns a plan;
the operator sees the plan (``title``, ``steps``, ``warnings``) and confirms; ``run_X`` carries
it out and returns what it did (a dataclass: ``text()`` for people, ``render.to_json`` for
programs), or raises ``PartlyDone`` naming each host. The procedures: ``standby.check_prepare``
/ ``run_prepare``, ``failover.check_failover`` / ``run_failover``, ``promote.check_promote`` /
``run_promote``, ``demote.check_demote`` / ``run_demote``, ``switchover.check_switchover`` /
``run_switchover``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["FollowPlan", "Plan", "Result"]


class Plan(Protocol):
    """What a ``check_X`` found and what ``run_X`` will do."""

    warnings: list[str]

    def title(self) -> str: ...
    def steps(self) -> list[str]: ...


class Result(Protocol):
    """What a ``run_X`` did."""

    def text(self) -> str: ...


@dataclass
class FollowPlan:
    """The start of every plan that makes ``node`` follow ``primary`` (``demote``, ``standby prepare``):
    the two nodes, what ``node`` is now, and the warnings for the operator."""

    node: str
    primary: str
    node_role: str
    warnings: list[str] = field(default_factory=list)
