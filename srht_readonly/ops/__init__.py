"""Operations side: the plan's procedures as code, and the primitives they are built from.

``ops`` never imports the application side. The lab (``srht_readonly.testing``) and the drill
are built from these same primitives, so every lab test exercises what operators run.
"""

from __future__ import annotations

from .errors import CommandFailed, OpsError, PartlyDone, Refused, Timeout, ToolMissing, Unreachable

__all__ = ["CommandFailed", "OpsError", "PartlyDone", "Refused", "Timeout", "ToolMissing", "Unreachable"]
