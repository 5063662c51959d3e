"""``srht_readonly.ssh``: what pipeline programs show the pusher, and what they never show.

``run()`` owns the process (it exits, configures logging, hooks warnings), so it is tested in
subprocesses, each a tiny pipeline program; the database cases use the lab's read-only
database and a closed port. The pipeline's own programs are run here without sshd where
sshd adds nothing (parsing, a missing config, a hook whose database is gone); the real sshd
and git are in ``test_ssh_pipeline.py``.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from integrations.gitsrht.ssh.shell import NOT_FOUND, Refused, parse
from srht_readonly.ssh import EX_SOFTWARE, EX_TEMPFAIL, WIDTH, format_message, warn

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _program(tmp_path: Path, body: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (the inside of ``def main():``) under ``run()`` as its own process."""
    script = tmp_path / "program.py"
    script.write_text(
        "from srht_readonly.ssh import run\n\n"
        "def main():\n" + textwrap.indent(textwrap.dedent(body), "    ") + "\n\n"
        "run(main, service='git.sr.ht')\n"
    )
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "SRHT_SSH_LOG": str(tmp_path / "ssh.log"),
                **(env or {})}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=full_env,
                          timeout=60)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "ssh.log").read_text()


# --- laying messages out for a terminal behind "remote: " ----------------------------------------


def test_format_message_wraps_with_the_label_on_the_first_line_and_a_hanging_indent() -> None:
    text = format_message("word " * 40, label="warning")
    lines = text.splitlines()
    assert lines[0].startswith("warning: word")
    assert all(line.startswith(" " * len("warning: ") + "word") for line in lines[1:])
    assert all(len(line) <= WIDTH for line in lines)
    assert len("remote: " + max(lines, key=len)) <= 80
    assert text.endswith("\n")


def test_format_message_keeps_paragraphs_apart() -> None:
    assert format_message("one\n\ntwo", label="error") == "error: one\n\n       two\n"


def test_warn_is_one_labelled_warning_and_survives_a_pusher_who_hung_up() -> None:
    out = io.StringIO()
    warn("webhooks were not delivered", stream=out)
    assert out.getvalue() == "warning: webhooks were not delivered\n"

    class HungUp(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    warn("nobody is listening", stream=HungUp())


# --- run(): refusals, failures, and nothing else on stderr ---------------------------------------


def test_read_only_error_prints_its_message_and_exits_75(tmp_path: Path) -> None:
    proc = _program(tmp_path, """
        from srht_readonly import ReadOnlyError
        raise ReadOnlyError("git.sr.ht is read-only; your new repository was not created.")
    """)
    assert proc.returncode == EX_TEMPFAIL
    assert proc.stderr == "error: git.sr.ht is read-only; your new repository was not created.\n"
    assert proc.stdout == ""


def test_unexpected_error_prints_a_reference_and_logs_the_traceback_under_it(tmp_path: Path) -> None:
    proc = _program(tmp_path, """
        raise KeyError("internal detail the pusher must not see")
    """)
    assert proc.returncode == EX_SOFTWARE
    assert "Traceback" not in proc.stderr and "internal detail" not in proc.stderr
    assert proc.stderr.startswith("error: git.sr.ht hit an internal error")
    reference = re.search(r"reference\s+([0-9a-f]+)\.", proc.stderr).group(1)
    log = _log(tmp_path)
    assert f"internal error, reference {reference}" in log
    assert "Traceback" in log and "internal detail the pusher must not see" in log


def test_an_entry_point_that_fails_to_import_is_an_internal_error_too(tmp_path: Path) -> None:
    script = tmp_path / "entry.py"
    script.write_text("from srht_readonly.ssh import run\nrun('no_such_module_here:main')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SRHT_SSH_LOG": str(tmp_path / "ssh.log")})
    assert proc.returncode == EX_SOFTWARE
    assert "Traceback" not in proc.stderr and "internal error" in proc.stderr
    assert "ModuleNotFoundError" in _log(tmp_path)


def test_exit_with_a_message_prints_it_as_an_error(tmp_path: Path) -> None:
    proc = _program(tmp_path, """
        import sys
        sys.exit("Repository not found.")
    """)
    assert (proc.returncode, proc.stderr) == (1, "error: Repository not found.\n")


def test_return_value_is_the_exit_status(tmp_path: Path) -> None:
    assert _program(tmp_path, "return 3").returncode == 3
    assert _program(tmp_path, "print('hello')").returncode == 0


def test_python_warnings_and_log_records_go_to_the_log_not_to_the_pusher(tmp_path: Path) -> None:
    proc = _program(tmp_path, """
        import logging, warnings
        warnings.warn("deprecated thing", DeprecationWarning)
        logging.getLogger("some.library").warning("library chatter")
        logging.getLogger("srht_readonly.monitor").warning("database is read-only (error): ...")
    """)
    assert (proc.returncode, proc.stderr) == (0, "")
    log = _log(tmp_path)
    assert "deprecated thing" in log and "library chatter" in log and "database is read-only" in log


def test_a_pusher_who_hung_up_gets_no_exception_report(tmp_path: Path) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(
        "import time\nfrom srht_readonly.ssh import run\n"
        "def main():\n    time.sleep(0.3)\n    print('x' * 200000)\n"
        "run(main)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "SRHT_SSH_LOG": str(tmp_path / "ssh.log")})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the pusher is gone before the program talks
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(60)
    assert (proc.returncode, stderr) == (141, "")
    assert "the pusher hung up" in _log(tmp_path)


@pytest.mark.lab
def test_an_unwrapped_write_on_a_read_only_database_is_a_refusal_not_a_crash(
    tmp_path: Path, srht_readonly_db
) -> None:
    proc = _program(tmp_path, f"""
        import psycopg2
        conn = psycopg2.connect({srht_readonly_db.dsn!r})
        conn.cursor().execute("CREATE TABLE refused (v int)")
    """)
    assert proc.returncode == EX_TEMPFAIL
    assert proc.stderr.startswith("error: git.sr.ht is in read-only mode for database maintenance")
    assert "Traceback" not in proc.stderr and "25006" not in proc.stderr


@pytest.mark.lab
def test_abort_on_read_only_on_a_read_only_database_shows_its_own_message(
    tmp_path: Path, srht_readonly_db
) -> None:
    proc = _program(tmp_path, f"""
        import psycopg2
        from srht_readonly import abort_on_read_only
        conn = psycopg2.connect({srht_readonly_db.dsn!r})
        with abort_on_read_only("git.sr.ht is read-only: ~alice/new was not created; push again later."):
            conn.cursor().execute("CREATE TABLE refused (v int)")
    """)
    assert proc.returncode == EX_TEMPFAIL
    assert proc.stderr == ("error: git.sr.ht is read-only: ~alice/new was not created; push again\n"
                           "       later.\n")


def test_an_unreachable_database_is_a_short_message(tmp_path: Path) -> None:
    proc = _program(tmp_path, f"""
        import psycopg2
        psycopg2.connect(host="127.0.0.1", port={_closed_port()}, user="x", dbname="x", connect_timeout=3)
    """)
    assert proc.returncode == EX_TEMPFAIL
    assert proc.stderr.startswith("error: git.sr.ht cannot reach its database right now")
    assert "Connection refused" not in proc.stderr


def test_the_example_of_docs_ssh_md_prints_what_the_page_says(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "ssh.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", page, re.DOTALL)[0]
    expected = page.split("exits 75:\n\n```\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    proc = subprocess.run([sys.executable, str(script), "create"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SRHT_SSH_LOG": str(tmp_path / "ssh.log")})
    assert (proc.returncode, proc.stderr) == (EX_TEMPFAIL, expected)


# --- the pipeline's programs where sshd adds nothing ---------------------------------------------


def _pipeline(tmp_path: Path, program: str, *args: str, env: dict[str, str] | None = None,
              config: str | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.ini"
    path.write_text(config if config is not None else (
        "[git.sr.ht]\n"
        f"connection-string = postgresql://srht@127.0.0.1:{_closed_port()}/srht\n"
        f"repos = {tmp_path / 'repos'}\n"
        "ssh-user = git\n"
        f"[meta.sr.ht]\norigin = http://127.0.0.1:{_closed_port()}\n"
    ))
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "SRHT_CONFIG": str(path),
                "SRHT_SSH_LOG": str(tmp_path / "ssh.log"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "integrations.gitsrht.ssh", program, *args], cwd=tmp_path,
                          capture_output=True, text=True, env=full_env, timeout=60)


def test_post_update_with_the_database_gone_says_the_push_was_saved(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "post-update", "refs/heads/main", env={"SRHT_REPO_ID": "1"})
    assert proc.returncode == 0
    assert proc.stderr.startswith("warning: git.sr.ht could not reach its database after your push.")
    assert "push itself was saved" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("warning:") == 1


def test_a_missing_config_is_one_line_for_the_pusher(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "shell", "1", "alice", env={"SSH_ORIGINAL_COMMAND": "git-upload-pack 'x'",
                                                         "SRHT_CONFIG": str(tmp_path / "missing.ini")})
    assert proc.returncode == EX_SOFTWARE
    assert proc.stderr.startswith("error: git.sr.ht hit an internal error") and "Traceback" not in proc.stderr
    assert "missing.ini" in _log(tmp_path)


def test_an_interactive_login_is_told_there_is_no_shell(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "shell", "1", "alice")
    assert proc.returncode == 1
    assert proc.stderr == "error: git.sr.ht only serves git over SSH; there is no shell access.\n"


def test_keys_answers_nothing_for_other_accounts(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "keys", "postgres", "/var/lib/postgresql", "ssh-ed25519", "AAAA")
    assert (proc.returncode, proc.stdout) == (0, "")


@pytest.mark.parametrize(("command", "expected"), [
    ("git-receive-pack '~alice/repo'", ("git-receive-pack", "alice", "repo")),
    ("git-receive-pack '/~alice/repo.git'", ("git-receive-pack", "alice", "repo")),
    ("git-upload-pack 'repo'", ("git-upload-pack", "pusher", "repo")),
    ("git-upload-archive '~bob/x_y-z.1'", ("git-upload-archive", "bob", "x_y-z.1")),
])
def test_parse_reads_what_git_sends(command: str, expected: tuple[str, str, str]) -> None:
    request = parse(command, "pusher")
    assert (request.command, request.owner, request.name) == expected


@pytest.mark.parametrize("command", [
    "git-receive-pack '~alice/../bob/repo'", "git-receive-pack '~alice/a/b'", "git-receive-pack '~alice/.hidden'",
    "git-receive-pack '~/repo'",
])
def test_parse_refuses_paths_that_are_no_repository(command: str) -> None:
    with pytest.raises(Refused, match=NOT_FOUND):
        parse(command, "pusher")


@pytest.mark.parametrize("command", ["", "bash", "git-receive-pack", "rm -rf /", "git-receive-pack 'a' 'b'"])
def test_parse_refuses_anything_but_git(command: str) -> None:
    with pytest.raises(Refused):
        parse(command, "pusher")
