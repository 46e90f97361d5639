"""Record the middleware's decisions, waits and forward failures in prometheus_client, if installed.

With ``prometheus_client`` (``pip install 'litefs-wsgi[metrics]'``) every LiteFSMiddleware
records into its default registry, so whatever the app already exports (``make_wsgi_app``,
prometheus-flask-exporter, django-prometheus) includes these metrics. Without it a
``Recorder`` whose methods do nothing stands in, and prometheus_client is never imported.

prometheus_client is imported when the first middleware is made, not when this module is:
its multiprocess mode is chosen by ``PROMETHEUS_MULTIPROC_DIR`` at that import, and the
standalone proxy's gunicorn settings set it first (``litefs_wsgi.gunicorn_conf``).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

# Every request the middleware handles is counted once, under one of these (README: Metrics).
DECISIONS = (
    "read",
    "waited",
    "timeout",
    "write_primary",
    "forward",
    "fly_replay",
    "passthrough",
    "health",
    "refused",
    "no_primary",
    "error",
)

# Why a forward to the primary (or the standalone proxy's target) failed; the Forwarder says.
FORWARD_CAUSES = ("connect", "timeout", "protocol", "client", "invalid", "url")

# Reads wait about a millisecond after a write on a replica (NOTES.md), up to poll_timeout (5 s).
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# A decision recorded by nobody: NoneType, whose call returns None. Called on every request,
# it is a C call, where a function of ours would be a bound method and a Python frame (about
# 300 instructions each time, bench/overhead.py --instructions). A class attribute that is
# a type, not a function, is not bound to the instance.
_nothing = type(None)


class Recorder:
    """Where the middleware records. This one records nothing (no prometheus_client);
    ``_PrometheusRecorder`` has the same attributes. Each decision is an attribute holding a
    callable of no arguments, so that a request pays one call and no lookup by label."""

    read = waited = timeout = write_primary = forward = fly_replay = _nothing
    passthrough = health = refused = no_primary = error = _nothing
    enabled = False

    def wait_started(self) -> float:
        """A read starts waiting; returns what ``wait_ended`` or ``wait_refused`` takes."""
        return 0.0

    def wait_ended(self, started: float) -> None:
        """The read that started waiting at ``started`` has its TXID, or timed out."""

    def wait_refused(self, started: float) -> None:
        """The read was refused (``max_waiters``) instead of waiting."""

    def forward_failed(self, cause: str, to_primary: bool) -> None:
        """A forward failed, for one of FORWARD_CAUSES."""

    def watch(self, watcher: Any) -> None:
        """Report the lag and role of ``watcher`` (a Watcher) at scrape time."""


NOOP = Recorder()


class _PrometheusRecorder(Recorder):
    enabled = True

    def __init__(self, prometheus_client: Any) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
            # Multiprocess mode (gunicorn's workers): each count must go to this process's file.
            requests = prometheus_client.Counter("litefs_wsgi_requests", REQUESTS_HELP, ["decision"])
            for decision in DECISIONS:
                # Bound here: a request then costs the child's inc, no label lookup.
                setattr(self, decision, requests.labels(decision).inc)
        else:
            counts = RequestCounts(prometheus_client.metrics_core.CounterMetricFamily)
            prometheus_client.REGISTRY.register(counts)
            for decision, count in counts.counts.items():
                setattr(self, decision, count.__next__)
        self._waiting = prometheus_client.Gauge(
            "litefs_wsgi_waiting_reads",
            "Reads waiting now for this node to reach their __txid.",
            multiprocess_mode="livesum",
        )
        self._waits = prometheus_client.Histogram(
            "litefs_wsgi_wait_seconds",
            "How long reads waited for their __txid (those that got it, and those that timed out).",
            buckets=WAIT_BUCKETS,
        )
        errors = prometheus_client.Counter(
            "litefs_wsgi_forward_errors",
            "Forwards that failed, by where they went (primary, target) and why.",
            ["to", "cause"],
        )
        self._forward_errors = {
            (cause, to == "primary"): errors.labels(to, cause).inc
            for to in ("primary", "target")
            for cause in FORWARD_CAUSES
        }
        self._node = NodeCollector(prometheus_client.metrics_core.GaugeMetricFamily)
        prometheus_client.REGISTRY.register(self._node)

    def wait_started(self) -> float:
        self._waiting.inc()
        return time.perf_counter()

    def wait_ended(self, started: float) -> None:
        self._waiting.dec()
        self._waits.observe(time.perf_counter() - started)

    def wait_refused(self, started: float) -> None:
        self._waiting.dec()
        self.refused()

    def forward_failed(self, cause: str, to_primary: bool) -> None:
        count = self._forward_errors.get((cause, to_primary))
        if count is not None:
            count()

    def watch(self, watcher: Any) -> None:
        self._node.watcher = watcher


REQUESTS_HELP = "Requests handled by litefs-wsgi's middleware, by the decision taken for each."


class RequestCounts:
    """The ``litefs_wsgi_requests`` counter of one process, counted without prometheus_client's
    Counter: its ``inc`` takes a lock and costs a tenth of a microsecond-long request path
    (bench/overhead.py --instructions). Each decision is an ``itertools.count``, whose
    ``__next__`` is one C call that the GIL makes atomic, read when scraped."""

    def __init__(self, counter_family: Any) -> None:
        self._family = counter_family
        self.counts = {decision: itertools.count() for decision in DECISIONS}

    def describe(self) -> list:
        return [self._family("litefs_wsgi_requests", REQUESTS_HELP, labels=["decision"])]

    def collect(self) -> Iterator:
        family = self._family("litefs_wsgi_requests", REQUESTS_HELP, labels=["decision"])
        for decision, count in self.counts.items():
            family.add_metric([decision], _value(count))
        yield family


def _value(count: itertools.count) -> int:
    # How many times next() was called: the count's repr, "count(N)", is the only way to read
    # it without moving it.
    return int(repr(count)[6:-1])


class NodeCollector:
    """The node's lag and role, read from its watcher when scraped, never per request.

    A collector rather than a Gauge: prometheus_client's multiprocess mode keeps no callback
    gauges, so the standalone proxy adds this one to the registry it serves as well."""

    def __init__(self, gauge_family: Any) -> None:
        self._gauge = gauge_family
        self.watcher: Any = None

    def describe(self) -> list:
        # Without this, registering would call collect() and read .lag at once.
        return list(self._families())

    def collect(self) -> Iterator:
        watcher = self.watcher
        if watcher is None:
            return iter(())
        lag = watcher.node.lag()
        is_primary = watcher.role(fresh=True)[0]  # a scrape is rare: read the role now
        return iter(self._families(math.nan if lag is None else lag / 1000, 1.0 if is_primary else 0.0))

    def _families(self, lag: float | None = None, primary: float | None = None) -> Iterator:
        lag_family = self._gauge(
            "litefs_wsgi_lag_seconds",
            "Replication lag this node's LiteFS reports in .lag (NaN when unreadable), read at scrape time.",
        )
        primary_family = self._gauge(
            "litefs_wsgi_primary", "1 when this node is the LiteFS primary, else 0, read at scrape time."
        )
        if lag is not None:
            lag_family.add_metric([], lag)
            primary_family.add_metric([], primary)
        yield lag_family
        yield primary_family


_recorder: Recorder | None = None
_lock = threading.Lock()


def recorder(watcher: Any = None) -> Recorder:
    """The process's recorder, made (and prometheus_client imported) on first use; it then
    reports the lag and role of ``watcher``, as the last middleware made asks."""
    global _recorder
    with _lock:
        if _recorder is None:
            try:
                import prometheus_client
                import prometheus_client.metrics_core
            except ImportError:
                _recorder = NOOP
            else:
                _recorder = _PrometheusRecorder(prometheus_client)
        if watcher is not None:
            _recorder.watch(watcher)
        return _recorder


def node_collector() -> NodeCollector | None:
    """The collector of the node's lag and role, for a registry other than the default one
    (prometheus_client's multiprocess mode); None without prometheus_client."""
    rec = recorder()
    return rec._node if isinstance(rec, _PrometheusRecorder) else None
