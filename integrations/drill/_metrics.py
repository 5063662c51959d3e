"""A stand-in service's Prometheus metrics, scraped through each scenario and held against its users.

``ScrapedMetrics(service, url)`` scrapes ``url`` (the service's ``/metrics``, prometheus_client's
text format) when the scenario's traffic starts (``start``), every ``INTERVAL`` seconds from a
thread of its own until it stops (``halt``), and once more when the operations still under way
have ended, just before the verdicts (``finish``). What it keeps:

* the change of every ``srht_readonly_writes_total`` series over the scenario (``delta``);
* ``srht_readonly_read_only`` as sampled, the highest value over the service's processes and
  reasons, with the scenario's clock (``read_only``);
* the scrapes that failed (an endpoint that stops answering while read-only is a bug).

``expectation(scenario, events, facts)`` is the verdict: the metrics agree with what the users
saw (docs/drill.md, "The services' metrics").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from srht_readonly.drill import Outcome, Recorder
from srht_readonly.drill.recorder import Event
from srht_readonly.drill.scenarios import Expectation, Fact

__all__ = ["INTERVAL", "ScrapedMetrics", "parse"]

#: Seconds between two scrapes while the traffic runs.
INTERVAL = 1.0
WRITES = "srht_readonly_writes_total"
READ_ONLY = "srht_readonly_read_only"
PERIODS = "srht_readonly_read_only_seconds_count"

Series = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> dict[Series, float]:
    """Every sample of a Prometheus text exposition: ``(name, sorted labels) -> value``."""
    found: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return found


class ScrapedMetrics:
    """Scrapes one service's metrics through a scenario (``start``/``stop``), then judges them."""

    def __init__(self, service: str, url: str, *, interval: float = INTERVAL) -> None:
        self.service = service
        self.url = url
        self.interval = interval
        self._http = requests.Session()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reset()

    def _reset(self) -> None:
        self.first: dict[Series, float] | None = None
        self.last: dict[Series, float] | None = None
        self.read_only: list[tuple[float, float]] = []
        self.failed: list[tuple[float, str]] = []
        self.scrapes = 0

    def start(self, recorder: Recorder) -> None:
        self._reset()
        self._stopping.clear()
        self.first = self._scrape(recorder)
        self._thread = threading.Thread(target=self._loop, args=(recorder,), name=f"srht-drill-metrics-{self.service}",
                                        daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop the periodic scrapes (the traffic stopped)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def finish(self, recorder: Recorder) -> None:
        """The last scrape, once the operations under way have ended (so each one is counted)."""
        self.halt()
        self.last = self._scrape(recorder)

    def close(self) -> None:
        self.halt()
        self._http.close()

    def _loop(self, recorder: Recorder) -> None:
        while not self._stopping.wait(self.interval):
            self._scrape(recorder)

    def _scrape(self, recorder: Recorder) -> dict[Series, float] | None:
        t = recorder.now()
        try:
            r = self._http.get(self.url, timeout=5)
            r.raise_for_status()
            samples = parse(r.text)
        except Exception as exc:  # recorded and judged: the endpoint must answer in every state
            self.failed.append((round(t, 3), f"{type(exc).__name__}: {exc}"[:160]))
            return None
        self.scrapes += 1
        values = [v for (name, labels), v in samples.items()
                  if name == READ_ONLY and dict(labels).get("service") == self.service]
        self.read_only.append((round(t, 3), max(values, default=0.0)))
        return samples

    def delta(self, policy: str, outcome: str) -> float:
        """How much ``srht_readonly_writes_total{policy, outcome}`` of the service rose over the scenario."""
        def value(samples: dict[Series, float] | None) -> float:
            return sum(v for (name, labels), v in (samples or {}).items() if name == WRITES
                       and dict(labels) == {"service": self.service, "policy": policy, "outcome": outcome})
        return value(self.last) - value(self.first)

    def periods(self) -> float:
        """How many read-only periods of the service's processes ended over the scenario."""
        def value(samples: dict[Series, float] | None) -> float:
            return sum(v for (name, labels), v in (samples or {}).items()
                       if name == PERIODS and dict(labels).get("service") == self.service)
        return value(self.last) - value(self.first)

    def figures(self) -> dict[str, Any]:
        """What the report keeps (``facts["metrics"][service]``)."""
        writes = {}
        for (name, labels), _ in (self.last or {}).items():
            label = dict(labels)
            if name == WRITES and label.get("service") == self.service:
                key = f"{label['policy']}/{label['outcome']}"
                writes[key] = round(self.delta(label["policy"], label["outcome"]), 3)
        return {"url": self.url, "scrapes": self.scrapes, "failed": self.failed[:5], "writes": writes,
                "read_only": self.read_only}

    def expectation(self, scenario: str, events: Sequence[Event], facts: dict[str, Any], *,
                    policy: str, outcome: str) -> Expectation:
        """The service's metrics agree with what its users saw in ``scenario``.

        Every scrape answered, the first and the last included. Where the database never stopped
        taking writes (no ``states`` in the facts): the read-only gauge stayed 0 and ``writes_total{policy,
        outcome}`` did not move. Elsewhere: the gauge was 1 at some scrape while the database was
        not writable, or a read-only period ended (``srht_readonly_read_only_seconds_count`` rose: a
        window of a second or two may fall between two scrapes), 0 at the last scrape (writable
        again), and the counter rose by at least the writes the users saw refused with the
        explanation (each refusal is counted once).
        """
        facts.setdefault(Fact.METRICS, {})[self.service] = self.figures()
        text = (f"{self.service}: its metrics agree with what users saw (srht_readonly_read_only, "
                f"srht_readonly_writes_total{{policy=\"{policy}\",outcome=\"{outcome}\"}}, scraped every "
                f"{self.interval:g} s)")
        if self.first is None or self.last is None or self.failed:
            return Expectation(text, False, f"{self.scrapes} scrapes, {len(self.failed)} failed: "
                               + "; ".join(f"{t} s {why}" for t, why in self.failed[:2]))
        counted = self.delta(policy, outcome)
        explained = [e for e in events if e.write and e.outcome is Outcome.EXPLAINED]
        seen = f"{self.scrapes} scrapes; {policy}/{outcome} +{counted:g}, {len(explained)} refusals seen by users"
        windows = [(lo, float("inf") if hi is None else hi) for _, lo, hi in facts.get(Fact.STATES, [])]
        if not windows:  # the database never stopped taking writes
            high = [t for t, v in self.read_only if v > 0]
            return Expectation(text, counted == 0 and not high and not explained,
                               seen + (f"; read-only at {high[0]} s" if high else "; read-only never"))
        inside = [v for t, v in self.read_only if any(lo <= t < hi for lo, hi in windows)]
        final = self.read_only[-1][1] if self.read_only else None
        periods = self.periods()
        saw = any(v >= 1 for v in inside) or periods > 0
        passed = bool(explained) and counted >= len(explained) and saw and final == 0
        return Expectation(text, passed, f"{seen}; read-only gauge 1 in {sum(v >= 1 for v in inside)} of "
                           f"{len(inside)} scrapes while not writable, {periods:g} read-only period(s) ended, "
                           f"{final} at the end")
