"""The drill: play the plan's mock contingency scenarios against real servers and report.

``scenarios`` script the procedures and ``procedures`` carry them out with ``ops`` on an
inventory; ``recorder`` timestamps what every service saw, ``ledger`` proves whether acknowledged
writes survived, ``verdicts`` judge each service; traffic comes from ``services`` (registered
stand-ins, on the embedded lab) or ``probes`` (a real deployment's ``[probe NAME]``, read by
``config``); ``session`` sets either up, ``runner`` plays, ``report`` and ``live`` show the
result, ``command`` is ``srht-readonly drill``.
"""

from __future__ import annotations

from .recorder import Event, Mark, Operation, Outcome, Recorder, State

__all__ = ["Event", "Mark", "Operation", "Outcome", "Recorder", "State"]
