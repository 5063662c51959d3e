"""Service-side metrics (``srht_readonly.metrics``): the monitor's state and the policies' outcomes on the
lab's real hot standby and primary, the Flask endpoint, the Celery adapter's outcomes, gunicorn-style
multi-process mode, and that the core never imports prometheus_client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from srht_readonly import ReadOnlyError, ReadOnlyMonitor, abort_on_read_only, drop_on_read_only, retry_until_writable
from srht_readonly.errors import DeadlineExceeded, Failure
from srht_readonly.metrics import ServiceMetrics, exposition
from srht_readonly.sqlalchemy import instrument
from tests._db import admin, wait_for

ROOT = Path(__file__).resolve().parent.parent


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = exposition(registry)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@pytest.fixture
def metrics():
    registry = CollectorRegistry()
    made = ServiceMetrics("git.sr.ht", registry=registry)
    yield made
    made.close()


@pytest.fixture(scope="module")
def standby_table(srht_lab):
    admin(srht_lab.primary.dsn, "CREATE TABLE IF NOT EXISTS metric_notes (v text)")
    wait_for(lambda: admin(srht_lab.standby.dsn, "SELECT to_regclass('metric_notes')")[0][0],
             "metric_notes on the standby")
    return srht_lab


@pytest.mark.lab
def test_policies_and_monitor_on_a_real_hot_standby_are_counted(standby_table, metrics):
    engine = sa.create_engine(standby_table.standby.url, connect_args={"connect_timeout": 5})
    monitor = ReadOnlyMonitor(probe=metrics.timed_probe(engine), recheck=60, announce_file=None)
    instrument(engine, monitor)
    metrics.watch(monitor)
    svc = "git.sr.ht"
    try:
        assert samples(metrics.registry)[("srht_readonly_read_only", (("reason", "start"), ("service", svc)))] == 0

        with pytest.raises(ReadOnlyError), abort_on_read_only("read-only", monitor=monitor), engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO metric_notes VALUES ('refused')")   # SQLSTATE 25006 on the standby
        m = samples(metrics.registry)
        assert m[("srht_readonly_read_only", (("reason", "error"), ("service", svc)))] == 1
        assert m[("srht_readonly_read_only", (("reason", "start"), ("service", svc)))] == 0
        assert m[("srht_readonly_writes_total", (("outcome", "refused"), ("policy", "abort"), ("service", svc)))] == 1

        with pytest.raises(ReadOnlyError), abort_on_read_only("read-only", monitor=monitor):
            pass  # refused before running: the monitor already knows
        with engine.connect() as conn, conn.begin(), drop_on_read_only(conn):
            conn.exec_driver_sql("INSERT INTO metric_notes VALUES ('dropped')")
        with pytest.raises(DeadlineExceeded):
            for attempt in retry_until_writable(0.3, max_wait=0.05):
                with attempt, engine.begin() as conn:
                    conn.exec_driver_sql("INSERT INTO metric_notes VALUES ('retried')")
        assert monitor.check() is True   # a real probe of the standby, timed

        m = samples(metrics.registry)
        writes = {(dict(k[1])["policy"], dict(k[1])["outcome"]): v for k, v in m.items()
                  if k[0] == "srht_readonly_writes_total"}
        assert writes[("abort", "refused")] == 2 and writes[("drop", "dropped")] == 1
        assert writes[("retry", "retried")] >= 2 and writes[("retry", "gave_up")] == 1
        assert m[("srht_readonly_retry_wait_seconds_count", (("service", svc),))] == writes[("retry", "retried")]
        assert 0 < m[("srht_readonly_retry_wait_seconds_sum", (("service", svc),))] <= 0.3 + 0.05
        assert m[("srht_readonly_probe_seconds_count", (("result", "read_only"), ("service", svc)))] == 1
        assert 0 < m[("srht_readonly_probe_seconds_sum", (("result", "read_only"), ("service", svc)))] < 2
        assert ("srht_readonly_writable_again_timestamp_seconds", (("service", svc),)) not in m
    finally:
        engine.dispose()


@pytest.mark.lab
def test_writable_again_after_a_read_only_period_is_timed_by_a_real_probe(srht_lab, metrics):
    engine = sa.create_engine(srht_lab.primary.url, connect_args={"connect_timeout": 5})
    monitor = ReadOnlyMonitor(probe=metrics.timed_probe(engine), recheck=60, announce_file=None)
    metrics.watch(monitor)
    svc = "git.sr.ht"
    try:
        monitor.set_read_only("drill: switchover rehearsal")
        began = monitor.state.since
        assert samples(metrics.registry)[("srht_readonly_read_only", (("reason", "manual"), ("service", svc)))] == 1
        assert monitor.check() is False   # the primary takes writes: writable again, by the probe
        m = samples(metrics.registry)
        assert m[("srht_readonly_read_only", (("reason", "manual"), ("service", svc)))] == 0
        assert m[("srht_readonly_read_only", (("reason", "probe"), ("service", svc)))] == 0
        assert m[("srht_readonly_read_only_seconds_count", (("service", svc),))] == 1
        again = m[("srht_readonly_writable_again_timestamp_seconds", (("service", svc),))]
        assert again == monitor.state.since and 0 <= again - began < 5
        assert m[("srht_readonly_probe_seconds_count", (("result", "writable"), ("service", svc)))] == 1
    finally:
        engine.dispose()


def test_flask_metrics_endpoint_serves_the_registry(metrics):
    import flask

    from srht_readonly.flask import metrics_endpoint

    app = flask.Flask(__name__)
    metrics_endpoint(app, registry=metrics.registry)
    monitor = metrics.watch(ReadOnlyMonitor(announce_file=None))
    monitor.set_read_only("maintenance")
    response = app.test_client().get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    assert 'srht_readonly_read_only{reason="manual",service="git.sr.ht"} 1.0' in response.get_data(as_text=True)


def test_serve_answers_over_http_for_a_celery_worker(metrics):
    import urllib.request

    from srht_readonly.metrics import serve

    monitor = metrics.watch(ReadOnlyMonitor(announce_file=None))
    monitor.set_read_only("maintenance")
    server = serve(0, "127.0.0.1", metrics.registry)
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'srht_readonly_read_only{reason="manual",service="git.sr.ht"} 1.0' in body


def test_celery_outcomes_are_counted(metrics):
    from celery import Celery

    from srht_readonly.celery import ReadOnlyTasks

    tasks = ReadOnlyTasks(Celery("metrics-test"), None, defer_deadline=60, defer_countdown=(1, 2))
    tasks._record("hooks.deliver", "deferred", Failure.READ_ONLY)
    tasks._record("hooks.deliver", "failed", Failure.UNAVAILABLE)
    m = samples(metrics.registry)
    for outcome in ("deferred", "failed"):
        key = (("outcome", outcome), ("policy", "celery"), ("service", "git.sr.ht"))
        assert m[("srht_readonly_writes_total", key)] == 1


WORKER = textwrap.dedent("""
    import sys
    from srht_readonly import ReadOnlyMonitor
    from srht_readonly._outcomes import report
    from srht_readonly.metrics import ServiceMetrics
    metrics = ServiceMetrics("git.sr.ht")
    monitor = metrics.watch(ReadOnlyMonitor(announce_file=None))
    if sys.argv[1] == "ro":
        monitor.set_read_only("maintenance")
    report("abort", "refused")
""")

SCRAPE = textwrap.dedent("""
    import json
    from prometheus_client.parser import text_string_to_metric_families
    from srht_readonly.metrics import exposition
    body, _ = exposition()
    print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(body.decode())
                      for s in f.samples]))
""")


def test_multiprocess_mode_adds_up_every_worker(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "SRHT_READONLY_ANNOUNCE_FILE": ""}
    for mode in ("ro", "rw"):   # two gunicorn workers, one of which saw the database read-only
        proc = subprocess.run([sys.executable, "-c", WORKER, mode], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", SCRAPE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = {(name, tuple(sorted(labels.items()))): value for name, labels, value in json.loads(proc.stdout)}
    assert found[("srht_readonly_writes_total",
                  (("outcome", "refused"), ("policy", "abort"), ("service", "git.sr.ht")))] == 2
    assert found[("srht_readonly_read_only", (("reason", "manual"), ("service", "git.sr.ht")))] == 1


def test_the_core_and_the_adapters_do_not_import_prometheus_client():
    code = ("import json, sys, srht_readonly, srht_readonly.policies, srht_readonly.flask, srht_readonly.celery, "
            "srht_readonly.sqlalchemy\nprint(json.dumps('prometheus_client' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) is False


@pytest.mark.lab
def test_the_service_metrics_example_of_docs_monitoring_runs(srht_lab):
    import re

    text = (ROOT / "docs" / "monitoring.md").read_text()
    every = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    for code in every:   # the Celery and gunicorn snippets run inside those servers: they must compile
        compile(code, "docs/monitoring.md", "exec")
    blocks = [b for b in every if "ServiceMetrics(" in b]
    assert blocks and len(every) > len(blocks)
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "STANDBY_URL": srht_lab.standby.url})
        assert proc.returncode == 0, f"{code}\n{proc.stderr}"


def test_an_idle_process_does_not_show_a_stale_read_only_gauge(metrics):
    # A monitor re-checks only when asked; nothing asks it here (an idle Celery pool process).
    # The metrics ask it every recheck while it is read-only, so the gauge follows the database.
    # Pure logic: the probe is a flag, not a server.
    takes_writes = False
    monitor = ReadOnlyMonitor(probe=lambda: not takes_writes, recheck=0.1, jitter=0, announce_file=None)
    metrics.watch(monitor)
    gauge = ("srht_readonly_read_only", (("reason", "manual"), ("service", "git.sr.ht")))
    monitor.set_read_only("a read-only failover")
    time.sleep(0.5)  # several rechecks: still read-only, still 1
    assert samples(metrics.registry)[gauge] == 1
    takes_writes = True  # promoted; no request comes
    deadline = time.monotonic() + 3
    while samples(metrics.registry)[gauge] != 0:
        assert time.monotonic() < deadline, "the gauge still says read-only 3 s after the database took writes"
        time.sleep(0.05)
    assert monitor.state.read_only is False and monitor.state.reason == "probe"


def test_a_watched_monitors_own_probes_are_timed_and_a_timed_probe_is_not_counted_twice(metrics):
    # Pure logic: the probes are callables (a server is not what is measured here).
    count = ("srht_readonly_probe_seconds_count", (("result", "read_only"), ("service", "git.sr.ht")))
    own = ReadOnlyMonitor(probe=lambda: True, announce_file=None)
    metrics.watch(own)
    own.check()
    own.check()
    assert samples(metrics.registry)[count] == 2
    timed = ReadOnlyMonitor(probe=metrics.timed_probe(lambda: True), announce_file=None)
    metrics.watch(timed)
    timed.check()
    assert samples(metrics.registry)[count] == 3  # once, by timed_probe
    metrics.close()
    own.check()
    assert samples(metrics.registry)[count] == 3  # closed: no longer timed
