"""Exceptions of the operations side; each message says what to do about it."""

from __future__ import annotations

from collections.abc import Sequence

from .._root_error import SrhtReadOnlyError


class OpsError(SrhtReadOnlyError):
    """A procedure could not be carried out."""


class ToolMissing(OpsError):
    """A program the procedure needs is not installed."""

    def __init__(self, tool: str, package: str, where: str = "") -> None:
        self.tool = tool
        self.package = package
        hint = f" (looked in {where})" if where else ""
        super().__init__(f"{tool} not found{hint}; install it: apt-get install {package}")


class CommandFailed(OpsError):
    """A command exited non-zero; keeps its argv, status and the tail of its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str = "", where: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        on = f" on {where}" if where else ""
        super().__init__(
            f"{' '.join(self.argv[:3])}{' ...' if len(self.argv) > 3 else ''}{on} exited {returncode}"
            + (f":\n{tail}" if tail else "")
        )


class Timeout(OpsError):
    """Something did not happen within the time allowed."""


class Refused(OpsError):
    """A safety check refused the operation; nothing was changed (exit status 1)."""


class PartlyDone(OpsError):
    """Some hosts were changed and others not (exit status 3); ``hosts`` maps each to its state."""

    def __init__(self, message: str, hosts: dict[str, str] | None = None) -> None:
        self.hosts = dict(hosts or {})
        lines = [message] + [f"  {name}: {state}" for name, state in self.hosts.items()]
        super().__init__("\n".join(lines))


class Unreachable(OpsError):
    """A host, server or console could not be reached."""
