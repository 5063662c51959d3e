"""A build across a real failover: started with PgBouncer on the standby, finished by the promotion."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from integrations.buildsrht import BuildRunner
from integrations.buildsrht import schema as builds
from srht_readonly import ReadOnlyMonitor
from srht_readonly.sqlalchemy import instrument
from tests._celery_harness import wait_for, wait_replicated
from tests.test_builds import EXPECTED, RUNNER, audit, prepare, state

pytestmark = pytest.mark.lab


def test_build_started_read_only_runs_its_steps_and_records_everything_within_2_s_of_promotion(
    srht_fresh_lab, tmp_path, caplog
):
    lab = srht_fresh_lab
    engine = builds.connect(lab.pgbouncer.url)
    job_id = prepare(engine)
    wait_replicated(lab, "SELECT count(*) FROM task", 3)
    lab.pgbouncer.point_at(lab.standby)  # the plan's read-only failover
    caplog.set_level(logging.INFO)

    monitor = ReadOnlyMonitor(engine, recheck=0.5, announce_file=None)
    instrument(engine, monitor)
    runner = BuildRunner(engine, deadline=60, name=RUNNER, workdir=tmp_path, monitor=monitor)
    outcome: dict[str, object] = {}

    def build() -> None:
        outcome["result"] = runner.run(job_id)
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=build, name="build")
    started = time.monotonic()
    thread.start()
    try:
        # The steps run while read-only (their logs appear), then the build blocks on its updates.
        home = tmp_path / str(job_id)
        wait_for(lambda: all((home / f"{n}.log").exists() for n in ("setup", "build", "test")), timeout=20,
                 what="the build's steps to run")
        wait_for(lambda: any("database read-only" in r.getMessage() for r in caplog.records), timeout=10,
                 what="the runner to say it waits")
        time.sleep(max(0.0, started + 2.5 - time.monotonic()))  # blocked for a while
        assert thread.is_alive() and "result" not in outcome
        assert state(engine, job_id).status == "queued"  # reads work; nothing could be written

        promotion = lab.promote(lab.standby)
        promoted = time.monotonic()
    finally:
        thread.join(timeout=70)
    result = outcome["result"]
    recorded_in = outcome["done"] - promoted  # type: ignore[operator]
    print(f"\nbuild blocked {promoted - started:.1f} s on the standby; promotion took {promotion.seconds:.2f} s; "
          f"every status recorded {recorded_in:.2f} s after it; updates waited {result.waited:.1f} s")  # type: ignore[attr-defined]
    assert result.status == "success", result  # type: ignore[attr-defined]
    assert recorded_in <= 2.0
    after = state(engine, job_id)
    assert (after.status, after.runner) == ("success", RUNNER)
    assert after.tasks == {"setup": "success", "build": "success", "test": "success"}
    assert after.artifacts == [("out.txt", len("built\n"))]
    assert audit(engine, changed_only=False) == EXPECTED  # every update committed exactly once, in order

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("integrations.buildsrht")
             and r.getMessage().startswith(f"[#{job_id}] database ")]
    print("runner's database lines:\n  " + "\n  ".join(lines))
    assert len(lines) == 2  # "database read-only; ..." then "database writable again after ..."
    assert "writable again" in lines[1]
    engine.dispose()
