"""Requests per second of a Flask app under gunicorn, bare and wrapped in LiteFSMiddleware, with wrk.

Run: ``python bench/app_rps.py`` from the repository root (about three minutes; needs ``wrk``,
Debian's package). Everything listens on 127.0.0.1. One gunicorn per setup (gthread, 1 worker,
8 threads, no access log), all started at once:

- bare: the app alone (the baseline);
- primary: the app in LiteFSMiddleware on a primary mount: GET without a cookie, and POST
  (the position read when the response starts, ``Set-Cookie`` added);
- replica: the app in LiteFSMiddleware on a replica mount, GET with a ``__txid`` cookie that
  is already satisfied;
- proxy: the standalone proxy on a replica mount in front of the bare app, GET without and with
  a satisfied cookie.

Each case is measured beside its baseline (the bare app, sent the same request, for the
middleware; the proxy without a cookie for the proxy with one): in each round, for each case
in an order rotated from round to round, wrk (2 threads, ``--connections``, ``--seconds``)
runs the baseline, the case, the case again and the baseline again, and the round's ratio is
the case's two runs over the baseline's two. On this shared machine throughput drifts by tens
of percent within a minute; measured this way, a drift that is steady over the four runs
falls on both sides alike. Printed: per case the median requests per second over all its
runs, the median over rounds of its ratio to its baseline with the lowest and highest round,
and the same ratio of CPU time per request instead (user and system time of the server's
processes, gunicorn's master and worker, read from /proc around each run; for the proxy its
own, not the app's behind it): what a request costs there, which moves less than its
throughput on a machine where wrk, the servers and the app wait for the same two cores.
``--app wsgi`` uses a plain WSGI callable instead of Flask, so that the middleware's share is
not hidden by Flask's own cost. ``--keep-open`` has the wrapped apps read ``-pos`` through kept
descriptors (``keep_pos_open``), as they do by default on LiteFS's own mount; without it they
open the file for each read, as on the directories laid out like a mount used here.
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
OTHER_COOKIES = "Cookie: session=5f2b8c0e9a; theme=dark"  # the same client before it wrote
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

    keep = {"keep_pos_open": True} if os.environ.get("BENCH_KEEP_OPEN") == "1" else {}
    return LiteFSMiddleware(_app(), db="app.db", mount_dir=os.environ["BENCH_MOUNT"], forward="http", **keep)


# -- the run ---------------------------------------------------------------------------------


def baselines(case: tuple) -> tuple[str, ...]:
    """The names of the cases ``case`` is measured beside: none, one or several."""
    baseline = case[4]
    return () if baseline is None else (baseline,) if isinstance(baseline, str) else baseline


def wrk(port: int, args: argparse.Namespace, header: str | None, script: str | None) -> tuple[float, int]:
    """(requests per second, requests answered) of one wrk run."""
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
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), int(re.search(r"(\d+) requests in", out)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    parser.add_argument("--seconds", type=int, default=2, help="wrk's duration per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--app", choices=["flask", "wsgi"], default="flask")
    parser.add_argument("--keep-open", action="store_true", help="the wrapped apps read -pos through kept descriptors")
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
        env["BENCH_KEEP_OPEN"] = "1" if args.keep_open else "0"
        masters = {}
        for name, mount, entry in (
            ("bare", primary, "bare()"),
            ("primary", primary, "wrapped()"),
            ("replica", replica, "wrapped()"),
        ):
            server_env = {**env, "BENCH_MOUNT": mount.path}
            quiet = {"stderr": subprocess.DEVNULL}
            command = [*GUNICORN, f"app_rps:{entry}"]
            masters[name] = stack.enter_context(common.gunicorn(command, ports[name], server_env, here, **quiet))
        config = common.proxy_config(f"{tmp}/litefs.yml", replica.path, f"127.0.0.1:{ports['bare']}")
        masters["proxy"] = stack.enter_context(
            common.standalone_proxy(config, ports["proxy"], 8, stderr=subprocess.DEVNULL)
        )
        cases = [  # (name, port, header, script, baseline)
            ("bare GET", "bare", None, None, None),
            ("bare GET, same cookie", "bare", COOKIE, None, None),
            ("bare POST", "bare", None, post, None),
            ("primary GET, no cookie", "primary", None, None, "bare GET"),
            ("replica GET, satisfied cookie", "replica", COOKIE, None, "bare GET, same cookie"),
            ("primary POST, cookie set", "primary", None, post, "bare POST"),
            ("proxy GET, no cookie", "proxy", None, None, None),
            ("proxy GET, other cookies", "proxy", OTHER_COOKIES, None, None),
            (
                "proxy GET, satisfied cookie",
                "proxy",
                COOKIE,
                None,
                ("proxy GET, no cookie", "proxy GET, other cookies"),
            ),
        ]
        if args.only:
            keep = {name for name, server, *_ in cases if server in args.only}
            keep |= {baseline for case in cases if case[0] in keep for baseline in baselines(case)}
            cases = [case for case in cases if case[0] in keep]
        by_name = {case[0]: case for case in cases}
        pairs = [(case[0], baseline) for case in cases for baseline in baselines(case)]
        rps: dict[str, list[float]] = {name: [] for name, *_ in cases}
        ratios: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
        cpu_ratios: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}

        def run(name: str) -> tuple[float, float]:
            """(req/s, CPU seconds per request of the server's processes) of one wrk run."""
            _, server, header, script, _ = by_name[name]
            pids = [masters[server].pid, *common.children(masters[server].pid)]
            before = common.cpu_seconds(pids)
            rate, count = wrk(ports[server], args, header, script)
            rps[name].append(rate)
            return rate, (common.cpu_seconds(pids) - before) / max(count, 1)

        for round_ in range(args.rounds):
            shift = round_ % len(pairs)
            for name, baseline in pairs[shift:] + pairs[:shift]:
                runs = [run(baseline), run(name), run(name), run(baseline)]
                ratios[(name, baseline)].append((runs[1][0] + runs[2][0]) / (runs[0][0] + runs[3][0]))
                cpu_ratios[(name, baseline)].append((runs[0][1] + runs[3][1]) / (runs[1][1] + runs[2][1]))
    print(
        f"{args.app} app under gunicorn gthread 1x8, wrk -t2 -c{args.connections} -d{args.seconds}s, "
        f"{args.rounds} rounds, each case beside its baseline (baseline, case, case, baseline), "
        f"-pos {'kept open' if args.keep_open else 'opened for each read'}"
    )
    header = f"{'case':<32} {'req/s':>8} {'ratio':>6}  {'rounds':>9}  {'CPU':>5}  to"
    print(header)
    print("-" * (len(header) + 20))
    for case in cases:
        name = case[0]
        if not rps[name]:
            continue
        for index, baseline in enumerate(baselines(case) or [None]):
            line = f"{name:<32} {statistics.median(rps[name]):>8.0f}" if index == 0 else " " * 41
            if baseline:
                kept, cpu = ratios[(name, baseline)], cpu_ratios[(name, baseline)]
                spread = f"{min(kept):.2f}-{max(kept):.2f}"
                line += f" {statistics.median(kept):>6.2f}  {spread:>9}  {statistics.median(cpu):>5.2f}  {baseline}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
