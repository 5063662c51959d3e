"""The fleet-wide operator lock in etcd (``ops.etcd``), against a real etcd and a real lab fleet.

Two operators on two machines (two lock directories: the lock file cannot see one another):
the second is refused, naming the first, and changes nothing; the first ``kill -9``'d, its lock
goes within ``lock-ttl``. etcd unreachable, or without its quorum: refused, nothing changed; one
member of three lost: no change at all.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from srht_readonly.ops.errors import Refused
from srht_readonly.ops.etcd import FleetLock
from srht_readonly.ops.inventory import EtcdSpec, InventoryError, parse
from srht_readonly.ops.ports import free_port
from srht_readonly.testing.deployment import fleet_fixture
from srht_readonly.testing.etcd import EtcdCluster
from tests._fleet import out, status

fleet = fleet_fixture("function")

HOLD = """
import sys, time
from srht_readonly.ops.etcd import FleetLock
from srht_readonly.ops.inventory import EtcdSpec
with FleetLock(EtcdSpec(tuple(sys.argv[1].split(",")), lock_ttl=5), "switchover --to konpaku"):
    print("held", flush=True)
    time.sleep(600)
"""


def _targets(fleet) -> set[str]:
    return {b["target"] for b in status(fleet)["pgbouncers"]}


def _other_bastion(fleet, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """``srht-readonly ARGS`` as an operator on another machine: a lock directory of its own."""
    (tmp_path / "bastion-b").mkdir(exist_ok=True)
    env = fleet.env()
    env["SRHT_READONLY_LOCK_DIR"] = str(tmp_path / "bastion-b")
    return subprocess.run([str(Path(sys.executable).with_name("srht-readonly")), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_second_operator_elsewhere_is_refused_and_a_dead_holders_lock_goes_within_its_ttl(fleet, tmp_path):
    with EtcdCluster(tmp_path / "etcd") as etcd:
        with fleet.inventory.open("a") as inventory:
            inventory.write(f"\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\nlock-ttl = 5\n")
        holder = subprocess.Popen([sys.executable, "-c", HOLD, ",".join(etcd.endpoints)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            time.sleep(6)  # longer than its ttl: the holder's keep-alive is what still holds it
            refused = _other_bastion(fleet, tmp_path, "failover", "--to", "konpaku", "--yes")
            assert refused.returncode == 1, out(refused)
            assert "another operator holds the fleet lock in etcd: `switchover --to konpaku`" in refused.stderr
            assert f"pid {holder.pid}" in refused.stderr
            assert _targets(fleet) == {"remilia"}, "refused, yet something changed"
            holder.kill()  # the holder dies without releasing anything
            holder.wait()
            died = time.monotonic()
            spec = EtcdSpec(tuple(etcd.endpoints), lock_ttl=5)
            while True:  # as soon as etcd has dropped the dead holder's key (its lease expired)
                try:
                    FleetLock(spec, "waiting").acquire_and_release()
                    break
                except Refused as exc:
                    assert "holds the fleet lock" in str(exc)
                    assert time.monotonic() - died < 5 + 2.5, "the dead holder's lock outlived its ttl by 2.5 s"
                    time.sleep(0.1)
            freed = time.monotonic() - died
            assert freed > 2.5, f"free {freed:.2f} s after its holder died: the lease did not hold it"
            proc = _other_bastion(fleet, tmp_path, "failover", "--to", "konpaku", "--yes")
            assert proc.returncode == 0, out(proc)
            assert _targets(fleet) == {"konpaku"}
            print(f"\nfleet lock of a kill -9'd holder free after {freed:.2f} s (lock-ttl 5 s)")
        finally:
            holder.kill()
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
        # Taken and released by each command: the next one, from the first machine, goes through.
        back = fleet.cli("failover", "--to", "remilia", "--yes")
        assert back.returncode == 0, out(back)


def test_etcd_unreachable_refuses_every_changing_command_and_status_still_works(fleet, tmp_path):
    with fleet.inventory.open("a") as inventory:
        inventory.write(f"\n[etcd]\nendpoints = http://127.0.0.1:{free_port()}\n")
    proc = fleet.cli("failover", "--to", "konpaku", "--yes")
    assert proc.returncode == 1, out(proc)
    assert "cannot reach etcd for the fleet lock; nothing was changed" in proc.stderr, out(proc)
    assert _targets(fleet) == {"remilia"}
    assert fleet.cli("status").returncode in (0, 1)  # reading needs no lock


def test_one_member_of_three_lost_changes_nothing_and_without_quorum_the_lock_is_refused(tmp_path):
    with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        spec = EtcdSpec(tuple(etcd.endpoints), lock_ttl=5)
        etcd.kill(0)  # the first endpoint is gone (the leader, maybe): the others elect one and go on
        deadline = time.monotonic() + 10
        while not etcd.healthy(1):
            assert time.monotonic() < deadline, "two members of three never became healthy again"
            time.sleep(0.1)
        with FleetLock(spec, "promote konpaku"), pytest.raises(Refused, match="holds the fleet lock"):
            FleetLock(spec, "failover").acquire()
        etcd.kill(1)
        started = time.monotonic()
        with pytest.raises(Refused, match="etcd did not grant the fleet lock .* without its quorum cannot"):
            FleetLock(spec, "failover").acquire()
        assert time.monotonic() - started < 10


NODES = ("[node remilia]\ndsn = host=10.0.0.2 port=5432\ndata = /srv/pg\n"
         "[node konpaku]\ndsn = host=10.0.0.3 port=5432\ndata = /srv/pg\n")


@pytest.mark.parametrize(("text", "message"), [
    ("endpoints = 10.0.0.5:2379", "is not http(s)://HOST:PORT"),
    ("endpoints = ,", "needs at least one etcd client URL"),
    ("endpoints = http://a:2379\nprefix = srht", "prefix must start with '/'"),
    ("endpoints = http://a", "is not http(s)://HOST:PORT"),
    ("endpoints = http://a:2379\nlock-ttl = 4", "lock-ttl must be whole seconds from 5 to 600"),
    ("endpoints = http://a:2379\nttl = 5", "ttl"),
])
def test_etcd_sections_are_checked_with_the_line_at_fault(text, message):
    with pytest.raises(InventoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(f"{NODES}[etcd]\n{text}\n")


def test_an_etcd_section_reads_as_documented():
    inventory = parse(f"{NODES}[etcd]\nendpoints = http://10.0.0.5:2379, https://10.0.0.6:2379/\nlock-ttl = 30\n")
    assert inventory.etcd == EtcdSpec(("http://10.0.0.5:2379", "https://10.0.0.6:2379"), "/srht-readonly", 30, 7)
    assert parse(NODES).etcd is None


def test_a_lock_whose_lease_expires_while_held_is_reported_lost(tmp_path, caplog):
    """etcd unreachable for longer than the ttl (every member stopped): the holder knows it lost the lock."""
    with EtcdCluster(tmp_path / "etcd") as etcd:
        lock = FleetLock(EtcdSpec(tuple(etcd.endpoints), lock_ttl=5), "switchover --to konpaku")
        lock.acquire()
        etcd.stop()
        deadline = time.monotonic() + 15
        while lock.lost is None:
            assert time.monotonic() < deadline, "a lock not refreshed for 15 s with a 5 s ttl is still 'held'"
            time.sleep(0.2)
        lock.release()
    assert "over its ttl" in lock.lost
    assert "LOST the fleet lock" in caplog.text and "was lost while `switchover --to konpaku` ran" in caplog.text
