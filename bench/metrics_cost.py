"""What recording Prometheus metrics costs per request, in-process around a real Flask app.

Run: ``python bench/metrics_cost.py`` (about half a minute; needs flask and prometheus_client),
and ``python bench/metrics_cost.py --multiprocess`` for prometheus_client's multiprocess mode,
as the standalone proxy runs it under gunicorn (each value written to a memory-mapped file).

For each case it calls a Flask hello-world through werkzeug's ``run_wsgi_app`` (as a server
would: body read, closed), bare, wrapped in LiteFSMiddleware with metrics off (the no-op
recorder that stands in without prometheus_client), and wrapped with metrics on, alternating
in batches of 100, and prints the median over rounds of the CPU time per request of each (CPU
time: other processes on a busy machine do not count in it) and what metrics add:

- primary read: a GET without a cookie on the primary;
- replica read: a GET on a replica whose ``__txid`` cookie is already satisfied;
- primary write: a POST on the primary (position read, ``Set-Cookie`` added).

Then it times the recording calls alone, the no-op recorder's and prometheus_client's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the median is printed")
    parser.add_argument("--multiprocess", action="store_true", help="prometheus_client's multiprocess mode")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.multiprocess:
            # Chosen when prometheus_client is imported, as gunicorn_conf.py does before workers start.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
        return run(args, tmp)


def run(args: argparse.Namespace, tmp: str) -> int:
    import flask
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    from litefs_wsgi import LiteFSMiddleware, metrics
    from litefs_wsgi.testing import LiteFSMount

    primary, replica = LiteFSMount(f"{tmp}/primary"), LiteFSMount(f"{tmp}/replica")
    primary.make_primary()
    primary.set_position("app.db", 42)
    replica.make_replica("node-a")
    replica.set_position("app.db", 42)

    hello = flask.Flask("hello")
    hello.add_url_rule("/items", "items", lambda: "ok", methods=["GET", "POST"])
    app = hello.wsgi_app

    def wrapped(mount: LiteFSMount, metrics_on: bool):
        middleware = LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, forward="http")
        if not metrics_on:
            # What a process without prometheus_client gets (a private attribute: a benchmark only).
            middleware._metrics = metrics.NOOP
        return middleware

    if not metrics.recorder().enabled:
        raise SystemExit("prometheus_client is not installed: pip install 'litefs-wsgi[metrics]'")

    def environ(method: str, cookie: str | None = None) -> dict:
        headers = {"Cookie": f"__txid={cookie}"} if cookie else {}
        return EnvironBuilder(path="/items", method=method, headers=headers).get_environ()

    def per_request(wsgi, env: dict, n: int) -> float:
        # CPU time of this process: other processes on a busy machine do not count in it.
        started = time.process_time()
        for _ in range(n):
            body, _status, _headers = run_wsgi_app(wsgi, env.copy(), buffered=True)
            if hasattr(body, "close"):
                body.close()
        return (time.process_time() - started) / n

    cases = [
        ("primary read (GET, no cookie)", primary, environ("GET")),
        ("replica read (cookie satisfied)", replica, environ("GET", "000000000000002a")),
        ("primary write (POST, cookie set)", primary, environ("POST")),
    ]
    mode = "multiprocess mode" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "one process"
    print(
        f"python {sys.version.split()[0]}, prometheus_client in {mode}, {args.n} requests per round and "
        f"variant, median of {args.rounds} interleaved rounds"
    )
    header = f"{'case':<34} {'bare µs':>8} {'metrics off µs':>15} {'metrics on µs':>14} {'metrics add µs':>15}"
    print(header)
    print("-" * len(header))
    for name, mount, env in cases:
        variants = {"bare": app, "off": wrapped(mount, False), "on": wrapped(mount, True)}
        times: dict[str, list[float]] = {key: [] for key in variants}
        for wsgi in variants.values():
            per_request(wsgi, env, 500)  # warm up
        for _ in range(args.rounds):
            # Each round alternates the variants in batches of 100, so that a slower moment
            # of the machine falls on all three alike.
            spent = dict.fromkeys(variants, 0.0)
            for _ in range(args.n // 100):
                for key, wsgi in variants.items():
                    spent[key] += per_request(wsgi, env, 100) / (args.n // 100)
            for key in variants:
                times[key].append(spent[key])
        bare, off, on = (statistics.median(times[key]) * 1e6 for key in ("bare", "off", "on"))
        # Per round, on minus off (side by side), then the median: steadier than a difference of medians.
        added = statistics.median((a - b) * 1e6 for a, b in zip(times["on"], times["off"]))
        print(f"{name:<34} {bare:>8.1f} {off:>15.1f} {on:>14.1f} {added:>15.2f}")
    # The difference above is within this machine's noise: time the calls a request makes alone.
    real = metrics.recorder()
    calls = [
        ("one decision counted (every request)", lambda rec: rec.read),
        ("a wait timed (wait_started + wait_ended)", lambda rec: lambda: rec.wait_ended(rec.wait_started())),
    ]
    print()
    header = f"{'the recording calls alone':<42} {'no-op µs':>9} {'prometheus_client µs':>21}"
    print(header)
    print("-" * len(header))
    for name, bind in calls:
        noop_call, real_call = bind(metrics.NOOP), bind(real)
        per = {"noop": [], "real": []}
        for _ in range(args.rounds):
            for key, call in (("noop", noop_call), ("real", real_call)):
                started = time.process_time()
                for _ in range(args.n * 20):
                    call()
                per[key].append((time.process_time() - started) / (args.n * 20) * 1e6)
        print(f"{name:<42} {statistics.median(per['noop']):>9.3f} {statistics.median(per['real']):>21.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
