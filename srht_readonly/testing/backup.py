"""A real Barman backing up the lab's primary: its own directory, streaming WAL, a first base backup.

``LabBarman(lab).start()`` writes ``barman.conf`` in ``lab.directory / "barman"`` (Barman runs as
the lab's OS user: it switches to it when started as root), creates the replication slot
``barman`` on the primary, starts ``barman receive-wal`` (``pg_receivewal``) through ``barman
cron``, closes the first WAL segment and takes the first base backup (``pg_basebackup``).
``stop()`` ends the streaming and drops the slot. Barman comes from scripts/bootstrap
(``/opt/srht-readonly/barman``, or ``$SRHT_READONLY_BARMAN``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ..ops import sql
from ..ops.backup import Barman
from ..ops.errors import OpsError, ToolMissing
from ..ops.inventory import BackupSpec
from ..ops.remote import LocalHost
from .servers import REPLICATION_USER

if TYPE_CHECKING:
    from .lab import Lab

__all__ = ["BARMAN", "SERVER", "LabBarman"]

#: Where scripts/bootstrap installs Barman.
BARMAN = Path(os.environ.get("SRHT_READONLY_BARMAN", "/opt/srht-readonly/barman")) / "bin" / "barman"
#: The Barman server name of the lab's primary.
SERVER = "lab"
SLOT = "barman"


class LabBarman:
    """Barman for ``lab``'s current primary, in ``lab.directory / "barman"``."""

    def __init__(self, lab: Lab, *, past_dir: Path, executable: str | os.PathLike[str] | None = None,
                 started: bool = False) -> None:
        self.lab = lab
        self.executable = Path(executable or BARMAN)
        self.home = lab.directory / "barman"
        self.config = self.home / "barman.conf"
        self.past_dir = past_dir
        self.started = started

    def command(self, *args: str) -> list[str]:
        return [str(self.executable), "-c", str(self.config), *args]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and proc.returncode != 0:
            raise OpsError(f"barman {' '.join(args)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
        return proc

    def write_config(self) -> None:
        if not self.executable.exists():
            raise ToolMissing("barman", "barman (run ./scripts/bootstrap)", str(self.executable))
        primary = self.lab.primary
        # Every node, read-write wanted: after a failover Barman (its next `barman cron`) streams from the new
        # primary, creating its slot there (create_slot = auto), as production's conninfo should.
        nodes = list(self.lab.nodes.values())
        hosts = ",".join(n.host for n in nodes)
        ports = ",".join(str(n.port) for n in nodes)
        every = f"host={hosts} port={ports} target_session_attrs=read-write"
        self.lab.hostos.make_dir(self.home, owner=self.lab.os_user, mode=0o755)
        self.lab.hostos.write_text_atomic(self.config, (
            "[barman]\n"
            f"barman_user = {self.lab.os_user}\n"
            f"barman_home = {self.home}\n"
            f"log_file = {self.home}/barman.log\n"
            "log_level = INFO\n\n"
            f"[{SERVER}]\n"
            "description = srht-readonly lab primary\n"
            f"conninfo = {every} user=postgres dbname=postgres\n"
            f"streaming_conninfo = {every} user={REPLICATION_USER} dbname=postgres\n"
            "backup_method = postgres\n"
            "streaming_archiver = on\n"
            "archiver = off\n"
            f"slot_name = {SLOT}\n"
            "create_slot = auto\n"
            f"path_prefix = {primary.server.bin}\n"
            "retention_policy = RECOVERY WINDOW OF 7 DAYS\n"
            "minimum_redundancy = 1\n"
        ), owner=self.lab.os_user, mode=0o644)

    def start(self, progress: object = None) -> None:
        """Streaming WAL, the first segment archived, the first base backup (a few seconds)."""
        self.write_config()
        self.started = True
        self.run("receive-wal", "--create-slot", "--if-not-exists", SERVER)
        self.run("cron")
        sql.wait_until(self._streaming, timeout=30, what="barman receive-wal to stream")
        self.switch_wal()
        self.backup()

    def backup(self) -> None:
        """``barman backup --wait``, with empty transactions on the primary so its last WAL is archived at once."""
        self.ops().backup_now(self.lab.primary.admin_dsn, timeout=300)

    def _streaming(self) -> bool:
        rows = sql.query(self.lab.primary.admin_dsn,
                         "SELECT 1 FROM pg_stat_replication WHERE application_name = 'barman_receive_wal'")
        return bool(rows)

    def switch_wal(self, *, timeout: float = 60) -> None:
        """Close the current WAL segment and wait until Barman archived it (``Barman.switch_wal``)."""
        self.ops().switch_wal(self.lab.primary.admin_dsn, timeout=timeout)

    def ops(self) -> Barman:
        """The procedures' own Barman over this one's ``[backup]`` section (the lab is built from ``ops``)."""
        return Barman(BackupSpec(config=str(self.config), server=SERVER, barman=str(self.executable),
                                 past_dir=str(self.past_dir)), LocalHost())

    def stop(self) -> None:
        """Stop the instances of the past, the streaming, and drop the slot (it would hold WAL on the primary for
        ever); never raises."""
        subprocess.run(["pkill", "-9", "-f", f"postgres -D {self.past_dir}/"], check=False)
        subprocess.run(["rm", "-rf", str(self.past_dir)], check=False)
        if not self.started:
            return
        self.started = False
        for args in (("receive-wal", "--stop", SERVER), ("receive-wal", "--drop-slot", SERVER)):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.run(*args, timeout=60, check=False)
        subprocess.run(["pkill", "-f", f"barman -c {self.config}"], check=False)

    def inventory_section(self) -> list[str]:
        """The inventory's ``[backup]`` lines for this Barman."""
        return ["[backup]", f"barman = {self.executable}", f"config = {self.config}", f"server = {SERVER}",
                f"past-dir = {self.past_dir}", ""]
