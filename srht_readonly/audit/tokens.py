"""A SQL tokenizer just good enough to audit statements: literals and comments are never keywords.

``tokenize(sql)`` yields ``Token``s: words (unquoted identifiers and keywords, lowercased in
``value``), quoted identifiers, string literals (``'...'``, ``E'...'``, ``$tag$...$tag$``, ``B''``,
``X''``, ``U&''``), numbers, parameters (``$1``, ``%s``, ``%(name)s``, ``:name``, ``?``) and
single punctuation characters. Comments (``--`` and nested ``/* */``) are dropped. It never
raises: an unterminated literal or comment runs to the end of the text.

``statements(sql)`` splits a text that holds several statements (a simple-protocol query may)
on the semicolons outside literals, and ``normalized(tokens)`` is the shape used to tell two
occurrences of a statement apart: literals and parameters become ``?``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Token", "TokenType", "normalized", "statements", "tokenize"]


class TokenType(StrEnum):
    WORD = "word"  # unquoted identifier or keyword
    IDENT = "ident"  # "quoted identifier"
    STRING = "string"
    NUMBER = "number"
    PARAM = "param"
    PUNCT = "punct"


@dataclass(frozen=True)
class Token:
    type: TokenType
    text: str  # as written
    value: str  # a word lowercased, an identifier or a string unquoted; else the text
    start: int = 0  # where ``text`` starts in the tokenized string

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    def is_word(self, *words: str) -> bool:
        return self.type is TokenType.WORD and self.value in words

    def is_punct(self, char: str) -> bool:
        return self.type is TokenType.PUNCT and self.text == char


_WORD = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_PARAM = re.compile(r"\$\d+|%\([^)]*\)s|%s|(?<![:\w]):[A-Za-z_][A-Za-z0-9_]*|\?")
# A string prefix: E'..' (backslash escapes), B'..', X'..', N'..', U&'..'.
_PREFIX = re.compile(r"(?i:(u&)|([ebxn]))'")


def tokenize(sql: str) -> Iterator[Token]:
    """The tokens of ``sql``, comments dropped."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "'":
            end = _end_of_quoted(sql, i, "'", backslash=False)
            yield Token(TokenType.STRING, sql[i:end], _unquote(sql[i:end], "'"), i)
            i = end
        elif c == '"':
            end = _end_of_quoted(sql, i, '"', backslash=False)
            yield Token(TokenType.IDENT, sql[i:end], _unquote(sql[i:end], '"'), i)
            i = end
        elif (m := _PREFIX.match(sql, i)) is not None:
            start = m.end() - 1
            end = _end_of_quoted(sql, start, "'", backslash=m.group(2) is not None and m.group(2) in "eE")
            yield Token(TokenType.STRING, sql[i:end], sql[start + 1:end - 1], i)
            i = end
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)) is not None:
            tag = m.group()
            close = sql.find(tag, m.end())
            end = n if close < 0 else close + len(tag)
            yield Token(TokenType.STRING, sql[i:end], sql[m.end():close if close >= 0 else n], i)
            i = end
        elif (m := _PARAM.match(sql, i)) is not None:
            yield Token(TokenType.PARAM, m.group(), m.group(), i)
            i = m.end()
        elif (m := _WORD.match(sql, i)) is not None:
            yield Token(TokenType.WORD, m.group(), m.group().lower(), i)
            i = m.end()
        elif (m := _NUMBER.match(sql, i)) is not None:
            yield Token(TokenType.NUMBER, m.group(), m.group(), i)
            i = m.end()
        else:
            yield Token(TokenType.PUNCT, c, c, i)
            i += 1


def statements(sql: str) -> list[list[Token]]:
    """The tokens of each statement of ``sql`` (split on ``;`` outside literals), empty ones left out."""
    result: list[list[Token]] = []
    current: list[Token] = []
    depth = 0  # a ';' inside parentheses (a malformed text) does not split
    for token in tokenize(sql):
        if token.is_punct(";") and depth == 0:
            if current:
                result.append(current)
            current = []
            continue
        if token.is_punct("("):
            depth += 1
        elif token.is_punct(")"):
            depth = max(0, depth - 1)
        current.append(token)
    if current:
        result.append(current)
    return result


def normalized(tokens: list[Token]) -> str:
    """``tokens`` as one line with every literal and parameter as ``?`` and keywords lowercased."""
    parts = []
    for t in tokens:
        if t.type in (TokenType.STRING, TokenType.NUMBER, TokenType.PARAM):
            parts.append("?")
        elif t.type is TokenType.WORD:
            parts.append(t.value)
        else:
            parts.append(t.text)
    return " ".join(parts)


def _skip_block_comment(sql: str, i: int) -> int:
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _end_of_quoted(sql: str, start: int, quote: str, *, backslash: bool) -> int:
    """Index just past the closing ``quote`` of the literal opened at ``start`` (doubled quotes escape)."""
    i, n = start + 1, len(sql)
    while i < n:
        c = sql[i]
        if backslash and c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _unquote(text: str, quote: str) -> str:
    inner = text[1:-1] if len(text) >= 2 and text.endswith(quote) else text[1:]
    return inner.replace(quote * 2, quote)
