"""The threads every traffic source runs: a loop of user operations from ``start`` to ``stop``.

A source subclasses :class:`Traffic`, sets ``name`` and ``kinds`` (the kinds of operation it
does) and implements ``step(worker)``: one user operation, opened with ``begin`` and closed with
``end`` (what the user saw, and the state of the database it observed). ``start(recorder)`` runs
``threads`` loops with ``pause`` seconds between steps; ``stop()`` asks them to end and returns at
once: the runner gives the operations under way time to end and judges those that do not as
hung (``Recorder.close``); a loop still busy later records into its own scenario's recorder,
which is closed by then. ``close()`` waits for the loops for good.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from srht_readonly.drill import Operation, Outcome, Recorder, State

logger = logging.getLogger(__name__)

#: Seconds ``close()`` waits for the loops.
CLOSE_WAIT = 60.0


class Traffic:
    """Loops of one service's user operations; subclasses implement ``step``."""

    name = "service"
    kinds: tuple[str, ...] = ()

    def __init__(self, *, threads: int, pause: float) -> None:
        self.threads = threads
        self.pause = pause
        self.recorder = Recorder()
        self._stopping = threading.Event()
        self._loops: list[threading.Thread] = []
        self._local = threading.local()  # the recorder of the scenario a loop was started for
        #: The service's scraped metrics (``_metrics.ScrapedMetrics``), if it serves them.
        self.metrics: Any = None

    def start(self, recorder: Recorder) -> None:
        self.recorder = recorder
        if self.metrics is not None:
            self.metrics.start(recorder)
        self._stopping = threading.Event()  # a loop left over from the last scenario keeps its own
        self._loops = [threading.Thread(target=self._loop, args=(i, recorder, self._stopping), daemon=True,
                                        name=f"drill-{self.name}-{i}") for i in range(self.threads)]
        for t in self._loops:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.metrics is not None:
            self.metrics.halt()

    def close(self) -> None:
        """Stop and wait for every loop (and whatever ``_threads_to_close`` names) to end."""
        self._stopping.set()
        if self.metrics is not None:
            self.metrics.close()
        self.join([*self._loops, *self._threads_to_close()], CLOSE_WAIT)

    def _threads_to_close(self) -> list[threading.Thread]:
        return []

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def join(self, threads: list[threading.Thread], timeout: float) -> None:
        give_up = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, give_up - time.monotonic()))
        busy = [t.name for t in threads if t.is_alive()]
        if busy:
            logger.info("%s: %d operation(s) still running after %.1f s: %s", self.name, len(busy), timeout,
                        ", ".join(busy))

    def _loop(self, worker: int, recorder: Recorder, stopping: threading.Event) -> None:
        self._local.recorder = recorder
        while not stopping.is_set():
            self._local.open = None
            started = time.monotonic()
            try:
                self.step(worker)
            except Exception as exc:  # a failure of the drill's own client is still something that happened
                logger.exception("%s traffic", self.name)
                detail = f"drill client failed: {exc!r}"
                if self._local.open is not None:
                    self.end(self._local.open, Outcome.ERROR, detail=detail)
                else:
                    recorder.record(self.name, "traffic", Outcome.ERROR, started=started, detail=detail)
            stopping.wait(self.pause)

    def step(self, worker: int) -> None:
        raise NotImplementedError

    @property
    def current_recorder(self) -> Recorder:
        """The recorder of the scenario this loop was started for."""
        return getattr(self._local, "recorder", self.recorder)

    def begin(self, op: str, *, write: bool = False) -> Operation:
        """Open one user operation of this loop (in flight until ``end``)."""
        operation = self.current_recorder.begin(self.name, op, write=write)
        self._local.open = operation
        return operation

    def end(self, operation: Operation, outcome: Outcome, *, detail: str = "", met: State | None = None) -> None:
        self._local.open = None
        self.current_recorder.end(operation, outcome, detail=detail, met=met)
