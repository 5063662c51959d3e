"""Make a PostgreSQL server slow on purpose: its processes in a cgroup (v1) with a CPU quota and
write throttling, for the drill's ``soft-outage`` scenario (a ZFS resilver, a saturated disk).

``throttle(pid, datadir)`` is a context manager: it creates a group of its own
(``srht-soft-<random>``) in the ``cpu`` hierarchy (``cpu.cfs_period_us``/``cpu.cfs_quota_us``)
and, when the data directory is on a block device, in the ``blkio`` one
(``blkio.throttle.write_bps_device``/``write_iops_device`` for that device); it moves the
postmaster and every process under it there (those forked later inherit the group), and starts
**burners** in the ``cpu`` group (``/bin/sh`` spinning, one per CPU); on the way out, whatever
happened (an error, Ctrl-C), it kills them, moves every process of its groups back where the
postmaster was and removes the groups.

Why the burner: a quota alone is spent only when the server's own clients ask for CPU, so in
part of each period some is left, and a query arriving then runs at full speed. Measured in
the drill (4 % of a CPU, the stand-ins' traffic): 8 of 25 and 5 of 12 commits timed at random
moments while throttled took under 1 ms, the rest 120-440 ms, so a median of three (what
``status`` takes) came out fast about one time in four. A burner spends each period's quota
within its first few milliseconds, as a saturated machine would, so nearly every query waits for
the next period, while the machine itself gives the burners no more than the quota. One per CPU:
CFS hands a group its quota in per-CPU slices (``sched_cfs_bandwidth_slice_us``, 5 ms), and since
Linux 5.4 a CPU keeps an unused slice across periods, so a single burner left the other CPU's
slice to the server: on an idle lab primary, 24 of 30 commits were fast with one burner on 2
CPUs, 0 of 30 with two (median 414 ms).

A data directory on tmpfs or overlayfs (no block device: ``st_dev`` major 0) cannot be write
throttled: ``Throttled.blkio`` says so and the CPU quota does the work. Buffered writes are not
throttled by blkio v1 either (only direct and synchronous I/O, such as WAL flushes with
``fsync = on``); the lab runs with ``fsync = off``, so there the CPU quota is what slows it.

Where the ``cpu`` hierarchy is missing or not writable (a cgroup v2-only host, not root),
``ThrottleUnavailable`` names what is missing: a scenario built on it must fail, not skip.
This needs root and the process tree on this machine: the lab's, or an inventory's nodes
without ``ssh``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CGROUP_ROOT", "CPU_PERCENT", "PERIOD_US", "Throttled", "ThrottleUnavailable", "throttle"]

#: Where the cgroup v1 hierarchies are mounted, one directory per controller (``cpu``, ``blkio``).
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The group's share of one CPU, in percent, and the CFS period: the quota is spent early in each
#: period by the busy server, then every process of it waits for the next period (up to ~0.5 s).
CPU_PERCENT = 4.0
PERIOD_US = 500_000
#: Write throttling of the data directory's block device (bytes and operations per second).
WRITE_BPS = 1024 * 1024
WRITE_IOPS = 20


class ThrottleUnavailable(RuntimeError):
    """cgroups v1 cannot be used here; the message names what is missing."""


@dataclass
class Throttled:
    """What ``throttle`` did: the groups (``{controller: path}``), the settings applied, the pids moved, and
    why blkio was not used (``blkio`` is then a sentence, not a dict)."""

    pid: int
    groups: dict[str, Path] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    blkio: dict[str, Any] | str = field(default_factory=dict)
    moved: int = 0
    burners: list[int] = field(default_factory=list)  # the pids of the processes spending the CPU quota

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "groups": {k: str(v) for k, v in self.groups.items()}, "cpu": self.cpu,
                "cpu_percent": round(100 * self.cpu["cfs_quota_us"] / self.cpu["cfs_period_us"], 2)
                if self.cpu else None, "blkio": self.blkio, "processes": self.moved,
                "burners": self.burners}


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren... (from ``/proc/*/stat``), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for child in sorted(children.get(parent, [])):
            out.append(child)
            todo.append(child)
    return out


def _hierarchy(root: Path, controller: str, files: tuple[str, ...]) -> Path:
    """The ``controller`` hierarchy under ``root``; ``ThrottleUnavailable`` unless usable."""
    where = root / controller
    if not (where / "cgroup.procs").is_file():
        raise ThrottleUnavailable(
            f"cannot throttle: no cgroup v1 {controller!r} hierarchy at {where} (no {where / 'cgroup.procs'}; "
            f"`mount | grep cgroup` shows what is mounted; a cgroup v2-only host is not supported)")
    missing = [f for f in files if not (where / f).is_file()]
    if missing:
        raise ThrottleUnavailable(f"cannot throttle: the {controller!r} hierarchy at {where} has no "
                                  f"{', '.join(missing)} (a kernel without CFS bandwidth control or blkio "
                                  f"throttling?)")
    if not os.access(where, os.W_OK):
        raise ThrottleUnavailable(f"cannot throttle: {where} is not writable here (run as root, with "
                                  f"cgroups mounted read-write)")
    return where


def _group_of(pid: int, controller: str) -> str:
    """The path of ``pid``'s group in the ``controller`` hierarchy (``/`` for the root)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path or "/"
    return "/"


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _move(group: Path, pid: int) -> bool:
    """Write ``pid`` into ``group``; False if it is gone (it exited meanwhile, or is a zombie)."""
    try:
        (group / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EINVAL) and not _alive(pid):
            return False
        raise
    return True


def _procs(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _block_device(datadir: Path) -> tuple[str | None, str]:
    """``("MAJ:MIN", "")`` of the block device holding ``datadir``, or ``(None, why not)``."""
    dev = os.stat(datadir).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None, (f"not applied: the data directory {datadir} is on device 0:{minor}, not a block device "
                      f"(tmpfs, overlayfs...); the CPU quota does the work")
    if not Path(f"/sys/dev/block/{major}:{minor}").exists():
        return None, f"not applied: {major}:{minor} (holding {datadir}) is not a block device"
    return f"{major}:{minor}", ""


@contextlib.contextmanager
def throttle(pid: int, datadir: str | os.PathLike[str], *, cpu_percent: float = CPU_PERCENT,
             period_us: int = PERIOD_US, write_bps: int | None = WRITE_BPS, write_iops: int | None = WRITE_IOPS,
             burn: int | None = None, root: str | os.PathLike[str] = CGROUP_ROOT) -> Iterator[Throttled]:
    """Throttle the process ``pid`` (a postmaster) and everything under it while the block runs.

    ``cpu_percent`` of one CPU every ``period_us``; ``write_bps``/``write_iops`` (None: not
    throttled) on the block device of ``datadir``; ``burn``: how many burners spend the quota at the
    start of each period (default: one per CPU; 0: none; the module's doc says why).
    ``ThrottleUnavailable`` when the cgroup v1 hierarchies under ``root`` cannot be used; nothing is
    left behind in any case.
    """
    root = Path(root)
    if not Path(f"/proc/{pid}").exists():
        raise ThrottleUnavailable(f"cannot throttle: no process {pid} on this machine")
    cpu_root = _hierarchy(root, "cpu", ("cpu.cfs_period_us", "cpu.cfs_quota_us"))
    device, why = _block_device(Path(datadir)) if (write_bps or write_iops) else (None, "not asked for")
    blkio_root = None
    if device is not None:
        try:
            blkio_root = _hierarchy(root, "blkio", ("blkio.throttle.write_bps_device",
                                                    "blkio.throttle.write_iops_device"))
        except ThrottleUnavailable as exc:
            why = f"not applied: {exc}"
    name = f"srht-soft-{secrets.token_hex(4)}"
    done = Throttled(pid, blkio=why)
    homes: dict[str, Path] = {}
    burners: list[subprocess.Popen[bytes]] = []
    try:
        quota = max(1000, int(period_us * cpu_percent / 100))
        group = cpu_root / name
        group.mkdir()
        done.groups["cpu"] = group
        homes["cpu"] = cpu_root / _group_of(pid, "cpu").lstrip("/")
        (group / "cpu.cfs_period_us").write_text(f"{period_us}\n")
        (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        done.cpu = {"cfs_period_us": period_us, "cfs_quota_us": quota}
        if blkio_root is not None and device is not None:
            group = blkio_root / name
            group.mkdir()
            done.groups["blkio"] = group
            homes["blkio"] = blkio_root / _group_of(pid, "blkio").lstrip("/")
            settings: dict[str, Any] = {"device": device}
            if write_bps:
                (group / "blkio.throttle.write_bps_device").write_text(f"{device} {write_bps}\n")
                settings["write_bps"] = write_bps
            if write_iops:
                (group / "blkio.throttle.write_iops_device").write_text(f"{device} {write_iops}\n")
                settings["write_iops"] = write_iops
            done.blkio = settings
        # The postmaster first: what it forks from then on is born in the group; then what it had
        # forked before, twice over for a child forked by a child while the first pass ran.
        for group in done.groups.values():
            if not _move(group, pid):
                raise ThrottleUnavailable(f"cannot throttle: process {pid} is gone")
        moved = {pid}
        for _ in range(2):
            for child in descendants(pid):
                if child not in moved and all([_move(g, child) for g in done.groups.values()]):
                    moved.add(child)
        done.moved = len(moved)
        for _ in range((os.cpu_count() or 1) if burn is None else burn):
            burner = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            burners.append(burner)
            if not _move(done.groups["cpu"], burner.pid):
                raise ThrottleUnavailable(f"cannot throttle: a burner (process {burner.pid}) died at once")
            done.burners.append(burner.pid)
        logger.info("throttled %d process(es) of postmaster %d: %s", len(moved), pid, done.as_dict())
        yield done
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        _release(done.groups, homes)


def _release(groups: dict[str, Path], homes: dict[str, Path]) -> None:
    """Move every process of ``groups`` to its ``homes`` entry, then remove the groups (retrying while a
    process forked during the move is still being moved)."""
    for controller, group in groups.items():
        home = homes.get(controller, group.parent)
        for _ in range(50):
            left = _procs(group)
            for pid in left:
                try:
                    _move(home, pid)
                except OSError as exc:  # keep going: the group must go, and the next round retries this one
                    logger.warning("could not move %d from %s back to %s: %s", pid, group, home, exc)
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)
        else:
            logger.error("could not remove %s: processes %s still in it", group, _procs(group))
