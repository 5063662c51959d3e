"""``srht-readonly drill``: every scenario's expectations hold on the real lab with the stand-in
services, at both loads; every sabotage fails its drill with the expectation that caught it; a
drill against an inventory plays its probes; a failing probe fails the drill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest

from srht_readonly.drill.config import drill_config
from srht_readonly.drill.sabotage import SABOTAGES
from srht_readonly.drill.scenarios import SCENARIOS
from srht_readonly.ops.inventory import InventoryError, parse
from tests._majors import new_major_bin

SERVICES = {"database", "web", "ssh", "builds", "celery"}
CLI = str(Path(sys.executable).with_name("srht-readonly"))


def drill(*args: str, cwd: Path, config: Path | None = None, timeout: float = 600,
          tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the drill (with ``TMPDIR=tmpdir``: its lab and scratch directories in there); if the test is
    interrupted (its timeout, Ctrl-C), stop it as Ctrl-C would, so it stops what it started instead of
    leaving a lab and services running (a SIGKILL would)."""
    argv = [CLI, *(["--config", str(config)] if config else []), "drill", *args]
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                          env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _running(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def scratch():
    """The drill's own TMPDIR, so ``_nothing_left`` looks for its leftovers only, not other tests' drills on
    the machine: under /tmp and open to all (the lab's servers run as postgres, in a directory in it)."""
    path = Path(tempfile.mkdtemp(prefix="srht-test-drill-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _nothing_left(report: dict, scratch: Path) -> None:
    """The drill removed its lab and scratch directories and left no process behind that names them."""
    lab_dir = report["environment"].split("embedded lab in ")[1].split(":")[0]
    assert Path(lab_dir).parent == scratch, lab_dir
    assert not Path(lab_dir).exists()
    assert not list(scratch.iterdir()), list(scratch.iterdir())
    assert not _running(str(scratch))


@pytest.mark.solo
@pytest.mark.timeout(600)  # every default scenario: about 4 minutes on 2 idle cores
def test_local_drill_every_scenario_holds_its_expectations(tmp_path, scratch):
    # 2 s per state: a state the verdicts judge is held longer (20 s more at most, or twice the
    # slowest operation) until every kind of operation of every service has met it, so even a
    # short drill judges no verdict on nothing.
    proc = drill("--duration", "2", "--json", cwd=tmp_path, tmpdir=scratch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert [s["name"] for s in report["scenarios"]] == [s.name for s in SCENARIOS if s.default]
    for scenario in report["scenarios"]:
        failed = [e for e in scenario["expectations"] if not e["passed"]]
        assert scenario["passed"] and not failed, (scenario["name"], failed)
        assert set(scenario["services"]) >= SERVICES, (scenario["name"], scenario["services"])
        assert scenario["timeline"]["lanes"], scenario["name"]
        assert "never" not in scenario["facts"], (scenario["name"], scenario["facts"]["never"])
    by = {s["name"]: s for s in report["scenarios"]}
    window = [e for e in by["readonly-failover"]["expectations"]
              if e["text"].startswith("ssh: in the read-only state")]
    assert len(window) == 4, window
    assert all(" 0 met the read-only state" not in e["observed"] for e in window), window
    met = [e for e in by["readonly-failover"]["expectations"] if e["text"].endswith("met the read-only state")]
    assert {e["text"].split(":")[0] for e in met} == SERVICES, met
    for e in met:  # each one shows the operations that decided it, with the state they met
        assert e["operations"] and all(o["met"] == "read-only" or o["met"] is None for o in e["operations"]), e
    for planned in ("switchover", "readonly-failover", "standby-crash", "host-os-upgrade", "past-data"):
        assert by[planned]["ledger"]["lost"] == 0 and by[planned]["ledger"]["acknowledged"] > 100
    assert by["switchover"]["write_unavailability"] < 1.0
    assert by["readonly-failover"]["services"]["web"]["explained"] > 0
    crash = by["primary-crash"]
    if crash["ledger"]["lost"]:
        assert "asynchronous" in crash["lost_because"]
    # The report, in the current directory: a page with a picture per scenario, and the JSON.
    page = (tmp_path / "drill-report" / "index.html").read_text()
    # ... and soft-outage's latency lanes besides its timeline.
    assert page.count("<svg") == len([s for s in SCENARIOS if s.default]) + 1
    assert page.count('class="latency"') == 1
    past = by["past-data"]["facts"]["past"]
    assert past["rows"] == 90 and past["missing"] == past["extra"] == [] and past["gone"] is True, past
    _soft_outage(by["soft-outage"], page)
    assert list(by)[-2:] == ["soft-outage", "major-upgrade"]
    upgraded = by["major-upgrade"]  # played last: the lab ends on the new major
    assert upgraded["ledger"]["lost"] == 0 and upgraded["ledger"]["acknowledged"] > 100
    assert list(by)[-1] == "major-upgrade"
    assert json.loads((tmp_path / "drill-report" / "report.json").read_text())["passed"] is True
    # The summary and the live progress went to stderr; nothing is left running.
    assert "every expectation held" in proc.stderr
    assert page.count("operations decided it") >= 40
    _nothing_left(report, scratch)


SOFT_VERDICTS = ("users met a soft outage", "latency back near the baseline",
                 "database: no error and nothing refused", "status flagged the slow primary",
                 "the exporter's srht_readonly_primary_commit_seconds showed it",
                 "the SrhtSoftOutage alert fires in the promtool case")


def _soft_outage(soft: dict, page: str) -> None:
    """soft-outage in the default drill: latency per service and phase, each of its verdicts held."""
    assert set(soft["latency"]) == SERVICES | {"database write"}, soft["latency"].keys()
    for lane, phases in soft["latency"].items():
        assert set(phases) == {"before", "during", "after"}, lane
        for phase, figures in phases.items():
            assert figures["n"] > 0 and 0 < figures["p50"] <= figures["p95"] <= figures["p99"], (lane, phase, figures)
    writes = soft["latency"]["database write"]
    assert writes["during"]["p95"] >= 5 * writes["before"]["p95"], writes
    assert set(soft["latency_points"]) >= SERVICES
    texts = {e["text"]: e for e in soft["expectations"]}
    for wanted in SOFT_VERDICTS:
        (e,) = [e for t, e in texts.items() if t.startswith(wanted)]
        assert e["passed"], e
    facts = soft["facts"]
    assert facts["throttle"]["cpu"]["cfs_quota_us"] > 0 and facts["throttle"]["processes"] > 3
    assert facts["promtool"]["fires"] is True and facts["promtool"]["quiet"] is True
    assert facts["slow_primary"]["during"]["status"]["slow"], facts["slow_primary"]
    assert "latency per service" in page.lower()


def test_soft_outage_is_left_out_against_remote_nodes_and_fails_clearly_when_named():
    import srht_readonly.ops.cli  # noqa: F401 - the CLI loads the drill command (imported alone it is circular)
    from srht_readonly.drill.command import default_scenarios
    from srht_readonly.drill.procedures import InventoryProcedures
    from srht_readonly.ops.cluster import Cluster
    from srht_readonly.ops.errors import OpsError

    assert "soft-outage" in default_scenarios(None, False)
    assert "soft-outage" not in default_scenarios(None, False, throttle=False)
    inventory = parse("[node remilia]\ndsn = host=10.0.0.2 port=5432\ndata = /var/lib/postgresql/15/main\n"
                      "ssh = db.example.org\n")
    with Cluster(inventory) as cluster, pytest.raises(OpsError, match="cannot throttle remilia: it runs on "
                                                                      "db.example.org \\(over ssh\\)"):
        InventoryProcedures(cluster).throttle("remilia")


@pytest.mark.solo
def test_unattended_the_agents_fail_over_within_2_s_of_the_kill_and_with_auto_promote_promote_once(tmp_path, scratch):
    """unattended-crash (the operator promotes) and unattended-promote (nobody does), in one drill."""
    proc = drill("--scenario", "unattended-crash", "--scenario", "unattended-promote", "--duration", "2", "--json",
                 cwd=tmp_path, tmpdir=scratch)
    report = json.loads(proc.stdout)
    failed = [e for s in report["scenarios"] for e in s["expectations"] if not e["passed"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    crash, promote = report["scenarios"]
    assert (crash["name"], promote["name"]) == ("unattended-crash", "unattended-promote")
    for scenario in (crash, promote):
        expectations = scenario["expectations"]
        (reads,) = [e for e in expectations if e["text"].startswith("reads restored within 2 s of the kill")]
        assert reads["passed"] and float(reads["observed"].split()[0]) < 2.0, reads
        assert set(scenario["services"]) >= SERVICES
        moved = scenario["facts"]["agents"]
        assert moved and all(len(lines) == 1 and "away:" in lines[0] for lines in moved.values()), moved
        facts = scenario["facts"]
        assert facts["promoted_at"] > facts["failover_at"] > facts["crash_at"]
    # With --auto-promote: the promotion was an agent's, once, and no operator step between the kill and it.
    (promoted,) = promote["facts"]["promotions"].values()
    assert len(promoted) == 1 and "promote:" in promoted[0], promoted
    (writes,) = [e for e in promote["expectations"] if e["text"].startswith("writes restored within 10 s of the kill")]
    assert writes["passed"] and float(writes["observed"].split()[0]) < 10.0, writes
    steps = list(promote["facts"]["step_seconds"])
    kill = next(i for i, label in enumerate(steps) if label.startswith("kill -9"))
    assert [label.split()[0] for label in steps[kill + 1:kill + 3]] == ["the", "an"], steps  # the agents' own steps
    _nothing_left(report, scratch)
    assert not [a for a in _running("agent --pgbouncer") if str(scratch) in a], "an agent outlived the drill"
    assert not [a for a in _running("etcd --name") if str(scratch) in a], "the drill's etcd outlived it"


@pytest.mark.solo
def test_local_drill_holds_under_excessive_load(tmp_path, scratch):
    # The read-only failover is the scenario an overloaded 2-core machine hurts most: four web and
    # celery loops with no pauses, two SSH loops per kind, 16 ledger writers and 16 readers.
    proc = drill("--load", "excessive", "--scenario", "readonly-failover", "--duration", "3", "--json", cwd=tmp_path,
                 tmpdir=scratch)
    report = json.loads(proc.stdout)
    failed = [e for s in report["scenarios"] for e in s["expectations"] if not e["passed"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert report["load"] == "excessive"
    _nothing_left(report, scratch)


@pytest.mark.parametrize("name", list(SABOTAGES))
def test_each_sabotage_fails_its_drill_naming_the_expectation_that_caught_it(tmp_path, scratch, name):
    sabotage = SABOTAGES[name]
    # A sabotage of the fleet (not of a stand-in) is caught on the ledger's own traffic: played without
    # the stand-ins, its scenario holds only as long as database operations need, not pushes.
    narrow = [] if sabotage.services else ["--no-services"]
    proc = drill("--sabotage", name, "--duration", "2", "--json", *narrow, cwd=tmp_path, tmpdir=scratch)
    assert proc.returncode == 1, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert [s["name"] for s in report["scenarios"]] == [sabotage.scenario]
    assert report["sabotage"]["caught_by_expected"], report["sabotage"]
    (caught,) = [e for e in report["scenarios"][0]["expectations"] if e["text"].startswith(sabotage.caught_by)]
    assert not caught["passed"]
    assert f"sabotage {name}" in proc.stderr and f"caught by '{sabotage.caught_by}" in proc.stderr, proc.stderr
    assert "Sabotaged on purpose" in (tmp_path / "drill-report" / "index.html").read_text()
    _nothing_left(report, scratch)


@pytest.mark.parametrize(("args", "message"), [
    (["--sabotage", "web-500", "--scenario", "switchover"], "plays the readonly-failover scenario only"),
    (["--sabotage", "store-keys", "--no-services"], "needs the embedded lab with its services"),
])
def test_a_sabotage_that_cannot_be_played_is_a_usage_error(tmp_path, args, message):
    proc = drill(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _inventory_with_probes(lab, path: Path, *, failing: bool = False) -> Path:
    lab.write_inventory(path)
    read = f"import psycopg2; psycopg2.connect({lab.pgbouncer.dsn!r}).cursor().execute('SELECT 1')"
    write = (f"import psycopg2; c = psycopg2.connect({lab.pgbouncer.dsn!r}); "
             "c.cursor().execute('CREATE TEMP TABLE t (v int) ON COMMIT DROP'); c.commit()")
    extra = [
        "[drill]", f"traffic = {lab.pgbouncer.url}", "",
        "[probe reader]", f'command = {sys.executable} -c "{read}"', "every = 0.2", "",
        "[probe writer]", f'command = {sys.executable} -c "{write}"', "write = yes", "every = 0.2", "",
    ]
    if failing:
        extra += ["[probe broken]", "command = echo 'no such page' >&2; exit 4", "every = 0.5", ""]
    path.write_text(path.read_text() + "\n" + "\n".join(extra))
    return path


def test_drill_against_an_inventory_plays_its_probes(srht_fresh_lab, tmp_path):
    config = _inventory_with_probes(srht_fresh_lab, tmp_path / "fleet.ini")
    proc = drill("--scenario", "readonly-failover", "--duration", "1.5", "--json", "--report", str(tmp_path / "r"),
                 cwd=tmp_path, config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (scenario,) = json.loads(proc.stdout)["scenarios"]
    services = scenario["services"]
    assert services["reader"]["ok"] > 0 and services["reader"].get("error", 0) == 0
    # The writer's refusals on the standby say "read-only transaction": explained, not errors.
    assert services["writer"]["explained"] > 0 and services["writer"].get("error", 0) == 0
    assert srht_fresh_lab.primary.name == "konpaku"  # the drill promoted the standby, for real


def test_a_probe_that_fails_fails_the_drill_with_exit_1(srht_fresh_lab, tmp_path):
    config = _inventory_with_probes(srht_fresh_lab, tmp_path / "fleet.ini", failing=True)
    proc = drill("--scenario", "switchover", "--duration", "1", "--report", str(tmp_path / "r"),
                 cwd=tmp_path, config=config)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "broken: traffic ran and no user saw an error" in proc.stdout
    assert "exit 4: no such page" in proc.stdout
    assert "SOME EXPECTATIONS FAILED" in proc.stderr


@pytest.mark.parametrize("broken", ["standby stopped", "pgbouncer on the standby", "pgbouncer paused"])
def test_a_fleet_that_is_not_ready_is_not_drilled(srht_fresh_lab, tmp_path, broken):
    lab = srht_fresh_lab
    config = _inventory_with_probes(lab, tmp_path / "fleet.ini")
    if broken == "standby stopped":
        lab.standby.stop("fast")
        why = "no standby streams from the primary"
    elif broken == "pgbouncer on the standby":
        lab.pgbouncer.point_at(lab.standby)
        why = f"pgbouncer points at {lab.standby.name}"
    else:
        admin = psycopg2.connect(lab.pgbouncer.admin_dsn)
        admin.autocommit = True
        admin.cursor().execute("PAUSE srht")  # per database, as the switchover does (1.18 hides a global one)
        why = "pgbouncer paused"
    proc = drill("--scenario", "switchover", "--duration", "1", "--json", "--report", str(tmp_path / "r"),
                 cwd=tmp_path, config=config)
    assert proc.returncode == 1, proc.stderr[-4000:]
    (scenario,) = json.loads(proc.stdout)["scenarios"]
    (check,) = scenario["expectations"]
    assert check["text"].startswith("the fleet was ready") and not check["passed"]
    assert why in check["observed"], check
    assert lab.nodes["remilia"].role() == "primary" and lab.nodes["konpaku"].role() in ("standby", "down")
    assert (tmp_path / "r" / "index.html").exists()
    if broken == "pgbouncer paused":
        admin.cursor().execute("RESUME srht")
        admin.close()


def test_a_drill_that_cannot_start_exits_2(tmp_path):
    config = tmp_path / "fleet.ini"
    config.write_text("[node a]\ndsn = host=127.0.0.1 port=1\ndata = /nonexistent\n")
    proc = drill("--scenario", "switchover", cwd=tmp_path, config=config)
    assert proc.returncode == 2, proc.stderr
    assert "no [drill] section" in proc.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("", "no [drill] section"),
    ("[drill]\nspeed = 3\n", "[drill] has no key 'speed'"),
    ("[drill]\ntraffic = postgresql://x@h/db\n[probe a]\nevery = 1\n", "needs exactly one of url = or command ="),
    ("[drill]\ntraffic = postgresql://x@h/db\n[probe a]\nurl = http://h/\nexplained = (\n", "[probe a]:"),
    ("[drill]\ntraffic = postgresql://x@h/db\n[probe a]\nurl = http://h/\nevery = 0\n", "every = 0 must be"),
    ("[drill]\ntraffic = postgresql://x@h/db\n[probe a]\nurl = http://h/\ntimeout = -1\n", "timeout = -1 must be"),
    ("[drill]\ntraffic = postgresql://x@h/db\n[probe a]\nurl = http://h/\nevery = nan\n", "every = nan must be"),
])
def test_drill_sections_are_checked_with_the_line_at_fault(text, message):
    inventory = parse("[node a]\ndsn = host=h\ndata = /d\n" + text, "fleet.ini")
    with pytest.raises(InventoryError, match=message.replace("[", r"\[").replace("(", r"\(")):
        drill_config(inventory)


def test_probes_are_read_with_their_defaults():
    inventory = parse("[node a]\ndsn = host=h\ndata = /d\n[drill]\ntraffic = postgresql://x@h/db, postgresql://x@g/db\n"
                      "[probe web]\nurl = http://h/\n[probe push]\ncommand = git push\nwrite = yes\n", "fleet.ini")
    config = drill_config(inventory)
    assert config.traffic == ["postgresql://x@h/db", "postgresql://x@g/db"]
    web, push = config.probes
    assert (web.name, web.method, web.write, web.every) == ("web", "GET", False, 1.0)
    assert (push.command, push.write) == ("git push", True)


def test_the_documented_probe_example_reads_as_documented():
    doc = (Path(__file__).parents[1] / "docs" / "drill.md").read_text()
    example = doc.split("## Against a secondary deployment", 1)[1].split("```ini\n", 1)[1].split("```", 1)[0]
    config = drill_config(parse("[node a]\ndsn = host=h\ndata = /d\n" + example, "drill.md"))
    assert config.database == "drill" and len(config.traffic) == 2
    probes = {p.name: p for p in config.probes}
    assert probes["git-web"].url == "https://git.sr.ht.example.org/~drill/probe"
    assert (probes["git-settings"].method, probes["git-settings"].data) == ("POST", "description=drill")
    push = probes["git-push"]
    assert push.command.endswith("git push -q") and push.write and push.timeout == 20
    assert push.explained.pattern == "read-only" and push.dropped is not None and push.dropped.pattern == "webhooks"


def test_local_drill_on_postgresql_18_holds_for_a_switchover(tmp_path, scratch):
    """The lab on the second major (--pg-bin): the drill's procedures and verdicts on 18. Database traffic only:
    the stand-ins do not depend on the server's major; pg_rewind on 18 is test_lab's and test_ops_majors'."""
    proc = drill("--pg-bin", str(new_major_bin()), "--scenario", "switchover",
                 "--no-services", "--duration", "2", "--json", cwd=tmp_path, tmpdir=scratch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert "(PostgreSQL) 18." in report["environment"], report["environment"]
    assert [s["name"] for s in report["scenarios"]] == ["switchover"]
    assert all(s["passed"] for s in report["scenarios"])
    _nothing_left(report, scratch)
