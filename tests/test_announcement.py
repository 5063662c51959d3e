"""Operator announcements (a file the operators write; ``srht_readonly.monitor.Announcement``):
the monitor is read-only while one applies, shows a scheduled one before it starts, looks at
the file at most once per recheck, and ignores a broken one (pure logic: a fake clock and probe)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from srht_readonly import ReadOnlyMonitor
from srht_readonly.monitor import ANNOUNCE_ENV, Announcement
from tests._fakes import Clock, FsyncRecorder, Probe, identity
from tests._fakes import monitor_on as make


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_plain_text_announcement_makes_read_only_until_removed(clock, tmp_path):
    path = tmp_path / "announce"
    probe = Probe(clock, answer=False)
    monitor = make(clock, probe, announce_file=path, recheck=2.0)
    events = []
    monitor.add_listener(events.append)
    assert monitor.read_only is False
    path.write_text("Database maintenance until 10:30 UTC.\n")
    assert monitor.read_only is False  # not re-read before the next check is due
    clock.advance(2.0)
    assert monitor.read_only is True
    assert monitor.state.reason == "announcement"
    assert monitor.state.detail == "Database maintenance until 10:30 UTC."
    assert monitor.announcement == Announcement("Database maintenance until 10:30 UTC.")
    clock.advance(10.0)
    assert monitor.read_only is True
    assert probe.calls == []  # the operator's word is not overridden by probes
    path.unlink()
    clock.advance(2.0)
    assert monitor.read_only is False
    assert len(probe.calls) == 1  # the database itself is asked once
    assert [e["event"] for e in events] == ["announcement", "read-only", "announcement", "writable"]


def test_scheduled_announcement_is_shown_before_and_applies_from_its_start(clock, tmp_path):
    path = tmp_path / "announce"
    start = datetime.fromtimestamp(clock.wall, UTC) + timedelta(seconds=60)
    Announcement("Read-only in one minute", starts=start, ends=start + timedelta(seconds=30)).write(path)
    monitor = make(clock, Probe(clock), announce_file=path, recheck=2.0)
    assert monitor.read_only is False
    assert monitor.announcement is not None and monitor.announcement.starts == start
    clock.advance(59.0)
    assert monitor.read_only is False
    clock.advance(1.0)
    assert monitor.read_only is True  # checked at the start time, not up to recheck later
    clock.advance(30.0)
    assert monitor.read_only is False


def test_announcement_file_is_statted_at_most_once_per_recheck(clock, tmp_path, monkeypatch):
    path = tmp_path / "announce"
    monitor = make(clock, None, announce_file=path, recheck=2.0)
    real_stat = os.stat
    stats = []

    def counting_stat(p: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(p) == str(path):
            stats.append(clock.now)
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    for _ in range(2000):
        monitor.read_only  # noqa: B018
        clock.advance(0.01)
    assert 10 <= len(stats) <= 15


def test_announcement_file_defaults_to_the_environment(clock, tmp_path, monkeypatch):
    path = tmp_path / "from-env"
    path.write_text('{"message": "maintenance", "starts": "2000-01-01T00:00:00"}')
    monkeypatch.setenv(ANNOUNCE_ENV, str(path))
    monitor = ReadOnlyMonitor(clock=clock, wall_clock=lambda: clock.wall)
    assert monitor.read_only is True
    assert monitor.announcement is not None
    assert monitor.announcement.starts == datetime(2000, 1, 1, tzinfo=UTC)
    monkeypatch.delenv(ANNOUNCE_ENV)
    assert make(clock).announcement is None


def test_broken_announcement_is_logged_once_and_ignored(clock, tmp_path, caplog):
    path = tmp_path / "announce"
    path.write_text('{"message": ')
    monitor = make(clock, None, announce_file=path)
    for _ in range(5):
        assert monitor.read_only is False
        clock.advance(3)
    assert len([r for r in caplog.records if "ignoring announcement" in r.getMessage()]) == 1


def test_announcement_round_trips_through_json():
    start = datetime(2024, 6, 8, 10, 0, tzinfo=UTC)
    announcement = Announcement("maintenance", starts=start)
    assert Announcement.parse(announcement.to_json()) == announcement
    assert Announcement.parse('{"message": "x", "ends": "2024-06-08T11:00:00"}').ends == (
        datetime(2024, 6, 8, 11, 0, tzinfo=UTC)
    )
    with pytest.raises(ValueError):
        Announcement.parse('{"starts": "2024-06-08T10:00:00"}')




def test_write_flushes_the_file_then_after_the_rename_its_directory(tmp_path, monkeypatch):
    # Atomic for readers is not enough: without a flush of the directory, a crash can lose the
    # rename, and the maintenance announcement with it.
    path = tmp_path / "announce"
    path.write_text("Old maintenance\n")
    fsyncs = FsyncRecorder(monkeypatch, watch=path)
    Announcement("Read-only maintenance in progress").write(path)
    assert [kind for kind, _, _ in fsyncs.calls] == ["file", "dir"]
    (_, file_id, before), (_, dir_id, after) = fsyncs.calls
    assert file_id == identity(path) and before == "Old maintenance\n"  # flushed before the rename
    assert dir_id == identity(tmp_path) and after == path.read_text()  # the directory, after it
    assert Announcement.parse(after).message == "Read-only maintenance in progress"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["announce"]
