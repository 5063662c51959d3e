"""``srht-readonly lab up --agents``: etcd and an agent beside each of the lab's PgBouncers, in the background.

A one-member etcd (data, log in ``DIR/etcd``) and one ``srht-readonly agent --pgbouncer NAME`` per
PgBouncer of the lab's inventory (logs in ``DIR/agents/NAME.log``), each in a session of its own so
that they outlive the command, as the lab's servers do. What runs is recorded in
``DIR/agents.json``; ``lab down`` stops it all (``stop``) before it removes the directory, and the
lab's inventory gains the ``[etcd]`` section (``inventory_section``), so ``status`` shows every
agent's heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from .agents import Agents
from .etcd import EtcdCluster

__all__ = ["STATE_FILE", "inventory_section", "recorded", "running", "start", "stop"]

STATE_FILE = "agents.json"


def recorded(directory: Path) -> dict[str, Any] | None:
    """What ``start`` recorded in ``directory``, or None."""
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def running(directory: Path) -> bool:
    """Whether every recorded process (etcd, each agent) still runs."""
    state = recorded(directory)
    return state is not None and all(_ours(pid, directory) for pid in _pids(state))


def inventory_section(state: dict[str, Any]) -> list[str]:
    return ["", "[etcd]", f"endpoints = {', '.join(state['etcd']['endpoints'])}"]


def start(directory: Path, inventory: Path, *, timeout: float = 30) -> dict[str, Any]:
    """Start etcd, add its ``[etcd]`` section to ``inventory``, start the agents and wait until each has
    learned the primary (its log says ``expect:``); what runs is recorded and returned."""
    etcd = EtcdCluster(directory / "etcd", detach=True)
    try:
        with inventory.open("a") as f:
            f.write("\n".join(inventory_section({"etcd": {"endpoints": etcd.endpoints}})) + "\n")
        logs = directory / "agents"
        logs.mkdir(exist_ok=True)
        agents = Agents(inventory, logs, detach=True)
    except BaseException:
        etcd.stop()
        raise
    state = {"etcd": {"endpoints": etcd.endpoints, "pids": [p.pid for p in etcd.procs if p is not None],
                      "log": str(directory / "etcd")},
             "agents": {n: {"pid": p.pid, "log": str(logs / f"{n}.log")} for n, p in agents.procs.items()}}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    try:
        agents.wait_for("expect:", timeout=timeout)
    except AssertionError as exc:
        stop(directory)
        raise RuntimeError(f"the agents did not start: {exc}") from exc
    return state


def stop(directory: Path, *, timeout: float = 15) -> None:
    """SIGTERM each recorded agent (a clean stop withdraws its heartbeat), SIGKILL one still there after
    ``timeout`` s, then etcd; only processes whose command line names ``directory`` are signalled."""
    state = recorded(directory)
    if state is None:
        return
    agents = [a["pid"] for a in state["agents"].values() if _ours(a["pid"], directory)]
    for pid in agents:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_ours(pid, directory) for pid in agents) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in [*agents, *state["etcd"]["pids"]]:
        if _ours(pid, directory):
            _signal(pid, signal.SIGKILL)
    (directory / STATE_FILE).unlink(missing_ok=True)


def _pids(state: dict[str, Any]) -> list[int]:
    return [*state["etcd"]["pids"], *(a["pid"] for a in state["agents"].values())]


def _ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is still one ``start`` made (not a pid reused since, by one of the lab's own servers
    among others): an agent whose ``--config`` is inside ``directory``, or an etcd whose ``--data-dir`` is;
    ``directory`` as the lab resolved it."""
    inside = f"{Path(directory).resolve()}/"
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    named = any(flag in ("--config", "--data-dir") and value.startswith(inside)
                for flag, value in zip(args, args[1:], strict=False))
    return named and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
