"""git.sr.ht's SSH pipeline under real ``git`` traffic, through OpenSSH's sshd.

Set up once: meta.sr.ht's stand-in, ``GitSshd`` (sshd on a loopback port in front of the
pipeline, whose programs reach the database through the drill's PgBouncer), a user with a
known key, and one repository per client loop with a webhook subscription to the drill's
receiver. Each client loop does one kind of thing with ``git`` over ssh (``push``, ``push-new``,
``fetch`` or ``new-key``), so that every kind is under way all the time; every kind must meet
the read-only state (the scenario holds it until they have), and each is judged on what it
observed there:

* ``push`` to its repository: ``ok``; ``dropped`` when the push was saved and the pusher was
  warned that its webhooks were not delivered (the plan's drop, read-only or unreachable; in
  the read-only window only the read-only warning will do, as the database answers then);
* ``push-new`` to a repository that does not exist yet (auto-creation): ``ok`` when created,
  ``explained`` when refused with the read-only message;
* ``fetch`` from its repository: ``ok``;
* ``new-key``: ``git ls-remote`` with a key only meta.sr.ht knows: ``ok`` if the key works and
  was stored, ``dropped`` if it worked and was not stored (the plan: use it, don't store it).

Anything else (non-zero exit, a traceback, an unexpected message) is an ``error``. Sabotage
``store-keys`` runs the keys program as sr.ht did before the plan: it stores an unknown key
with a plain INSERT, which fails the login while the database is read-only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
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
from integrations.gitsrht.ssh.keys import STORE_ALWAYS_ENV, fingerprint, normalise
from integrations.gitsrht.ssh.meta import MetaServer
from integrations.gitsrht.ssh.sshd import GitSshd, make_key
from integrations.gitsrht.ssh.webhooks import READ_ONLY_WARNING
from srht_readonly.drill import Outcome, Recorder, State, verdicts
from srht_readonly.drill.scenarios import Expectation, Fact
from srht_readonly.drill.services import DrillEnvironment

from ._traffic import Traffic

__all__ = ["SshTraffic"]

#: load -> (client loops per kind, pause between git commands in seconds)
LOADS = {"typical": (1, 0.05), "excessive": (1, 0.0)}
#: What each loop does, one kind per loop so that every kind is under way all the time (an operation
#: costs 1.5-4 s: ssh, then the keys program twice, the shell and the hook, each a Python process).
KINDS = ("push", "push-new", "fetch", "new-key")
GIT_TIMEOUT = 60
#: ``judge_push``'s details for its two drops, told apart by the read-only window's check.
PUSH_DROPPED_READ_ONLY = "saved; webhooks dropped with the read-only warning"
PUSH_DROPPED_UNREACHABLE = "saved; webhooks not delivered, database unreachable (warned)"
#: What the read-only state requires of each kind: (op, the outcomes allowed, the check's text). A
#: push creating a repository may also be "created; webhooks dropped": created before the state began.
IN_THE_WINDOW = (
    ("push", (Outcome.DROPPED,), "pushes were saved, their webhooks dropped with the read-only warning"),
    ("push-new", (Outcome.EXPLAINED, Outcome.DROPPED), "pushes creating a repository were refused with the reason"),
    ("fetch", (Outcome.OK,), "fetches kept working"),
    ("new-key", (Outcome.DROPPED,), "unknown keys worked and were not stored"),
)


def _words(message: str) -> str:
    return " ".join(message.split())


class SshTraffic(Traffic):
    """Runs sshd and the pipeline for the drill's lifetime and pushes/fetches through them."""

    name = "ssh"
    kinds = KINDS

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine, webhook_url: str) -> None:
        per_kind, pause = LOADS[env.load]
        threads = per_kind * len(KINDS)
        super().__init__(threads=threads, pause=pause)
        self.dir = env.directory / "ssh"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.user = f"git-{uuid.uuid4().hex[:6]}"
        self.meta = stack.enter_context(MetaServer())
        sabotage = {STORE_ALWAYS_ENV: "1"} if env.sabotage == "store-keys" else {}
        self.sshd = stack.enter_context(GitSshd(connection_string=env.database_url, meta_origin=self.meta.origin,
                                                webhook_timeout=2, env=sabotage))
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
        own = self.sshd.url(self.user, f"push-{worker}")
        if op == "push":
            self._commit(worker)
        elif op == "new-key":
            self._new_key(worker)
            return
        operation = self.begin(op, write=op.startswith("push"))
        try:
            if op == "push":
                outcome, detail = judge_push(self.git(worker, "push", "--porcelain", own, "HEAD:refs/heads/main"))
            elif op == "push-new":
                name = f"new-{next(self._names)}"
                proc = self.git(worker, "push", "--porcelain", self.sshd.url(self.user, name), "HEAD:refs/heads/main")
                outcome, detail = judge_new(proc, self.user, name)
            else:
                outcome, detail = judge_plain(self.git(worker, "fetch", "-q", own, "main"))
        except subprocess.TimeoutExpired:
            outcome, detail = Outcome.ERROR, f"git hung {GIT_TIMEOUT} s"
        self.end(operation, outcome, detail=detail, met=observed(op, outcome, detail))

    def _new_key(self, worker: int) -> None:
        key = self.dir / f"id_new_{next(self._names)}"
        public = make_key(key, comment="new")
        self.meta.add_key(public, owner=self.user)
        operation = self.begin("new-key")
        try:
            outcome, detail = judge_plain(self.git(worker, "ls-remote", self.sshd.url(self.user, f"push-{worker}"),
                                                   key=key))
        except subprocess.TimeoutExpired:
            outcome, detail = Outcome.ERROR, f"git hung {GIT_TIMEOUT} s"
        met = None
        if outcome is Outcome.OK:
            key_type, b64 = public.split()[:2]
            try:
                with self.check.connect() as conn:
                    stored = conn.execute(text("SELECT count(*) FROM sshkey WHERE key = :k"),
                                          {"k": normalise(key_type, b64)}).scalar_one()
            except Exception as exc:  # the drill's own check; the user saw the key work
                outcome, detail = Outcome.DROPPED, f"key worked; could not check whether it was stored: {exc!r}"[:200]
            else:
                met = State.WRITABLE if stored else State.READ_ONLY
                if not stored:
                    outcome, detail = Outcome.DROPPED, "key worked and was not stored"
        self.end(operation, outcome, detail=detail, met=met)
        for path in (key, key.with_name(key.name + ".pub")):
            path.unlink(missing_ok=True)

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts, kinds=self.kinds)
        if scenario in verdicts.READ_ONLY_WINDOW and Fact.READ_ONLY_UNTIL in facts:
            checks += window_checks(events, facts)
        return checks


def observed(op: str, outcome: Outcome, detail: str) -> State | None:
    """The state of the database a push or fetch showed its user (None: it showed none)."""
    if PUSH_DROPPED_READ_ONLY in detail or outcome is Outcome.EXPLAINED:
        return State.READ_ONLY
    if PUSH_DROPPED_UNREACHABLE in detail:
        return State.UNAVAILABLE
    if outcome is Outcome.OK and op.startswith("push"):
        return State.WRITABLE  # the hook recorded the push (and the repository, for push-new)
    return None


def window_checks(events: list[Any], facts: dict[str, Any]) -> list[Expectation]:
    """The read-only state's checks on the SSH ``events``, one per kind (``IN_THE_WINDOW``).

    Each kind is judged on what met the read-only state: at least one of each (the scenario held
    the state until there was), and every one judged as read-only ended as the plan says.
    """
    checks: list[Expectation] = []
    judged = verdicts.judged_read_only(events, facts)
    met = verdicts.met_read_only(events, facts)
    for op, allowed, what in IN_THE_WINDOW:
        mine = [e for e in judged if e.op == op]
        met_it = [e for e in met if e.op == op]
        check = verdicts.all_are(f"ssh: in the read-only state, {what}", mine, allowed, at_least=0)
        if not met_it:
            check.passed = False
        created = [e for e in mine if op == "push-new" and e.outcome is Outcome.DROPPED
                   and verdicts.state_at(e.started, facts) is State.READ_ONLY]
        if created:  # the repository cannot have been created while the database was read-only
            check.passed = False
            check.observed += ", " + verdicts.sample(created, "created while read-only")
            check.evidence = created + check.evidence
        if op == "push":  # the database answers in the window: "unreachable" is the wrong explanation
            unwarned = [e for e in mine if e.outcome is Outcome.DROPPED and e.detail != PUSH_DROPPED_READ_ONLY]
            if unwarned:
                check.passed = False
                check.observed += ", " + verdicts.sample(unwarned, "dropped without the read-only warning")
                check.evidence = unwarned + check.evidence
        check.observed += f"; {len(met_it)} met the read-only state"
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
