"""``python -m integrations.gitsrht.ssh PROGRAM [ARGS...]``: what sshd and git actually run.

PROGRAM is ``keys``, ``shell`` or ``post-update``. Only ``srht_readonly.ssh`` is imported
before ``run()`` takes over, so even a broken installation (a missing module, a bad
``config.ini``) is reported to the pusher as one short line, never as a traceback.
"""

from __future__ import annotations

import sys

PROGRAMS = {
    "keys": "integrations.gitsrht.ssh.keys:main",
    "shell": "integrations.gitsrht.ssh.shell:main",
    "post-update": "integrations.gitsrht.ssh.hook:main",
}


def _main() -> None:
    try:
        from srht_readonly.ssh import run
    except Exception:  # srht-readonly itself is broken: say so in one line and stop
        sys.stderr.write("error: git.sr.ht is misconfigured; please tell the administrators.\n")
        sys.exit(70)
    program = sys.argv[1] if len(sys.argv) > 1 else ""
    if program not in PROGRAMS:
        sys.stderr.write(f"usage: python -m integrations.gitsrht.ssh {{{','.join(PROGRAMS)}}} [ARGS...]\n")
        sys.exit(2)
    sys.argv = [f"gitsrht-{program}", *sys.argv[2:]]
    run(PROGRAMS[program], service="git.sr.ht")


if __name__ == "__main__":
    _main()
