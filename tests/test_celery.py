"""srht_readonly.celery on a real worker: read-only failures fail in one line, never retry; defer works.

A private Redis and a ``celery worker`` process (prefork, one child) run ``tests/_celery_app.py``;
the databases come from the lab (``srht_readonly_db`` refuses writes with 25006 like a standby).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import psycopg2
import pytest
from celery import Celery

from srht_readonly import DatabaseUnavailable, DeadlineExceeded, ReadOnlyError
from srht_readonly.celery import COUNTERS_TASK, TaskDeadlineExceeded, install, installed
from srht_readonly.ops.ports import free_port
from tests._celery_harness import celery_worker, redis_server, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def celery_env(tmp_path_factory):
    from tests import _celery_app as tasks

    directory = tmp_path_factory.mktemp("celery")
    with redis_server(directory / "redis") as server:
        env = {"SRHT_TEST_BROKER": server.url(0), "SRHT_TEST_BACKEND": server.url(1)}
        tasks.app.conf.update(broker_url=env["SRHT_TEST_BROKER"], result_backend=env["SRHT_TEST_BACKEND"])
        with celery_worker("tests._celery_app", directory / "worker", env=env, queues="srht-tests") as worker:
            yield SimpleNamespace(app=tasks.app, tasks=tasks, worker=worker)
        tasks.app.close()


@pytest.fixture
def ro_db(srht_readonly_db):
    """A database refusing writes (25006), with an empty ``marks`` table."""
    conn = psycopg2.connect(srht_readonly_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET default_transaction_read_only = off")
            cur.execute("BEGIN READ WRITE")
            cur.execute("CREATE TABLE marks (marker text NOT NULL)")
    finally:
        conn.close()
    return srht_readonly_db


def _marks(dsn: str, marker: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM marks WHERE marker = %s", (marker,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def _final_lines(worker, task_id: str, *, timeout: float = 10) -> list[str]:
    """The worker's lines about ``task_id`` once its final line (succeeded/raised) is written."""
    def done():
        lines = worker.lines_about(task_id)
        return lines if any(" succeeded in " in x or " raised " in x for x in lines) else None

    return wait_for(done, timeout=timeout, what=f"the final log line of task {task_id}")


def _counts(env, task: str, outcome: str) -> int:
    result = env.app.send_task(COUNTERS_TASK, queue="srht-tests").get(timeout=10)
    return sum(c["count"] for c in result["counters"] if c["task"] == task and c["outcome"] == outcome)


def test_importing_srht_readonly_does_not_import_celery():
    code = "import sys, srht_readonly; assert 'celery' not in sys.modules, 'celery was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_twice_on_one_app_is_refused():
    app = Celery("twice", set_as_current=False)
    first = install(app)
    assert installed(app) is first
    with pytest.raises(RuntimeError, match="already"):
        install(app)


@pytest.mark.parametrize("task_name", ["autoretry_write", "explicit_retry_write", "defined_after_install"])
def test_read_only_write_ends_failure_in_one_line_without_retry(celery_env, ro_db, task_name):
    task = getattr(celery_env.tasks, task_name)
    before = _counts(celery_env, task.name, "failed")
    marker = uuid.uuid4().hex
    result = task.delay(ro_db.dsn, marker)
    with pytest.raises(ReadOnlyError, match="read-only"):
        result.get(timeout=20)
    assert result.state == "FAILURE"
    lines = _final_lines(celery_env.worker, result.id)
    assert len(lines) == 2, lines  # "received" and the one failure line
    (failure_line,) = [x for x in lines if " raised " in x]
    assert f"{task.name}[{result.id}] raised expected: ReadOnlyError(" in failure_line
    assert "cannot execute INSERT in a read-only transaction" in failure_line
    assert not [x for x in lines if " retry: " in x]
    assert "Traceback" not in "\n".join(celery_env.worker.lines())
    assert _marks(ro_db.dsn, marker) == 0
    assert _counts(celery_env, task.name, "failed") == before + 1


def test_unreachable_database_ends_failure_in_one_line_without_retry(celery_env):
    dsn = f"host=127.0.0.1 port={free_port()} user=srht dbname=srht"  # nothing listens there
    result = celery_env.tasks.autoretry_write.delay(dsn, "unreachable")
    with pytest.raises(DatabaseUnavailable, match="unreachable.*Connection refused"):
        result.get(timeout=20)
    lines = _final_lines(celery_env.worker, result.id)
    assert len(lines) == 2, lines
    assert "raised expected: DatabaseUnavailable(" in lines[-1]


def test_other_errors_keep_celerys_retry_and_traceback(celery_env, srht_lab):
    result = celery_env.tasks.broken_sql.delay(srht_lab.primary.dsn)
    with pytest.raises(Exception, match="syntax error"):
        result.get(timeout=20)
    lines = _final_lines(celery_env.worker, result.id)
    assert len([x for x in lines if " retry: " in x]) == 1  # autoretry_for still applies to them
    assert "raised unexpected: SyntaxError(" in lines[-1]


def test_deferring_task_waits_and_completes_once_writable(celery_env, ro_db, srht_lab):
    marker = uuid.uuid4().hex
    result = celery_env.tasks.deferred_write.delay(ro_db.dsn, marker)
    wait_for(lambda: len([x for x in celery_env.worker.lines_about(result.id) if " retry: " in x]) >= 2, timeout=15,
             what="two deferrals")
    assert not result.ready()
    conn = psycopg2.connect(srht_lab.primary.admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:  # the database now takes writes, as after a promotion
            cur.execute(f'ALTER DATABASE "{ro_db.name}" SET default_transaction_read_only = off')
    finally:
        conn.close()
    writable_at = time.monotonic()
    assert result.get(timeout=20) == marker
    took = time.monotonic() - writable_at
    retries = [x for x in _final_lines(celery_env.worker, result.id) if " retry: " in x]
    print(f"\ndeferred task: {len(retries)} deferrals, done {took:.2f} s after the database took writes")
    assert took < 5  # countdown capped at 0.5 s; margins for a busy machine
    assert all("ReadOnlyError(" in x for x in retries)
    assert _marks(ro_db.dsn, marker) == 1


def test_deferring_task_fails_at_its_deadline_in_one_line(celery_env, ro_db):
    started = time.monotonic()
    result = celery_env.tasks.deferred_write_short.delay(ro_db.dsn, "never")
    with pytest.raises(TaskDeadlineExceeded, match="deferral deadline") as info:
        result.get(timeout=20)
    assert isinstance(info.value, DeadlineExceeded)
    took = time.monotonic() - started
    lines = _final_lines(celery_env.worker, result.id)
    deferrals = [x for x in lines if " retry: " in x]
    print(f"\ndeferral deadline 2 s: gave up after {took:.2f} s and {len(deferrals)} deferrals")
    assert 2.0 <= took < 5.0
    # Countdowns drawn in [c/2, c] with c from 0.2 to 0.5 s: at most 2 s / 0.1 s deferrals.
    assert 2 <= len(deferrals) <= 20
    assert len([x for x in lines if " raised " in x]) == 1
    assert "raised expected: TaskDeadlineExceeded(" in lines[-1]


def test_unknown_commit_is_not_deferred_unless_the_task_is_idempotent(celery_env):
    result = celery_env.tasks.commit_unknown_deferring.delay()
    with pytest.raises(DatabaseUnavailable, match="lost during COMMIT"):
        result.get(timeout=20)
    lines = _final_lines(celery_env.worker, result.id)
    assert len(lines) == 2 and not [x for x in lines if " retry: " in x], lines

    idempotent = celery_env.tasks.commit_unknown_idempotent.delay()
    with pytest.raises(TaskDeadlineExceeded, match="unreachable"):
        idempotent.get(timeout=20)
    assert [x for x in _final_lines(celery_env.worker, idempotent.id) if " retry: " in x]


def test_an_unknown_on_read_only_policy_is_refused_by_name():
    from types import SimpleNamespace

    from srht_readonly.celery import OnReadOnly, ReadOnlyTasks

    assert ReadOnlyTasks._policy(SimpleNamespace(name="t", on_read_only="defer")) is OnReadOnly.DEFER
    assert ReadOnlyTasks._policy(SimpleNamespace(name="t", on_read_only=None)) is OnReadOnly.FAIL
    with pytest.raises(ValueError, match="task t: on_read_only must be 'fail' or 'defer', not 'later'"):
        ReadOnlyTasks._policy(SimpleNamespace(name="t", on_read_only="later"))
