"""The transaction-mode audit (``srht_readonly.audit``, docs/audit.md).

Pure logic first (the analyser on synthetic statements, the log parser on synthetic log text,
the report, the SQLAlchemy hook on SQLite, the command's usage errors), then, on the lab's real
PostgreSQL and PgBouncer in transaction mode (``-m lab``): each finding kind detected from a
deliberately wrong snippet and not reported for its correct form, what a leaked session setting
does to another client, ``srht-readonly audit`` end to end, and the stand-in services of
``integrations/`` audited under traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import pytest
from click.testing import CliRunner

from srht_readonly.audit import Finding, Kind, Statement, analyse, combine
from srht_readonly.audit.command import SITE, audit
from srht_readonly.audit.recorder import (
    LOG_PREFIX,
    ServerLog,
    SqlAlchemyRecorder,
    bouncer_connections,
    parse_log,
    read_json_lines,
    through_bouncer,
)
from srht_readonly.audit.report import headline, render_json, render_text
from srht_readonly.audit.tokens import TokenType, normalized, statements, tokenize
from srht_readonly.ops import sql

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("srht-readonly"))


def kinds(*texts: str, transaction: str | None = None) -> list[Kind]:
    return [f.kind for f in analyse(Statement("s1", transaction, t) for t in texts)]


# --- the analyser: each kind flagged, its correct form not -----------------------------------------

FLAGGED = [
    ("SET search_path TO app, public", Kind.SESSION_SET),
    ("set statement_timeout = 5000", Kind.SESSION_SET),
    ("SET SESSION lock_timeout TO '1s'", Kind.SESSION_SET),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", Kind.SESSION_SET),
    ("SET ROLE reporting", Kind.SESSION_SET),
    ('SET "myapp.user_id" = 42', Kind.SESSION_SET),
    ("SET myapp.user_id = '42'", Kind.SESSION_SET),
    ("RESET search_path", Kind.SESSION_SET),
    ("RESET ALL", Kind.SESSION_SET),
    ("SELECT set_config('myapp.user_id', '42', false)", Kind.SESSION_SET),
    ("select pg_catalog.set_config('search_path', 'app', 'f')", Kind.SESSION_SET),
    ("SELECT set_config(%(name)s, %(value)s, false)", Kind.SESSION_SET),
    ("LISTEN jobs", Kind.LISTEN),
    ('UNLISTEN "jobs"', Kind.LISTEN),
    ("UNLISTEN *", Kind.LISTEN),
    ("SELECT pg_advisory_lock(42)", Kind.ADVISORY_LOCK),
    ("SELECT pg_try_advisory_lock(1, 2)", Kind.ADVISORY_LOCK),
    ("SELECT pg_advisory_lock_shared(%s)", Kind.ADVISORY_LOCK),
    ("select PG_TRY_ADVISORY_LOCK_SHARED(7) as got", Kind.ADVISORY_LOCK),
    ("PREPARE by_name (text) AS SELECT * FROM repo WHERE name = $1", Kind.PREPARED_STATEMENT),
    ("CREATE TEMP TABLE scratch (v int)", Kind.TEMP_TABLE),
    ("CREATE TEMPORARY TABLE IF NOT EXISTS scratch AS SELECT 1", Kind.TEMP_TABLE),
    ("CREATE GLOBAL TEMPORARY TABLE scratch (v int) ON COMMIT DELETE ROWS", Kind.TEMP_TABLE),
    ("CREATE TEMP VIEW recent AS SELECT 1", Kind.TEMP_TABLE),
    ("SELECT * INTO TEMP TABLE scratch FROM repo", Kind.TEMP_TABLE),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Kind.WITH_HOLD_CURSOR),
    ('DECLARE "c" BINARY NO SCROLL CURSOR WITH HOLD FOR SELECT 1', Kind.WITH_HOLD_CURSOR),
    ("DISCARD ALL", Kind.DISCARD),
    ("discard plans", Kind.DISCARD),
    ("LOAD 'auto_explain'", Kind.LOAD),
]

CLEAN = [
    "SET LOCAL statement_timeout = '5s'",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('myapp.user_id', '42', true)",
    "SELECT set_config('myapp.user_id', '42', 't')",
    "SELECT set_config(%(name)s, %(value)s, %(local)s)",  # the value is not in the text: the server log judges
    "SET application_name = 'git.sr.ht'",  # PgBouncer carries these five itself
    "SET client_encoding TO 'UTF8'",
    "SET TIME ZONE 'UTC'",
    "SET DateStyle='ISO, MDY';SET TimeZone='UTC';",
    "RESET TimeZone",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT pg_try_advisory_xact_lock_shared(1, 2)",
    "SELECT pg_advisory_unlock(42)",
    "NOTIFY jobs, 'payload'",
    "SELECT pg_notify('jobs', 'payload')",
    "PREPARE TRANSACTION 'gid-1'",
    "CREATE TEMP TABLE scratch (v int) ON COMMIT DROP",
    "CREATE TEMPORARY TABLE scratch ON COMMIT DROP AS SELECT 1",
    "CREATE TABLE settings (name text)",
    "CREATE UNLOGGED TABLE cache (v int)",
    "SELECT * INTO archive FROM repo",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "ALTER ROLE srht SET search_path = app",
    "ALTER DATABASE srht SET statement_timeout = '30s'",
    "UPDATE repository SET description = 'x' WHERE id = 1",
    "INSERT INTO settings (name) VALUES ('SET search_path TO evil')",
    # literals and comments are not SQL
    "SELECT 'SET x = 1'",
    "SELECT 'LISTEN jobs', 'it''s; LISTEN y'",
    "SELECT E'it\\'s; DISCARD ALL'",
    "SELECT $$SELECT pg_advisory_lock(1)$$",
    "SELECT $fn$ LISTEN x $fn$",
    "-- SET search_path TO app\nSELECT 1",
    "/* LISTEN jobs; /* nested */ DISCARD ALL */ SELECT 1",
    'SELECT 1 AS "SET x"',
    'SELECT "pg_advisory_lock"',
    "SELECT pg_advisory_lock",  # a column of that name, not a call
]


@pytest.mark.parametrize(("sql", "kind"), FLAGGED)
def test_each_kind_is_flagged(sql: str, kind: Kind) -> None:
    assert kinds(sql) == [kind]


@pytest.mark.parametrize("sql", CLEAN)
def test_correct_forms_literals_and_comments_are_not_flagged(sql: str) -> None:
    assert kinds(sql) == []


def test_several_statements_in_one_text_are_each_judged() -> None:
    found = analyse([Statement("s", None, "SET x.y = 1; SELECT 'LISTEN a'; LISTEN b; SELECT pg_advisory_lock(1)")])
    assert [(f.kind, f.statement) for f in found] == [
        (Kind.SESSION_SET, "SET x.y = 1"), (Kind.LISTEN, "LISTEN b"),
        (Kind.ADVISORY_LOCK, "SELECT pg_advisory_lock(1)"),
    ]


@pytest.mark.parametrize(("create", "end"), [
    ("CREATE TEMP TABLE scratch (v int)", "DROP TABLE scratch"),
    ("CREATE TEMP TABLE public_scratch (v int)", "DROP TABLE IF EXISTS other, pg_temp.public_scratch CASCADE"),
    ('CREATE TEMP TABLE "Scratch" (v int)', 'DROP TABLE "Scratch"'),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE c"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE ALL"),
    ("PREPARE q AS SELECT 1", "DEALLOCATE q"),
    ("PREPARE q AS SELECT 1", "DEALLOCATE PREPARE ALL"),
])
def test_ended_in_the_same_transaction_is_fine_in_another_it_is_not(create: str, end: str) -> None:
    same = [Statement("s", "3/7", "BEGIN"), Statement("s", "3/7", create), Statement("s", "3/7", "SELECT 1"),
            Statement("s", "3/7", end), Statement("s", "3/7", "COMMIT")]
    assert analyse(same) == []
    later = [Statement("s", "3/7", create), Statement("s", "3/8", end)]
    assert len(analyse(later)) == 1
    autocommit = [Statement("s", None, create), Statement("s", None, end)]
    assert len(analyse(autocommit)) == 1
    other_session = [Statement("s", "3/7", create), Statement("t", "3/7", end)]
    assert len(analyse(other_session)) == 1
    end_before = [Statement("s", "3/7", end), Statement("s", "3/7", create)]
    assert len(analyse(end_before)) == 1
    assert kinds(f"{create}; {end}", transaction="3/9") == []  # one simple query: one implicit transaction


def test_protocol_level_named_statements_are_flagged_unnamed_ones_not() -> None:
    found = analyse([Statement("s", "3/1", "SELECT $1", prepared="_pg3_0"),
                     Statement("s", "3/2", "SELECT $1", prepared="_pg3_0"),
                     Statement("t", "4/1", "SELECT $1", prepared="_pg3_3"),
                     Statement("s", "3/3", "SELECT $1")])
    assert [(f.kind, f.count) for f in found] == [(Kind.PREPARED_STATEMENT, 3)]
    assert found[0].statement == "SELECT $1  [executed as named statement _pg3_0]"


def test_findings_are_merged_by_kind_shape_and_where_with_a_count() -> None:
    found = analyse([
        Statement("a", None, "SELECT pg_advisory_lock(1)", where="app.py:3 in work"),
        Statement("b", None, "select  pg_advisory_lock( 2 )", where="app.py:3 in work"),
        Statement("c", None, "SELECT pg_advisory_lock(3)", where="app.py:9 in other"),
        Statement("d", None, "SET search_path TO a"),
        Statement("e", None, "SET search_path TO b"),
    ])
    assert [(f.kind, f.where, f.count, f.statement) for f in found] == [
        (Kind.ADVISORY_LOCK, "app.py:3 in work", 2, "SELECT pg_advisory_lock(1)"),
        (Kind.ADVISORY_LOCK, "app.py:9 in other", 1, "SELECT pg_advisory_lock(3)"),
        (Kind.SESSION_SET, None, 2, "SET search_path TO a"),
    ]


def test_combine_keeps_the_python_frame_and_adds_what_only_the_server_saw() -> None:
    python = analyse([Statement("py:1:1", None, "SELECT pg_advisory_lock(%(id)s)", where="svc.py:10 in lock")])
    server = analyse([Statement("r:1", "3/1", "SELECT pg_advisory_lock(42)"), Statement("r:1", "3/2", "LISTEN x")])
    merged = combine(python, server)
    assert [(f.kind, f.where) for f in merged] == [(Kind.ADVISORY_LOCK, "svc.py:10 in lock"), (Kind.LISTEN, None)]


def test_a_named_statement_only_the_server_saw_takes_the_frame_of_the_same_statement_in_python() -> None:
    seen = [Statement("py:1:1", "tx1", "SELECT 'a' || %(n)s", where="svc.py:20 in lookup")]
    server = analyse([Statement("r:1", "3/1", "SELECT 'a' || $1", prepared="_pg3_0")])
    assert [(f.kind, f.where) for f in combine(analyse(seen), server, seen)] == [
        (Kind.PREPARED_STATEMENT, "svc.py:20 in lookup")]
    assert combine([], server)[0].where is None


def test_tokenizer_reads_literals_identifiers_parameters_and_comments() -> None:
    sql = "SELECT E'a\\'b', $t$x$t$, U&'d\\0061', \"Q\"\"x\", %(p)s, $1, :name, 1.5e3 -- c\n/* a /* b */ c */ ; x::int"
    tokens = list(tokenize(sql))
    assert [(t.type, t.value) for t in tokens] == [
        (TokenType.WORD, "select"), (TokenType.STRING, "a\\'b"), (TokenType.PUNCT, ","), (TokenType.STRING, "x"),
        (TokenType.PUNCT, ","), (TokenType.STRING, "d\\0061"), (TokenType.PUNCT, ","), (TokenType.IDENT, 'Q"x'),
        (TokenType.PUNCT, ","), (TokenType.PARAM, "%(p)s"), (TokenType.PUNCT, ","), (TokenType.PARAM, "$1"),
        (TokenType.PUNCT, ","), (TokenType.PARAM, ":name"), (TokenType.PUNCT, ","), (TokenType.NUMBER, "1.5e3"),
        (TokenType.PUNCT, ";"), (TokenType.WORD, "x"), (TokenType.PUNCT, ":"), (TokenType.PUNCT, ":"),
        (TokenType.WORD, "int"),
    ]
    assert [normalized(s) for s in statements("SET a = 'x'; SELECT 1;;")] == ["set a = ?", "select ?"]
    assert list(tokenize("SELECT 'unterminated")) [-1].value == "unterminated"  # never raises


# --- the server log parser ---------------------------------------------------------------------------

LOG = """\
2026-11-30 16:00:00.001 UTC [100] LOG:  checkpoint starting: time
2026-11-30 16:00:01.000 UTC [200] (6566b1a1.c8 3/12 srht srht 127.0.0.1(40001)) LOG:  statement: BEGIN
2026-11-30 16:00:01.001 UTC [200] (6566b1a1.c8 3/12 srht srht 127.0.0.1(40001)) LOG:  statement: SELECT 'a
\tSET x = 1'
\t  , pg_advisory_lock(1)
2026-11-30 16:00:01.002 UTC [200] (6566b1a1.c8 3/13 srht srht 127.0.0.1(40001)) LOG:  execute <unnamed>: SELECT $1
2026-11-30 16:00:01.002 UTC [200] (6566b1a1.c8 3/13 srht srht 127.0.0.1(40001)) DETAIL:  parameters: $1 = '1'
2026-11-30 16:00:01.003 UTC [201] (6566b1a2.c9 4/2 srht srht 127.0.0.1(40002)) LOG:  execute _pg3_0: SELECT $1::int
2026-11-30 16:00:01.004 UTC [201] (6566b1a2.c9 4/3 srht srht 127.0.0.1(40002)) LOG:  execute S_1/C_2: SELECT 2
2026-11-30 16:00:01.004 UTC [201] (6566b1a2.c9 4/3 srht srht [local]) LOG:  execute fetch from S_1/C_2: SELECT 2
2026-11-30 16:00:01.005 UTC [202] (6566b1a3.ca 5/1 postgres postgres 127.0.0.1(40003)) LOG:  statement: SET x = 1
2026-11-30 16:00:01.006 UTC [203] (6566b1a4.cb 6/1 srht srht [local]) ERROR:  syntax error at or near "LISTEN"
2026-11-30 16:00:01.006 UTC [203] (6566b1a4.cb 6/1 srht srht [local]) STATEMENT:  LISTEN
a line of something else
2026-11-30 16:00:01.007 UTC [203] (6566b1a4.cb  srht srht [local]) LOG:  statement: LISTEN z
"""


def test_parse_log_reads_statements_multiline_and_extended_protocol() -> None:
    found = parse_log(LOG, node="remilia")
    assert found == [
        Statement("remilia:6566b1a1.c8", "3/12", "BEGIN"),
        Statement("remilia:6566b1a1.c8", "3/12", "SELECT 'a\nSET x = 1'\n  , pg_advisory_lock(1)"),
        Statement("remilia:6566b1a1.c8", "3/13", "SELECT $1"),
        Statement("remilia:6566b1a2.c9", "4/2", "SELECT $1::int", prepared="_pg3_0"),
        Statement("remilia:6566b1a2.c9", "4/3", "SELECT 2", prepared="S_1"),
        Statement("remilia:6566b1a4.cb", None, "LISTEN z"),
    ]
    assert [(f.kind, f.count) for f in analyse(found)] == [
        (Kind.ADVISORY_LOCK, 1), (Kind.PREPARED_STATEMENT, 1), (Kind.PREPARED_STATEMENT, 1), (Kind.LISTEN, 1)]
    assert parse_log(LOG, exclude_users=())[5].text == "SET x = 1"  # the admin role, when asked for


def test_only_sessions_of_pgbouncer_server_connections_are_kept() -> None:
    bouncer_log = (
        "2026-11-30 16:00:00.500 UTC [300] LOG S-0x5: srht/srht@127.0.0.1:5432 new connection to server "
        "(from 127.0.0.1:40001)\n"
        "2026-11-30 15:00:00.000 UTC [300] LOG S-0x6: srht/srht@127.0.0.1:5432 new connection to server "
        "(from 127.0.0.1:40002)\n"  # the same port an hour earlier: another connection
        "2026-11-30 16:00:02.000 UTC [300] LOG C-0x7: srht/srht@127.0.0.1:51000 login attempt: db=srht user=srht\n"
    )
    connections = bouncer_connections(bouncer_log)
    assert set(connections) == {"40001", "40002"}
    # 6566b1a1 is 2023-11-29 04:37:21 UTC in the synthetic log: give it PgBouncer's timestamp instead
    start = int(connections["40001"][0])
    log = LOG.replace("6566b1a1", f"{start:x}").replace("6566b1a2", f"{start:x}")
    kept = parse_log(log, keep=through_bouncer(connections))
    assert {s.session for s in kept} == {f"{start:x}.c8"}


def test_the_prefix_the_parser_reads_is_the_one_the_server_is_given() -> None:
    assert LOG_PREFIX == "%m [%p] %q(%c %v %u %d %r) "


# --- the report --------------------------------------------------------------------------------------


def test_text_report_has_a_block_per_finding_and_json_a_list() -> None:
    found = [Finding(Kind.LISTEN, "LISTEN jobs", "svc/jobs.py:12 in wait", 3, "listen jobs"),
             Finding(Kind.TEMP_TABLE, "CREATE TEMP TABLE t (v int)", None)]
    text = render_text(found)
    assert text.startswith("[listen] LISTEN / UNLISTEN, seen 3 times\n  statement: LISTEN jobs\n"
                           "  where:     svc/jobs.py:12 in wait\n  why:       LISTEN subscribes")
    assert "\n\n[temp-table] temporary table that outlives its transaction, seen once\n" in text
    assert "  where:     not known (seen in the server log only)\n" in text
    assert "  fix:       CREATE TEMP TABLE ... ON COMMIT DROP" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    data = json.loads(render_json(found))
    assert [d["kind"] for d in data] == ["listen", "temp-table"]
    assert set(data[0]) == {"kind", "title", "count", "statement", "where", "why", "fix", "normalized"}
    statements_seen = [Statement("a", None, "SELECT 1"), Statement("b", None, "LISTEN jobs")]
    assert headline(found, statements_seen) == "2 finding(s) (listen, temp-table) in 2 statement(s) from 2 session(s)"
    assert headline([], statements_seen) == "no session-level use found in 2 statement(s) from 2 session(s)"


def test_every_kind_has_a_title_an_explanation_and_a_fix() -> None:
    for kind in Kind:
        f = Finding(kind, "x", None)
        assert f.title and len(f.why) > 80 and f.fix


# --- the SQLAlchemy hook, on SQLite (no server needed) ----------------------------------------------


def test_sqlalchemy_hook_records_statement_transaction_and_the_callers_frame() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine("sqlite://")
    recorder = SqlAlchemyRecorder().install(engine)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.execute(sa.text("SELECT 2"))
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 3"))
    finally:
        recorder.uninstall()
        engine.dispose()
    texts = [s for s in recorder.statements if s.text.startswith("SELECT")]
    assert [s.text for s in texts] == ["SELECT 1", "SELECT 2", "SELECT 3"]
    assert texts[0].transaction is not None and texts[0].transaction == texts[1].transaction != texts[2].transaction
    assert len({s.session for s in texts}) == 1  # one pooled DBAPI connection
    line = test_sqlalchemy_hook_records_statement_transaction_and_the_callers_frame.__code__.co_firstlineno
    assert texts[0].where == f"tests/test_audit.py:{line + 7} in test_sqlalchemy_hook_records_statement_" \
                             "transaction_and_the_callers_frame"


def test_sqlalchemy_hook_records_only_the_addresses_asked_for() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine("sqlite://")
    recorder = SqlAlchemyRecorder(addresses={"127.0.0.1:6432"}).install(engine)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        recorder.uninstall()
        engine.dispose()
    assert recorder.statements == []


def test_sitecustomize_hooks_sqlalchemy_in_a_child_process_and_keeps_the_one_it_hides(tmp_path: Path) -> None:
    record = tmp_path / "python.jsonl"
    code = textwrap.dedent("""\
        import sys
        assert "sqlalchemy" not in sys.modules  # nothing imported before the program asks for it
        import sqlalchemy as sa

        def lock(conn):
            conn.execute(sa.text("SELECT pg_advisory_lock(1)"))

        engine = sa.create_engine("sqlite://")
        with engine.connect() as conn:
            try:
                lock(conn)
            except sa.exc.OperationalError:
                pass  # SQLite has no such function; the statement was sent all the same
        import builtins
        assert builtins.HIDDEN_SITECUSTOMIZE_RAN
    """)
    hidden = tmp_path / "hidden"  # a sitecustomize further down the path (Debian's Python ships one)
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import builtins\nbuiltins.HIDDEN_SITECUSTOMIZE_RAN = True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(hidden)]),
           "SRHT_READONLY_AUDIT_RECORD": str(record)}
    env.pop("SRHT_READONLY_AUDIT_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recorded = read_json_lines(record)
    assert [(s.text, s.where) for s in recorded if "advisory" in s.text] == [
        ("SELECT pg_advisory_lock(1)", "<string>:6 in lock")]
    assert [f.kind for f in analyse(recorded)] == [Kind.ADVISORY_LOCK]


# --- the command's usage errors (no lab is started) ----------------------------------------------


def test_audit_without_a_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(audit, [])
    assert result.exit_code == 2
    assert "Missing argument 'COMMAND...'" in result.output


def test_audit_on_a_directory_without_a_lab_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, ["--dir", str(tmp_path), "--", "true"])
    assert result.exit_code == 2, result.output
    assert f"no lab in {tmp_path}" in result.output


# === on the lab: PostgreSQL's statement log, PgBouncer in transaction mode ===========================


class Audited:
    """The lab's primary logging every statement; ``findings(snippet)`` audits what ``snippet`` sends."""

    def __init__(self, lab: Any, log: ServerLog) -> None:
        self.lab = lab
        self.log = log
        self.statements: list[Statement] = []

    def bouncer(self, *, autocommit: bool = False) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self.lab.pgbouncer.dsn, connect_timeout=5)
        conn.autocommit = autocommit
        return conn

    def findings(self, snippet: Callable[[Audited], None]) -> list[Finding]:
        self.log.mark()
        snippet(self)
        self.statements = self.log.statements()
        return analyse(self.statements)


@pytest.fixture(scope="module")
def audited(srht_lab: Any) -> Iterator[Audited]:
    log = ServerLog(srht_lab.node(srht_lab.pgbouncer.target), bouncers=srht_lab.bouncers)
    log.start()
    try:
        yield Audited(srht_lab, log)
    finally:
        log.stop()


def _run(*sql: str, autocommit: bool = False, ignore: type[Exception] | tuple[type[Exception], ...] = ()
         ) -> Callable[[Audited], None]:
    """A snippet: ``sql`` through PgBouncer with psycopg2, in one transaction (or autocommit), committed."""

    def snippet(a: Audited) -> None:
        conn = a.bouncer(autocommit=autocommit)
        try:
            with conn.cursor() as cur:
                for statement in sql:
                    try:
                        cur.execute(statement)
                    except ignore:
                        if not autocommit:
                            conn.rollback()
            if not autocommit:
                conn.commit()
        finally:
            conn.close()

    return snippet


def _listen_direct_notify_through_bouncer(a: Audited) -> None:
    """LISTEN's right place: a connection straight to PostgreSQL; NOTIFY through PgBouncer."""
    direct = psycopg2.connect(a.lab.primary.dsn, connect_timeout=5)
    direct.autocommit = True
    try:
        direct.cursor().execute("LISTEN srht_audit_jobs")
        _run("NOTIFY srht_audit_jobs, 'hello'")(a)
        deadline = time.monotonic() + 5
        while not direct.notifies and time.monotonic() < deadline:
            direct.poll()
            time.sleep(0.02)
        assert [n.payload for n in direct.notifies] == ["hello"]
    finally:
        direct.close()


def _named_cursor(withhold: bool) -> Callable[[Audited], None]:
    def snippet(a: Audited) -> None:
        conn = a.bouncer()
        try:
            cur = conn.cursor("srht_audit_cursor", withhold=withhold)
            cur.execute("SELECT generate_series(1, 5)")
            if withhold:
                conn.commit()  # the cursor outlives it: the next FETCH is in another transaction
            assert [r[0] for r in cur.fetchall()] == [1, 2, 3, 4, 5]
            cur.close()
            conn.commit()
        finally:
            conn.close()

    return snippet


def _psycopg3(prepare: bool) -> Callable[[Audited], None]:
    """psycopg 3 with the extended protocol; ``prepare=True`` makes it a named statement (``_pg3_N``)."""

    def snippet(a: Audited) -> None:
        with psycopg.connect(a.lab.pgbouncer.dsn, connect_timeout=5) as conn, conn.transaction():
            for n in range(3):
                row = conn.execute("SELECT %s::int + 1", (n,), prepare=prepare).fetchone()
                assert row == (n + 1,)
            if prepare:  # leave no named statement on PgBouncer's server connection
                conn.execute("DEALLOCATE ALL", prepare=False)

    return snippet


#: kind -> (a deliberately wrong snippet, its correct form, what the correct form sends)
CASES: dict[str, tuple[Kind, Callable[[Audited], None], Callable[[Audited], None], str]] = {
    "set": (Kind.SESSION_SET, _run("SET statement_timeout = '5s'", "RESET statement_timeout", autocommit=True),
            _run("SET LOCAL statement_timeout = '5s'", "SELECT 1"), "SET LOCAL statement_timeout"),
    "set_config": (Kind.SESSION_SET, _run("SELECT set_config('srht_audit.user', '42', false)", autocommit=True),
                   _run("SELECT set_config('srht_audit.user', '42', true)"), "'42', true)"),
    "listen": (Kind.LISTEN, _run("LISTEN srht_audit_jobs", "UNLISTEN srht_audit_jobs"),
               _listen_direct_notify_through_bouncer, "NOTIFY srht_audit_jobs"),
    "advisory_lock": (Kind.ADVISORY_LOCK,  # inside one transaction, and still wrong: the lock outlives it
                      _run("SELECT pg_advisory_lock(4242)", "SELECT pg_advisory_unlock(4242)"),
                      _run("SELECT pg_advisory_xact_lock(4242)"), "pg_advisory_xact_lock(4242)"),
    "try_advisory_lock_shared": (Kind.ADVISORY_LOCK,
                                 _run("SELECT pg_try_advisory_lock_shared(4243)",
                                      "SELECT pg_advisory_unlock_shared(4243)", autocommit=True),
                                 _run("SELECT pg_try_advisory_xact_lock_shared(4243)"), "xact_lock_shared(4243)"),
    "sql_prepare": (Kind.PREPARED_STATEMENT,
                    _run("PREPARE srht_audit_q AS SELECT 1", "EXECUTE srht_audit_q", "DEALLOCATE srht_audit_q",
                         autocommit=True, ignore=psycopg2.errors.InvalidSqlStatementName),
                    _run("PREPARE srht_audit_q AS SELECT 1", "EXECUTE srht_audit_q", "DEALLOCATE srht_audit_q"),
                    "DEALLOCATE srht_audit_q"),
    "protocol_named_statement": (Kind.PREPARED_STATEMENT, _psycopg3(prepare=True), _psycopg3(prepare=False),
                                 "SELECT $1::int + 1"),
    "temp_table": (Kind.TEMP_TABLE,
                   _run("CREATE TEMP TABLE srht_audit_t (v int)", "INSERT INTO srht_audit_t VALUES (1)",
                        "DROP TABLE srht_audit_t", autocommit=True),
                   _run("CREATE TEMP TABLE srht_audit_t (v int) ON COMMIT DROP",
                        "INSERT INTO srht_audit_t VALUES (1)"),
                   "ON COMMIT DROP"),
    "temp_table_dropped_in_its_transaction": (
        Kind.TEMP_TABLE, _run("CREATE TEMP TABLE srht_audit_t2 AS SELECT 1 AS v", "SELECT * FROM srht_audit_t2",
                              "DROP TABLE srht_audit_t2", autocommit=True),
        _run("CREATE TEMP TABLE srht_audit_t2 AS SELECT 1 AS v", "SELECT * FROM srht_audit_t2",
             "DROP TABLE srht_audit_t2"), "DROP TABLE srht_audit_t2"),
    "with_hold_cursor": (Kind.WITH_HOLD_CURSOR, _named_cursor(withhold=True), _named_cursor(withhold=False),
                         "CURSOR WITHOUT HOLD"),
    # DISCARD's and LOAD's fix is not to send them: their "correct form" is the same words where
    # they are not SQL (a literal, a comment), which the audit must not mistake for statements.
    "discard": (Kind.DISCARD, _run("DISCARD ALL", autocommit=True),
                _run("SELECT 'DISCARD ALL' AS words -- DISCARD ALL"), "SELECT 'DISCARD ALL'"),
    "load": (Kind.LOAD, _run("LOAD 'auto_explain'", autocommit=True, ignore=psycopg2.errors.InsufficientPrivilege),
             _run("/* LOAD 'auto_explain' */ SELECT $$LOAD 'auto_explain'$$"), "SELECT $$LOAD"),
}


@pytest.mark.lab
@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_is_detected_through_pgbouncer_and_its_correct_form_is_not(audited: Audited, case: str) -> None:
    kind, wrong, right, sent = CASES[case]
    found = audited.findings(wrong)
    assert found and {f.kind for f in found} == {kind}, (found, audited.statements)
    assert found[0].where is None  # psycopg2 and psycopg 3 straight: only the server saw it
    clean = audited.findings(right)
    assert clean == [], (clean, audited.statements)
    assert any(sent in s.text for s in audited.statements), audited.statements  # it was seen, and judged fine


@pytest.mark.lab
def test_protocol_named_statements_show_in_the_log_with_their_name(audited: Audited) -> None:
    found = audited.findings(_psycopg3(prepare=True))
    assert [(f.kind, f.count) for f in found] == [(Kind.PREPARED_STATEMENT, 3)]
    assert found[0].statement.startswith("SELECT $1::int + 1  [executed as named statement _pg3_")
    audited.findings(_psycopg3(prepare=False))
    assert {s.prepared for s in audited.statements} == {None}


@pytest.mark.lab
def test_a_leaked_setting_reaches_another_client_and_pgbouncer_carries_only_its_five(audited: Audited) -> None:
    """Why session SET is reported (and SET TimeZone is not), on the real PgBouncer: one server connection
    serves two clients in turn; a custom setting leaks from one to the other, TimeZone does not."""
    a, b = audited.bouncer(autocommit=True), audited.bouncer()
    try:
        with a.cursor() as cur:
            cur.execute("SET srht_audit.leak = 'from a'; SET TimeZone = 'Asia/Tokyo'; SELECT pg_backend_pid()")
            (pid_a,) = cur.fetchone()
        with b.cursor() as cur:  # PgBouncer hands out the server connection it got back last: a's
            cur.execute("SELECT pg_backend_pid(), current_setting('srht_audit.leak', true), "
                        "current_setting('TimeZone')")
            pid_b, leaked, zone_b = cur.fetchone()
        b.commit()
        with a.cursor() as cur:
            cur.execute("SELECT current_setting('TimeZone'); RESET srht_audit.leak; RESET TimeZone")
    finally:
        a.close()
        b.close()
    assert pid_b == pid_a
    assert leaked == "from a"
    assert zone_b != "Asia/Tokyo"


# --- srht-readonly audit, end to end -----------------------------------------------------------------

BAD = textwrap.dedent("""\
    import os
    import psycopg2
    import sqlalchemy as sa

    def remember_user(conn):
        conn.execute(sa.text("SELECT set_config('srht.user', :u, false)"), {"u": "alice"})

    engine = sa.create_engine(os.environ["DATABASE_URL"])
    with engine.begin() as conn:
        remember_user(conn)
    engine.dispose()
    raw = psycopg2.connect(os.environ["DATABASE_URL"])
    raw.autocommit = True
    raw.cursor().execute("LISTEN jobs")
    raw.close()
    print("done")
""")

CLEAN_SNIPPET = textwrap.dedent("""\
    import os
    import sqlalchemy as sa

    engine = sa.create_engine(os.environ["DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT set_config('srht.user', :u, true)"), {"u": "alice"})
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7)"))
        conn.execute(sa.text("SET LOCAL statement_timeout = '5s'"))
    engine.dispose()
""")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "audit", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.lab
def test_audit_command_on_a_new_lab_reports_each_finding_and_exits_1() -> None:
    started = time.monotonic()
    result = cli("--json", "--", sys.executable, "-c", BAD)
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)
    assert [(f["kind"], f["where"]) for f in findings] == [
        ("session-set", "<string>:6 in remember_user"),  # SQLAlchemy: the hook knows the frame
        ("listen", None),  # psycopg2 straight: the server log only
    ]
    assert findings[0]["statement"] == "SELECT set_config('srht.user', %(u)s, false)"
    assert "done" in result.stderr  # the command's output goes to stderr
    assert "starting a lab" in result.stderr and "2 finding(s) (session-set, listen)" in result.stderr
    print(f"audit on a new lab: {time.monotonic() - started:.1f} s")


@pytest.mark.lab
def test_audit_command_on_a_running_lab_exits_0_when_clean_and_leaves_it_as_it_was(srht_lab: Any) -> None:
    node = srht_lab.node(srht_lab.pgbouncer.target)
    before = node.server.settings()
    result = cli("--dir", str(srht_lab.directory), "--", sys.executable, "-c", CLEAN_SNIPPET)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout == "No session-level use found.\n"
    assert "no session-level use found in" in result.stderr
    assert node.server.settings() == before  # logging is as it was (this module's own recorder may be on)
    assert sql.query_one(node.admin_dsn, "SHOW log_statement") == (before.get("log_statement", "none"),)


@pytest.mark.lab
def test_audit_command_exit_statuses_of_a_failing_or_missing_command(srht_lab: Any) -> None:
    failing = cli("--dir", str(srht_lab.directory), "--", sys.executable, "-c", "raise SystemExit(5)")
    assert failing.returncode == 3, failing.stderr
    assert "failed (exit 5)" in failing.stderr
    missing = cli("--dir", str(srht_lab.directory), "--", "/nonexistent/program")
    assert missing.returncode == 2, missing.stderr
    assert "cannot run /nonexistent/program" in missing.stderr


def _block(page: str, starting: str) -> str:
    """The fenced block of ``page`` whose first line is ``starting`` (without its fences)."""
    start = page.index("\n" + starting) + 1
    return page[start:page.index("\n```", start) + 1]


@pytest.mark.lab
def test_the_documented_example_prints_what_the_docs_show(srht_lab: Any, tmp_path: Path) -> None:
    page = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    (tmp_path / "bad.py").write_text(_block(page, "# bad.py\n").split("\n", 1)[1])
    run = [CLI, "audit", "--dir", str(srht_lab.directory), "--", sys.executable, "bad.py"]
    text = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert text.returncode == 1, text.stderr
    assert text.stdout == _block(page, "[session-set] ")
    as_json = subprocess.run(run[:2] + ["--json"] + run[2:], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
    lines = "".join(f"{f['kind']} {f['where'] or 'null'}\n" for f in json.loads(as_json.stdout))
    assert lines == _block(page, "session-set bad.py:")
    assert {f["kind"] for f in json.loads(as_json.stdout)} == {str(k) for k in Kind}  # every kind, for real


# --- the pytest option ------------------------------------------------------------------------------

INNER = textwrap.dedent("""\
    import psycopg2
    import sqlalchemy as sa


    def test_a_worker(srht_lab):
        engine = sa.create_engine(srht_lab.pgbouncer.url)
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(99)"))
            conn.execute(sa.text("SELECT pg_advisory_unlock(99)"))
        engine.dispose()
        conn = psycopg2.connect(srht_lab.pgbouncer.dsn)
        conn.autocommit = True
        conn.cursor().execute("LISTEN jobs")
        conn.close()
        direct = psycopg2.connect(srht_lab.primary.dsn)  # not through PgBouncer: not audited
        direct.autocommit = True
        direct.cursor().execute("SET search_path TO public")
        direct.close()


    def test_a_fresh_lab(srht_fresh_lab):
        conn = psycopg2.connect(srht_fresh_lab.pgbouncer.dsn)
        conn.cursor().execute("CREATE TEMP TABLE t (v int)")
        conn.commit()
        conn.close()
""")


@pytest.mark.lab
def test_pytest_option_reports_the_findings_of_a_test_suite_at_the_end(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("--srht-audit", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)  # findings are reported, they do not fail the run
    out = result.stdout.str()
    section = out[out.index("srht-readonly audit"):]
    assert "[advisory-lock] session-level advisory lock, seen once" in section
    assert "where:     test_inner.py:8 in test_a_worker" in section
    assert "[listen] LISTEN / UNLISTEN, seen once" in section
    assert "[temp-table] temporary table that outlives its transaction, seen once" in section
    assert "search_path" not in section
    verdict = section[section.index("srht-readonly audit: 3 finding(s) ("):].splitlines()[0]
    assert verdict.endswith("on 2 lab(s)"), verdict


# --- the stand-in services ---------------------------------------------------------------------------


# On labs of their own: the stand-ins' tables go in the application database.


@pytest.mark.lab
def test_every_stand_in_under_drill_traffic_audits_clean() -> None:
    result = cli("--", sys.executable, "-m", "integrations.drill.exercise", "--seconds", "3", timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout
    for service in ("web", "ssh", "builds", "celery"):
        assert f"\n{service}: " in result.stderr, result.stderr
    statements = int(result.stderr.rsplit("no session-level use found in ", 1)[1].split(" ")[0])
    assert statements > 500, result.stderr
