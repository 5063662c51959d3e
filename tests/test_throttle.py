"""``srht_readonly.testing.throttle`` on a real, lone PostgreSQL: a throttled primary commits slowly,
``status`` flags it (and does not before), the release restores it and leaves no cgroup behind,
even after an error; where cgroups v1 are missing the error names what is missing."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from srht_readonly.ops import sql
from srht_readonly.ops.cluster import Cluster
from srht_readonly.ops.inventory import load
from srht_readonly.ops.status import collect
from srht_readonly.testing.lab import Lab
from srht_readonly.testing.throttle import CGROUP_ROOT, ThrottleUnavailable, descendants, throttle

# Alone (make test's second pass): it times commits on a machine it expects quiet, and compares every
# srht-soft-* group before and after, where another test's group would show.
pytestmark = pytest.mark.solo


def _groups() -> list[str]:
    return sorted(p.name for c in ("cpu", "blkio") if (CGROUP_ROOT / c).is_dir()
                  for p in (CGROUP_ROOT / c).iterdir() if p.name.startswith("srht-soft-"))


def _group_of(pid: int) -> str | None:
    """``pid``'s group in the cpu hierarchy; None when it has exited meanwhile (a client's backend ends
    any time: CI once caught one between listing it and reading its cgroup)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    line = next(x for x in text.splitlines() if x.split(":")[1] == "cpu")
    return line.split(":", 2)[2]


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    """A lone primary (no standby, no PgBouncer) with 8 pgbench clients committing as fast as they can
    (a process of their own: the test's threads would share its GIL with what it measures)."""
    with Lab(standby=False, pgbouncer=False) as lab:
        tmp = tmp_path_factory.mktemp("throttle")
        script = tmp / "commit.sql"
        script.write_text("SELECT txid_current();\n")
        node = lab.primary
        busy = subprocess.Popen([str(Path(lab.bin) / "pgbench"), "-n", "-c", "8", "-j", "2", "-T", "600", "-f",
                                 str(script), "-h", node.host, "-p", str(node.port), "-U", "srht", "srht"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inventory = lab.write_inventory(tmp / "inventory.ini")
        try:
            time.sleep(1)
            assert busy.poll() is None, "pgbench did not start"
            yield lab, inventory
        finally:
            busy.terminate()
            busy.wait(timeout=30)


def test_a_throttled_primary_commits_slowly_status_flags_it_and_the_release_restores_it(lone):
    lab, inventory = lone
    node = lab.primary
    pid = node.server.postmaster_pid()
    before_groups = _groups()
    with Cluster(load(inventory)) as cluster:
        before = collect(cluster)
        assert before.commit_seconds is not None and before.commit_seconds < 0.05, before.commit_seconds
        assert not [p for p in before.problems if "a tiny commit" in p.message]
        # The drill's default (4 % of a CPU, used up by the burners): commits take ~0.4 s, yet a new
        # connection still gets in within status's 3 s connect timeout. At 2 %, CI once saw status's
        # own connection time out (connections took 0.5-3.5 s), so it reported no primary at all.
        with throttle(pid, node.server.data) as done:
            group = done.groups["cpu"]
            assert group.is_dir() and group.name.startswith("srht-soft-")
            assert (group / "cpu.cfs_quota_us").read_text().strip() == str(done.cpu["cfs_quota_us"])
            assert _group_of(pid) == f"/{group.name}"
            children = descendants(pid)
            assert children and all(_group_of(c) in (f"/{group.name}", None) for c in children)
            assert done.moved >= 5  # the postmaster, its background processes and the 8 clients' backends
            burners = done.burners
            assert len(burners) == os.cpu_count() and all(_group_of(b) == f"/{group.name}" for b in burners)
            slow = sql.time_commit(node.admin_dsn)
            during = collect(cluster)
        after = sql.time_commit(node.admin_dsn)
    assert slow >= 0.1, f"a throttled commit took {slow * 1000:.1f} ms"
    flagged = [p for p in during.problems if "a tiny commit" in p.message]
    assert flagged, f"status timed a commit at {during.commit_seconds} s and did not flag it: {during.problems}"
    assert flagged[0].severity == "warning" and flagged[0].subject == f"node {node.name}", flagged
    assert "[status] slow-commit = 0.1 s" in flagged[0].message
    assert after < 0.05, f"released, a commit still took {after * 1000:.1f} ms"
    assert not group.exists() and _groups() == before_groups
    assert _group_of(pid) == "/" and all(_group_of(c) in ("/", None) for c in descendants(pid))
    assert not any(Path(f"/proc/{b}").exists() for b in burners), "a burner outlived the throttle"


def test_the_release_happens_on_an_error_too(lone):
    lab, _ = lone
    pid = lab.primary.server.postmaster_pid()
    with pytest.raises(KeyboardInterrupt), throttle(pid, lab.primary.server.data, write_bps=None,
                                                     write_iops=None) as done:
        assert done.blkio == "not asked for"
        raise KeyboardInterrupt
    assert not done.groups["cpu"].exists() and _group_of(pid) == "/"
    assert done.burners and not any(Path(f"/proc/{b}").exists() for b in done.burners)


def test_without_cgroups_v1_the_error_names_what_is_missing(lone, tmp_path):
    lab, _ = lone
    pid = lab.primary.server.postmaster_pid()
    missing = tmp_path / "no-cgroups"
    with pytest.raises(ThrottleUnavailable) as raised, throttle(pid, lab.primary.server.data, root=missing):
        pytest.fail("throttled without cgroups")
    assert f"no cgroup v1 'cpu' hierarchy at {missing / 'cpu'}" in str(raised.value)
    assert not missing.exists() and _group_of(pid) == "/"
    # A hierarchy without CFS bandwidth control is named as such.
    (missing / "cpu").mkdir(parents=True)
    (missing / "cpu" / "cgroup.procs").write_text("")
    with pytest.raises(ThrottleUnavailable, match="has no cpu.cfs_period_us, cpu.cfs_quota_us"), \
            throttle(pid, lab.primary.server.data, root=missing):
        pass


def test_no_process_no_throttle(tmp_path):
    with pytest.raises(ThrottleUnavailable, match="no process 999999999"), throttle(999999999, tmp_path):
        pass
