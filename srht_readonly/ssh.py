"""What every SSH pipeline program needs to talk to the pusher: ``run(main)`` and ``warn()``.

sr.ht's SSH pipeline is a chain of short-lived programs (sshd's ``AuthorizedKeysCommand``, the
forced-command shell, git hooks). Whatever they write to stderr reaches the person pushing:
directly while the shell runs, prefixed with ``remote: `` once ``git receive-pack`` runs the
hooks. So:

* ``run(main)`` is the entry point of each program. ``ReadOnlyError`` becomes its message on
  stderr and exit status 75 (``EX_TEMPFAIL``: try again later); ``DatabaseUnavailable``, a
  database error nobody wrapped, and any unexpected exception become a short message (75 or
  70, ``EX_SOFTWARE``). **No traceback ever reaches the pusher**: details, with a reference
  the message quotes, go to the log (``log=``, else ``$SRHT_SSH_LOG``, else syslog), and so
  do Python warnings.
* ``warn(message)`` prints one warning (``say`` a plain message); ``format_message`` lays a message out for a terminal
  behind ``remote: `` (wrapped, the label on the first line, the rest indented under it).

Each program is its own process, so nothing learned by one (``ReadOnlyMonitor`` state) carries
to the next: each learns from its own failure, which is why the policies are what decide.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers
import os
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from typing import IO, NoReturn

from .errors import DatabaseUnavailable, Failure, ReadOnlyError, classify

__all__ = [
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "LOG_ENV",
    "WIDTH",
    "format_message",
    "run",
    "say",
    "warn",
]

logger = logging.getLogger(__name__)

#: Exit status of a refusal the pusher may retry later (sysexits.h ``EX_TEMPFAIL``).
EX_TEMPFAIL = 75
#: Exit status of an unexpected error (sysexits.h ``EX_SOFTWARE``).
EX_SOFTWARE = 70
#: Environment variable naming the log file when ``run(log=...)`` is not given.
LOG_ENV = "SRHT_SSH_LOG"
#: Columns a message is wrapped to; git's ``remote: `` prefix adds 8 and still fits 80.
WIDTH = 72

_READ_ONLY = (
    "{service} is in read-only mode for database maintenance, so this action was refused. "
    "Nothing was changed; please try again later."
)
_UNAVAILABLE = (
    "{service} cannot reach its database right now (it may be switching to a standby). "
    "Nothing was changed; please try again in a few minutes."
)
_COMMIT_UNKNOWN = (
    "{service} lost its database connection while saving, so this change may or may not "
    "have been saved. Please check, and try again if it is missing."
)
_INTERNAL = (
    "{service} hit an internal error and could not complete this request. "
    "The administrators can find the details under reference {reference}."
)


def format_message(message: str, *, label: str = "") -> str:
    """``message`` wrapped to :data:`WIDTH` columns for a terminal, with a trailing newline.

    ``label`` (``"warning"``, ``"error"``) starts the first line as ``warning: ...``; the
    following lines are indented under the text, so that behind git's ``remote: `` prefix a
    warning still reads as one. Blank lines separate paragraphs.
    """
    head = f"{label}: " if label else ""
    indent = " " * len(head)
    out: list[str] = []
    for number, paragraph in enumerate(message.strip().split("\n\n")):
        text = " ".join(paragraph.split())
        if number:
            out.append("")
        out.extend(textwrap.wrap(
            text, WIDTH, initial_indent=indent if out else head, subsequent_indent=indent,
            break_long_words=False, break_on_hyphens=False,
        ) or [head.rstrip()])
    return "\n".join(out) + "\n"


def _write(text: str, stream: IO[str] | None) -> None:
    target = stream if stream is not None else sys.stderr
    try:
        target.write(text)
        target.flush()
    except (BrokenPipeError, ValueError, OSError):  # the pusher hung up: nobody left to tell
        logger.debug("could not write to the pusher: %s", text.strip())


def say(message: str, *, stream: IO[str] | None = None) -> None:
    """Print ``message`` for the pusher, wrapped, with no label (news, hints). Never raises."""
    _write(format_message(message), stream)


def warn(message: str, *, stream: IO[str] | None = None) -> None:
    """Print ``message`` as one warning for the pusher (``warning: ...``, wrapped).

    Never raises: a pusher who hung up is no reason to fail.
    """
    _write(format_message(message, label="warning"), stream)


def _error(message: str, stream: IO[str] | None) -> None:
    _write(format_message(message, label="error"), stream)


def _setup_logging(name: str, log: str | os.PathLike[str] | None) -> None:
    """Send every log record (and every Python warning) to the log, never to the pusher."""
    root = logging.getLogger()
    target = os.fspath(log) if log is not None else os.environ.get(LOG_ENV)
    handler: logging.Handler
    if target:
        try:
            handler = logging.FileHandler(target, encoding="utf-8")
        except OSError:
            handler = logging.NullHandler()
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    ))
    root.addHandler(handler)
    if root.level in (logging.WARNING, logging.NOTSET):
        root.setLevel(logging.INFO)
    # Both would print to stderr, which is the pusher's terminal: the last-resort handler
    # (records nobody handles) and the report of a handler that failed (a full disk).
    logging.lastResort = None
    logging.raiseExceptions = False
    logging.captureWarnings(True)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        logger.error("uncaught exception in thread %s", args.thread, exc_info=args.exc_value)

    threading.excepthook = thread_hook


def _resolve(main: Callable[[], int | None] | str) -> Callable[[], int | None]:
    if callable(main):
        return main
    module, _, attr = main.partition(":")
    return getattr(importlib.import_module(module), attr or "main")  # type: ignore[no-any-return]


def _refusal(exc: BaseException, service: str) -> str | None:
    """The message for a refusal the pusher may retry, or None if ``exc`` is no such thing."""
    if isinstance(exc, ReadOnlyError):
        return exc.message
    failure = classify(exc)  # our own exceptions carry theirs; driver errors by SQLSTATE
    if failure is Failure.READ_ONLY:
        return _READ_ONLY.format(service=service)
    if failure is Failure.COMMIT_UNKNOWN:
        return _COMMIT_UNKNOWN.format(service=service)
    if failure is Failure.UNAVAILABLE or isinstance(exc, DatabaseUnavailable):
        return _UNAVAILABLE.format(service=service)
    return None


def _silence_stdout() -> None:
    """Flush stdout; if the pusher is gone, point fd 1 at /dev/null so exit prints nothing."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def run(
    main: Callable[[], int | None] | str,
    *,
    service: str = "sr.ht",
    name: str | None = None,
    log: str | os.PathLike[str] | None = None,
    stream: IO[str] | None = None,
) -> NoReturn:
    """Run a pipeline program's ``main()`` and exit; never show the pusher a traceback.

    ``main`` is a callable returning an exit status (None means 0) or a ``"module:function"``
    string, imported here so that even an import error is caught. Outcomes:

    * ``ReadOnlyError``: its message on stderr, exit 75;
    * ``DatabaseUnavailable``, ``DeadlineExceeded``, or a database error that ``classify``
      recognises: a short message naming ``service`` (read-only, unreachable, or "may or
      may not have been saved" for an unknown COMMIT), exit 75;
    * ``sys.exit("text")``: ``error: text``, exit 1 (an ``int`` or None exits as it says);
    * anything else: a short message with a reference, exit 70; the traceback is logged
      under that reference. ``KeyboardInterrupt`` exits 130, a hung-up pusher
      (``BrokenPipeError``) 141, silently.

    ``name`` labels log lines (default: the program's file name).
    """
    name = name or os.path.basename(sys.argv[0] or "srht-ssh") or "srht-ssh"
    status = EX_SOFTWARE
    try:
        try:
            _setup_logging(name, log)
        except Exception:  # no log is no reason to fail the push
            logging.raiseExceptions = False
        status = _run(main, service, stream)
    finally:
        _silence_stdout()
    sys.exit(status)


def _run(main: Callable[[], int | None] | str, service: str, stream: IO[str] | None) -> int:
    try:
        result = _resolve(main)()
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        _error(str(code), stream)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the pusher hung up: nobody is left to tell anything
        logger.info("the pusher hung up")
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it
    except BaseException as exc:  # anything at all: the pusher never gets a traceback
        message = _refusal(exc, service)
        if message is not None:
            cause = str(exc.__cause__ or exc).strip().splitlines()
            logger.info("refused (%s): %s", type(exc).__name__, cause[0] if cause else "")
            _error(message, stream)
            return EX_TEMPFAIL
        reference = uuid.uuid4().hex[:12]
        logger.error("internal error, reference %s", reference, exc_info=exc)
        _error(_INTERNAL.format(service=service, reference=reference), stream)
        return EX_SOFTWARE
    return int(result or 0)
