"""srht_readonly.shared_state against a real Redis (a private ``redis-server`` each test may kill).

Each ``Process`` below is what one service process has: a monitor (its probe reads a "database"
the test controls) and a ``SharedState``. Several in one pytest process share nothing but
Redis; the same with real gunicorn workers is tests/test_gunicorn_web.py. A forked child is
the one real second process here (gunicorn ``--preload``'s case).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from srht_readonly import Failure, ReadOnlyMonitor
from srht_readonly.monitor import Reason
from srht_readonly.shared_state import Hint, SharedState, shared_state_of
from tests._fakes import Pg2Error, lost_connection_error, read_only_error
from tests._redis import PrivateRedis

ROOT = Path(__file__).resolve().parent.parent
FAST = {"timeout": 0.3, "backoff": (0.02, 0.1)}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()


class Process:
    """A monitor whose probe asks ``db`` (``{"read_only": bool}``), with its shared state."""

    def __init__(self, url: str, prefix: str, db: dict[str, bool], *, recheck: float = 600, **options: Any) -> None:
        self.db = db
        self.probes = 0
        self.monitor = ReadOnlyMonitor(recheck=recheck, jitter=0, probe=self.probe, announce_file=None)
        self.shared = SharedState(self.monitor, url, prefix=prefix, **{**FAST, **options}).start()

    def probe(self) -> bool:
        self.probes += 1
        return self.db["read_only"]


@pytest.fixture
def processes(redis_server: PrivateRedis) -> Iterator[Callable[..., Process]]:
    made: list[Process] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def make(db: dict[str, bool], **options: Any) -> Process:
        made.append(Process(redis_server.url, options.pop("prefix", prefix), db, **options))
        return made[-1]

    yield make
    for p in made:
        p.shared.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - started


def connected(*ps: Process) -> None:
    for p in ps:
        assert p.shared.connected.wait(3), "the subscriber never connected"


def test_one_process_finds_read_only_every_other_learns_at_once_and_only_the_finder_publishes(processes,
                                                                                                redis_server):
    db = {"read_only": False}
    finder, others = processes(db), [processes(db) for _ in range(3)]
    connected(finder, *others)
    channel = redis_server.client().pubsub(ignore_subscribe_messages=True)
    channel.subscribe(finder.shared.channel)
    db["read_only"] = True
    finder.monitor.observe(Pg2Error("cannot execute INSERT in a read-only transaction", "25006"))
    for other in others:
        wait_for(lambda o=other: o.monitor.state.read_only, timeout=1)
        state = other.monitor.state
        assert state.reason is Reason.SHARED and state.failure is None
        assert "cannot execute INSERT in a read-only transaction" in state.detail and "told by" in state.detail
        assert other.monitor.read_only is True  # the field read agrees, without probing
        assert other.probes == 0
    messages = []
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # (a None is also what a subscription's confirmation gives)
        message = channel.get_message(timeout=0.05)
        if message is not None and message["type"] == "message":
            messages.append(message)
    channel.close()
    assert len(messages) == 1  # the finder's; the others learned it and told nobody
    hint = Hint.loads(messages[0]["data"])
    assert hint.read_only and hint.origin == finder.shared.origin
    assert finder.shared.published == 1 and all(o.shared.published == 0 for o in others)
    # The key holds it, with its expiry.
    assert 0 < redis_server.client().pttl(finder.shared.key) <= 30_000


def test_an_unreachable_database_is_shared_as_unavailable(processes):
    db = {"read_only": False}
    finder, other = processes(db), processes(db)
    connected(finder, other)

    def unreachable() -> bool:
        raise ConnectionError("connection refused")

    finder.monitor._probe = unreachable  # its probe gets no answer: the database is away
    finder.monitor.observe(lost_connection_error())
    assert finder.monitor.read_only is True and finder.monitor.state.failure is Failure.UNAVAILABLE
    wait_for(lambda: other.monitor.state.read_only)
    assert other.monitor.state.failure is Failure.UNAVAILABLE


def test_a_writable_hint_is_believed_only_once_a_probe_agrees(processes):
    finder_db, other_db = {"read_only": True}, {"read_only": True}
    finder, other = processes(finder_db), processes(other_db)
    connected(finder, other)
    finder.monitor.observe(read_only_error())
    wait_for(lambda: other.monitor.state.read_only)
    # The finder sees the database writable; the other's probe still says read-only: it stays.
    finder_db["read_only"] = False
    assert finder.monitor.check() is False
    wait_for(lambda: other.probes == 1)
    assert other.monitor.state.read_only is True
    # Once the other's probe agrees, the next writable hint turns it writable at once.
    finder.monitor.observe(read_only_error())  # read-only again...
    other_db["read_only"] = False
    finder.monitor.set_writable("promoted")  # ...and writable: a second writable hint
    wait_for(lambda: not other.monitor.state.read_only, timeout=1)
    assert other.monitor.state.reason is Reason.PROBE  # its own probe decided, not the hint


def test_the_hint_never_outlives_the_monitors_own_recheck(processes):
    db = {"read_only": False}
    finder = processes(db)
    other = processes({"read_only": False}, recheck=0.2)  # its own view: the database takes writes
    connected(finder, other)
    finder.monitor.observe(read_only_error())
    wait_for(lambda: other.monitor.state.read_only)
    assert other.monitor.read_only is True
    wait_for(lambda: other.monitor.read_only is False, timeout=1)  # the recheck probed: writable
    assert other.probes == 1 and other.monitor.state.reason is Reason.PROBE
    # It said so, and the finder checks (its own probe says read-only: it stays so).
    db["read_only"] = True
    wait_for(lambda: finder.probes >= 1)
    assert finder.monitor.state.read_only is True


def test_a_process_started_while_read_only_starts_read_only_until_the_key_expires(processes):
    db = {"read_only": True}
    finder = processes(db, ttl=0.6)
    connected(finder)
    finder.monitor.observe(read_only_error())
    wait_for(lambda: finder.shared.published == 1)
    late = processes(db, ttl=0.6)
    wait_for(lambda: late.monitor.state.read_only, timeout=1)
    assert late.monitor.state.reason is Reason.SHARED
    time.sleep(0.7)
    later = processes(db, ttl=0.6)
    connected(later)
    time.sleep(0.05)
    assert later.monitor.state.read_only is False  # expired: it learns by itself, as without Redis


def test_without_redis_nothing_raises_nothing_sticks_and_it_connects_once_redis_is_there(processes, tmp_path):
    absent = PrivateRedis(tmp_path / "later")  # its port, nothing listening yet
    db = {"read_only": False}
    started = time.monotonic()
    finder = Process(absent.url, "absent", db)
    other = Process(absent.url, "absent", db)
    assert time.monotonic() - started < 0.5  # start() never waits for Redis
    try:
        db["read_only"] = True
        finder.monitor.observe(read_only_error())  # the listener queues; nothing raises
        assert finder.monitor.read_only is True and other.monitor.read_only is False
        db["read_only"] = False
        finder.monitor.set_writable("promoted")
        assert finder.monitor.read_only is False
        time.sleep(0.3)
        assert not finder.shared.connected.is_set()
        absent.start()
        try:
            connected(finder, other)  # reconnected with backoff
            finder.monitor.observe(read_only_error())
            wait_for(lambda: other.monitor.state.read_only, timeout=1)
        finally:
            absent.kill()
    finally:
        finder.shared.stop()
        other.shared.stop()


def test_redis_killed_during_a_change_then_back_the_latest_change_is_told(processes, redis_server):
    db = {"read_only": False}
    finder, other = processes(db), processes(db)
    connected(finder, other)
    redis_server.kill()
    db["read_only"] = True
    finder.monitor.observe(read_only_error())
    time.sleep(0.3)
    assert other.monitor.state.read_only is False  # nobody could tell it: it learns by itself
    assert finder.shared.published == 0
    redis_server.start()  # same port
    wait_for(lambda: other.monitor.state.read_only, timeout=3)  # the pending change, sent once back
    assert finder.shared.published == 1


def test_a_forked_child_gets_its_own_subscriber_and_learns(processes, redis_server):
    db = {"read_only": False}
    parent = processes(db)
    finder = processes(db)
    connected(parent, finder)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its monitor learns, then leave without cleanup
        code = 1
        try:
            os.close(read)
            shared = shared_state_of(parent.monitor)
            if shared is not None and shared.connected.wait(3):
                os.write(write, b"connected\n")
                deadline = time.monotonic() + 3
                while not parent.monitor.state.read_only and time.monotonic() < deadline:
                    time.sleep(0.005)
                os.write(write, f"{parent.monitor.state.reason} {shared.origin}\n".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as child:
        assert child.readline() == "connected\n"
        finder.monitor.observe(read_only_error())
        reason, origin = child.readline().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reason == "shared" and origin != parent.shared.origin


def test_one_shared_state_per_monitor(processes, redis_server):
    p = processes({"read_only": False})
    assert SharedState.attach(p.monitor, redis_server.url, prefix=p.shared.prefix) is p.shared
    with pytest.raises(ValueError, match="elsewhere"):
        SharedState.attach(p.monitor, redis_server.url, prefix="another")
    with pytest.raises(ValueError, match="either"):
        SharedState(p.monitor)


def test_garbage_on_the_channel_is_ignored(processes, redis_server):
    p = processes({"read_only": False})
    connected(p)
    redis_server.client().publish(p.shared.channel, "not json")
    redis_server.client().publish(p.shared.channel, json.dumps({"read_only": True}))
    time.sleep(0.1)
    assert p.monitor.state.read_only is False and p.shared.received == 0


BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_the_documented_examples_run(redis_server):
    blocks = BLOCK.findall((ROOT / "docs" / "shared-state.md").read_text(encoding="utf-8"))
    assert blocks
    for number, code in enumerate(blocks, 1):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                                env={**os.environ, "REDIS_URL": redis_server.url, "SRHT_READONLY_ANNOUNCE_FILE": ""})
        assert result.returncode == 0, f"docs/shared-state.md example {number} failed:\n{code}\n{result.stderr}"


IMPORTS_IN_OUR_THREADS = """
import sys, threading, time
from srht_readonly.monitor import ReadOnlyMonitor
from srht_readonly.shared_state import SharedState

seen = []
def hook(event, args):
    if event == "import" and threading.current_thread().name.startswith("srht-readonly-shared"):
        seen.append(args[0])

sys.addaudithook(hook)
finder, other = (ReadOnlyMonitor(probe=lambda: False, announce_file=None) for _ in range(2))
shared = [SharedState.attach(m, sys.argv[1], prefix="imports") for m in (finder, other)]
assert all(s.connected.wait(5) for s in shared)
finder.set_read_only("found read-only")
deadline = time.monotonic() + 5
while not other.state.read_only and time.monotonic() < deadline:
    time.sleep(0.01)
assert other.state.read_only, "the other monitor never heard"
for s in shared:
    s.stop()
print(sorted(set(seen)))
"""


def test_our_threads_import_nothing_once_started(redis_server):
    # CPython keeps, in a forked child, the lock of a module another thread was importing at fork()
    # time: a gunicorn worker forked while the subscriber imported encodings.idna hung forever on its
    # first request. So start() imports ahead what the threads need; a fresh interpreter shows it.
    proc = subprocess.run([sys.executable, "-c", IMPORTS_IN_OUR_THREADS, redis_server.url], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"imported by srht-readonly-shared threads: {proc.stdout.strip()}"
