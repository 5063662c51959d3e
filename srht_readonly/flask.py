"""Flask adapter: a web service that stays useful while its database is read-only.

Setup in an sr.ht-style app (``db.session`` a ``scoped_session`` over ``create_engine``)::

    from srht_readonly.flask import ReadOnly
    ReadOnly(app, session=db.session)

Promises:

* A request that fails because the database is read-only is answered **503** with
  ``Retry-After``, ``Cache-Control: no-store`` and ``Srht-Read-Only: true``, after the session is
  rolled back. Browsers get an HTML page saying what happened, that nothing was saved and that
  refreshing (or its *Try again* button) sends the same request again; API and GraphQL clients
  (``Accept``/``Content-Type`` JSON, or a configured path prefix) get
  ``{"errors": [{"message": ..., "extensions": {"code": "READ_ONLY"}}]}``. A database that cannot
  be reached is answered the same way with ``DATABASE_UNAVAILABLE``; a COMMIT whose outcome is
  unknown with ``COMMIT_UNKNOWN`` (and the page does not claim that nothing was saved).
* While the monitor knows the database is read-only, unsafe methods are refused with that
  response **before** any ``before_request`` function or view runs, so nothing is half-done on
  disk or in Redis. Views decorated with :func:`exempt` run anyway.
* Every response carries ``Srht-Read-Only: true`` while read-only (not while the database is
  unreachable: that is no read-only mode, and its 503 says "unavailable"); templates get
  ``read_only_banner`` (text, or None), with the operator's announcement when there is one.
* A request whose database work fails on a lost connection (a crashed primary, a dropped
  PgBouncer server connection) is **re-run** on a fresh connection, within
  ``SRHT_READONLY_RETRY_BUDGET`` seconds, before any byte of the response is sent, when doing
  it twice cannot do anything twice: a GET, HEAD or OPTIONS request whose writes (if any) never
  reached COMMIT, or any request that has only read so far. Never after a write reached COMMIT,
  never for a view marked :func:`no_retry`, never for a streamed response (its body runs after
  the view returned). The exact rule is ``srht_readonly.rerun.why_not``; docs/flask.md.
* With ``SRHT_READONLY_REDIS_URL``, the monitor shares what it learns with every other process
  (``srht_readonly.shared_state``): one process's first refused write makes every process refuse
  unsafe requests before the view.
* A healthy request costs two attribute reads on the monitor (and a context processor on
  rendered pages), two context-variable sets and one call per statement for the retry's
  ledger: no query, no I/O.
"""

from __future__ import annotations

import logging
import re
import time as _time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from time import time
from typing import Any, TypeVar

import flask
from jinja2 import Template
from sqlalchemy.exc import DBAPIError

from . import rerun
from ._outcomes import report
from ._root_error import SrhtReadOnlyError
from .errors import Failure, first_line
from .monitor import ReadOnlyMonitor
from .sqlalchemy import instrument, track_writes

__all__ = [
    "DEFAULTS",
    "DEFAULT_TEMPLATE",
    "EXTENSION_KEY",
    "HEADER",
    "ReadOnly",
    "ReadOnlyState",
    "Settings",
    "exempt",
    "metrics_endpoint",
    "no_retry",
    "respond",
]

logger = logging.getLogger(__name__)

#: Where ``init_app`` registers the per-app :class:`ReadOnlyState`.
EXTENSION_KEY = "srht_readonly"
#: Response header present (``true``) on every response while the database is read-only
#: (and answers: never while it is unreachable).
HEADER = "Srht-Read-Only"
#: Template name looked up first in the app's own template folders; the packaged page otherwise.
DEFAULT_TEMPLATE = "srht_readonly/read_only.html"

#: Every ``SRHT_READONLY_*`` key (without the prefix) and its default; see docs/flask.md.
DEFAULTS: dict[str, Any] = {
    "RETRY_AFTER": 30,
    "SITE_NAME": "sr.ht",
    "STATUS_URL": None,
    "MESSAGE": None,
    "BANNER": None,
    "TEMPLATE": DEFAULT_TEMPLATE,
    "API_PREFIXES": ("/api/", "/query"),
    "METHODS": ("POST", "PUT", "PATCH", "DELETE"),
    "REPOST": True,
    "RECHECK": 2.0,
    "ANNOUNCE_FILE": None,
    "RETRY_BUDGET": 3.0,
    "REDIS_URL": None,
    "SHARED_PREFIX": "srht-readonly",
    "SHARED_TTL": 30.0,
}

CODES = {
    Failure.READ_ONLY: "READ_ONLY",
    Failure.UNAVAILABLE: "DATABASE_UNAVAILABLE",
    Failure.COMMIT_UNKNOWN: "COMMIT_UNKNOWN",
}

_EXEMPT = "_srht_readonly_exempt"
_NO_RETRY = "_srht_readonly_no_retry"
_PACKAGED_TEMPLATE = "templates/read_only.html"

V = TypeVar("V", bound=Callable[..., Any])


def exempt(view: V) -> V:
    """Mark a view that does not write, so it still runs for unsafe methods while read-only.

    For POST views such as a login form check or a search. If such a view writes anyway, its
    failure still gets the 503 response. Put it closest to the function or outermost: other
    decorators that use ``functools.wraps`` carry the mark along.
    """
    setattr(view, _EXEMPT, True)
    return view


def no_retry(view: V) -> V:
    """Mark a view never to be re-run after a lost database connection (see docs/flask.md).

    For views with effects outside the database that must not happen twice (an email, a file,
    a call to another service) before their database work, or that call SQL functions which
    write from a ``SELECT``. Same placement rules as :func:`exempt`.
    """
    setattr(view, _NO_RETRY, True)
    return view


def metrics_endpoint(app: flask.Flask, path: str = "/metrics", *, registry: Any = None) -> None:
    """Serve the process's Prometheus metrics (``srht_readonly.metrics``, the ``metrics`` extra) at ``path``.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn with several workers) every worker's
    metrics are added up, whichever worker answers. A GET view, so it answers while read-only.
    """
    from . import metrics

    def srht_readonly_metrics() -> flask.Response:
        body, content_type = metrics.exposition(metrics.REGISTRY if registry is None else registry)
        return flask.Response(body, content_type=content_type)

    app.add_url_rule(path, endpoint="srht_readonly_metrics", view_func=srht_readonly_metrics, methods=["GET"])


def _strings(value: str | Iterable[str], key: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"SRHT_READONLY_{key} must be a string or a list of strings, not {value!r}")
    return tuple(item.strip() for item in items if item.strip())


@dataclass(frozen=True)
class Settings:
    """The ``SRHT_READONLY_*`` configuration of one app, read once by ``init_app``."""

    retry_after: int
    site_name: str
    status_url: str | None
    message: str | None
    banner: str | None
    template: str
    api_prefixes: tuple[str, ...]
    methods: frozenset[str]
    repost: bool
    recheck: float
    announce_file: str | None
    retry_budget: float = DEFAULTS["RETRY_BUDGET"]
    redis_url: str | None = None
    shared_prefix: str = DEFAULTS["SHARED_PREFIX"]
    shared_ttl: float = DEFAULTS["SHARED_TTL"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Settings:
        """Read (and ``setdefault``) every key; raise ``ValueError`` naming a bad one."""
        raw = {key: config.setdefault(f"SRHT_READONLY_{key}", default) for key, default in DEFAULTS.items()}
        try:
            retry_after = int(raw["RETRY_AFTER"])
            recheck = float(raw["RECHECK"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"SRHT_READONLY_RETRY_AFTER and _RECHECK must be numbers of seconds: {exc}") from exc
        if retry_after < 0 or recheck <= 0:
            raise ValueError("SRHT_READONLY_RETRY_AFTER must be >= 0 and SRHT_READONLY_RECHECK > 0")
        try:
            retry_budget = float(raw["RETRY_BUDGET"])
            shared_ttl = float(raw["SHARED_TTL"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"SRHT_READONLY_RETRY_BUDGET and _SHARED_TTL must be numbers of seconds: {exc}") from exc
        if retry_budget < 0 or shared_ttl <= 0:
            raise ValueError("SRHT_READONLY_RETRY_BUDGET must be >= 0 and SRHT_READONLY_SHARED_TTL > 0")
        return cls(
            retry_after=retry_after,
            site_name=str(raw["SITE_NAME"]),
            status_url=raw["STATUS_URL"] or None,
            message=raw["MESSAGE"] or None,
            banner=raw["BANNER"] or None,
            template=str(raw["TEMPLATE"]),
            api_prefixes=_strings(raw["API_PREFIXES"], "API_PREFIXES"),
            methods=frozenset(m.upper() for m in _strings(raw["METHODS"], "METHODS")),
            repost=bool(raw["REPOST"]),
            recheck=recheck,
            announce_file=str(raw["ANNOUNCE_FILE"]) if raw["ANNOUNCE_FILE"] else None,
            retry_budget=retry_budget,
            redis_url=str(raw["REDIS_URL"]) if raw["REDIS_URL"] else None,
            shared_prefix=str(raw["SHARED_PREFIX"]),
            shared_ttl=shared_ttl,
        )

    def message_for(self, failure: Failure) -> str:
        """What to tell the user (page and JSON) when no view supplied its own message."""
        site = self.site_name
        if failure is Failure.READ_ONLY:
            return self.message or (
                f"{site} is in read-only mode: its database is not accepting changes right now. "
                "Please try again in a few minutes."
            )
        if failure is Failure.COMMIT_UNKNOWN:
            return (
                f"{site} lost its database connection while saving your change, so it may or may not "
                "have been saved. Please check before trying again."
            )
        return f"{site} cannot reach its database right now. Please try again in a few minutes."

    def banner_for(self) -> str:
        """The banner text while read-only, when the operator announced nothing."""
        return self.banner or (
            f"{self.site_name} is in read-only mode for database maintenance: you can browse, "
            "but changes cannot be saved right now."
        )

    def unavailable_banner_for(self) -> str:
        """The banner text while the database cannot be reached at all."""
        return (f"{self.site_name} cannot reach its database right now: some pages may fail to load and "
                "changes cannot be saved. Please try again in a few minutes.")


class ReadOnlyState:
    """What ``init_app`` registers as ``app.extensions["srht_readonly"]`` for one app."""

    def __init__(self, extension: ReadOnly, monitor: ReadOnlyMonitor, session: Any, settings: Settings) -> None:
        self.extension = extension
        self.monitor = monitor
        self.session = session
        self.settings = settings
        #: The monitor's ``srht_readonly.shared_state.SharedState`` (``SRHT_READONLY_REDIS_URL``), or None.
        self.shared: Any = None
        self._fallback: Template | None = None

    @property
    def read_only(self) -> bool:
        """Whether the monitor says writes are refused now (no I/O while writable)."""
        return self.monitor.read_only

    def banner(self) -> str | None:
        """The text for the read-only banner: the announcement, the default text, or None."""
        read_only = self.monitor.read_only
        announcement = self.monitor.announcement
        if announcement is not None:
            ends = announcement.ends
            if ends is None or ends.timestamp() > time():
                return announcement.message
        if not read_only:
            return None
        if self.monitor.state.failure is Failure.UNAVAILABLE:  # not maintenance: say what is happening
            return self.settings.unavailable_banner_for()
        return self.settings.banner_for()

    def rollback(self) -> None:
        """Roll the session back, so the failed transaction does not leak into the next use."""
        if self.session is None:
            return
        try:
            self.session.rollback()
        except Exception as exc:  # the connection may be gone; the 503 is still the answer
            logger.debug("rolling back after a read-only failure failed: %s", exc)

    def discard_session(self) -> None:
        """Roll back and, for a ``scoped_session``, remove the session, so a re-run starts afresh."""
        self.rollback()
        remove = getattr(self.session, "remove", None)
        if remove is not None:
            try:
                remove()
            except Exception as exc:
                logger.debug("removing the session before a re-run failed: %s", exc)

    def fallback_template(self, app: flask.Flask) -> Template:
        """The packaged page, compiled once in the app's environment (so it sees its globals)."""
        if self._fallback is None:
            source = resources.files("srht_readonly").joinpath(_PACKAGED_TEMPLATE).read_text("utf-8")
            self._fallback = app.jinja_env.from_string(source)
        return self._fallback


class ReadOnly:
    """The Flask extension: ``ReadOnly(app, session=db.session)`` or ``ReadOnly(...).init_app(app)``.

    ``monitor`` is the process's :class:`ReadOnlyMonitor`; without one, ``init_app`` makes one
    per app (``SRHT_READONLY_RECHECK``, ``SRHT_READONLY_ANNOUNCE_FILE``); ``.monitor`` is the
    one given, or the last one made. ``session`` (a
    ``scoped_session`` or ``Session``) is rolled back before a 503 is sent; its engine (or
    ``engine``) is instrumented so every database error reaches the monitor and probes go
    through it.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        monitor: ReadOnlyMonitor | None = None,
        session: Any = None,
        engine: Any = None,
    ) -> None:
        self.monitor = monitor
        self.session = session
        self.engine = engine
        self._given_monitor = monitor
        if app is not None:
            self.init_app(app)

    exempt = staticmethod(exempt)
    no_retry = staticmethod(no_retry)

    def init_app(self, app: flask.Flask) -> ReadOnlyState:
        """Register on ``app`` (once: a second registration raises ``RuntimeError``)."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"srht_readonly is already registered on the app {app.name!r}; call init_app once per app"
            )
        settings = Settings.from_config(app.config)
        engine = self.engine if self.engine is not None else _engine_of(self.session)
        monitor = self._given_monitor
        if monitor is None:
            options: dict[str, Any] = {"recheck": settings.recheck}
            if settings.announce_file is not None:
                options["announce_file"] = settings.announce_file
            monitor = ReadOnlyMonitor(engine, **options)
            self.monitor = monitor
        if engine is not None:
            try:
                instrument(engine, monitor)
            except ValueError as exc:
                raise ValueError(
                    "this engine already reports to another ReadOnlyMonitor: pass that one, "
                    "ReadOnly(app, monitor=srht_readonly.sqlalchemy.monitor_of(engine), session=...)"
                ) from exc
        # The retry needs to know what a request wrote: only with an engine to watch.
        retrying = engine is not None and settings.retry_budget > 0
        if retrying:
            track_writes(engine)
        state = ReadOnlyState(self, monitor, self.session, settings)
        if settings.redis_url is not None:
            from .shared_state import SharedState  # redis is imported only when asked for

            state.shared = SharedState.attach(monitor, settings.redis_url, prefix=settings.shared_prefix,
                                              ttl=settings.shared_ttl)
        app.extensions[EXTENSION_KEY] = state
        _register(app, state)
        if retrying:
            _wrap_dispatch(app, state)
        return state


def _engine_of(session: Any) -> Any:
    """The engine a (scoped) session is bound to, without creating a session to ask."""
    if session is None:
        return None
    factory = getattr(session, "session_factory", None)  # scoped_session
    if factory is not None:
        return factory.kw.get("bind")
    return session.get_bind()


def _register(app: flask.Flask, state: ReadOnlyState) -> None:
    monitor = state.monitor
    methods = state.settings.methods

    def refuse_writes() -> flask.Response | None:
        # The monitor first: a field read while writable, where ``flask.request`` is a proxy lookup.
        if not monitor.read_only or flask.request.method not in methods:
            return None
        if flask.request.routing_exception is not None:
            return None  # a 404 or 405 stays one
        view = app.view_functions.get(flask.request.endpoint or "")
        if getattr(view, _EXEMPT, False):
            return None
        failure = Failure.UNAVAILABLE if monitor.state.failure is Failure.UNAVAILABLE else Failure.READ_ONLY
        logger.debug("refused %s %s before the view: database read-only", flask.request.method, flask.request.path)
        report("abort", "refused", failure=failure, before=True)
        return respond(state, failure)

    def mark_response(response: flask.Response) -> flask.Response:
        # Only while the database answers read-only: an unreachable one is no read-only mode,
        # and respond() leaves the header off its "unavailable" 503 for the same reason.
        if monitor.read_only and monitor.state.failure is not Failure.UNAVAILABLE:
            response.headers[HEADER] = "true"
        return response

    def banner() -> dict[str, Any]:
        return {"read_only_banner": state.banner()}

    def on_package_error(exc: SrhtReadOnlyError) -> flask.Response:
        failure = getattr(exc, "failure", None)
        if not isinstance(failure, Failure):
            raise exc
        monitor.observe(exc)
        if exc.__cause__ is not None:  # a database error turned into ours; not a refusal made before any work
            _rerun_if_allowed(app, state, failure, exc)
        return respond(state, failure, getattr(exc, "message", None) or str(exc))

    def on_database_error(exc: DBAPIError) -> flask.Response:
        failure = monitor.observe(exc)
        if failure is None:
            raise exc  # not ours: Flask's usual 500 handling takes it from here
        _rerun_if_allowed(app, state, failure, exc)
        if flask.request.method in methods:  # a write refused (a page that failed is no write)
            report("abort", "refused", failure=failure, before=False)
        return respond(state, failure)

    # First of all before_request functions: an app's own ones may write (sessions, counters).
    app.before_request_funcs.setdefault(None, []).insert(0, refuse_writes)
    app.after_request(mark_response)
    app.context_processor(banner)
    app.register_error_handler(SrhtReadOnlyError, on_package_error)
    app.register_error_handler(DBAPIError, on_database_error)


class _Attempt:
    """One request's attempts: the ledger of the current one, and the budget once one failed."""

    __slots__ = ("budget", "ledger")

    def __init__(self) -> None:
        self.ledger = rerun.Ledger()
        self.budget: rerun.RetryBudget | None = None


class _Rerun(Exception):  # noqa: N818 - a signal to the dispatch wrapper, never seen outside it
    def __init__(self, cause: BaseException, wait: float) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.wait = wait


_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("srht_readonly_attempt", default=None)


def _wrap_dispatch(app: flask.Flask, state: ReadOnlyState) -> None:
    """Run ``full_dispatch_request`` again when the error handlers ask for it (``_Rerun``).

    The whole dispatch is repeated (``before_request`` functions, so a refusal before the view
    still applies, then the view), in the same request context; nothing of the response has
    been sent: Flask sends it after ``full_dispatch_request`` returns.
    """
    dispatch = app.full_dispatch_request

    ledger_var = rerun.LEDGER

    def full_dispatch_request() -> flask.Response:
        attempt = _Attempt()
        token = _ATTEMPT.set(attempt)
        try:
            while True:
                recording = ledger_var.set(attempt.ledger)
                try:
                    return dispatch()
                except _Rerun as again:
                    wait = again.wait
                    cause = again.cause
                finally:
                    ledger_var.reset(recording)
                budget = attempt.budget
                assert budget is not None
                state.discard_session()
                request = flask.request
                logger.info("re-running %s %s after a lost database connection (attempt %d, %.2f s since the "
                            "first failure, waiting %.2f s): %s", request.method, request.path, budget.attempts,
                            budget.elapsed, wait, first_line(cause))
                _time.sleep(wait)
                attempt.ledger = rerun.Ledger()  # that attempt's transactions died with its connection
        finally:
            _ATTEMPT.reset(token)

    app.full_dispatch_request = full_dispatch_request  # type: ignore[method-assign]


def _rerun_if_allowed(app: flask.Flask, state: ReadOnlyState, failure: Failure, exc: BaseException) -> None:
    """Raise ``_Rerun`` if this request may run again (``rerun.why_not`` and the budget); else return."""
    attempt = _ATTEMPT.get()
    if attempt is None:
        return
    request = flask.request
    view = app.view_functions.get(request.endpoint or "")
    why = rerun.why_not(failure, attempt.ledger, method=request.method, opted_out=getattr(view, _NO_RETRY, False))
    if why is not None:
        if failure is not Failure.READ_ONLY:
            logger.info("not re-running %s %s after a lost database connection: %s", request.method, request.path, why)
        return
    if attempt.budget is None:
        attempt.budget = rerun.RetryBudget(state.settings.retry_budget)
    wait = attempt.budget.next_wait()
    if wait is None:
        logger.info("gave up re-running %s %s: the database stayed unreachable for %.1f s (%d attempts)",
                    request.method, request.path, attempt.budget.elapsed, attempt.budget.attempts)
        return
    raise _Rerun(exc, wait)


def _wants_json(prefixes: tuple[str, ...]) -> bool:
    request = flask.request
    if prefixes and request.path.startswith(prefixes):
        return True
    if request.is_json:
        return True
    return request.accept_mimetypes.best_match(("text/html", "application/json")) == "application/json"


#: Form fields never written into the page's *Try again* form (a CSRF token is not a secret from
#: its user, and the form needs it).
SECRET_FIELD = re.compile(r"pass(word|wd|phrase)|secret|(?<!csrf_)token|api[_-]?key|(^|[_-])otp($|[_-])", re.I)


def _retry_control(settings: Settings) -> dict[str, Any]:
    """How the page's *Try again* control repeats this request (re-posting a form's fields, but
    never a password-like one: those the user types again, or the browser's refresh resends)."""
    request = flask.request
    query = request.query_string.decode("latin-1")
    url = request.script_root + request.path + (f"?{query}" if query else "")
    fields: list[tuple[str, str]] | None = None
    left_out: list[str] = []
    if request.method == "POST" and settings.repost and not request.files:
        fields = []
        for name, value in request.form.items(multi=True):
            if SECRET_FIELD.search(name):
                left_out.append(name)
            else:
                fields.append((name, value))
    return {"method": request.method, "url": url, "fields": fields, "left_out": sorted(set(left_out))}


def respond(state: ReadOnlyState, failure: Failure, message: str | None = None) -> flask.Response:
    """The 503 answer to a request refused or failed because of ``failure`` (session rolled back)."""
    state.rollback()
    settings = state.settings
    message = message or settings.message_for(failure)
    if _wants_json(settings.api_prefixes):
        response = flask.jsonify({"errors": [{"message": message, "extensions": {"code": CODES[failure]}}]})
    else:
        app = flask.current_app._get_current_object()  # type: ignore[attr-defined]
        html = flask.render_template(
            [settings.template, state.fallback_template(app)],
            site_name=settings.site_name,
            status_url=settings.status_url,
            message=message,
            failure=failure.value,
            retry_after=settings.retry_after,
            announcement=state.monitor.announcement,
            retry=_retry_control(settings),
        )
        response = flask.make_response(html)
    response.status_code = 503
    response.headers["Retry-After"] = str(settings.retry_after)
    response.headers["Cache-Control"] = "no-store"
    response.vary.add("Accept")
    if failure is Failure.READ_ONLY:
        response.headers[HEADER] = "true"
    return response

