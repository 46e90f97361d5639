"""The middleware's cost per request, against the bare WSGI app, called in-process.

Run: ``python bench/overhead.py`` (about half a minute). Each case calls the app directly with
a prepared environ many times, bare and wrapped in LiteFSMiddleware, side by side, and
prints the best of several rounds:

- primary read: a GET without a cookie on the primary (no file read at all);
- primary write: a POST on the primary (the position is read and ``Set-Cookie`` added);
- replica read: a GET on a replica whose ``__txid`` cookie is already satisfied (one read
  of the ``-pos`` file, no waiting).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from werkzeug.test import EnvironBuilder

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount


def bare_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def start_response(status, headers, exc_info=None):
    return None


def per_call(app, environ: dict, n: int) -> float:
    """Seconds per request, body consumed and closed as a server would."""
    started = time.perf_counter()
    for _ in range(n):
        result = app(environ.copy(), start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.perf_counter() - started) / n


def environ(method: str, cookie: str | None = None) -> dict:
    headers = {"Cookie": f"__txid={cookie}"} if cookie else {}
    return EnvironBuilder(path="/items", method=method, headers=headers).get_environ()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        primary, replica = LiteFSMount(f"{tmp}/primary"), LiteFSMount(f"{tmp}/replica")
        primary.make_primary()
        primary.set_position("app.db", 42)
        replica.make_replica("node-a")
        replica.set_position("app.db", 42)
        on_primary = LiteFSMiddleware(bare_app, db="app.db", mount_dir=primary.path, forward="http")
        on_replica = LiteFSMiddleware(bare_app, db="app.db", mount_dir=replica.path, forward="http")
        cases = [
            ("primary read (GET, no cookie)", on_primary, environ("GET")),
            ("primary write (POST, cookie set)", on_primary, environ("POST")),
            ("replica read (cookie satisfied)", on_replica, environ("GET", "000000000000002a")),
        ]
        print(f"python {sys.version.split()[0]}, {args.n} requests per round, best of {args.rounds} rounds")
        header = f"{'case':<34} {'bare µs':>8} {'wrapped µs':>11} {'overhead µs':>12} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        for name, wrapped, env in cases:
            per_call(wrapped, env, 1000)  # warm up
            bare = min(per_call(bare_app, env, args.n) for _ in range(args.rounds))
            mid = min(per_call(wrapped, env, args.n) for _ in range(args.rounds))
            print(f"{name:<34} {bare * 1e6:>8.2f} {mid * 1e6:>11.2f} {(mid - bare) * 1e6:>12.2f} {mid / bare:>5.1f}x")
        try:
            import flask
        except ImportError:
            return 0
        hello = flask.Flask("hello")
        hello.add_url_rule("/items", "items", lambda: "ok", methods=["GET", "POST"])
        flask_time = min(per_call(hello.wsgi_app, environ("GET"), args.n // 4) for _ in range(args.rounds))
        print(f"for scale: a Flask hello-world view takes {flask_time * 1e6:.1f} µs per request here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
