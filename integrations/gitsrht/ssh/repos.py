"""Repositories on disk: where they live, what a valid name is, and how one is made.

The database row always comes first: the shell makes the directory only after its INSERT is
committed, so a read-only database (or a lost connection) never leaves a directory that no row
knows about.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["VALID_NAME", "create_on_disk", "remove_from_disk", "valid_name"]

#: git.sr.ht's rule: letters, digits, ``._-``, not starting with a dot or dash.
VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,255}")


def valid_name(name: str) -> bool:
    """Whether ``name`` may be a repository's name (and so a directory's)."""
    return bool(VALID_NAME.fullmatch(name)) and not name.endswith(".git") and ".." not in name


def create_on_disk(path: str | os.PathLike[str], post_update_script: str) -> None:
    """``git init --bare`` at ``path`` (HEAD on ``main``) and link its post-update hook."""
    path = Path(path)
    subprocess.run(["git", "init", "--bare", "--quiet", "--initial-branch=main", str(path)], check=True,
                   capture_output=True, text=True)
    hook = path / "hooks" / "post-update"
    hook.unlink(missing_ok=True)
    hook.symlink_to(post_update_script)


def remove_from_disk(path: str | os.PathLike[str]) -> None:
    """Undo ``create_on_disk`` (best effort; used when the row could not be kept)."""
    shutil.rmtree(path, ignore_errors=True)
