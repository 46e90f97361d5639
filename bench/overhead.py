"""What LiteFSMiddleware costs a real Flask app per request, called in-process.

Run: ``python bench/overhead.py`` (about half a minute). A Flask app (one view for GET and
POST, a 200-byte answer) is called through werkzeug's ``run_wsgi_app``, as a WSGI server
would call it, bare and wrapped in LiteFSMiddleware, in interleaved rounds: each round times
every case bare and wrapped, one after the other, and the figures printed are the medians
over rounds, not the best round (CPU time of the calling thread):

- primary read: a GET without a cookie on the primary;
- replica read: a GET on a replica whose ``__txid`` cookie is already satisfied;
- primary write: a POST on the primary (the position read when the response starts, and
  ``Set-Cookie`` added).

The ratio is the wrapped app's throughput as a share of the bare app's (1.00: free).

``--instructions`` counts instead, under valgrind's callgrind, the CPU instructions each
request executes (the difference between runs of two request counts, so start-up cancels out):
the same figure on a busy machine as on a quiet one, where CPU times move by tens of percent.
It leaves out the time spent in the kernel (the ``-pos`` file read of a write).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import flask
from werkzeug.test import EnvironBuilder, run_wsgi_app

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

BODY = "x" * 200


def flask_app() -> flask.Flask:
    app = flask.Flask("bench")
    app.add_url_rule("/items", "items", lambda: BODY, methods=["GET", "POST"])
    return app


def per_request(app, environ: dict, n: int) -> float:
    """CPU seconds per request, the answer read and closed as a server would. This thread's
    CPU time, not the wall clock: other processes on a shared machine then shift it little."""
    started = time.thread_time()
    for _ in range(n):
        run_wsgi_app(app, environ.copy(), buffered=True)  # buffered: read whole and closed
    return (time.thread_time() - started) / n


def environ(method: str, cookie: str | None = None) -> dict:
    headers = {"Cookie": f"session=abc123; __txid={cookie}; theme=dark"} if cookie else {}
    return EnvironBuilder(path="/items", method=method, headers=headers).get_environ()


def setup(tmp: str) -> tuple:
    """The bare app and the cases: (name, wrapped app, environ), each checked once."""
    primary, replica = LiteFSMount(f"{tmp}/primary"), LiteFSMount(f"{tmp}/replica")
    primary.make_primary()
    primary.set_position("app.db", 42)
    replica.make_replica("node-a")
    replica.set_position("app.db", 42)
    on_primary = LiteFSMiddleware(flask_app().wsgi_app, db="app.db", mount_dir=primary.path, forward="http")
    on_replica = LiteFSMiddleware(flask_app().wsgi_app, db="app.db", mount_dir=replica.path, forward="http")
    cases = [
        ("primary read (GET, no cookie)", on_primary, environ("GET")),
        ("replica read (cookie satisfied)", on_replica, environ("GET", "000000000000002a")),
        ("primary write (POST, cookie set)", on_primary, environ("POST")),
    ]
    for _name, wrapped, env in cases:  # warm up, and check that each case is what it says
        _body, status, headers = run_wsgi_app(wrapped, env.copy(), buffered=True)
        assert status.startswith("200"), status
        assert ("Set-Cookie" in headers) == (env["REQUEST_METHOD"] == "POST"), headers
    return flask_app().wsgi_app, cases


def count_instructions(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")

    def instructions(case: int, side: str, n: int) -> int:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
        run = subprocess.run(
            [*command, "--one", str(case), side, "-n", str(n)],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        return int(re.search(r"Collected : (\d+)", run.stderr)[1])

    n = max(args.n // 4, 200)
    print(f"python {sys.version.split()[0]}, Flask {version('flask')}, instructions per request (callgrind, {n})")
    header = f"{'case':<34} {'bare':>9} {'wrapped':>9} {'added':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        names = [name for name, _, _ in setup(tmp)[1]]
    for case, name in enumerate(names):
        bare, wrapped = ((instructions(case, side, 2 * n) - instructions(case, side, n)) / n for side in ("bare", "on"))
        print(f"{name:<34} {bare:>9.0f} {wrapped:>9.0f} {wrapped - bare:>8.0f} {bare / wrapped:>6.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="requests per case, per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians are printed")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions:
        return count_instructions(args)
    with tempfile.TemporaryDirectory() as tmp:
        bare, cases = setup(tmp)
        if args.one:  # one case, one side, for count_instructions
            name, wrapped, env = cases[int(args.one[0])]
            app = bare if args.one[1] == "bare" else wrapped
            for _ in range(args.n):
                run_wsgi_app(app, env.copy(), buffered=True)
            return 0
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
        for _ in range(args.rounds):
            for name, wrapped, env in cases:
                samples[name].append((per_request(bare, env, args.n), per_request(wrapped, env, args.n)))
    print(
        f"python {sys.version.split()[0]}, Flask {version('flask')}, CPU time, "
        f"{args.n} requests per case and round, medians of {args.rounds} interleaved rounds"
    )
    header = f"{'case':<34} {'bare µs':>8} {'wrapped µs':>11} {'added µs':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, pairs in samples.items():
        bare_t = statistics.median(b for b, _ in pairs)
        wrapped_t = statistics.median(w for _, w in pairs)
        ratio = statistics.median(b / w for b, w in pairs)  # throughput kept, per round
        added = (wrapped_t - bare_t) * 1e6
        print(f"{name:<34} {bare_t * 1e6:>8.1f} {wrapped_t * 1e6:>11.1f} {added:>9.1f} {ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
