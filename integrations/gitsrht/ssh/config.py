"""The pipeline's configuration: sr.ht's ``config.ini``, found where sr.ht looks for it.

sshd starts the pipeline's programs with an almost empty environment, so the file is found at
a fixed place: ``$SRHT_CONFIG`` if set (the wrappers in ``sshd.py`` set it), else
``/etc/sr.ht/config.ini``. Keys used (``[git.sr.ht]`` unless said otherwise)::

    [git.sr.ht]
    origin = https://git.example.org            ; web front, for the hint after auto-creation
    connection-string = postgresql://git@localhost:16432/git.sr.ht   ; through PgBouncer
    repos = /var/lib/git                        ; repositories live in repos/~owner/name
    ssh-user = git                              ; the only OS user the keys program answers for
    shell = /usr/bin/gitsrht-shell              ; the forced command the keys program prints
    post-update-script = /usr/bin/gitsrht-update-hook   ; linked as each repo's post-update hook
    webhook-timeout = 5                         ; seconds per webhook POST

    [meta.sr.ht]
    origin = https://meta.example.org           ; GET /api/ssh-key/<b64> for unknown keys
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIG_ENV", "DEFAULT_PATH", "Config", "ConfigError", "load"]

CONFIG_ENV = "SRHT_CONFIG"
DEFAULT_PATH = "/etc/sr.ht/config.ini"
SECTION = "git.sr.ht"


class ConfigError(Exception):
    """The configuration file is missing or lacks a key; the message names which."""


@dataclass(frozen=True)
class Config:
    """What the pipeline's programs read from ``config.ini``."""

    connection_string: str
    repos: Path
    meta_origin: str
    ssh_user: str = "git"
    shell: str = "/usr/bin/gitsrht-shell"
    post_update_script: str = "/usr/bin/gitsrht-update-hook"
    origin: str = ""
    webhook_timeout: float = 5.0

    def repo_path(self, owner: str, name: str) -> Path:
        """Where the repository ``~owner/name`` lives on disk."""
        return self.repos / f"~{owner}" / name


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read ``path`` (default ``$SRHT_CONFIG``, then ``/etc/sr.ht/config.ini``)."""
    path = os.fspath(path) if path is not None else os.environ.get(CONFIG_ENV) or DEFAULT_PATH
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(path, encoding="utf-8"):
        raise ConfigError(f"cannot read {path}; set ${CONFIG_ENV} to the sr.ht config.ini")

    def get(section: str, key: str, default: str | None = None) -> str:
        value = parser.get(section, key, fallback=default)
        if value is None or value == "":
            raise ConfigError(f"{path}: [{section}] {key} is missing")
        return value

    return Config(
        connection_string=get(SECTION, "connection-string"),
        repos=Path(get(SECTION, "repos")),
        meta_origin=get("meta.sr.ht", "origin").rstrip("/"),
        ssh_user=get(SECTION, "ssh-user", "git"),
        shell=get(SECTION, "shell", Config.shell),
        post_update_script=get(SECTION, "post-update-script", Config.post_update_script),
        origin=parser.get(SECTION, "origin", fallback="").rstrip("/"),
        webhook_timeout=float(get(SECTION, "webhook-timeout", "5")),
    )
