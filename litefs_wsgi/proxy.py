"""The standalone proxy: every request goes to ``target`` behind LiteFS's rules.

Served by gunicorn's threaded workers: ``gunicorn -c python:litefs_wsgi.gunicorn_conf`` from
any directory, or ``litefs-wsgi serve``. Options come from the litefs.yml-style file named in
``LITEFS_WSGI_CONFIG`` and from ``LITEFS_PROXY_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from . import metrics
from .config import Config, ConfigError
from .forwarding import Forwarder
from .middleware import LiteFSMiddleware
from .websocket import is_websocket_upgrade, tunnel


class TargetApp:
    """A WSGI app that relays each request to ``target``; WebSocket upgrades are piped."""

    may_replay = False  # an app in another process cannot raise ReplayOnPrimary (LiteFSMiddleware)

    def __init__(self, target: str, forwarder: Forwarder, websocket_idle_timeout: float) -> None:
        self.target = target
        self.forwarder = forwarder
        self.websocket_idle_timeout = websocket_idle_timeout

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        # An upgrade has an Upgrade header: a look-up, not a call, for every other request.
        if "HTTP_UPGRADE" in environ and is_websocket_upgrade(environ) and "gunicorn.socket" in environ:
            return tunnel(environ, start_response, self.target, self.forwarder, self.websocket_idle_timeout)
        return self.forwarder.forward(environ, start_response, self.target)


class MetricsPath:
    """Answers ``GET path`` with the Prometheus metrics; every other request goes on to ``app``.

    Under gunicorn's workers (``PROMETHEUS_MULTIPROC_DIR`` set, as gunicorn_conf does) they are
    every worker's, added up from prometheus_client's multiprocess files; else this process's
    default registry. The node's lag and role are read at each scrape. Scrapes are not counted
    as requests.
    """

    def __init__(self, app: LiteFSMiddleware, path: str) -> None:
        try:
            import prometheus_client
            from prometheus_client import multiprocess
        except ImportError:
            raise ConfigError(
                "metrics_path: serving metrics needs prometheus_client: pip install 'litefs-wsgi[metrics]'"
            ) from None
        self.app = app
        self.path = path
        registry = prometheus_client.REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(metrics.node_collector())
        self.metrics = prometheus_client.make_wsgi_app(registry)

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path and environ.get("REQUEST_METHOD") == "GET":
            return self.metrics(environ, start_response)
        return self.app(environ, start_response)


def make_application(config: Config | None = None, pool_size: int | None = None) -> LiteFSMiddleware | MetricsPath:
    """Build the proxy; ``pool_size`` defaults to ``LITEFS_WSGI_POOL_SIZE`` (set by
    ``litefs_wsgi.gunicorn_conf`` to the worker's thread count), else 10. With ``metrics_path``, the
    middleware sits behind MetricsPath."""
    config = config if config is not None else Config.load()
    if not config.target:
        raise ConfigError(
            "target: the standalone proxy needs the app to forward to; set proxy.target in the file "
            "named by LITEFS_WSGI_CONFIG, or LITEFS_PROXY_TARGET=localhost:8081"
        )
    if pool_size is None:
        pool_size = int(os.environ.get("LITEFS_WSGI_POOL_SIZE") or 10)
    forwarder = Forwarder(config.connect_timeout, config.read_timeout, pool_size, splice=config.splice)
    middleware = LiteFSMiddleware(
        TargetApp(config.target, forwarder, config.websocket_idle_timeout), config, forwarder=forwarder
    )
    return MetricsPath(middleware, config.metrics_path) if config.metrics_path else middleware


_application: LiteFSMiddleware | MetricsPath | None = None


def __getattr__(name: str):
    # Built on first access, so that importing this module needs no configuration; gunicorn
    # reads ``application`` when the worker boots, and a bad option stops it there.
    global _application
    if name == "application":
        if _application is None:
            _application = make_application()
        return _application
    raise AttributeError(name)
