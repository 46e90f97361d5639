"""gunicorn settings for the standalone proxy (``litefs_wsgi.proxy:application``).

Used by ``gunicorn -c gunicorn.conf.py`` at the repository root and by ``litefs-wsgi serve``.
The proxy's own options come from the litefs.yml-style file in ``LITEFS_WSGI_CONFIG`` and
``LITEFS_PROXY_*`` variables; they are checked here, before any worker starts.
"""

import os
import sys

from litefs_wsgi.config import Config, ConfigError

try:
    _config = Config.load()
    if not _config.target:
        raise ConfigError("target: set proxy.target in the config file, or LITEFS_PROXY_TARGET=localhost:8081")
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
workers = int(os.environ.get("GUNICORN_WORKERS") or 2)
threads = int(os.environ.get("GUNICORN_THREADS") or 32)

# A worker silent this long is restarted; kept well above the longest wait for replication.
timeout = int(max(30, 2 * _config.poll_timeout + 10))

# On SIGTERM, requests in flight get this long to finish before workers are killed.
graceful_timeout = 30

# Idle keep-alive connections from clients are closed after this many seconds.
keepalive = 5

# One access-log line per request on stdout, errors on stderr.
accesslog = "-"
errorlog = "-"
loglevel = "debug" if _config.debug else "info"


def post_fork(server, worker):
    # Size each worker's connection pool to its threads, before the app is built.
    os.environ["LITEFS_WSGI_POOL_SIZE"] = str(worker.cfg.threads)


def worker_exit(server, worker):
    # Close pooled connections to the target and the primary.
    from litefs_wsgi import proxy

    if proxy._application is not None:
        proxy._application.forwarder.close()
        proxy._application.watcher.close()
