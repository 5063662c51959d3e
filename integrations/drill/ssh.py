"""git.sr.ht's SSH pipeline under real ``git`` traffic, through OpenSSH's sshd.

Set up once: meta.sr.ht's stand-in, ``GitSshd`` (sshd on a loopback port in front of the
pipeline, whose programs reach the database through the drill's PgBouncer), a user with a
known key, and one repository per client loop with a webhook subscription to the drill's
receiver. Each client loop does one kind of thing with ``git`` over ssh (``push``, ``push-new``,
or the reads ``fetch`` and ``new-key`` in turn); in the read-only window at least one of each
kind is required wherever the window is long enough to hold one from start to end, given how
often each loop starts one (a loop's own period: several loops of a kind do not make one's
operations shorter or more frequent):

* ``push`` to its repository: ``ok``; ``dropped`` when the push was saved and the pusher was
  warned that its webhooks were not delivered (the plan's drop, read-only or unreachable; in
  the read-only window only the read-only warning will do, as the database answers then);
* ``push-new`` to a repository that does not exist yet (auto-creation): ``ok`` when created,
  ``explained`` when refused with the read-only message;
* ``fetch`` from its repository: ``ok``;
* ``new-key``: ``git ls-remote`` with a key only meta.sr.ht knows: ``ok`` if the key works and
  was stored, ``dropped`` if it worked and was not stored (the plan: use it, don't store it).

Anything else (non-zero exit, a traceback, an unexpected message) is an ``error``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.pool import NullPool

from integrations.gitsrht import schema
from integrations.gitsrht.ssh import repos
from integrations.gitsrht.ssh.database import url as sqlalchemy_url
from integrations.gitsrht.ssh.hook import UNREACHABLE_WARNING
from integrations.gitsrht.ssh.keys import fingerprint, normalise
from integrations.gitsrht.ssh.meta import MetaServer
from integrations.gitsrht.ssh.sshd import GitSshd, make_key
from integrations.gitsrht.ssh.webhooks import READ_ONLY_WARNING
from srht_readonly.drill import Outcome, Recorder, verdicts
from srht_readonly.drill.scenarios import Expectation
from srht_readonly.drill.services import DrillEnvironment

from ._traffic import Traffic

__all__ = ["SshTraffic"]

#: load -> (client loops per kind, pause between git commands in seconds)
LOADS = {"typical": (1, 0.05), "excessive": (2, 0.0)}
#: What each loop does, one kind per loop so that every kind is under way all the time (an operation
#: costs 1.5-4 s: ssh, then the keys program twice, the shell and the hook, each a Python process).
KINDS = ("push", "push-new", "read")
GIT_TIMEOUT = 60
#: ``judge_push``'s details for its two drops, told apart by the read-only window's check.
PUSH_DROPPED_READ_ONLY = "saved; webhooks dropped with the read-only warning"
PUSH_DROPPED_UNREACHABLE = "saved; webhooks not delivered, database unreachable (warned)"
#: What the read-only window requires of each kind: (op, the outcome allowed, the check's text).
IN_THE_WINDOW = (
    ("push", Outcome.DROPPED, "pushes were saved, their webhooks dropped with the read-only warning"),
    ("push-new", Outcome.EXPLAINED, "pushes creating a repository were refused with the reason"),
    ("fetch", Outcome.OK, "fetches kept working"),
    ("new-key", Outcome.DROPPED, "unknown keys worked and were not stored"),
)


def _words(message: str) -> str:
    return " ".join(message.split())


class SshTraffic(Traffic):
    """Runs sshd and the pipeline for the drill's lifetime and pushes/fetches through them."""

    name = "ssh"

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine, webhook_url: str) -> None:
        per_kind, pause = LOADS[env.load]
        threads = per_kind * len(KINDS)
        super().__init__(threads=threads, pause=pause)
        self.dir = env.directory / "ssh"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.user = f"git-{uuid.uuid4().hex[:6]}"
        self.meta = stack.enter_context(MetaServer())
        self.sshd = stack.enter_context(GitSshd(connection_string=env.database_url, meta_origin=self.meta.origin,
                                                webhook_timeout=2))
        stack.callback(self.close)
        self.check = create_engine(sqlalchemy_url(env.database_url), poolclass=NullPool,
                                   connect_args={"connect_timeout": 2})
        stack.callback(self.check.dispose)
        self.key = self.dir / "id_known"
        public = make_key(self.key, comment=self.user)
        key_type, b64 = public.split()[:2]
        schema.create(engine)
        hook = str(self.sshd.program("post-update"))
        with engine.begin() as conn:
            u, r = schema.user, schema.repository
            user_id = conn.execute(u.insert().values(username=self.user).returning(u.c.id)).scalar_one()
            meta_id = conn.execute(select(func.coalesce(func.max(schema.sshkey.c.meta_id), 0) + 1)).scalar_one()
            conn.execute(schema.sshkey.insert().values(user_id=user_id, meta_id=meta_id + 10**6,
                                                       key=normalise(key_type, b64), fingerprint=fingerprint(b64)))
            for i in range(threads):
                path = self.sshd.repo_path(self.user, f"push-{i}")
                repo_id = conn.execute(r.insert().values(owner_id=user_id, name=f"push-{i}", path=str(path))
                                       .returning(r.c.id)).scalar_one()
                conn.execute(schema.webhook_subscription.insert().values(repo_id=repo_id, url=webhook_url))
                repos.create_on_disk(path, hook)
        self._names = itertools.count()
        self._loop_of: dict[Any, int] = {}  # event -> the loop that did it, for each loop's period
        self._reads = [itertools.cycle(("fetch", "new-key")) for _ in range(threads)]
        for i in range(threads):
            work = self.work(i)
            work.mkdir()
            for args in (("init", "-q", "-b", "main"), ("config", "user.name", "Drill"),
                         ("config", "user.email", "drill@example.org")):
                self.git(i, *args)
            self._commit(i)
            first = self.git(i, "push", "-q", self.sshd.url(self.user, f"push-{i}"), "HEAD:refs/heads/main")
            if first.returncode:
                raise RuntimeError(f"the SSH pipeline refused the drill's first push: {first.stderr.strip()}")

    def work(self, worker: int) -> Path:
        return self.dir / f"work-{worker}"

    def git(self, worker: int, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
            "GIT_SSH_COMMAND": self.sshd.ssh_command(key or self.key),
        }
        return subprocess.run(["git", *args], cwd=self.work(worker), env=env, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT)

    def _commit(self, worker: int) -> None:
        with (self.work(worker) / "log.txt").open("a") as log:
            log.write(f"{time.time()}\n")
        self.git(worker, "add", "log.txt")
        self.git(worker, "commit", "-q", "-m", "drill")

    def step(self, worker: int) -> None:
        op = KINDS[worker % len(KINDS)]
        op = next(self._reads[worker]) if op == "read" else op
        own = self.sshd.url(self.user, f"push-{worker}")
        started = time.monotonic()
        try:
            if op == "push":
                self._commit(worker)
                started = time.monotonic()
                proc = self.git(worker, "push", "--porcelain", own, "HEAD:refs/heads/main")
                outcome, detail = judge_push(proc)
                self._record(worker, op, outcome, started, write=True, detail=detail)
            elif op == "push-new":
                name = f"new-{next(self._names)}"
                proc = self.git(worker, "push", "--porcelain", self.sshd.url(self.user, name), "HEAD:refs/heads/main")
                outcome, detail = judge_new(proc, self.user, name)
                self._record(worker, op, outcome, started, write=True, detail=detail)
            elif op == "fetch":
                proc = self.git(worker, "fetch", "-q", own, "main")
                outcome, detail = judge_plain(proc)
                self._record(worker, op, outcome, started, detail=detail)
            else:
                self._new_key(worker, started)
        except subprocess.TimeoutExpired:
            self._record(worker, op, Outcome.ERROR, started, write=op.startswith("push"),
                         detail=f"git hung {GIT_TIMEOUT} s")

    def _new_key(self, worker: int, started: float) -> None:
        key = self.dir / f"id_new_{next(self._names)}"
        public = make_key(key, comment="new")
        self.meta.add_key(public, owner=self.user)
        started = time.monotonic()
        proc = self.git(worker, "ls-remote", self.sshd.url(self.user, f"push-{worker}"), key=key)
        outcome, detail = judge_plain(proc)
        if outcome is Outcome.OK:
            key_type, b64 = public.split()[:2]
            try:
                with self.check.connect() as conn:
                    stored = conn.execute(text("SELECT count(*) FROM sshkey WHERE key = :k"),
                                          {"k": normalise(key_type, b64)}).scalar_one()
            except Exception as exc:  # the drill's own check; the user saw the key work
                outcome, detail = Outcome.DROPPED, f"key worked; could not check whether it was stored: {exc!r}"[:200]
            else:
                if not stored:
                    outcome, detail = Outcome.DROPPED, "key worked and was not stored"
        self._record(worker, "new-key", outcome, started, detail=detail)
        for path in (key, key.with_name(key.name + ".pub")):
            path.unlink(missing_ok=True)

    def _record(self, worker: int, op: str, outcome: Outcome, started: float, *, write: bool = False,
                detail: str = "") -> None:
        """``Traffic.record``, remembering which loop did the operation."""
        recorder = getattr(self._local, "recorder", self.recorder)
        event = recorder.record(self.name, op, outcome, started=started, write=write, detail=detail)
        self._loop_of[event] = worker

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts)
        if scenario == "readonly-failover":
            lo, hi = verdicts.read_only_window(facts)
            checks += window_checks(events, lo, hi, self._loop_of)
        return checks


def loop_period(events: list[Any], loop_of: dict[Any, int]) -> float:
    """How often one loop starts one of ``events``' kind: the median gap between a loop's own starts.

    Gaps between the starts of *all* loops would shrink with their number (two loops per kind
    under ``--load excessive`` halve it) and require one in windows too short to hold one.
    """
    by_loop: dict[int | None, list[float]] = {}
    for e in events:
        by_loop.setdefault(loop_of.get(e), []).append(verdicts.started(e))
    gaps = [b - a for starts in by_loop.values() for a, b in itertools.pairwise(sorted(starts))]
    return statistics.median(gaps or [math.inf])


def window_checks(events: list[Any], lo: float, hi: float, loop_of: dict[Any, int]) -> list[Expectation]:
    """The read-only window ``[lo, hi]``'s checks on the SSH ``events``, one per kind (``IN_THE_WINDOW``).

    One of a kind starts every ``period`` (per loop) and lasts ``took``: a window at least as long as
    both together certainly holds one from start to end, so only then is one required.
    """
    checks: list[Expectation] = []
    inside = verdicts.during(events, lo, hi)
    for op, allowed, what in IN_THE_WINDOW:
        kind = [e for e in events if e.op == op]
        took = statistics.median([e.latency for e in kind] or [math.inf])
        period = loop_period(kind, loop_of)
        need = 1 if hi - lo >= period + took else 0
        mine = [e for e in inside if e.op == op]
        check = verdicts.all_are(f"ssh: in the read-only window, {what}", mine, (allowed,), at_least=need)
        if op == "push":  # the database answers in the window: "unreachable" is the wrong explanation
            unwarned = [e for e in mine if e.outcome is Outcome.DROPPED and e.detail != PUSH_DROPPED_READ_ONLY]
            if unwarned:
                check.passed = False
                check.observed += ", " + verdicts.sample(unwarned, "dropped without the read-only warning")
        required = "" if need else ": none required"
        check.observed += f" (window {hi - lo:.1f} s, one every {period:.1f} s per loop taking {took:.1f} s{required})"
        checks.append(check)
    return checks


def _remote(proc: subprocess.CompletedProcess[str]) -> str:
    """What the server said (the ``remote:`` lines), as one line."""
    return _words(" ".join(line.removeprefix("remote:") for line in proc.stderr.splitlines()
                           if line.startswith("remote:")))


def _gist(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return f"exit {proc.returncode}: " + " / ".join(lines[:3])[:200]


def judge_plain(proc: subprocess.CompletedProcess[str]) -> tuple[Outcome, str]:
    if proc.returncode == 0 and "Traceback" not in proc.stderr:
        return Outcome.OK, ""
    return Outcome.ERROR, _gist(proc)


def judge_push(proc: subprocess.CompletedProcess[str]) -> tuple[Outcome, str]:
    remote = _remote(proc)
    if proc.returncode or "Traceback" in proc.stderr:
        return Outcome.ERROR, _gist(proc)
    if _words(READ_ONLY_WARNING) in remote:
        return Outcome.DROPPED, PUSH_DROPPED_READ_ONLY
    if _words(UNREACHABLE_WARNING) in remote:
        return Outcome.DROPPED, PUSH_DROPPED_UNREACHABLE
    if remote:
        return Outcome.ERROR, f"unexpected remote output: {remote[:200]}"
    return Outcome.OK, ""


def judge_new(proc: subprocess.CompletedProcess[str], owner: str, name: str) -> tuple[Outcome, str]:
    said = _words(proc.stderr)
    if "Traceback" in said:
        return Outcome.ERROR, _gist(proc)
    if proc.returncode == 0 and f"You created a new repository, ~{owner}/{name}." in _remote(proc):
        return Outcome.OK, ""
    if proc.returncode == 0:  # created and pushed; the hook could not record it (it says so) or said something else
        outcome, detail = judge_push(proc)
        return outcome, f"created; {detail}" if outcome is Outcome.DROPPED else detail
    if proc.returncode and "read-only mode" in said and f"~{owner}/{name} cannot be created right now" in said:
        return Outcome.EXPLAINED, "refused: read-only, repository not created"
    return Outcome.ERROR, _gist(proc)
