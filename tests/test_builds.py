"""The build-runner stand-in on the shared lab: statuses, failures, timeouts, unknown COMMITs, deadline.

Each test gets its own database on the shared primary (replicated to the standby) with the
builds schema and an audit trigger that logs every row change the runner makes, in order.
"""

from __future__ import annotations

import logging
import time
import uuid
from types import SimpleNamespace

import psycopg2
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from integrations.buildsrht import BuildRunner
from integrations.buildsrht import schema as builds
from tests._celery_harness import wait_replicated

pytestmark = pytest.mark.lab

RUNNER = "runner.test"
MANIFEST = {
    "tasks": [{"setup": "echo setting up"}, {"build": "echo built > out.txt"}, {"test": "test -s out.txt"}],
    "artifacts": ["out.txt"],
}
#: What the audit trigger must see for MANIFEST, each change once, in this order.
EXPECTED = [
    f"job queued {RUNNER}", f"job running {RUNNER}",
    "task setup running", "task setup success",
    "task build running", "task build success",
    "task test running", "task test success",
    "artifact out.txt",
    f"job success {RUNNER}",
]

AUDIT = """
CREATE TABLE audit (seq bigserial PRIMARY KEY, entry text NOT NULL, changed boolean NOT NULL);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  changed boolean := TG_OP = 'INSERT' OR OLD IS DISTINCT FROM NEW;
BEGIN
  IF TG_TABLE_NAME = 'job' THEN
    INSERT INTO audit (entry, changed) VALUES ('job ' || NEW.status || ' ' || coalesce(NEW.runner, '-'), changed);
  ELSIF TG_TABLE_NAME = 'task' THEN
    INSERT INTO audit (entry, changed) VALUES ('task ' || NEW.name || ' ' || NEW.status, changed);
  ELSE
    INSERT INTO audit (entry, changed) VALUES ('artifact ' || NEW.path, changed);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER job_audit AFTER UPDATE ON job FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER task_audit AFTER UPDATE ON task FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER artifact_audit AFTER INSERT ON artifact FOR EACH ROW EXECUTE FUNCTION audit_row();
"""


def prepare(engine, manifest=MANIFEST) -> int:
    """Create the schema and the audit trigger, submit ``manifest``; the job id."""
    builds.create(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(AUDIT)
        return builds.submit(conn, manifest)


def audit(engine, *, changed_only: bool = True) -> list[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT entry, changed FROM audit ORDER BY seq").all()
    return [entry for entry, changed in rows if changed or not changed_only]


def state(engine, job_id: int) -> SimpleNamespace:
    with engine.connect() as conn:
        job = conn.execute(select(builds.job).where(builds.job.c.id == job_id)).one()
        tasks = dict(conn.execute(select(builds.task.c.name, builds.task.c.status)
                                  .where(builds.task.c.job_id == job_id)).all())
        artifacts = conn.execute(select(builds.artifact.c.path, builds.artifact.c.size)
                                 .where(builds.artifact.c.job_id == job_id)).all()
    return SimpleNamespace(status=job.status, runner=job.runner, updated=job.updated, tasks=tasks,
                           artifacts=[tuple(a) for a in artifacts])


@pytest.fixture
def builds_db(srht_lab):
    """A database of its own on the shared lab: engines on the primary (through PgBouncer) and the standby."""
    name = f"builds_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(srht_lab.primary.admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" OWNER srht')
    primary = builds.connect(f"postgresql://srht@127.0.0.1:{srht_lab.pgbouncer.port}/{name}")
    standby = builds.connect(f"postgresql://srht@127.0.0.1:{srht_lab.standby.port}/{name}")
    try:
        yield SimpleNamespace(name=name, primary=primary, standby=standby, lab=srht_lab)
    finally:
        primary.dispose()
        standby.dispose()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_build_records_every_status_once_and_in_order(builds_db, tmp_path):
    job_id = prepare(builds_db.primary)
    result = BuildRunner(builds_db.primary, deadline=30, name=RUNNER, workdir=tmp_path).run(job_id)
    assert result.status == "success", result
    after = state(builds_db.primary, job_id)
    assert (after.status, after.runner) == ("success", RUNNER)
    assert after.tasks == {"setup": "success", "build": "success", "test": "success"}
    assert after.artifacts == [("out.txt", len("built\n"))]
    assert (tmp_path / "artifacts" / str(job_id) / "out.txt").read_text() == "built\n"
    assert audit(builds_db.primary, changed_only=False) == EXPECTED
    assert result.waited == 0


def test_failing_step_fails_the_build_and_skips_the_rest(builds_db, tmp_path):
    manifest = {"tasks": [{"setup": "true"}, {"build": "exit 3"}, {"test": "true"}], "artifacts": ["out.txt"]}
    job_id = prepare(builds_db.primary, manifest)
    result = BuildRunner(builds_db.primary, deadline=30, name=RUNNER, workdir=tmp_path).run(job_id)
    assert result.status == "failed"
    after = state(builds_db.primary, job_id)
    assert after.status == "failed"
    assert after.tasks == {"setup": "success", "build": "failed", "test": "skipped"}
    assert after.artifacts == []


def test_step_still_running_at_the_deadline_times_out_and_is_recorded(builds_db, tmp_path):
    job_id = prepare(builds_db.primary, {"tasks": [{"hang": "sleep 30"}]})
    started = time.monotonic()
    result = BuildRunner(builds_db.primary, deadline=1.5, name=RUNNER, workdir=tmp_path).run(job_id)
    took = time.monotonic() - started
    assert result.status == "timeout"
    assert 1.5 <= took < 5
    # Past the deadline each update still gets its one try: on a writable database it lands.
    after = state(builds_db.primary, job_id)
    assert (after.status, after.tasks) == ("timeout", {"hang": "failed"})


def test_updates_whose_commit_outcome_is_unknown_are_retried_without_applying_twice(builds_db, tmp_path):
    """Every COMMIT succeeds but first reports a lost connection: each update is sent twice."""

    class LostAfterCommit(Session):
        commits = 0

        def commit(self) -> None:
            super().commit()
            LostAfterCommit.commits += 1
            if LostAfterCommit.commits % 2:
                raise psycopg2.OperationalError("server closed the connection unexpectedly")

    job_id = prepare(builds_db.primary)
    runner = BuildRunner(builds_db.primary, deadline=30, name=RUNNER, workdir=tmp_path,
                         session_factory=lambda: LostAfterCommit(builds_db.primary), retry={"max_wait": 0.05})
    result = runner.run(job_id)
    assert result.status == "success"
    assert LostAfterCommit.commits == 2 * len(EXPECTED)
    assert audit(builds_db.primary) == EXPECTED  # every change exactly once, in order
    with_repeats = audit(builds_db.primary, changed_only=False)
    assert len(with_repeats) == 2 * len(EXPECTED) - 1  # the repeated artifact INSERT did nothing
    assert state(builds_db.primary, job_id).artifacts == [("out.txt", len("built\n"))]


def test_build_on_a_standby_runs_its_steps_then_aborts_at_its_deadline(builds_db, tmp_path, caplog):
    job_id = prepare(builds_db.primary)
    wait_replicated(builds_db.lab, "SELECT count(*) FROM audit", 0, dbname=builds_db.name)
    before = state(builds_db.primary, job_id)
    caplog.set_level(logging.DEBUG)
    runner = BuildRunner(builds_db.standby, deadline=3, name=RUNNER, workdir=tmp_path)
    started = time.monotonic()
    result = runner.run(job_id)
    took = time.monotonic() - started
    print(f"\nbuild on the standby with a 3 s deadline: aborted after {took:.2f} s")
    assert result.status == "aborted"
    assert 3.0 <= took <= 4.0
    assert result.tasks == {"setup": "success", "build": "success", "test": "success"}  # the steps ran
    assert result.unrecorded == ["job runner", "job status running", "task setup running", "task setup success",
                                 "task build running", "task build success", "task test running",
                                 "task test success", "artifact out.txt", "job status success"]
    assert result.recorded == []
    aborted = [r for r in caplog.records if "build aborted" in r.getMessage()]
    assert len(aborted) == 1 and aborted[0].levelno == logging.ERROR
    assert aborted[0].getMessage().startswith(f"[#{job_id}] build aborted: the database stayed read-only")
    ours = [r for r in caplog.records if r.name.startswith("integrations.buildsrht") and "database" in r.getMessage()
            and r.levelno >= logging.INFO]
    core = [r for r in caplog.records if r.name.startswith("srht_readonly") and r.levelno >= logging.INFO]
    tries = [r for r in caplog.records if r.name == "srht_readonly.policies.retry"]
    print(f"{len(tries)} tries logged at DEBUG or above; INFO+ lines: {len(ours)} from the runner, "
          f"{len(core)} from srht_readonly")
    assert len(tries) > 5  # it did retry with backoff...
    assert len(ours) == 2  # ...but said so once (read-only), then once more (aborted)
    assert len(core) <= 1  # retry_until_writable's own first-wait line
    after = state(builds_db.primary, job_id)  # nothing was written
    assert (after.status, after.runner, after.updated, after.tasks) == (before.status, None, before.updated,
                                                                       before.tasks)
