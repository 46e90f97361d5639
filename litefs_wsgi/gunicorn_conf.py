"""gunicorn settings for the standalone proxy (``litefs_wsgi.proxy:application``).

Use them from any directory with ``gunicorn -c python:litefs_wsgi.gunicorn_conf`` (the
installed module; no file to copy), or through ``litefs-wsgi serve``, which runs the same
settings. The proxy's own options come from the litefs.yml-style file in
``LITEFS_WSGI_CONFIG`` and ``LITEFS_PROXY_*`` variables; they are checked here, before any
worker starts. gunicorn's own options given on its command line or in ``GUNICORN_CMD_ARGS``
win over the settings below.
"""

import importlib.util
import os
import platform
import shutil
import sys
import tempfile

from litefs_wsgi.config import Config, ConfigError, _count


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # found, not imported
    except ValueError:  # sys.modules holds None for it: blocked
        return False


try:
    _config = Config.load()
    if not _config.target:
        raise ConfigError("target: set proxy.target in the config file, or LITEFS_PROXY_TARGET=localhost:8081")
    if _config.metrics_path and not _installed("prometheus_client"):
        raise ConfigError("metrics_path: serving metrics needs prometheus_client: pip install 'litefs-wsgi[metrics]'")
    _workers = _count(os.environ.get("GUNICORN_WORKERS") or "2", "GUNICORN_WORKERS")
    _threads = _count(os.environ.get("GUNICORN_THREADS") or "32", "GUNICORN_THREADS")
except ConfigError as exc:
    print(f"litefs-wsgi: {exc}", file=sys.stderr)
    sys.exit(2)  # as the litefs-wsgi command does for a bad option

# The WSGI app each worker serves: the rules of LiteFS's proxy in front of `target`.
wsgi_app = "litefs_wsgi.proxy:application"

# Listen where litefs.yml's proxy.addr says (":8080" means every interface).
bind = os.environ.get("GUNICORN_BIND") or ("0.0.0.0" + _config.addr if _config.addr.startswith(":") else _config.addr)

# Threaded workers: a read waiting for replication, a forwarded upload or an open WebSocket
# each hold one thread, so threads bound how many of those a worker serves at once.
worker_class = "gthread"
workers = _workers  # GUNICORN_WORKERS, default 2
threads = _threads  # GUNICORN_THREADS, default 32

# A worker silent this long is restarted; kept well above the longest wait for replication.
timeout = int(max(30, 2 * _config.poll_timeout + 10))

# On SIGTERM, requests in flight get this long to finish before workers are killed.
graceful_timeout = 30

# Idle keep-alive connections from clients are closed after this many seconds.
keepalive = 5

# No access log: LiteFS's proxy writes no line per request either, and one cost the proxy
# about a fifth of its throughput at 32 connections (bench/proxy_rps.py). For one on stdout,
# gunicorn's own option: `--access-logfile -` (litefs-wsgi serve passes it on), or in the
# environment GUNICORN_CMD_ARGS="--access-logfile -" (both entry points read it).
accesslog = None
errorlog = "-"
# gunicorn's own log stays at info: the proxy's `debug` option is about routing decisions,
# which it logs itself (on stderr, "litefs-wsgi: ..."); use --log-level for gunicorn's.
loglevel = "info"


# One malloc arena per worker, not one per thread: glibc gives each thread that allocates
# an arena of its own (up to 8 per core), and each keeps what it freed, so 32 threads that
# each relayed a download keep far more than one would. Python allocates under its GIL, so
# the threads never wait on one arena. Measured with 4 downloads of 64 MiB at once and 256 KiB
# blocks: a worker peaked at up to 43 MiB with an arena per thread, 37-39 MiB with one. Set in
# the master, so every worker forks with it; MALLOC_ARENA_MAX in the environment wins.
def _one_malloc_arena() -> None:
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX (glibc's malloc.h)
    except (OSError, AttributeError):
        pass


_one_malloc_arena()


# Metrics at proxy.metrics-path add up over the workers with prometheus_client's multiprocess
# mode: each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which must be set
# before a worker imports prometheus_client, so here, in the master. Unless you set it, a new
# temporary directory, removed when gunicorn exits (a reload keeps it: counts go on).
_TEMP_DIR_MARK = "LITEFS_WSGI_METRICS_TEMP_DIR"
if _config.metrics_path:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="litefs-wsgi-metrics-")
        os.environ[_TEMP_DIR_MARK] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def post_fork(server, worker):
    # Size each worker's connection pool to its threads, before the app is built.
    os.environ["LITEFS_WSGI_POOL_SIZE"] = str(worker.cfg.threads)


def worker_exit(server, worker):
    # Close pooled connections to the target and the primary.
    from litefs_wsgi import proxy

    app = proxy._application
    if isinstance(app, proxy.MetricsPath):
        app = app.app
    if app is not None:
        app.forwarder.close()
        app.watcher.close()


def child_exit(server, worker):
    # A worker gone waits no more: its share of the "waiting now" gauge goes with it. Its
    # counters stay, so totals survive a restarted worker.
    if _config.metrics_path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    # Remove the metrics directory made above (only that one, never one you gave).
    made = os.environ.get(_TEMP_DIR_MARK)
    if made and made == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(made, ignore_errors=True)
