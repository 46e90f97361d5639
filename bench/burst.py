"""Benchmark: a burst of 10x the proxy's threads in clients, some waiting on far-ahead cookies.

    python bench/burst.py                 # 8 threads, 80 clients, 25% waiting, 6 s a run
    python bench/burst.py --threads 4 --seconds 3

Starts a target (a threaded werkzeug server in its own process) and the standalone proxy
(``gunicorn -c gunicorn.conf.py``, one worker, ``--threads`` threads) on a LiteFS-style
primary mount at TXID 1, all on 127.0.0.1. For ``--seconds`` each run, ``10 x threads``
clients send GETs in a loop; a share of them carry ``__txid`` cookies far ahead, which wait
for ``poll_timeout`` and answer 504. The other clients' p50/p99 latency and success rate
are printed for three runs side by side: no waiters (baseline), waiters, and waiters with
``max_waiters`` set; and the worst-case worker hold time, from gunicorn's access log (%(D)s:
the time a worker thread spent on one request). Everything stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import sys
import tempfile
import threading
import time
from subprocess import DEVNULL, PIPE

from common import ROOT, free_port, proxy_config, running, standalone_proxy

sys.path.insert(0, ROOT)  # litefs_wsgi from this checkout, installed or not
from litefs_wsgi.testing import LiteFSMount  # noqa: E402

CLIENT_TIMEOUT = 30.0  # seconds; a request unanswered this long counts as failed

TARGET = """
import sys
from werkzeug.serving import make_server

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]

make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True).serve_forever()
"""


@contextlib.contextmanager
def proxy(tmp: str, mount: LiteFSMount, target_port: int, threads: int, poll_timeout: float, max_waiters: int):
    """The standalone proxy; yields (port, access-log lines)."""
    config = os.path.join(tmp, f"litefs-{max_waiters}.yml")
    proxy_config(config, mount.path, f"127.0.0.1:{target_port}", poll_timeout=poll_timeout, max_waiters=max_waiters)
    port = free_port()
    args = ("--access-logformat", "ACCESS %(s)s %(D)s", "--backlog", "2048")
    lines: list[str] = []
    output = {"stdout": PIPE, "stderr": DEVNULL, "text": True}
    with standalone_proxy(config, port, threads, args, **output) as proc:
        # Read all along: gunicorn logs each request and would block on a full pipe.
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        yield port, lines
    reader.join(5)


def client(port: int, cookie: str | None, until: float, results: list) -> None:
    """GET in a loop on one keep-alive connection until ``until``; (status, seconds) per request."""
    headers = {"Cookie": f"__txid={cookie}"} if cookie else {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = None
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
        results.append((status, time.monotonic() - start))
    conn.close()


def burst(port: int, clients: int, waiting_share: float, seconds: float) -> tuple[list, list]:
    """Run the clients; return (results of plain clients, results of waiting clients)."""
    waiting = round(clients * waiting_share)
    plain_results: list = []
    waiting_results: list = []
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=client,
            args=(
                port,
                "00000000ffffffff" if i < waiting else None,
                until,
                waiting_results if i < waiting else plain_results,
            ),
            daemon=True,
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + CLIENT_TIMEOUT + 5)
    return plain_results, waiting_results


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def hold_times(lines: list[str]) -> list[float]:
    return [int(m[2]) / 1e6 for line in lines if (m := re.match(r"ACCESS (\d+) (\d+)", line))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=8, help="proxy threads (one worker)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--waiting", type=float, default=0.25, help="share of clients with far-ahead cookies")
    parser.add_argument("--poll-timeout", type=float, default=2.0, help="how long a waiting read waits")
    args = parser.parse_args()
    clients = 10 * args.threads
    max_waiters = max(1, args.threads // 4)

    runs = [
        ("baseline: no waiters", 0.0, 0),
        (f"{args.waiting:.0%} waiting, max_waiters unset", args.waiting, 0),
        (f"{args.waiting:.0%} waiting, max_waiters={max_waiters}", args.waiting, max_waiters),
    ]
    print(
        f"proxy: 1 worker x {args.threads} threads; {clients} clients for {args.seconds:g}s a run; "
        f"poll_timeout {args.poll_timeout:g}s"
    )
    print(f"{'run':<36}{'plain ok':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}  waiting answers      max hold s")
    target_port = free_port()
    target = [sys.executable, "-c", TARGET, str(target_port)]
    with tempfile.TemporaryDirectory(prefix="litefs-burst-") as tmp, running(target, target_port, stderr=DEVNULL):
        mount = LiteFSMount(os.path.join(tmp, "litefs"))
        mount.make_primary()
        mount.set_position("app.db", 1)
        for name, share, limit in runs:
            with proxy(tmp, mount, target_port, args.threads, args.poll_timeout, limit) as (port, lines):
                plain, waiting = burst(port, clients, share, args.seconds)
            ok = [seconds for status, seconds in plain if status == 200]
            statuses: dict = {}
            for status, _ in waiting:
                statuses[status] = statuses.get(status, 0) + 1
            holds = hold_times(lines)
            print(
                f"{name:<36}{len(ok) / max(1, len(plain)):>10.1%}{len(ok) / args.seconds:>8.0f}"
                f"{percentile(ok, 50) * 1000:>9.1f}{percentile(ok, 99) * 1000:>9.1f}  "
                f"{' '.join(f'{s}x{n}' for s, n in sorted(statuses.items(), key=str)) or '-':<21}"
                f"{max(holds, default=0):>10.2f}"
            )


if __name__ == "__main__":
    main()
