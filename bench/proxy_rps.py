"""Requests per second and latency of the standalone proxy against other ways to put a proxy in front of an app.

Run: ``python bench/proxy_rps.py`` from the repository root (about a minute; nginx is measured
only when ``nginx`` is on PATH). Everything listens on 127.0.0.1, side by side in one run:

- direct: the app under gunicorn, no proxy (the baseline);
- litefs-wsgi: ``litefs_wsgi.proxy:application`` (this node the primary, GET without cookie),
  and on a replica with a ``__txid`` cookie already satisfied (one ``-pos`` read, no wait);
- werkzeug ProxyMiddleware: ``werkzeug.middleware.http_proxy``;
- naive requests: a forwarder calling ``requests.request`` per request, as often hand-written;
- nginx: ``proxy_pass`` with upstream keep-alive.

Each proxy runs under gunicorn with the same settings (gthread, 1 worker, 16 threads, no
access log); the load generator is a threaded Python client on keep-alive connections
sending a fixed number of GETs, so every run stops by itself. The machine's cores are shared
by the client, the proxy and the app: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from subprocess import PIPE, STDOUT

import common
from common import free_port, running

HERE = os.path.dirname(os.path.abspath(__file__))
BODY = b"x" * 512
PATH = "/bench/items"
GUNICORN = ["-k", "gthread", "--workers", "1", "--threads", "16", "--log-level", "warning", "--keep-alive", "5"]


# -- the WSGI apps gunicorn loads from this module ------------------------------------------


def app(environ, start_response):
    """The application behind every proxy: a small fixed answer."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def _werkzeug_proxy():
    from werkzeug.middleware.http_proxy import ProxyMiddleware

    def not_proxied(environ, start_response):
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    # werkzeug turns a prefix "/" into "//", which matches nothing: name a real one.
    return ProxyMiddleware(not_proxied, {PATH.rsplit("/", 1)[0]: {"target": os.environ["BENCH_TARGET"]}})


def naive_proxy(environ, start_response):
    """Forward with ``requests.request``: a new connection per request, body read whole."""
    import requests
    from werkzeug.datastructures import EnvironHeaders
    from werkzeug.http import is_hop_by_hop_header
    from werkzeug.wsgi import get_input_stream

    headers = {k: v for k, v in EnvironHeaders(environ).items() if not is_hop_by_hop_header(k) and k != "Host"}
    url = os.environ["BENCH_TARGET"] + environ.get("RAW_URI", environ.get("PATH_INFO", "/"))
    body = get_input_stream(environ).read()
    response = requests.request(
        environ["REQUEST_METHOD"], url, headers=headers, data=body or None, allow_redirects=False, timeout=30
    )
    out = [(k, v) for k, v in response.raw.headers.items() if not is_hop_by_hop_header(k)]
    start_response(f"{response.status_code} {response.reason}", out)
    return [response.content]


def __getattr__(name: str):
    if name == "werkzeug_proxy":
        return _werkzeug_proxy()
    raise AttributeError(name)


# -- running servers -------------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(wsgi: str, env: dict | None = None) -> Iterator[str]:
    port = free_port()
    with common.gunicorn([*GUNICORN, "--chdir", HERE, wsgi], port, env, HERE, stdout=PIPE, stderr=STDOUT):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def nginx(target_port: int, tmp: str) -> Iterator[str]:
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server 127.0.0.1:{target_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
        )
    with running(["nginx", "-p", tmp, "-c", conf], port, stdout=PIPE, stderr=STDOUT):
        yield f"http://127.0.0.1:{port}"


# -- the load generator ----------------------------------------------------------------------


def load(url: str, requests: int, concurrency: int, headers: dict | None = None) -> dict:
    """Send ``requests`` GETs over ``concurrency`` keep-alive connections; rps and latencies."""
    host, port = url.split("//")[1].split(":")
    per_thread = requests // concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1, timeout=60)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        start.wait()
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                conn.request("GET", PATH, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or data != BODY:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join(300)
    elapsed = time.perf_counter() - t0
    flat = sorted(x for per in latencies for x in per)
    return {
        "rps": len(flat) / elapsed,
        "p50": statistics.median(flat) * 1000,
        "p99": flat[int(len(flat) * 0.99)] * 1000,
        "errors": sum(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", "--requests", type=int, default=4000)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mount, replica = os.path.join(tmp, "litefs"), os.path.join(tmp, "replica")
        for path in (mount, replica):
            os.makedirs(path)
            with open(os.path.join(path, "app.db-pos"), "w") as f:
                f.write("000000000000002a/0000000000000001\n")
        with open(os.path.join(replica, ".primary"), "w") as f:
            f.write("node-a\n")
        with gunicorn("proxy_rps:app") as target:
            target_env = {"BENCH_TARGET": target}
            litefs_env = {
                "LITEFS_DIR": mount,
                "LITEFS_PROXY_DB": "app.db",
                "LITEFS_PROXY_TARGET": target.split("//")[1],
                "LITEFS_PROXY_FORWARD": "http",
                "LITEFS_WSGI_POOL_SIZE": "16",
            }
            cookie = {"Cookie": "__txid=000000000000002a"}
            setups = [
                ("direct (no proxy)", contextlib.nullcontext(target), None),
                ("litefs-wsgi", gunicorn("litefs_wsgi.proxy:application", litefs_env), None),
                (
                    "litefs-wsgi, replica+cookie",
                    gunicorn("litefs_wsgi.proxy:application", {**litefs_env, "LITEFS_DIR": replica}),
                    cookie,
                ),
                ("werkzeug ProxyMiddleware", gunicorn("proxy_rps:werkzeug_proxy", target_env), None),
                ("naive requests forwarder", gunicorn("proxy_rps:naive_proxy", target_env), None),
            ]
            if shutil.which("nginx"):
                setups.append(("nginx proxy_pass", nginx(int(target.rsplit(":", 1)[1]), tmp), None))
            else:
                print("nginx: not installed, skipped")
            print(f"{args.requests} GETs over {args.concurrency} keep-alive connections, {os.cpu_count()} cores")
            header = f"{'setup':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs direct':>10}"
            print(header)
            print("-" * len(header))
            direct = None
            for name, setup, headers in setups:
                with setup as url:
                    load(url, min(400, args.requests), args.concurrency, headers)  # warm up
                    r = load(url, args.requests, args.concurrency, headers)
                direct = direct or r["rps"]
                print(
                    f"{name:<26} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>7}"
                    f" {r['rps'] / direct:>9.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
