"""The lab laid out like a deployment for the operations CLI: more PgBouncers, some reached over a
real sshd, and the INI inventory (docs/cli.md's format) that describes it all.

``build_fleet(lab)`` is what the CLI's tests and ``benchmarks/switchover.py`` use::

    with Lab() as lab:
        fleet = build_fleet(lab)               # 3 PgBouncers, "meta.sr.ht" over ssh
        subprocess.run(["srht-readonly", "--config", fleet.inventory, "status"], env=fleet.env())
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inventory import write_inventory
from .lab import Lab
from .servers import LabBouncer
from .sshd import Sshd

logger = logging.getLogger(__name__)

SSH_ALIAS_SUFFIX = ".lab-ssh"


def start_sshd(lab: Lab) -> Sshd:
    """An sshd for this lab (stopped when the lab closes)."""
    sshd = Sshd(lab.directory / "sshd")
    sshd.start()
    lab.on_close("stop sshd", sshd.stop)
    return sshd


@dataclass
class LabFleet:
    """What ``build_fleet`` made: the lab, the inventory, the ssh_config its ssh hosts need, the sshd."""

    lab: Lab
    inventory: Path
    ssh_config: Path
    sshd: Sshd
    bouncers: list[LabBouncer] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the installed ``srht-readonly`` console script against this fleet, as an operator would."""
        script = Path(sys.executable).with_name("srht-readonly")
        started = time.monotonic()
        proc = subprocess.run([str(script), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, input=input)
        proc.seconds = time.monotonic() - started  # type: ignore[attr-defined]
        logger.info("srht-readonly %s -> %d in %.2f s", " ".join(args), proc.returncode, proc.seconds)  # type: ignore
        return proc

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for running ``srht-readonly`` against this fleet."""
        env = dict(os.environ if base is None else base)
        env["SRHT_READONLY_CONFIG"] = str(self.inventory)
        env["SRHT_READONLY_SSH_CONFIG"] = str(self.ssh_config)
        env["SRHT_READONLY_LOCK_DIR"] = str(self.inventory.parent)
        return env


def build_fleet(
    lab: Lab,
    *,
    extra: Iterable[str] = ("git.sr.ht", "meta.sr.ht"),
    over_ssh: Iterable[str] = ("meta.sr.ht",),
    settings: Mapping[str, Mapping[str, object]] | None = None,
    databases: Mapping[str, Iterable[str]] | None = None,
    password_file: str | os.PathLike[str] | None = None,
) -> LabFleet:
    """Add PgBouncers ``extra`` to a started lab, reach ``over_ssh`` ones (PgBouncers or nodes) through a
    real sshd, write the inventory.

    By default the extra PgBouncers keep PgBouncer's own ``server_login_retry`` (15 s), as a
    fresh production install would, so tests see what ``failover`` does about it.
    """
    settings = dict(settings or {})
    made = [lab.add_pgbouncer(name, **{"server_login_retry": None, **settings.get(name, {})}) for name in extra]
    sshd = start_sshd(lab)
    ssh_config = lab.directory / "ssh_config"
    aliases = {}
    for name in over_ssh:
        aliases[name] = f"{name}{SSH_ALIAS_SUFFIX}"
        sshd.client_config(ssh_config, aliases[name])
    if not aliases:
        ssh_config.write_text("")
    inventory = write_inventory(lab, lab.directory / "readonly.ini", ssh=aliases, databases=databases,
                                password_file=password_file)
    return LabFleet(lab, inventory, ssh_config, sshd, made)


PgBin = str | os.PathLike[str] | Callable[[], "str | os.PathLike[str]"] | None


def fleet_fixture(scope: str = "function", *, pg_bin: PgBin = None, **options: Any) -> Any:
    """A pytest fixture yielding a ``LabFleet`` on a lab of its own (``build_fleet(**options)``).

    ``pg_bin``: the lab's PostgreSQL (``Lab(pg_bin=)``), or a function returning it, called when the
    fixture is set up (so a missing installation fails that test, not the collection). Parametrized
    indirectly (``@pytest.mark.parametrize("fleet", [None, new_major_bin], indirect=True)``), the
    parameter replaces ``pg_bin``: one lab per major.
    """
    import pytest

    @pytest.fixture(scope=scope)  # type: ignore[call-overload, misc]
    def _fleet(request: pytest.FixtureRequest) -> Iterator[LabFleet]:
        chosen = getattr(request, "param", pg_bin)
        lab = Lab(pg_bin=chosen() if callable(chosen) else chosen)
        try:
            lab.start()
            yield build_fleet(lab, **options)
        finally:
            lab.close()

    return _fleet
