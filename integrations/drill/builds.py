"""builds.sr.ht's runner under a steady stream of builds.

The jobs are queued once, at setup, while the database takes writes (queuing is the web
application's write, not the runner's), and the drill runs them again and again: a build's
updates are absolute values, so a re-run records the same kind of rows. Every ``interval``
seconds a free job is started in a thread of its own with ``BuildRunner`` (one engine and one
``ReadOnlyMonitor`` for all builds, as in a runner process): two short shell steps, an artifact,
and a deadline of ``4 x duration + 10 + MOST_HOLD`` seconds, longer than any read-only window.

Each build is recorded when it ends: ``ok`` (the detail says how long its updates waited for the
database) or ``error`` (aborted at its deadline, or a step failed). A build still running when
the traffic stops is judged like any operation in flight (``Recorder.close``): every scenario
ends with the database writable for a while, and a build takes well under a second, so one
that has not finished by then is stuck. Sabotage ``no-backoff`` gives each update no time to
wait (``BuildRunner(wait_for_writes=False)``), as sr.ht's runner was before the plan.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from integrations.buildsrht import BuildResult, BuildRunner
from integrations.buildsrht import schema as builds
from srht_readonly import ReadOnlyMonitor
from srht_readonly.drill import Event, Operation, Outcome, Recorder, State, verdicts
from srht_readonly.drill.scenarios import MOST_HOLD, Expectation, Fact
from srht_readonly.drill.services import DrillEnvironment
from srht_readonly.sqlalchemy import instrument

from ._traffic import Traffic

__all__ = ["BuildTraffic"]

logger = logging.getLogger(__name__)

#: load -> (seconds between build starts, most builds running at once)
LOADS = {"typical": (1.0, 8), "excessive": (0.5, 16)}
MANIFEST = {
    "tasks": [{"setup": "echo drill > setup.txt"}, {"build": "sleep 0.2 && echo built > out.txt"}],
    "artifacts": ["out.txt"],
}


@dataclass
class Build:
    job_id: int
    operation: Operation
    recorder: Recorder
    thread: threading.Thread | None = None
    event: Event | None = None
    result: BuildResult | None = None


class BuildTraffic(Traffic):
    """Starts builds on a runner that shares the drill's database; records each when it ends."""

    name = "builds"
    kinds = ("build",)
    writes_wait = True  # a build waits in the read-only state: under way there, it met it

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine) -> None:
        interval, self.most = LOADS[env.load]
        super().__init__(threads=1, pause=interval)
        builds.create(engine)
        with engine.begin() as conn:
            self.jobs = [builds.submit(conn, MANIFEST, note="srht-readonly drill") for _ in range(2 * self.most)]
        # Longer than any read-only window: a scenario holds one up to MOST_HOLD beyond duration.
        self.deadline = 4 * env.duration + 10 + MOST_HOLD
        self.engine = builds.connect(env.database_url, pool_size=self.most + 2, max_overflow=self.most)
        stack.callback(self.engine.dispose)
        self.monitor = ReadOnlyMonitor(self.engine, recheck=0.5, announce_file=None)
        instrument(self.engine, self.monitor)
        self.runner = BuildRunner(self.engine, deadline=self.deadline, name="drill.local",
                                  workdir=env.directory / "builds", monitor=self.monitor, retry={"max_wait": 0.5},
                                  wait_for_writes=env.sabotage != "no-backoff")
        self._lock = threading.Lock()
        self._running: dict[int, Build] = {}
        self._ended: list[Build] = []
        stack.callback(self.close)

    def start(self, recorder: Recorder) -> None:
        with self._lock:
            self._ended = []
        super().start(recorder)

    def step(self, worker: int) -> None:
        with self._lock:
            free = [j for j in self.jobs if j not in self._running]
            if len(self._running) >= self.most or not free:
                return
            build = Build(free[0], self.current_recorder.begin(self.name, "build", write=True), self.current_recorder)
            self._running[build.job_id] = build
            self.jobs.append(self.jobs.pop(self.jobs.index(build.job_id)))  # least recently used first
        build.thread = threading.Thread(target=self._build, args=(build,), daemon=True,
                                        name=f"drill-build-{build.job_id}")
        build.thread.start()

    def _build(self, build: Build) -> None:
        try:
            result = self.runner.run(build.job_id)
        except Exception as exc:  # a bug of the runner: the user sees a build that crashed
            logger.exception("build of job %d", build.job_id)
            self._end(build, Outcome.ERROR, f"runner crashed: {exc!r}")
            return
        build.result = result
        if result.status == "success":
            self._end(build, Outcome.OK, f"success in {result.seconds:.1f} s, waited {result.waited:.1f} s "
                                         "for the database", State.READ_ONLY if result.waited > 0 else None)
        elif result.status == "aborted":
            self._end(build, Outcome.ERROR, f"aborted after {result.seconds:.1f} s: {result.reason}")
        else:
            self._end(build, Outcome.ERROR, f"{result.status}: tasks {result.tasks}")

    def _end(self, build: Build, outcome: Outcome, detail: str, met: State | None = None) -> None:
        with self._lock:
            if self._running.get(build.job_id) is build:
                del self._running[build.job_id]
            build.event = build.recorder.end(build.operation, outcome, detail=detail, met=met)
            if build.event is not None:  # None: judged hung when the traffic stopped
                self._ended.append(build)

    def _threads_to_close(self) -> list[threading.Thread]:
        with self._lock:
            return [b.thread for b in self._running.values() if b.thread is not None]

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts, kinds=self.kinds, writes_wait=self.writes_wait)
        with self._lock:
            ended = [b for b in self._ended if b.recorder is recorder]
        aborted = [b.event for b in ended if b.result is not None and b.result.status == "aborted" and b.event]
        checks.append(Expectation(f"builds: none aborted (deadline {self.deadline:g} s)", not aborted,
                                  verdicts.sample(aborted, "aborted")))
        if scenario in verdicts.READ_ONLY_WINDOW and Fact.READ_ONLY_UNTIL in facts:
            hi = facts[Fact.READ_ONLY_UNTIL]
            waited = [b for b in ended if b.result is not None and b.result.waited > 0 and b.event is not None]
            late = [f"#{b.job_id} {b.event.t - hi:.2f} s" for b in waited
                    if b.event and b.event.t > hi + verdicts.GRACE]
            checks.append(Expectation(
                f"builds: those that waited for the read-only database finished within {verdicts.GRACE:g} s "
                "of the promotion", bool(waited) and not late,
                f"{len(waited)} waited" + (f"; late: {', '.join(late[:5])}" if late else "")))
        return checks
