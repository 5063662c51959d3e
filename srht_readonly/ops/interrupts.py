"""The operator's process told to stop (Ctrl-C, SIGTERM, SIGHUP) becomes one exception; recovery is shielded.

A procedure that has changed something must put the fleet back in a known state before the
process exits, whatever ended it: the operator's Ctrl-C (SIGINT), a supervisor or ``kill``
(SIGTERM), or the operator's ssh session dying (SIGHUP). Inside ``raising()`` each of these
raises ``Interrupted`` in the main thread, wherever it is (a blocking ``subprocess.run`` kills
its child and re-raises; a console wait returns), so the procedure's ``except`` runs the
recovery of the stage it was in. Inside ``shielded()`` (the recovery itself) a signal is only
remembered: a second Ctrl-C does not cut the recovery short. ``kill -9`` cannot be caught;
the dead-man timers (``deadman``) cover it.

    with interrupts.raising():
        try:
            change_things()
        except BaseException:
            with interrupts.shielded():
                put_things_back()
            raise
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Interrupted", "SIGNALS", "exit_on_sigterm", "raising", "shielded"]

#: The signals that end a procedure (with its recovery) rather than the process at once.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_shield_depth = 0
_remembered: list[str] = []


class Interrupted(BaseException):
    """The process received SIGINT, SIGTERM or SIGHUP (``signal`` names it) while a procedure ran.

    A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` does not swallow it.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal = signal_name


def _handle(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _shield_depth:
        _remembered.append(name)
        with contextlib.suppress(OSError):  # the terminal is gone (SIGHUP): carry on without it
            print(f"srht-readonly: {name} received; finishing the recovery first (it is bounded in time)",
                  file=sys.stderr, flush=True)
        return
    raise Interrupted(name)


@contextmanager
def raising() -> Iterator[None]:
    """While inside: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (outside ``shielded()``).

    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def shielded() -> Iterator[list[str]]:
    """While inside, those signals are remembered (the list yielded), not raised."""
    global _shield_depth
    _shield_depth += 1
    start = len(_remembered)
    seen: list[str] = []
    try:
        yield seen
    finally:
        _shield_depth -= 1
        seen.extend(_remembered[start:])
        if not _shield_depth:
            _remembered.clear()


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """For long commands with nothing to recover but servers to stop (``drill``, ``audit``): SIGTERM (a CI
    timeout, systemd) unwinds like Ctrl-C, through every ``finally``, and exits 143."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
