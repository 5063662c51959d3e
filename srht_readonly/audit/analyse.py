"""Pure logic: recorded statements in, findings out.

A ``Statement`` is what a recorder saw: the session (server connection, or client connection for
the SQLAlchemy hook) and transaction it ran in, its text, the Python frame that sent it when
known, and the name of the protocol-level prepared statement it executed (None when unnamed).
``analyse(statements)`` flags every session-level use (``findings.Kind``) and merges repeats:
one ``Finding`` per (kind, normalized statement, where), with a count.

What is *not* flagged, because it ends with its transaction: ``SET LOCAL``, ``SET TRANSACTION``,
``SET CONSTRAINTS``, ``set_config(..., true)``, ``pg_advisory_xact_lock``, ``CREATE TEMP TABLE
... ON COMMIT DROP``; a temporary table dropped, a ``WITH HOLD`` cursor closed or a SQL
``PREPARE`` deallocated later in the *same* transaction of the same session; settings PgBouncer
carries from client to server connection itself (``TRACKED``). Text inside string literals,
quoted identifiers and comments is never read as SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .findings import Finding, Kind
from .tokens import Token, TokenType, normalized, statements

__all__ = ["TRACKED", "Statement", "analyse", "combine"]

#: Parameters PgBouncer tracks per client and sets on each server connection it hands over
#: (the GUC_REPORT ones): a session SET of these is carried, not leaked.
TRACKED = frozenset({"client_encoding", "datestyle", "timezone", "standard_conforming_strings", "application_name"})

SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                           "pg_try_advisory_lock_shared"})
_FALSE = frozenset({"false", "f", "fa", "fal", "fals", "off", "of", "no", "n", "0"})
_TRUE = frozenset({"true", "t", "tr", "tru", "on", "yes", "ye", "y", "1"})
#: Longest statement text kept in a finding.
MAX_TEXT = 500


@dataclass(frozen=True)
class Statement:
    """One statement as a recorder saw it.

    ``transaction`` is None when the statement ran in a transaction of its own (autocommit) as
    far as the recorder knows; ``prepared`` names the protocol-level prepared statement it was
    executed as (None: unnamed, or the simple protocol).
    """

    session: str
    transaction: str | None
    text: str
    where: str | None = None
    prepared: str | None = None


@dataclass(frozen=True)
class _Hit:
    kind: Kind
    tokens: list[Token]
    # (kind, name) of the object a later statement of the same transaction may drop/close/deallocate
    pending: tuple[str, str] | None = None
    shape: str | None = None  # what tells occurrences apart, when not the normalized statement


@dataclass
class _Tally:
    first: Finding
    count: int = 0
    order: int = 0


def analyse(stream: Iterable[Statement]) -> list[Finding]:
    """The findings in ``stream``, one per (kind, normalized statement, where), in order of first sight."""
    recorded = list(stream)
    hits: list[tuple[int, int, Statement, _Hit]] = []
    ended: dict[tuple[str, str], list[tuple[int, int, str, str]]] = {}  # (session, tx) -> [(i, j, kind, name)]
    for i, st in enumerate(recorded):
        if st.prepared is not None:
            hits.append((i, -1, st, _Hit(Kind.PREPARED_STATEMENT, list(_tokens_of(st.text)))))
        for j, tokens in enumerate(statements(st.text)):
            for hit in _flag(tokens):
                hits.append((i, j, st, hit))
            if st.transaction is not None:
                for what, name in _ends(tokens):
                    ended.setdefault((st.session, st.transaction), []).append((i, j, what, name))
    tallies: dict[tuple[Kind, str, str | None], _Tally] = {}
    for i, j, st, hit in hits:
        if hit.pending is not None and st.transaction is not None and _ended_later(
                ended.get((st.session, st.transaction), []), (i, j), hit.pending):
            continue
        shape = hit.shape or normalized(hit.tokens)
        key = (hit.kind, shape, st.where)
        tally = tallies.get(key)
        if tally is None:
            if j < 0:  # a protocol-level named statement: the whole text, and its name
                text = f"{_short(st.text)}  [executed as named statement {st.prepared}]"
            else:
                text = _short(st.text[hit.tokens[0].start:hit.tokens[-1].end])
            tally = tallies[key] = _Tally(Finding(hit.kind, text, st.where, normalized=shape), order=len(tallies))
        tally.count += 1
    return [Finding(t.first.kind, t.first.statement, t.first.where, t.count, t.first.normalized)
            for t in sorted(tallies.values(), key=lambda t: t.order)]


def combine(python: Sequence[Finding], server: Sequence[Finding], seen: Iterable[Statement] = ()) -> list[Finding]:
    """Findings of both recorders: the server's only where the SQLAlchemy hook did not see the same statement.

    The hook knows the Python frame; the server log sees every client (and the values of
    parameters, and which statements ran as named prepared statements). A statement both saw is
    reported once, with its frame. A finding only the server made (a psycopg 3 engine preparing
    a statement, say) takes the frame of a statement of the same shape the hook recorded
    (``seen``), when there is one.
    """
    known = {(f.kind, f.normalized) for f in python}
    frames: dict[str, str] = {}
    for st in seen:
        if st.where is not None:
            frames.setdefault(normalized(list(_tokens_of(st.text))), st.where)
    merged = list(python)
    for f in server:
        if (f.kind, f.normalized) in known:
            continue
        where = f.where or frames.get(f.normalized)
        merged.append(Finding(f.kind, f.statement, where, f.count, f.normalized))
    return merged


def _flag(tokens: list[Token]) -> list[_Hit]:
    """The session-level uses in one statement's tokens (usually none, at most a few)."""
    if not tokens:
        return []
    first = tokens[0]
    hits: list[_Hit] = []
    if first.is_word("set"):
        if _session_set(tokens[1:]):
            hits.append(_Hit(Kind.SESSION_SET, tokens, shape=_set_shape(tokens)))
    elif first.is_word("reset"):
        if not (len(tokens) > 1 and _parameter(tokens[1:]) in TRACKED):
            hits.append(_Hit(Kind.SESSION_SET, tokens))
    elif first.is_word("listen", "unlisten"):
        hits.append(_Hit(Kind.LISTEN, tokens))
    elif first.is_word("prepare") and not (len(tokens) > 1 and tokens[1].is_word("transaction")):
        name = _name(tokens[1]) if len(tokens) > 1 else ""
        hits.append(_Hit(Kind.PREPARED_STATEMENT, tokens, ("prepare", name)))
    elif first.is_word("declare"):
        hold = _declare_with_hold(tokens)
        if hold is not None:
            hits.append(_Hit(Kind.WITH_HOLD_CURSOR, tokens, ("cursor", hold)))
    elif first.is_word("discard"):
        hits.append(_Hit(Kind.DISCARD, tokens))
    elif first.is_word("load"):
        hits.append(_Hit(Kind.LOAD, tokens))
    elif first.is_word("create"):
        temp = _create_temp(tokens)
        if temp is not None:
            hits.append(_Hit(Kind.TEMP_TABLE, tokens, ("relation", temp)))
    temp_into = _select_into_temp(tokens)
    if temp_into is not None:
        hits.append(_Hit(Kind.TEMP_TABLE, tokens, ("relation", temp_into)))
    for index, token in enumerate(tokens):
        if token.type is not TokenType.WORD or index + 1 >= len(tokens) or not tokens[index + 1].is_punct("("):
            continue
        if token.value in SESSION_LOCKS:
            hits.append(_Hit(Kind.ADVISORY_LOCK, tokens))
        elif token.value == "set_config" and _set_config_is_session(tokens, index + 1):
            hits.append(_Hit(Kind.SESSION_SET, tokens))
    return hits


# --- the rules ---------------------------------------------------------------------------------


def _session_set(rest: list[Token]) -> bool:
    """``SET <rest>``: does it change the session (True) or only the transaction (False)?"""
    if not rest:
        return False
    head = rest[0]
    if head.is_word("local", "transaction", "constraints"):
        return False
    if head.is_word("session"):
        rest = rest[1:]
        if not rest:
            return True
        if rest[0].is_word("characteristics", "authorization"):
            return True
    if rest[0].is_word("time") and len(rest) > 1 and rest[1].is_word("zone"):
        return False  # SET TIME ZONE: TimeZone, tracked
    if rest[0].is_word("names"):
        return False  # SET NAMES: client_encoding, tracked
    return _parameter(rest) not in TRACKED


def _set_shape(tokens: list[Token]) -> str:
    """``SET name TO value``: one shape whatever the value (``set name to ?``)."""
    for index, t in enumerate(tokens):
        if t.is_word("to") or t.is_punct("="):
            return normalized(tokens[:index + 1]) + " ?"
    return normalized(tokens)


def _parameter(tokens: list[Token]) -> str:
    """The (possibly dotted) parameter name at the start of ``tokens``, lowercased unless quoted."""
    parts: list[str] = []
    expect_name = True
    for t in tokens:
        if expect_name and t.type in (TokenType.WORD, TokenType.IDENT):
            parts.append(t.value)
            expect_name = False
        elif not expect_name and t.is_punct("."):
            expect_name = True
        else:
            break
    return ".".join(parts)


def _name(token: Token) -> str:
    return token.value if token.type in (TokenType.WORD, TokenType.IDENT) else token.text


def _declare_with_hold(tokens: list[Token]) -> str | None:
    """``DECLARE name ... CURSOR WITH HOLD FOR ...``: the cursor's name, or None without WITH HOLD."""
    if len(tokens) < 2:
        return None
    for a, b in zip(tokens, tokens[1:], strict=False):
        if a.is_word("for"):
            return None
        if a.is_word("with") and b.is_word("hold"):
            return _name(tokens[1])
    return None


def _create_temp(tokens: list[Token]) -> str | None:
    """``CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY [RECURSIVE] TABLE|VIEW|SEQUENCE name``
    without ``ON COMMIT DROP``: the relation's name, else None."""
    i = 1
    if i + 1 < len(tokens) and tokens[i].is_word("or") and tokens[i + 1].is_word("replace"):
        i += 2
    if i < len(tokens) and tokens[i].is_word("global", "local"):
        i += 1
    if not (i < len(tokens) and tokens[i].is_word("temp", "temporary")):
        return None
    i += 1
    if i < len(tokens) and tokens[i].is_word("recursive"):
        i += 1
    if not (i < len(tokens) and tokens[i].is_word("table", "view", "sequence")):
        return None
    i += 1
    if i + 2 < len(tokens) and tokens[i].is_word("if") and tokens[i + 1].is_word("not") \
            and tokens[i + 2].is_word("exists"):
        i += 3
    if _on_commit_drop(tokens):
        return None
    return _relation(tokens[i:]) if i < len(tokens) else ""


def _select_into_temp(tokens: list[Token]) -> str | None:
    """``SELECT ... INTO [TEMP|TEMPORARY] [TABLE] name``, at the top level: the name, else None."""
    if not tokens[0].is_word("select", "with"):
        return None
    depth = 0
    for index, t in enumerate(tokens):
        if t.is_punct("("):
            depth += 1
        elif t.is_punct(")"):
            depth -= 1
        elif depth == 0 and t.is_word("into") and index + 1 < len(tokens):
            nxt = tokens[index + 1]
            if nxt.is_word("temp", "temporary"):
                rest = tokens[index + 2:]
                if rest and rest[0].is_word("table"):
                    rest = rest[1:]
                return _relation(rest) if rest else ""
            return None
    return None


def _on_commit_drop(tokens: list[Token]) -> bool:
    return any(a.is_word("on") and b.is_word("commit") and c.is_word("drop")
               for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False))


def _relation(tokens: list[Token]) -> str:
    """The last part of a (possibly schema-qualified) name at the start of ``tokens``."""
    name = _parameter(tokens)
    return name.rsplit(".", 1)[-1]


def _set_config_is_session(tokens: list[Token], open_paren: int) -> bool:
    """``set_config(name, value, is_local)``: True when ``is_local`` is false (literally).

    A parameter or an expression there cannot be judged from the text: not flagged (the
    server log, which sees the value sent, judges it). A tracked setting is not flagged either.
    """
    args: list[list[Token]] = [[]]
    depth = 0
    for t in tokens[open_paren + 1:]:
        if t.is_punct("("):
            depth += 1
        elif t.is_punct(")"):
            if depth == 0:
                break
            depth -= 1
        elif t.is_punct(",") and depth == 0:
            args.append([])
            continue
        args[-1].append(t)
    if len(args) != 3:
        return False
    name = args[0]
    if len(name) == 1 and name[0].type is TokenType.STRING and name[0].value.lower() in TRACKED:
        return False
    is_local = [t for t in args[2] if not (t.is_punct(":") or t.is_word("boolean", "bool"))]
    if len(is_local) != 1:
        return False
    value = is_local[0]
    if value.type is TokenType.WORD:
        return value.value == "false"
    if value.type in (TokenType.STRING, TokenType.NUMBER):
        return value.value.strip().lower() in _FALSE
    return False


def _ends(tokens: list[Token]) -> list[tuple[str, str]]:
    """What ``tokens`` drops, closes or deallocates: ``(kind, name)``; ``name`` ``*`` for ALL."""
    if not tokens:
        return []
    first = tokens[0]
    if first.is_word("drop") and len(tokens) > 2 and tokens[1].is_word("table", "view", "sequence"):
        rest = tokens[2:]
        if len(rest) > 1 and rest[0].is_word("if") and rest[1].is_word("exists"):
            rest = rest[2:]
        names, expect = [], True
        for index, t in enumerate(rest):
            if expect and t.type in (TokenType.WORD, TokenType.IDENT):
                names.append(_relation(rest[index:]))
                expect = False
            elif t.is_punct(","):
                expect = True
        return [("relation", n) for n in names]
    if first.is_word("close") and len(tokens) > 1:
        return [("cursor", "*" if tokens[1].is_word("all") else _name(tokens[1]))]
    if first.is_word("deallocate") and len(tokens) > 1:
        rest = tokens[2:] if tokens[1].is_word("prepare") else tokens[1:]
        if rest:
            return [("prepare", "*" if rest[0].is_word("all") else _name(rest[0]))]
    return []


def _ended_later(ends: list[tuple[int, int, str, str]], at: tuple[int, int], pending: tuple[str, str]) -> bool:
    what, name = pending
    return any((i, j) > at and w == what and n in (name, "*") for i, j, w, n in ends)


def _tokens_of(text: str) -> Iterable[Token]:
    return [t for part in statements(text) for t in part]


_SPACE = re.compile(r"\s+")


def _collapse(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def _short(text: str) -> str:
    text = _collapse(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"
