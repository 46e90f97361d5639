"""Requests per second of a Flask app under gunicorn, bare and wrapped in LiteFSMiddleware, with wrk.

Run: ``python bench/app_rps.py`` from the repository root (about two minutes; needs ``wrk``,
Debian's package). Everything listens on 127.0.0.1. One gunicorn per setup (gthread, 1 worker,
8 threads, no access log), all started at once:

- bare: the app alone (the baseline);
- primary: the app in LiteFSMiddleware on a primary mount: GET without a cookie, and POST
  (the position read when the response starts, ``Set-Cookie`` added);
- replica: the app in LiteFSMiddleware on a replica mount, GET with a ``__txid`` cookie that
  is already satisfied;
- proxy: the standalone proxy on a replica mount in front of the bare app, GET without and with
  a satisfied cookie.

Each round runs wrk (2 threads, ``--connections``, ``--seconds``) once per case, in an order
rotated from round to round, so that a slow moment of this shared machine falls on all of them.
Printed: per case the median requests per second over rounds, and the median of each round's
ratio to its baseline (the bare app, sent the same request, for the middleware; the proxy
without a cookie for the proxy with one). ``--app wsgi`` uses a plain WSGI callable instead of Flask, so that the
middleware's share is not hidden by Flask's own cost.
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
from contextlib import ExitStack

import common

BODY = b"x" * 200
TXID = 42
COOKIE = f"Cookie: session=5f2b8c0e9a; __txid={TXID:016x}; theme=dark"
GUNICORN = ["-k", "gthread", "--workers", "1", "--threads", "8", "--log-level", "warning"]


# -- the WSGI apps gunicorn loads from this module -------------------------------------------


def _app():
    if os.environ.get("BENCH_APP") == "wsgi":

        def plain(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
            return [BODY]

        return plain
    import flask

    app = flask.Flask("bench")
    app.add_url_rule("/items", "items", lambda: BODY, methods=["GET", "POST"])
    return app.wsgi_app


def bare():
    return _app()


def wrapped():
    from litefs_wsgi import LiteFSMiddleware

    return LiteFSMiddleware(_app(), db="app.db", mount_dir=os.environ["BENCH_MOUNT"], forward="http")


# -- the run ---------------------------------------------------------------------------------


def wrk(port: int, args: argparse.Namespace, header: str | None, script: str | None) -> float:
    command = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "--timeout", "10s"]
    if header:
        command += ["-H", header]
    if script:
        command += ["-s", script]
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}/items"], capture_output=True, text=True, timeout=args.seconds + 60
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors on port {port}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    parser.add_argument("--seconds", type=int, default=3, help="wrk's duration per case and round")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--app", choices=["flask", "wsgi"], default="flask")
    parser.add_argument(
        "--only", choices=["bare", "primary", "replica", "proxy"], nargs="+", help="run only these setups' cases"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (Debian: apt-get install wrk)")
    sys.path.insert(0, common.ROOT)
    from litefs_wsgi.testing import LiteFSMount

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        primary, replica = LiteFSMount(f"{tmp}/primary"), LiteFSMount(f"{tmp}/replica")
        primary.make_primary()
        replica.make_replica("node-a")
        for mount in (primary, replica):
            mount.set_position("app.db", TXID)
        post = os.path.join(tmp, "post.lua")
        with open(post, "w") as f:
            f.write('wrk.method = "POST"\nwrk.body = "x=1"\nwrk.headers["Content-Type"] = "text/plain"\n')
        here = os.path.dirname(os.path.abspath(__file__))
        ports = {name: common.free_port() for name in ("bare", "primary", "replica", "proxy")}
        env = {"BENCH_APP": args.app, "PYTHONPATH": os.pathsep.join([here, common.ROOT])}
        for name, mount, entry in (
            ("bare", primary, "bare()"),
            ("primary", primary, "wrapped()"),
            ("replica", replica, "wrapped()"),
        ):
            server_env = {**env, "BENCH_MOUNT": mount.path}
            quiet = {"stderr": subprocess.DEVNULL}
            command = [*GUNICORN, f"app_rps:{entry}"]
            stack.enter_context(common.gunicorn(command, ports[name], server_env, here, **quiet))
        config = common.proxy_config(f"{tmp}/litefs.yml", replica.path, f"127.0.0.1:{ports['bare']}")
        stack.enter_context(common.standalone_proxy(config, ports["proxy"], 8, stderr=subprocess.DEVNULL))
        cases = [  # (name, port, header, script, baseline)
            ("bare GET", "bare", None, None, None),
            ("bare GET, same cookie", "bare", COOKIE, None, None),
            ("bare POST", "bare", None, post, None),
            ("primary GET, no cookie", "primary", None, None, "bare GET"),
            ("replica GET, satisfied cookie", "replica", COOKIE, None, "bare GET, same cookie"),
            ("primary POST, cookie set", "primary", None, post, "bare POST"),
            ("proxy GET, no cookie", "proxy", None, None, None),
            ("proxy GET, satisfied cookie", "proxy", COOKIE, None, "proxy GET, no cookie"),
        ]
        if args.only:
            keep = {name for name, server, *_ in cases if server in args.only}
            keep |= {case[4] for case in cases if case[0] in keep and case[4]}  # and their baselines
            cases = [case for case in cases if case[0] in keep]
        rps: dict[str, list[float]] = {name: [] for name, *_ in cases}
        for round_ in range(args.rounds):
            shift = round_ % len(cases)
            for name, server, header, script, _ in cases[shift:] + cases[:shift]:
                rps[name].append(wrk(ports[server], args, header, script))
    print(
        f"{args.app} app under gunicorn gthread 1x8, wrk -t2 -c{args.connections} -d{args.seconds}s, "
        f"medians of {args.rounds} interleaved rounds"
    )
    header = f"{'case':<32} {'req/s':>8} {'ratio':>6}  to"
    print(header)
    print("-" * (len(header) + 20))
    for name, _, _, _, baseline in cases:
        ratio = ""
        if baseline:
            ratio = f"{statistics.median(a / b for a, b in zip(rps[name], rps[baseline])):>6.2f}  {baseline}"
        print(f"{name:<32} {statistics.median(rps[name]):>8.0f} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
