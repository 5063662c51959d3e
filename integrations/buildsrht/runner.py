"""``BuildRunner``: builds.sr.ht's ``RunBuild``, with one deadline and updates that wait for writes.

A build is: read the job, set its runner and status ``running``, run each task's script in a
shell (recording ``running`` then ``success``/``failed``; after a failure the remaining tasks are
``skipped``), store the artifacts, set the final status. The shell steps, the database waits and
the final recording all share **one** :class:`~srht_readonly.Deadline` (``deadline`` seconds,
builds.sr.ht's ``[builds.sr.ht::worker] timeout``):

* a step still running at the deadline is killed, and the job ends ``timeout``;
* updates go through an :class:`~integrations.buildsrht.journal.UpdateJournal`, so a read-only
  database does not stop the build: its steps run, its updates wait in order, and the build
  blocks at the end until they are all recorded;
* if the database is still not writable at the deadline the build is **aborted**: the result's
  status is ``"aborted"``, one ERROR line says so and lists the updates that were not recorded;
  the job row keeps the last status that was recorded (nothing can be written to it).

Every update is idempotent (absolute values with the event's own timestamp; artifacts inserted
with ``ON CONFLICT DO NOTHING``), so retrying one after an unknown COMMIT is safe.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from srht_readonly import Deadline, DeadlineExceeded, Failure, retry_until_writable

from . import schema
from .journal import UpdateJournal

__all__ = ["BuildResult", "BuildRunner"]

logger = logging.getLogger(__name__)


class _JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """builds.sr.ht prefixes every line of a job's log with ``[#id]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[#{self.extra['job_id']}] {msg}", kwargs  # type: ignore[index]


@dataclass
class BuildResult:
    """How a build ended: ``status`` is a job status, or ``"aborted"`` (see the module doc)."""

    job_id: int
    status: str
    tasks: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    recorded: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    waited: float = 0.0  # seconds the updates waited for the database
    seconds: float = 0.0  # the whole build


def _now() -> datetime:
    # The event's own time, computed once: applying the update again writes the same value.
    return datetime.now(UTC).replace(tzinfo=None)


class BuildRunner:
    """Runs builds against ``engine`` (the service's connection string, through PgBouncer).

    ``deadline`` is the whole build's time in seconds; ``name`` is recorded as the job's runner;
    ``workdir`` holds one directory per job (default: a temporary one) with each task's log in
    ``<task>.log``; ``artifact_dir`` receives the artifacts (default: ``workdir/artifacts``).
    ``monitor``, ``session_factory`` and ``retry`` go to the journal (see ``journal.py``).
    ``wait_for_writes=False`` aborts a build at its first refused update instead of waiting, as
    sr.ht's runner did before the plan (the drill's ``--sabotage no-backoff``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        deadline: float = 45 * 60,
        name: str = "runner.local",
        workdir: str | Path | None = None,
        artifact_dir: str | Path | None = None,
        shell: tuple[str, ...] = ("/bin/sh", "-ec"),
        monitor: Any = None,
        session_factory: Any = None,
        retry: dict[str, Any] | None = None,
        wait_for_writes: bool = True,
    ) -> None:
        self.engine = engine
        self.wait_for_writes = wait_for_writes
        self.deadline = float(deadline)
        self.name = name
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="buildsrht-"))
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else self.workdir / "artifacts"
        self.shell = shell
        self.monitor = monitor
        self.session_factory = session_factory
        self.retry = dict(retry or {})

    def run(self, job_id: int) -> BuildResult:
        """Run job ``job_id`` to its end; never raises for a build failure, only for bugs."""
        started = time.monotonic()
        deadline = Deadline(self.deadline)
        log = _JobLog(logger, {"job_id": job_id})
        result = BuildResult(job_id, "running")
        writes_until = deadline if self.wait_for_writes else Deadline(0)
        journal = UpdateJournal(self.engine, writes_until, log=log, monitor=self.monitor,
                                session_factory=self.session_factory, retry=self.retry)
        try:
            manifest = self._manifest(job_id, deadline)
            job = schema.job.c
            journal.put("job runner", update(schema.job).where(job.id == job_id).values(runner=self.name))
            self._set_status(journal, job_id, "running")
            log.info("build started on %s, deadline in %g s", self.name, self.deadline)
            result.status = self._run_tasks(job_id, manifest, deadline, journal, log, result)
            if result.status == "success":
                self._store_artifacts(job_id, manifest, journal, log)
            self._set_status(journal, job_id, result.status)
            journal.wait()  # the build blocks here until every update is recorded, or the deadline
        except DeadlineExceeded as exc:
            result.unrecorded = journal.pending()
            result.reason = str(exc)
            state = "read-only" if exc.failure is Failure.READ_ONLY else "unreachable"
            log.error(
                "build aborted: the database stayed %s until the build's deadline (%g s), so %d update(s) "
                "were not recorded (%s); the job row keeps its last recorded status",
                state, self.deadline, len(result.unrecorded), ", ".join(result.unrecorded),
            )
            result.status = "aborted"
        finally:
            journal.close()
            result.recorded = list(journal.recorded)
            result.waited = journal.waited
            result.seconds = time.monotonic() - started
        if result.status != "aborted":
            log.info("build %s in %.1f s (%d updates recorded, %.1f s waiting for the database)",
                     result.status, result.seconds, len(result.recorded), result.waited)
        return result

    # -- steps -----------------------------------------------------------------------------

    def _manifest(self, job_id: int, deadline: Deadline) -> dict[str, Any]:
        """The job's manifest. Reads work on a standby; only an unreachable database waits."""
        with Session(self.engine) as session:
            for attempt in retry_until_writable(deadline, session=session, commit=False, **self.retry):
                with attempt:
                    text = session.execute(select(schema.job.c.manifest).where(schema.job.c.id == job_id)).scalar_one()
        return dict(json.loads(text))

    def _run_tasks(self, job_id: int, manifest: dict[str, Any], deadline: Deadline, journal: UpdateJournal,
                   log: _JobLog, result: BuildResult) -> str:
        status = "success"
        home = self.workdir / str(job_id)
        home.mkdir(parents=True, exist_ok=True)
        for step in manifest.get("tasks", []):
            ((name, script),) = step.items()
            if status != "success":
                self._set_task(journal, job_id, name, "skipped")
                result.tasks[name] = "skipped"
                continue
            self._set_task(journal, job_id, name, "running")
            outcome = self._run_step(home, name, script, deadline)
            log.info("task %s: %s", name, outcome)
            self._set_task(journal, job_id, name, "success" if outcome == "success" else "failed")
            result.tasks[name] = "success" if outcome == "success" else "failed"
            if outcome != "success":
                status = outcome  # "failed" or "timeout"
        return status

    def _run_step(self, home: Path, name: str, script: str, deadline: Deadline) -> str:
        with open(home / f"{name}.log", "wb") as out:
            try:
                done = subprocess.run([*self.shell, script], cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=max(0.01, deadline.remaining()), check=False)
            except subprocess.TimeoutExpired:
                return "timeout"
        return "success" if done.returncode == 0 else "failed"

    def _store_artifacts(self, job_id: int, manifest: dict[str, Any], journal: UpdateJournal, log: _JobLog) -> None:
        home = self.workdir / str(job_id)
        target = self.artifact_dir / str(job_id)
        for path in manifest.get("artifacts", []):
            source = home / path
            if not source.is_file():
                log.warning("artifact %s was not produced; not stored", path)
                continue
            target.mkdir(parents=True, exist_ok=True)
            stored = target / source.name
            shutil.copyfile(source, stored)
            journal.put(f"artifact {path}", insert(schema.artifact).values(
                job_id=job_id, path=path, name=source.name, url=stored.as_uri(), size=stored.stat().st_size,
                created=_now(),
            ).on_conflict_do_nothing(index_elements=["job_id", "path"]))

    # -- updates (each idempotent) ---------------------------------------------------------

    @staticmethod
    def _set_status(journal: UpdateJournal, job_id: int, status: str) -> None:
        job = schema.job.c
        journal.put(f"job status {status}",
                    update(schema.job).where(job.id == job_id).values(status=status, updated=_now()))

    @staticmethod
    def _set_task(journal: UpdateJournal, job_id: int, name: str, status: str) -> None:
        task = schema.task.c
        journal.put(f"task {name} {status}", update(schema.task)
                    .where(task.job_id == job_id, task.name == name).values(status=status, updated=_now()))
