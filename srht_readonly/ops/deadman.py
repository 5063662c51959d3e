"""Dead-man timers: a PgBouncer paused by a procedure is RESUMEd on its own host if the procedure dies.

Before a switchover PAUSEs the fleet, each PgBouncer's host starts a small detached timer
(``setsid``, so neither the end of the ssh session nor a ``kill -9`` of the CLI takes it down).
After ``limit`` seconds, unless the procedure disarmed it, the timer RESUMEs its PgBouncer with
``psql`` on the admin console and leaves a record, which ``status`` reports. The console's
connection parameters (a password among them) reach the host on stdin, into a file of mode 600
in a directory of mode 700 that is removed when the timer is disarmed or has fired: never on a
command line.

The files live in ``/var/tmp/srht-readonly-UID/`` on each host (``UID``: the user the procedure
runs commands as there), named after the PgBouncer and its console's address (``KEY``, e.g.
``git.sr.ht@127.0.0.1:6432``, so that two fleets sharing a host and a PgBouncer name never read
each other's timers): ``KEY.armed/`` while a timer is armed, ``KEY.resumed`` once one fired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2.extensions

from .errors import OpsError
from .remote import Host

# $1 key (see key()), $2 limit, $3 how many of the console commands that follow run at once (then the record
# is written; the rest run 2 s later); stdin: a pg_service.conf for the console. Prints the timer's
# pid (its process group).
_ARM = r"""set -eu
name=$1; limit=$2; now=$3; shift 3
if ! command -v psql >/dev/null 2>&1; then
    echo "psql is not installed (the dead-man timer needs it: apt-get install postgresql-client)" >&2; exit 1
fi
umask 077
base=/var/tmp/srht-readonly-$(id -u)
mkdir -p -- "$base"
if [ -L "$base" ] || [ ! -O "$base" ]; then echo "$base is not a directory of $(id -un)" >&2; exit 1; fi
chmod 700 -- "$base"
d=$base/$name.armed
if [ -d "$d" ] && [ -s "$d/pid" ]; then kill -- "-$(cat "$d/pid")" 2>/dev/null || true; fi
rm -rf -- "$d"; mkdir -- "$d"
cat > "$d/service"
setsid sh -c '
d=$1; limit=$2; record=$3; now=$4; shift 4
sleep "$limit"
[ -e "$d/service" ] || exit 0
export PGSERVICEFILE="$d/service" PGCONNECT_TIMEOUT=5
failed=
i=0
for command; do
    i=$((i + 1))
    out=$(psql -X -q -w "service=srht_readonly_deadman" -c "$command" 2>&1) || failed=$(echo "$out" | head -n 1)
    if [ "$i" = "$now" ]; then
        when=$(date -u +%Y-%m-%dT%H:%M:%SZ)
        if [ -z "$failed" ]; then
            echo "$when RESUMEd after $limit s: the procedure that PAUSEd it did not disarm its timer (it died?)"
        else
            echo "$when could NOT RESUME it after $limit s ($failed): RESUME it on its console now"
        fi >> "$record"
        [ "$#" -gt "$now" ] && sleep 2
    fi
done
rm -f -- "$d/service"
' sh "$d" "$limit" "$base/$name.resumed" "$now" "$@" </dev/null >/dev/null 2>&1 &
echo $! > "$d/pid"
echo $!
"""

# $1 key. Stops the timer, removes the console's parameters; prints a record if it fired.
_DISARM = r"""
name=$1; base=/var/tmp/srht-readonly-$(id -u); d=$base/$name.armed
if [ -s "$d/pid" ]; then kill -- "-$(cat "$d/pid")" 2>/dev/null || true; fi
rm -rf -- "$d"
if [ -f "$base/$name.resumed" ]; then cat -- "$base/$name.resumed"; rm -f -- "$base/$name.resumed"; fi
exit 0
"""

# $1 key. Prints what a timer recorded, if one fired and no procedure has finished since.
_RECORDS = r"""
f=/var/tmp/srht-readonly-$(id -u)/$1.resumed
[ -f "$f" ] && tail -n 1 -- "$f"
exit 0
"""

SERVICE = "srht_readonly_deadman"


@dataclass
class Timer:
    """One armed timer: the PgBouncer it resumes, on which host, its process group, its files' ``key``."""

    name: str
    host: Host
    pid: int
    limit: float
    key: str


def key(name: str, admin_conninfo: str) -> str:
    """The timer files' name for PgBouncer ``name``: its name and its console's address."""
    params = dict(psycopg2.extensions.parse_dsn(admin_conninfo))
    address = f"{params.get('host', '')}:{params.get('port', '')}".replace("/", "_")
    return f"{name}@{address}"


def service_file(admin_conninfo: str) -> str:
    """The ``pg_service.conf`` that reaches a PgBouncer's console (libpq reads it; no argv sees it)."""
    params = dict(psycopg2.extensions.parse_dsn(admin_conninfo))
    params.setdefault("dbname", "pgbouncer")
    for key, value in params.items():
        if "\n" in value or "\r" in value:
            raise OpsError(f"the admin conninfo's {key} holds a line break; a service file cannot carry it")
    return f"[{SERVICE}]\n" + "".join(f"{k}={v}\n" for k, v in params.items())


def arm(host: Host, name: str, admin_conninfo: str, commands: list[str], limit: float, *,
        then: Sequence[str] = ()) -> Timer:
    """Start the timer on ``host``: after ``limit`` seconds it runs ``commands`` (RESUME...) on the console,
    and ``then`` 2 s later."""
    if limit <= 0:
        raise OpsError(f"a dead-man limit must be above 0 s (got {limit:g})")
    files = key(name, admin_conninfo)
    argv = ["sh", "-c", _ARM, "sh", files, f"{limit:g}", str(len(commands)), *commands, *then]
    proc = host.run(argv, input=service_file(admin_conninfo), check=False, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        why = (proc.stderr or proc.stdout).strip()[-300:] or f"exit {proc.returncode}"
        raise OpsError(f"cannot arm the dead-man timer of PgBouncer {name} on {host.name}: {why}")
    return Timer(name, host, int(proc.stdout.strip()), limit, files)


def disarm(timer: Timer) -> str | None:
    """Stop ``timer``; what it recorded if it had already fired (the PgBouncer was RESUMEd by it)."""
    proc = timer.host.run(["sh", "-c", _DISARM, "sh", timer.key], check=False, timeout=30)
    if proc.returncode != 0:
        raise OpsError(f"cannot disarm the dead-man timer of {timer.name} on {timer.host.name}: "
                       f"{proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else None


def record(host: Host, name: str, admin_conninfo: str) -> str | None:
    """The last thing a timer of ``name`` on ``host`` recorded (it RESUMEd the PgBouncer), if any."""
    proc = host.run(["sh", "-c", _RECORDS, "sh", key(name, admin_conninfo)], check=False, timeout=30)
    return proc.stdout.strip() or None
