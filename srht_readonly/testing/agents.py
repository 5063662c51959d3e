"""``srht-readonly agent`` processes beside a ``LabFleet``'s PgBouncers, for tests and benchmarks.

``Agents(fleet, directory, *args)`` starts one agent per PgBouncer of the fleet's inventory (the
installed console script, as an operator's unit file runs it), each logging to
``directory/NAME.log``; ``wait_for(text)`` waits until every log says ``text`` (``wait_for_any``: one
of them); ``stop()`` sends SIGTERM and checks each exited 0. ``reads_restored(probe, since)``: per
PgBouncer, how long after ``since`` reads worked again after stopping; ``start_again(node)`` starts a
killed node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..ops.inventory import load
from .deployment import LabFleet
from .load import ReadProbe, WriteLoad
from .servers import LabNode

__all__ = ["LAB_FENCE", "Agents", "reads_restored", "start_again", "write_fence", "writes_restored"]


class Agents:
    """One ``srht-readonly agent --pgbouncer NAME`` process per PgBouncer of ``fleet`` (a ``LabFleet``, or
    an inventory file: then ``env`` is the processes' environment, default this one's); ``detach``: each in a
    session of its own, to outlive this process (``lab up --agents``); ``wrap``: turns each command line into
    the one to run (``Netns.argv``: the agent inside a network namespace); ``only``: these PgBouncers' agents,
    not every one of the inventory's."""

    def __init__(self, fleet: LabFleet | Path, directory: Path, *args: str,
                 env: Mapping[str, str] | None = None, detach: bool = False,
                 wrap: Callable[[list[str]], list[str]] | None = None, only: Sequence[str] | None = None) -> None:
        self.directory = Path(directory)
        inventory = fleet.inventory if isinstance(fleet, LabFleet) else Path(fleet)
        environment = fleet.env() if isinstance(fleet, LabFleet) else dict(os.environ if env is None else env)
        self.names = list(only) if only is not None else list(load(inventory).pgbouncers)
        beside = Path(sys.executable).with_name("srht-readonly")  # this virtualenv's, else the one on $PATH
        script = beside if beside.exists() else Path(shutil.which("srht-readonly") or beside)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in self.names:
                with (self.directory / f"{name}.log").open("w") as log:
                    argv = [str(script), "--config", str(inventory), "agent", "--pgbouncer", name, *args]
                    self.procs[name] = subprocess.Popen(
                        wrap(argv) if wrap else argv,
                        env=environment, stdout=subprocess.DEVNULL, stderr=log, start_new_session=detach)
        except BaseException:
            self.stop()
            raise

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)}" for n in self.names)

    def count(self, text: str) -> dict[str, int]:
        return {n: self.log(n).count(text) for n in self.names}

    def lines(self, text: str) -> dict[str, list[str]]:
        """Each agent's log lines holding ``text``."""
        return {n: [line for line in self.log(n).splitlines() if text in line] for n in self.names}

    def wait_for(self, text: str, *, timeout: float, times: int = 1) -> None:
        """Until every agent's log holds ``text`` at least ``times`` times; ``AssertionError`` with the logs
        after ``timeout`` seconds, or when an agent exited."""
        deadline = time.monotonic() + timeout
        while min(self.count(text).values()) < times:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise AssertionError(f"agents exited {dead}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not every agent said {text!r} {times} time(s) within {timeout} s:\n"
                                     f"{self.logs()}")
            time.sleep(0.05)

    def wait_for_any(self, text: str, *, timeout: float) -> str:
        """Until some agent's log holds ``text``; that agent's name. ``AssertionError`` as ``wait_for``."""
        deadline = time.monotonic() + timeout
        while True:
            said = [n for n, c in self.count(text).items() if c]
            if said:
                return said[0]
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise AssertionError(f"agents exited {dead}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no agent said {text!r} within {timeout} s:\n{self.logs()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = p.wait()
        if any(codes.values()):
            raise AssertionError(f"agents exited {codes}:\n{self.logs()}")

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _back_after(times: list[float], since: float) -> float | None:
    """Seconds from ``since`` to the end of the longest stretch between two of ``times`` that ends after it."""
    times = sorted(times)
    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False) if b >= since]
    return max(gaps)[1] - since if gaps else None


def reads_restored(probe: ReadProbe, since: float) -> list[float | None]:
    """Per DSN of ``probe``: seconds from ``since`` to the end of the longest stretch without a good read
    that ends after ``since`` (reads fail, or wait in PgBouncer for a server, then work again); None
    when no read worked after ``since``.

    Measured at the end of that stretch, so a read that a dying server still answered just after
    ``since`` does not count as "back"."""
    return [_back_after(oks, since) for oks in probe.ok_times]


def writes_restored(load: WriteLoad, since: float) -> float | None:
    """As ``reads_restored``, for the acknowledged writes of ``load``'s slowest writer; None when a writer
    had none after ``since``."""
    ends = [_back_after(log.ack_times, since) for log in load.logs]
    return None if None in ends else max(e for e in ends if e is not None)


#: The lab's ``[agent] fence``: ``kill -9`` of the node's postmaster and its children (as ``systemctl kill
#: -s KILL`` kills a unit), then exit 0 once it is gone (a zombie counts), 1 if not within 10 s.
LAB_FENCE = """#!/bin/sh
pid=$(head -1 "$SRHT_READONLY_FENCE_DATA/postmaster.pid" 2>/dev/null) || exit 0
pkill -9 -P "$pid" 2>/dev/null; kill -9 "$pid" 2>/dev/null
i=0
while [ $i -lt 100 ]; do
  state=$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null) || exit 0
  [ "$state" = Z ] && exit 0
  sleep 0.1; i=$((i + 1))
done
exit 1
"""


def write_fence(path: Path, script: str = LAB_FENCE, *, log: Path | None = None) -> Path:
    """``script`` as an executable file at ``path``, first appending the node's name to ``log`` if given."""
    if log is not None:
        head, _, body = script.partition("\n")
        script = f'{head}\necho "$SRHT_READONLY_FENCE_NODE" >> {log}\n{body}'
    path.write_text(script)
    path.chmod(0o755)
    return path


def start_again(node: LabNode, *, timeout: float = 30) -> None:
    """Start ``node`` after a ``kill -9``: once its old postmaster is reaped (PostgreSQL refuses to
    start while the pid in ``postmaster.pid`` exists, a zombie included, and here the container's
    init reaps orphans a few seconds late)."""
    pid = node.server.postmaster_pid()
    deadline = time.monotonic() + timeout
    while pid is not None and Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"postmaster {pid} of {node.name} still not reaped {timeout} s after it was killed")
        time.sleep(0.05)
    node.start()
