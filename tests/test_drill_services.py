"""The drill's local services (``integrations.drill``): real servers, real traffic, against a lab.

One lab and one ``LocalServices`` for the module, in file order: traffic while writable (every
operation works), traffic with PgBouncer on the hot standby (the plan's read-only failover:
refusals are the explanatory ones, drops are the allowed ones, nothing is an error), then
``close()`` leaves no process, thread or port behind. A constructor that fails half-way
cleans up too.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integrations.drill import LocalServices
from srht_readonly.drill import Event, Outcome, Recorder, verdicts
from srht_readonly.drill.services import DrillEnvironment
from srht_readonly.testing import Lab, factories

pytestmark = pytest.mark.lab

drill_lab = factories.lab("module")

WAIT = 60.0


@pytest.fixture(scope="module")
def services(drill_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    env = DrillEnvironment(drill_lab.pgbouncer.url, tmp_path_factory.mktemp("drill"), "typical", 2.0)
    started = time.monotonic()
    local = LocalServices(env)
    print(f"\nLocalServices up in {time.monotonic() - started:.1f} s")
    try:
        yield local
    finally:
        local.close()


def drive(local: LocalServices, recorder: Recorder,
          *stages: tuple[Callable[[list[Event]], bool], Callable[[], None] | None]) -> None:
    """Start every source on ``recorder``; for each ``(until, then)`` stage wait until ``until(events)``
    holds, then call ``then()``; stop the sources, each within the runner's bound."""
    for source in local.sources:
        source.start(recorder)
    try:
        for until, then in stages:
            give_up = time.monotonic() + WAIT
            while not until(recorder.events):
                assert time.monotonic() < give_up, f"gave up waiting; so far {recorder.counts()}"
                time.sleep(0.1)
            if then is not None:
                then()
    finally:
        for source in local.sources:
            began = time.monotonic()
            source.stop()
            assert time.monotonic() - began < 2.5, f"{source.name}.stop() took {time.monotonic() - began:.1f} s"


def seen(events: list[Event], wanted: dict[tuple[str, str], Outcome]) -> bool:
    """Every (service, op) of ``wanted`` has ended at least once with its outcome."""
    return all(any(e.service == s and e.op == op and e.outcome is o for e in events) for (s, op), o in wanted.items())


def errors(recorder: Recorder) -> list[Event]:
    return [e for e in recorder.events if e.outcome is Outcome.ERROR]


def failed(checks: list[Any]) -> list[str]:
    return [f"{c.text}: {c.observed} {[e.as_dict() for e in c.evidence[:3]]}" for c in checks if not c.passed]


WRITABLE = {
    **{("web", op): Outcome.OK for op in ("index", "repo", "settings", "create", "api")},
    **{("ssh", op): Outcome.OK for op in ("push", "push-new", "fetch", "new-key")},
    ("builds", "build"): Outcome.OK,
    ("celery", "deliver"): Outcome.OK,
}

READ_ONLY = {
    **{("web", op): Outcome.EXPLAINED for op in ("settings", "create", "api")},
    **{("web", op): Outcome.DROPPED for op in ("index", "repo")},
    ("ssh", "push"): Outcome.DROPPED,
    ("ssh", "push-new"): Outcome.EXPLAINED,
    ("ssh", "fetch"): Outcome.OK,
    ("ssh", "new-key"): Outcome.DROPPED,
    ("celery", "deliver"): Outcome.EXPLAINED,
}


def test_writable_every_source_records_only_successful_operations(services: LocalServices) -> None:
    recorder = Recorder()
    drive(services, recorder, (lambda events: seen(events, WRITABLE), None))
    assert {e.outcome for e in recorder.events} == {Outcome.OK}, [e for e in recorder.events if e.outcome != "ok"]
    assert {e.service for e in recorder.events} == {"web", "ssh", "builds", "celery"}
    for source in services.sources:  # the undisturbed scenarios' verdicts pass on this traffic
        assert failed(source.expectations("switchover", recorder, {"step_seconds": {}})) == []


def test_on_the_standby_writes_are_explained_or_dropped_and_nothing_is_an_error(
    services: LocalServices, drill_lab: Lab
) -> None:
    drill_lab.wait_caught_up(timeout=10)
    facts: dict[str, Any] = {"step_seconds": {}}
    recorder = Recorder()

    def read_only() -> None:
        drill_lab.pgbouncer.point_at(drill_lab.standby)
        facts["read_only_from"] = recorder.now()
        facts["states"] = [["read-only", facts["read_only_from"], None]]

    def writable_again() -> None:
        facts["read_only_until"] = facts["back_at"] = facts["states"][0][2] = recorder.now()
        drill_lab.pgbouncer.point_at(drill_lab.primary)

    def recovered(events: list[Event]) -> bool:
        later = [e for e in events if e.t > facts["read_only_until"]]
        settled = verdicts.after(events, facts["read_only_until"] + verdicts.GRACE)  # judged: all must work
        return (any(e.service == "builds" and "waited 0.0 s" not in e.detail for e in later)
                and any(e.service == "web" and e.write and e.outcome is Outcome.OK for e in later)
                and not verdicts.kinds_missing(settled, {s.name: s.kinds for s in services.sources}, "worked-again",
                                               facts))

    try:
        read_only()
        drive(services, recorder, (lambda events: seen(events, READ_ONLY), writable_again), (recovered, None))
    finally:
        drill_lab.pgbouncer.point_at(drill_lab.primary)
    assert errors(recorder) == []
    for source in services.sources:  # and the read-only failover's verdicts pass on it
        assert failed(source.expectations("readonly-failover", recorder, facts)) == []


def ours(markers: list[str]) -> list[str]:
    """Live processes whose command line mentions one of ``markers``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "State:\tZ" not in status and any(m in cmdline for m in markers):
            found.append(f"{pid}: {cmdline[:160]}")
    return found


def drill_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(("drill-", "gitsrht-web", "meta.sr.ht", "webhook-receiver", "build-journal"))]


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def test_close_stops_every_server_process_and_thread(services: LocalServices) -> None:
    sshd_base = str(services.ssh.sshd.base)
    markers = [str(services.env.directory), sshd_base]
    pids = [services.ssh.sshd.process.pid, services.celery.redis.proc.pid, services.celery.worker.proc.pid]
    assert len(ours(markers)) >= 3  # sshd, redis-server and the worker (and its pool) are found this way
    began = time.monotonic()
    services.close()
    print(f"\nLocalServices closed in {time.monotonic() - began:.1f} s")
    assert ours(markers) == []
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()] == []
    assert not os.path.exists(sshd_base)
    assert drill_threads() == []
    assert refused(services.web.url)
    services.close()  # twice is harmless


@pytest.mark.solo  # it looks for any sshd of the stand-ins and any new directory in /opt: alone, or finds others'
def test_a_constructor_failing_half_way_leaves_nothing_running(drill_lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "celery").write_text("in the way")  # the last service cannot make its directory
    before = set(os.listdir("/opt")) | set(os.listdir("/var/lib"))
    with pytest.raises(NotADirectoryError):
        LocalServices(DrillEnvironment(drill_lab.pgbouncer.url, tmp_path, "typical", 2.0))
    assert ours([str(tmp_path), "srht-readonly-sshd-"]) == []
    assert drill_threads() == []
    assert (set(os.listdir("/opt")) | set(os.listdir("/var/lib"))) <= before
