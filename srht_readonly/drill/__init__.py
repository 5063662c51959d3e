"""The drill: play the plan's mock contingency scenarios against real servers and report.

``recorder`` timestamps what every service saw, ``ledger`` proves whether acknowledged writes
survived, ``scenarios`` drive the procedures (built from ``ops``), ``report`` renders the
result as JSON and an HTML page with a timeline per scenario.
"""

from __future__ import annotations

from .recorder import Event, Mark, Outcome, Recorder

__all__ = ["Event", "Mark", "Outcome", "Recorder"]
