"""The INI inventory: the documented example parses; every malformed file names its file, line and fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from srht_readonly.ops.cli import EXIT_USAGE, Failure, failures, main
from srht_readonly.ops.errors import OpsError, PartlyDone, Refused
from srht_readonly.ops.inventory import InventoryError, load, parse

DOCUMENTED_EXAMPLE = """\
[node remilia]
dsn = host=10.0.0.2 port=5432 user=postgres dbname=postgres   ; how ops reaches it
data = /var/lib/postgresql/12/data
ssh = remilia.example.org        ; absent: this machine
bin = /usr/lib/postgresql/12/bin ; optional
os-user = postgres               ; optional
target = host=10.0.0.2 port=5432 ; optional: how PgBouncers reach it (default: from dsn)

[node konpaku]
dsn = host=10.0.0.3 user=postgres dbname=postgres
data = /var/lib/postgresql/12/data

[pgbouncer git.sr.ht]
ssh = git.sr.ht.example.org      ; absent: this machine
config = /etc/pgbouncer/pgbouncer.ini
admin = host=127.0.0.1 port=16432 user=pgbouncer dbname=pgbouncer
databases = git.sr.ht, meta.sr.ht ; entries that follow the primary (default: all)

[replication]
user = replicator
password-file = /etc/sr.ht/replication.password
"""


def test_the_documented_example_parses_with_defaults_filled_in():
    inv = parse(DOCUMENTED_EXAMPLE, "readonly.ini")
    assert list(inv.nodes) == ["remilia", "konpaku"]
    remilia, konpaku = inv.nodes["remilia"], inv.nodes["konpaku"]
    assert remilia.ssh == "remilia.example.org" and remilia.os_user == "postgres"
    assert remilia.target == {"host": "10.0.0.2", "port": "5432"}
    assert konpaku.ssh is None and konpaku.target == {"host": "10.0.0.3", "port": "5432"}  # from dsn
    git = inv.pgbouncers["git.sr.ht"]
    assert git.databases == ("git.sr.ht", "meta.sr.ht")
    assert git.admin == "host=127.0.0.1 port=16432 user=pgbouncer dbname=pgbouncer"
    assert inv.replication.user == "replicator"
    assert inv.node_at("10.0.0.3", "5432") is konpaku


def test_values_in_the_drills_sections_keep_their_semicolons_and_hashes():
    text = DOCUMENTED_EXAMPLE + """
[drill]
traffic = typical ; kept: the drill's own checks judge it

[probe git-push]
command = cd /srv/x ; git push -q origin HEAD # all of it is the command
explained = read-only mode ;|#[0-9]+
"""
    inv = parse(text, "readonly.ini")
    probe = inv.others["probe", "git-push"]
    assert probe["command"][0] == "cd /srv/x ; git push -q origin HEAD # all of it is the command"
    assert probe["explained"][0] == "read-only mode ;|#[0-9]+"
    assert inv.others["drill", None]["traffic"][0] == "typical ; kept: the drill's own checks judge it"
    # Elsewhere they are still comments.
    assert inv.nodes["remilia"].ssh == "remilia.example.org"
    assert inv.pgbouncers["git.sr.ht"].databases == ("git.sr.ht", "meta.sr.ht")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("dsn = host=a\n", 1, "outside any section"),
        ("[node]\ndsn = host=a\n", 1, "needs a name"),
        ("[nodes remilia]\n", 1, "unknown section"),
        ("[node a]\ndsn = host=a\ndata = /d\n[node a]\n", 4, "appears twice"),
        ("[node a]\ndsn = host=a\ndsn = host=b\ndata = /d\n", 3, "set twice"),
        ("[node a]\ndsn = host=a\ndata = /d\nos_user = postgres\n", 4, "did you mean 'os-user'"),
        ("[node a]\ndata = /d\n", 1, "no 'dsn'"),
        ("[node a]\ndsn =\ndata = /d\n", 2, "empty"),
        ("[node a]\ndsn = host='a\ndata = /d\n", 2, "not a libpq connection string"),
        ("[node a]\ndsn = dbname=x\ndata = /d\n", 2, "no TCP host"),
        ("[node a]\ndsn = host=a\ndata = relative/dir\n", 3, "absolute path"),
        ("[node a]\ndsn = host=a\ndata = /d\n[node b]\ndsn = host=a\ndata = /d\n", 4, "same target"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer p]\nconfig = /c\nadmin = host=x\n", 6, "dbname=pgbouncer"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer p]\nconfig = /c\nadmin = dbname=pgbouncer\n"
         "databases = ,\n", 7, "lists no database"),
        ("[node a]\ndsn = host=a\ndata = /d\njust words\n", 4, "expected 'key = value'"),
        ("[pgbouncer p]\nconfig = /c\nadmin = dbname=pgbouncer\n", None, "no [node NAME]"),
        ("[node Remilia-1]\ndsn = host=a\ndata = /d\n", 1, "replication slot's name"),
        ("[node " + "a" * 64 + "]\ndsn = host=a\ndata = /d\n", 1, "1 to 63 of a-z, 0-9 and _"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer ../p]\nconfig = /c\nadmin = dbname=pgbouncer\n", 4,
         "names files on its host"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer -p]\nconfig = /c\nadmin = dbname=pgbouncer\n", 4,
         "not starting with '.' or '-'"),
        ("[node a]\ndsn = host=a port=54x2\ndata = /d\n", 2, "a port is a number"),
        ("[node a]\ndsn = host=a\ndata = /d\ntarget = host=a port=0\n", 4, "a port is a number"),
        ("[node a]\ndsn = host=a\ndata = /d\nssh = -oProxyCommand=x\n", 4, "ssh reads as an option"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer p]\nconfig = /c\nadmin = dbname=pgbouncer port=x\n", 6,
         "a port is a number"),
        ("[node a]\ndsn = host=a\ndata = /d\n[pgbouncer p]\nconfig = /c\nadmin = dbname=pgbouncer\nssh = -x\n", 7,
         "ssh reads as an option"),
    ],
)
def test_malformed_inventory_names_line_and_fault(text, line, words):
    with pytest.raises(InventoryError) as info:
        parse(text, "/etc/sr.ht/readonly.ini")
    assert info.value.line == line
    assert words in info.value.problem
    where = f"/etc/sr.ht/readonly.ini:{line}: " if line else "/etc/sr.ht/readonly.ini: "
    assert str(info.value).startswith(where)


def test_missing_inventory_says_how_to_point_at_one(tmp_path):
    with pytest.raises(InventoryError, match="pass --config FILE or set \\$SRHT_READONLY_CONFIG"):
        load(tmp_path / "absent.ini")


def test_password_file_is_read_only_when_needed_and_errors_say_what_to_do(tmp_path):
    inv = parse(DOCUMENTED_EXAMPLE.replace("/etc/sr.ht/replication.password", str(tmp_path / "pw")))
    with pytest.raises(Exception, match="create it \\(mode 600\\)"):
        inv.replication.password()
    (tmp_path / "pw").write_text("s3cret\n")
    assert inv.replication.password() == "s3cret"


def test_cli_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "readonly.ini"
    bad.write_text("[node remilia]\ndsn = host=a\ndata = /d\nport = 5432\n")
    result = CliRunner().invoke(main, ["--config", str(bad), "status"])
    assert result.exit_code == EXIT_USAGE
    assert f"{bad}:4: unknown key 'port'" in result.output


def test_cli_subprocess_exits_2_for_missing_inventory_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("srht-readonly")
    proc = subprocess.run([str(script), "--config", str(tmp_path / "none.ini"), "switchover", "--to", "x", "--yes"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE
    assert "none.ini: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_node_is_a_configuration_error(tmp_path):
    good = tmp_path / "readonly.ini"
    good.write_text(DOCUMENTED_EXAMPLE)
    result = CliRunner().invoke(main, ["--config", str(good), "promote", "yukari", "--dry-run"])
    assert result.exit_code == EXIT_USAGE
    assert "no [node yukari]" in result.output and "remilia, konpaku" in result.output


@pytest.mark.parametrize("command", [
    [], ["status"], ["standby", "prepare"], ["failover"], ["promote"], ["demote"], ["switchover"], ["lab"],
])
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "srht-readonly" in result.output


@pytest.mark.parametrize(("error", "code", "label"), [
    (Refused("no"), 1, "refused"),
    (InventoryError("f.ini", 3, "bad"), 2, "configuration error"),
    (PartlyDone("half", {"git.sr.ht": "switched", "meta.sr.ht": "RELOAD failed"}), 3, "partly done"),
])
def test_package_errors_become_design_exit_statuses(error, code, label):
    with pytest.raises(Failure) as info, failures(as_json=True):
        raise error
    assert (info.value.exit_code, info.value.label) == (code, label)
    if code == 3:
        assert "meta.sr.ht: RELOAD failed" in info.value.message and info.value.hosts["git.sr.ht"] == "switched"


def test_an_unexpected_error_after_the_plan_was_accepted_is_partly_done():
    with pytest.raises(Failure) as info, failures(changing=True):
        raise OpsError("pg_ctl exited 1")
    assert info.value.exit_code == 3 and "running the same command again is safe" in info.value.message


def test_connection_strings_ops_writes_are_escaped_by_libpq(tmp_path):
    import psycopg2.extensions

    from srht_readonly.ops.cluster import Cluster

    secret = "a b'c\\d=e"
    (tmp_path / "pw").write_text(secret + "\n")
    inv = parse(DOCUMENTED_EXAMPLE.replace("/etc/sr.ht/replication.password", str(tmp_path / "pw"))
                .replace("user=postgres dbname=postgres", "user=postgres dbname=postgres password='x y'", 1))
    with Cluster(inv) as cluster:
        streaming = psycopg2.extensions.parse_dsn(cluster.replication_conninfo("remilia", "konpaku"))
        source, env = cluster.rewind_source("remilia")
    assert streaming["password"] == secret and streaming["application_name"] == "konpaku"
    assert "password" not in psycopg2.extensions.parse_dsn(source) and env == {"PGPASSWORD": "x y"}
