"""The git.sr.ht SSH pipeline under a real sshd and a real ``git``, against the lab.

One lab for the module, in three phases, in file order: writable (PgBouncer on the primary),
read-only (PgBouncer pointed at the hot standby: the plan's failover) and promoted (the standby
promoted, PgBouncer on it). sshd, meta.sr.ht and the webhook receiver run throughout: nothing
is restarted between phases. Every git command is also checked for tracebacks.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from integrations.gitsrht import schema
from integrations.gitsrht.ssh import repos
from integrations.gitsrht.ssh.database import url as sqlalchemy_url
from integrations.gitsrht.ssh.keys import fingerprint, normalise
from integrations.gitsrht.ssh.meta import MetaServer
from integrations.gitsrht.ssh.shell import NOT_FOUND
from integrations.gitsrht.ssh.sshd import GitSshd, make_key
from integrations.gitsrht.ssh.webhooks import READ_ONLY_WARNING
from srht_readonly.ops import sql
from srht_readonly.testing import Lab, factories

pytestmark = pytest.mark.lab

ssh_lab = factories.lab("module")

GIT_TIMEOUT = 60


class Receiver:
    """A webhook receiver on loopback that records every POST."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.posts.append({"path": self.path, "headers": dict(self.headers),
                                           "body": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_push(self, push: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["body"]["push"] == push]

    def count(self) -> int:
        with self.lock:
            return len(self.posts)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    lab: Lab
    sshd: GitSshd
    meta: MetaServer
    receiver: Receiver
    engine: Engine
    home: Path
    work: Path
    keys: dict[str, tuple[Path, str]] = field(default_factory=dict)
    alice_id: int = 0
    first_primary: str = ""
    sshd_pid: int = 0

    def git(self, *args: str, key: str = "alice", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_SSH_COMMAND": self.sshd.ssh_command(self.keys[key][0]),
            "LC_ALL": "C",
        }
        proc = subprocess.run(["git", *args], cwd=cwd or self.work, env=env, capture_output=True,
                              text=True, timeout=GIT_TIMEOUT)
        output = proc.stdout + proc.stderr
        if args[0] in ("push", "clone", "fetch", "ls-remote"):
            print(f"$ git {' '.join(args)}  [key {key}, exit {proc.returncode}]\n{proc.stderr}")
        assert "Traceback" not in output, f"a traceback reached the pusher:\n{output}"
        return proc

    def commit(self, message: str) -> str:
        with (self.work / "log.txt").open("a") as log:
            log.write(f"{message}\n")
        self.git("add", "log.txt")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def push(self, owner: str, name: str, *, key: str = "alice") -> subprocess.CompletedProcess[str]:
        return self.git("push", "--porcelain", self.sshd.url(owner, name), "HEAD:refs/heads/main", key=key)

    def scalar(self, query: Any, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query, params).scalar()

    def updated(self, name: str) -> Any:
        r = schema.repository.c
        return self.scalar(select(r.updated).where(r.name == name))

    def key_rows(self, key: str, *, nodes: list[Any] | None = None) -> int:
        """Rows for ``key`` on ``nodes`` (default: the node PgBouncer points at)."""
        key_type, b64 = self.keys[key][1].split()[:2]
        total = 0
        for node in nodes or [self.lab.nodes[self.lab.pgbouncer.target]]:
            engine = create_engine(sqlalchemy_url(node.url))
            try:
                with engine.connect() as conn:
                    total += conn.execute(select(func.count()).select_from(schema.sshkey)
                                          .where(schema.sshkey.c.key == normalise(key_type, b64))).scalar_one()
            finally:
                engine.dispose()
        return total

    def pushed_commit(self, owner: str, name: str) -> str:
        out = subprocess.run(["git", "--git-dir", str(self.sshd.repo_path(owner, name)), "rev-parse",
                              "refs/heads/main"], capture_output=True, text=True)
        return out.stdout.strip()


def remote_warnings(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("remote: warning:")]


def push_id(world: World, before: int) -> str:
    """The SRHT_PUSH of the webhooks the receiver got since it had ``before`` posts."""
    with world.receiver.lock:
        pushes = {p["body"]["push"] for p in world.receiver.posts[before:]}
    assert len(pushes) == 1, f"expected the webhooks of one push, got {pushes}"
    return pushes.pop()


@pytest.fixture(scope="module")
def world(ssh_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("ssh-pipeline")
    engine = create_engine(sqlalchemy_url(ssh_lab.pgbouncer.url))
    meta = MetaServer()
    receiver = Receiver()
    sshd: GitSshd | None = None
    try:
        schema.create(engine)
        meta.start()
        sshd = GitSshd(connection_string=ssh_lab.pgbouncer.url, meta_origin=meta.origin)
        sshd.start()
        home = tmp / "home"
        home.mkdir()
        world = World(ssh_lab, sshd, meta, receiver, engine, home, tmp / "work",
                      first_primary=ssh_lab.primary.name, sshd_pid=sshd.process.pid)
        for name in ("alice", "new-writable", "new-read-only", "new-promoted", "stranger"):
            public = make_key(tmp / f"id_{name}", comment=name)
            world.keys[name] = (tmp / f"id_{name}", public)
        alice_type, alice_b64 = world.keys["alice"][1].split()[:2]
        hook = str(sshd.program("post-update"))
        with engine.begin() as conn:
            u, r = schema.user, schema.repository
            world.alice_id = conn.execute(u.insert().values(username="alice").returning(u.c.id)).scalar_one()
            bob_id = conn.execute(u.insert().values(username="bob").returning(u.c.id)).scalar_one()
            conn.execute(schema.sshkey.insert().values(
                user_id=world.alice_id, meta_id=1, key=normalise(alice_type, alice_b64),
                fingerprint=fingerprint(alice_b64)))
            existing = conn.execute(r.insert().values(
                owner_id=world.alice_id, name="existing", path=str(sshd.repo_path("alice", "existing")),
                updated=text("now() - interval '1 day'")).returning(r.c.id)).scalar_one()
            conn.execute(r.insert().values(owner_id=bob_id, name="secret", visibility="private",
                                           path=str(sshd.repo_path("bob", "secret"))))
            conn.execute(schema.webhook_subscription.insert(), [
                {"repo_id": existing, "url": f"{receiver.url}/one"},
                {"repo_id": existing, "url": f"{receiver.url}/two"},
            ])
        repos.create_on_disk(sshd.repo_path("alice", "existing"), hook)
        repos.create_on_disk(sshd.repo_path("bob", "secret"), hook)
        for name in ("new-writable", "new-read-only", "new-promoted"):
            meta.add_key(world.keys[name][1], owner="alice")
        world.work.mkdir()
        world.git("init", "-q", "-b", "main")
        world.git("config", "user.name", "Alice")
        world.git("config", "user.email", "alice@example.org")
        world.commit("first")
        yield world
    finally:
        if sshd is not None:
            sshd.stop()
        meta.stop()
        receiver.stop()
        engine.dispose()


def _wait_replayed(lab: Lab) -> None:
    (target,) = sql.query_one(lab.primary.admin_dsn, "SELECT pg_current_wal_lsn()")
    standby = lab.standby.admin_dsn
    deadline = time.monotonic() + 10
    while not sql.query_one(standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0]:
        assert time.monotonic() < deadline, "the standby did not catch up within 10 s"
        time.sleep(0.05)


@pytest.fixture
def writable(world: World) -> World:
    """Phase 1: PgBouncer on the primary it started with."""
    assert world.lab.pgbouncer.target == world.first_primary, "phases run in file order: writable first"
    return world


@pytest.fixture(scope="module")
def read_only_phase(world: World) -> World:
    """Phase 2: the plan's failover: PgBouncer repointed at the hot standby."""
    _wait_replayed(world.lab)
    world.lab.pgbouncer.point_at(world.lab.standby)
    return world


@pytest.fixture
def read_only(read_only_phase: World) -> World:
    node = world_node(read_only_phase)
    assert node.role() == "standby", "phases run in file order: read-only before promoted"
    return read_only_phase


@pytest.fixture(scope="module")
def promoted_phase(world: World) -> World:
    """Phase 3: the standby promoted and PgBouncer on it; sshd untouched."""
    standby = world.lab.standby
    world.lab.promote(standby)
    world.lab.pgbouncer.point_at(standby)
    return world


@pytest.fixture
def promoted(promoted_phase: World) -> World:
    assert promoted_phase.sshd.process is not None
    assert promoted_phase.sshd.process.pid == promoted_phase.sshd_pid, "sshd was restarted"
    return promoted_phase


def world_node(world: World) -> Any:
    return world.lab.nodes[world.lab.pgbouncer.target]


# --- the behaviours, checked the same way in every phase ------------------------------------------


def check_push_updates_mtime_and_delivers_webhooks(world: World, message: str) -> None:
    before_updated = world.updated("existing")
    before_posts = world.receiver.count()
    commit = world.commit(message)
    proc = world.push("alice", "existing")
    assert proc.returncode == 0, proc.stderr
    assert world.pushed_commit("alice", "existing") == commit
    assert world.updated("existing") > before_updated
    assert remote_warnings(proc) == []
    deadline = time.monotonic() + 5
    while world.receiver.count() < before_posts + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    push = push_id(world, before_posts)
    posts = world.receiver.for_push(push)
    assert sorted(p["path"] for p in posts) == ["/one", "/two"]
    body = posts[0]["body"]
    assert body["repository"]["name"] == "existing" and body["pusher"]["canonical_name"] == "~alice"
    assert body["refs"] == [{"name": "refs/heads/main", "new": {"id": commit}}]
    d = schema.webhook_delivery.c
    statuses = {world.scalar(select(d.response_status).where(d.uuid == p["headers"]["X-Webhook-Delivery"]))
                for p in posts}
    assert statuses == {200}


def check_push_creates_new_repo(world: World, name: str) -> None:
    proc = world.push("alice", name)
    assert proc.returncode == 0, proc.stderr
    r = schema.repository.c
    assert world.scalar(select(r.path).where(r.name == name)) == str(world.sshd.repo_path("alice", name))
    assert world.pushed_commit("alice", name) == world.git("rev-parse", "HEAD").stdout.strip()
    assert f"remote: You created a new repository, ~alice/{name}." in proc.stderr


def check_unknown_key_fetched_authorised_and_stored(world: World, key: str) -> None:
    assert world.key_rows(key) == 0
    world.commit(f"pushed with {key}")
    proc = world.push("alice", "existing", key=key)
    assert proc.returncode == 0, proc.stderr
    assert world.meta.asked_for(world.keys[key][1]) >= 1
    assert world.key_rows(key) == 1
    k = schema.sshkey.c
    key_type, b64 = world.keys[key][1].split()[:2]
    assert world.scalar(select(k.user_id).where(k.key == normalise(key_type, b64))) == world.alice_id


# --- phase 1: writable ---------------------------------------------------------------------------


def test_writable_push_to_existing_repo_updates_mtime_and_delivers_webhooks(writable: World) -> None:
    check_push_updates_mtime_and_delivers_webhooks(writable, "writable push")


def test_writable_push_to_new_repo_creates_it(writable: World) -> None:
    check_push_creates_new_repo(writable, "fresh-writable")


def test_writable_unknown_key_is_fetched_authorised_and_stored(writable: World) -> None:
    check_unknown_key_fetched_authorised_and_stored(writable, "new-writable")


def test_key_unknown_to_meta_is_refused_and_missing_repos_are_not_found(writable: World) -> None:
    proc = writable.git("ls-remote", writable.sshd.url("alice", "existing"), key="stranger")
    assert proc.returncode != 0 and "Permission denied (publickey)" in proc.stderr
    proc = writable.git("ls-remote", writable.sshd.url("bob", "secret"))
    assert proc.returncode != 0 and NOT_FOUND in proc.stderr
    proc = writable.push("bob", "nothing-here")
    assert proc.returncode != 0 and NOT_FOUND in proc.stderr
    assert not writable.sshd.repo_path("bob", "nothing-here").exists()


# --- phase 2: read-only (PgBouncer on the hot standby) -------------------------------------------


def test_read_only_push_to_existing_repo_succeeds_keeps_mtime_and_warns_once(read_only: World) -> None:
    world = read_only
    before_updated = world.updated("existing")
    before_posts = world.receiver.count()
    d = schema.webhook_delivery
    before_rows = world.scalar(select(func.count()).select_from(d))
    commit = world.commit("read-only push")
    proc = world.push("alice", "existing")
    assert proc.returncode == 0, proc.stderr
    assert world.pushed_commit("alice", "existing") == commit
    assert world.updated("existing") == before_updated
    assert len(remote_warnings(proc)) == 1, proc.stderr
    # Everything the pipeline said is that one warning, wrapped and indented behind "remote: ".
    remote = [line.removeprefix("remote:").strip() for line in proc.stderr.splitlines()
              if line.startswith("remote:")]
    assert " ".join(remote) == f"warning: {READ_ONLY_WARNING}"
    time.sleep(0.2)
    assert world.receiver.count() == before_posts
    assert world.scalar(select(func.count()).select_from(d)) == before_rows


def test_read_only_push_to_new_repo_is_refused_with_the_reason(read_only: World) -> None:
    world = read_only
    proc = world.push("alice", "fresh-read-only")
    assert proc.returncode != 0
    assert "read-only mode for database maintenance" in proc.stderr
    assert "~alice/fresh-read-only" in proc.stderr
    assert NOT_FOUND not in proc.stderr
    assert not world.sshd.repo_path("alice", "fresh-read-only").exists()
    r = schema.repository.c
    assert world.scalar(select(func.count()).where(r.name == "fresh-read-only")) == 0


def test_read_only_unknown_key_is_authorised_but_not_stored(read_only: World) -> None:
    world = read_only
    key = "new-read-only"
    world.commit(f"pushed with {key}")
    proc = world.push("alice", "existing", key=key)
    assert proc.returncode == 0, proc.stderr
    assert world.meta.asked_for(world.keys[key][1]) >= 1
    assert world.key_rows(key, nodes=list(world.lab.nodes.values())) == 0


def test_read_only_clone_and_fetch_keep_working(read_only: World, tmp_path: Path) -> None:
    world = read_only
    head = world.pushed_commit("alice", "existing")
    clone = tmp_path / "clone"
    proc = world.git("clone", "-q", world.sshd.url("alice", "existing"), str(clone))
    assert proc.returncode == 0, proc.stderr
    assert world.git("rev-parse", "HEAD", cwd=clone).stdout.strip() == head
    proc = world.git("fetch", "-q", world.sshd.url("alice", "fresh-writable"), cwd=clone)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9a-f]{40}", world.git("rev-parse", "FETCH_HEAD", cwd=clone).stdout.strip())


# --- phase 3: promoted ---------------------------------------------------------------------------


def test_promoted_push_to_existing_repo_updates_mtime_and_delivers_webhooks(promoted: World) -> None:
    check_push_updates_mtime_and_delivers_webhooks(promoted, "push after promotion")


def test_promoted_push_to_new_repo_creates_it(promoted: World) -> None:
    check_push_creates_new_repo(promoted, "fresh-read-only")  # the one refused while read-only


def test_promoted_unknown_key_is_fetched_authorised_and_stored(promoted: World) -> None:
    check_unknown_key_fetched_authorised_and_stored(promoted, "new-promoted")
    check_unknown_key_fetched_authorised_and_stored(promoted, "new-read-only")  # not stored before


# --- and with no database at all -----------------------------------------------------------------


def test_database_unreachable_pusher_gets_a_short_message_not_a_traceback(promoted: World) -> None:
    # PgBouncer stopped: connections are refused at once. (A PgBouncer whose server is down
    # holds each login until connect_timeout instead, 5 s per run of the keys program, which
    # sshd runs twice per connection: the same message, ten seconds later.)
    world = promoted
    world.lab.pgbouncer.stop()
    proc = world.push("alice", "existing")  # world.git() fails the test on any traceback
    assert proc.returncode != 0
    assert "git.sr.ht cannot reach its database right now" in proc.stderr
    assert "Permission denied" not in proc.stderr
