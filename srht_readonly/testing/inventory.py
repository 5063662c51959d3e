"""The CLI's INI inventory (docs/cli.md) describing a lab: every node, every PgBouncer, ``[replication]``.

``Lab.write_inventory(path)`` calls it; ``deployment.build_fleet`` adds ssh destinations.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .servers import REPLICATION_USER

if TYPE_CHECKING:
    from .lab import Lab

__all__ = ["write_inventory"]


def write_inventory(
    lab: Lab,
    path: str | os.PathLike[str],
    *,
    ssh: Mapping[str, str] | None = None,
    databases: Mapping[str, Iterable[str]] | None = None,
    password_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the inventory (docs/cli.md) for ``lab``: every node, every PgBouncer, ``[replication]``.

    ``ssh`` maps node or PgBouncer names to the ssh destination that reaches their host;
    ``databases`` restricts which entries of a PgBouncer follow the primary.
    """
    ssh, databases = dict(ssh or {}), dict(databases or {})
    out = [f"; srht-readonly lab in {lab.directory}", ""]
    for node in lab.nodes.values():
        out += [f"[node {node.name}]"] + ([f"ssh = {ssh[node.name]}"] if node.name in ssh else []) + [
            f"dsn = {node.admin_dsn}",
            f"data = {node.server.data}",
            f"bin = {node.server.bin}",
            f"os-user = {lab.os_user}",
            f"target = host={node.host} port={node.port}",
            "",
        ]
    for bouncer in lab.bouncers:
        out += [f"[pgbouncer {bouncer.name}]"]
        if bouncer.name in ssh:
            out.append(f"ssh = {ssh[bouncer.name]}")
        out += [f"config = {bouncer.config_path}", f"admin = {bouncer.admin_dsn}"]
        if bouncer.name in databases:
            out.append(f"databases = {', '.join(databases[bouncer.name])}")
        out.append("")
    if lab.barman is not None:
        out += lab.barman.inventory_section()
    out += ["[replication]", f"user = {REPLICATION_USER}"]
    if password_file is not None:
        out.append(f"password-file = {password_file}")
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path
