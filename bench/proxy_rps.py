"""The standalone proxy against other ways to put a proxy in front of an app: ratios to the app served directly.

Run: ``python bench/proxy_rps.py`` from the repository root (about 7 minutes at the defaults).
Everything listens on 127.0.0.1 and runs side by side in one run:

- direct: the app under gunicorn (gthread, 1 worker x 8 threads, no access log), the baseline;
- litefs-wsgi: the standalone proxy as a user gets it, ``gunicorn -c gunicorn.conf.py`` with
  nothing but ``LITEFS_WSGI_CONFIG`` set (a LiteFS-style mount where this node is the primary);
- werkzeug: ``werkzeug.middleware.http_proxy.ProxyMiddleware`` (a new connection per request);
- minimal: ``bench/minimal_forwarder.py``, the reference (a keep-alive socket per thread, head
  in one string, answer head split by hand, ``Content-Length`` only);
- nginx: ``proxy_pass`` with upstream keep-alive, when ``nginx`` is installed;
- LiteFS: LiteFS's own Go proxy, when the ``litefs`` binary is on PATH and FUSE works (a real
  ``litefs mount``, static lease, this node the primary).

The other Python proxies run under gunicorn with the workers and threads the standalone proxy
gets by default, no access log; nginx with as many workers. Loads (wrk, keep-alive): GET of a
512-byte answer at 32 and at 4 connections; GET at 32 with a ``__txid`` cookie the primary has
reached (LiteFS and litefs-wsgi check it, the others just pass it on); a 64 MiB download at 4.
In each round, for each load, the setups take turns (each round starting at another one) and
litefs-wsgi runs before the first, between each two and after the last: every other setup is
measured between two runs of ours, and ours against it is the mean of those two over it, so
that a drift of this shared machine over the three runs (tens of percent within a minute)
falls on both sides. Printed: the medians over rounds of the ratios to direct, with each
worker's peak RSS (VmHWM), and of ours against each other setup, with the lowest and highest
round. The machine's cores are shared by wrk, the proxies and the app: read the ratios, not
the absolute figures. For the GETs
it also prints the CPU time (user and system) each setup's own processes spent per request,
read from /proc around each wrk run: what a request costs, which moves less than req/s does
on a machine where everything waits for the same two cores; and the context switches their
threads made per request (also from /proc): a Python server's threads take turns at the GIL,
and each wait for it, or for a socket, is a switch, which costs more CPU than most of the
request's own Python code on a virtual machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import common
from common import ROOT, children, context_switches, cpu_seconds, free_port, running

HERE = os.path.dirname(os.path.abspath(__file__))
BODY = b"x" * 512
STREAM = 64 * 1024 * 1024
BLOCK = 1024 * 1024
APP = ["-k", "gthread", "--workers", "1", "--threads", "8", "--keep-alive", "75", "--log-level", "warning"]
LOADS = {
    "GET c32": ("/bench/items", 32, False),
    "GET c4": ("/bench/items", 4, False),
    "c32 cookie": ("/bench/items", 32, True),
    "64 MiB c4": ("/bench/stream", 4, False),
}


# -- the WSGI apps gunicorn loads from this module ------------------------------------------


def app(environ, start_response):
    """The application behind every proxy: 512 bytes, or a 64 MiB download at /bench/stream."""
    if environ["PATH_INFO"] == "/bench/stream":
        block = b"s" * BLOCK
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(STREAM))])
        return (block for _ in range(STREAM // BLOCK))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def __getattr__(name: str):
    if name == "werkzeug_proxy":
        from werkzeug.middleware.http_proxy import ProxyMiddleware

        def not_proxied(environ, start_response):
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]

        # werkzeug turns a prefix "/" into "//", which matches nothing: name a real one.
        return ProxyMiddleware(not_proxied, {"/bench": {"target": os.environ["BENCH_TARGET"] + "/bench"}})
    raise AttributeError(name)


# -- the setups ------------------------------------------------------------------------------


class Setup:
    def __init__(self, name: str, url: str, pids: Iterator[int] | None = None) -> None:
        self.name, self.url, self._pids = name, url, pids

    def workers(self) -> list[int]:
        return list(self._pids()) if self._pids else []


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def gunicorn(name: str, args: list[str], env: dict, log: str) -> Iterator[Setup]:
    port = free_port()
    with open(log, "ab") as out:
        try:
            # Only ours reads gunicorn.conf.py: the others start where gunicorn finds none.
            cwd = ROOT if "-c" in args else HERE
            server = common.gunicorn(args, port, env, cwd, stdout=out, stderr=subprocess.STDOUT)
            proc = server.__enter__()
        except SystemExit:
            with open(log, "rb") as f:
                raise SystemExit(f"{name} did not start: {f.read()[-2000:].decode(errors='replace')}") from None
        try:
            yield Setup(name, f"http://127.0.0.1:{port}", lambda: children(proc.pid))
        finally:
            server.__exit__(None, None, None)


@contextlib.contextmanager
def nginx(target_port: int, workers: int, tmp: str) -> Iterator[Setup]:
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""daemon off;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server 127.0.0.1:{target_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
        )
    with running(["nginx", "-p", tmp, "-c", conf], port) as proc:
        yield Setup("nginx", f"http://127.0.0.1:{port}", lambda: children(proc.pid))


@contextlib.contextmanager
def litefs_proxy(target_port: int, tmp: str) -> Iterator[tuple[Setup, int]]:
    """LiteFS's Go proxy on a real ``litefs mount``; yields it and app.db's TXID."""
    base = os.path.join(tmp, "litefs-go")
    mnt, data = os.path.join(base, "mnt"), os.path.join(base, "data")
    os.makedirs(mnt)
    os.makedirs(data)
    port, api = free_port(), free_port()
    conf = os.path.join(base, "litefs.yml")
    with open(conf, "w") as f:
        f.write(
            f'fuse:\n  dir: "{mnt}"\ndata:\n  dir: "{data}"\n'
            f'lease:\n  type: "static"\n  candidate: true\n  advertise-url: "http://127.0.0.1:{api}"\n'
            f'http:\n  addr: "127.0.0.1:{api}"\n'
            f'proxy:\n  addr: "127.0.0.1:{port}"\n  target: "127.0.0.1:{target_port}"\n  db: "app.db"\n'
        )
    log = open(os.path.join(base, "litefs.log"), "ab")
    try:
        with running(["litefs", "mount", "-config", conf], port, stdout=log, stderr=subprocess.STDOUT) as proc:
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(mnt, ".lag")):  # mounted, and the primary
                if time.monotonic() > deadline:
                    raise SystemExit(f"LiteFS did not mount {mnt}; see {base}/litefs.log")
                time.sleep(0.1)
            with sqlite3.connect(os.path.join(mnt, "app.db")) as db:
                db.execute("CREATE TABLE t (x)")
                db.execute("INSERT INTO t VALUES (1)")
            db.close()
            with open(os.path.join(mnt, "app.db-pos")) as f:
                txid = int(f.read().split("/")[0], 16)
            yield Setup("LiteFS proxy", f"http://127.0.0.1:{port}", lambda: [proc.pid]), txid
    finally:
        log.close()
        subprocess.run(["fusermount3", "-u", mnt], stderr=subprocess.DEVNULL, check=False)


# -- measuring ---------------------------------------------------------------------------------


def wrk(url: str, path: str, connections: int, seconds: float, cookie: str | None) -> tuple[float, str, int]:
    """Requests per second (for the download, 64 MiB answers' worth of bytes per second), a
    warning when any answer was not a 2xx or a socket failed, and the number of answers."""
    command = ["wrk", "-t", "2" if connections > 1 else "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s"]
    command += ["--timeout", "30s"]
    if cookie:
        command += ["-H", f"Cookie: {cookie}"]
    out = subprocess.run([*command, url + path], capture_output=True, text=True, timeout=seconds + 60).stdout
    problems = "; ".join(line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line)
    answers = re.search(r"(\d+) requests in", out)
    count = int(answers[1]) if answers else 0
    if path == "/bench/stream":  # bytes, not answers: a few 64 MiB answers end within a run
        match = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?)B", out)
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
        return (float(match[1]) * scale[match[2]] / STREAM if match else 0.0), problems, count
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return (float(match[1]) if match else 0.0), problems, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; medians are printed")
    parser.add_argument("--seconds", type=int, default=2, help="length of each wrk run")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="also measure the standalone proxy with these environment variables, e.g. "
        "'threads 8:GUNICORN_THREADS=8' or 'access log:GUNICORN_CMD_ARGS=--access-logfile -'",
    )
    parser.add_argument("--only", default="", help="comma-separated loads to run (default: all)")
    args = parser.parse_args(argv)
    loads = {k: v for k, v in LOADS.items() if not args.only or k in args.only.split(",")}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        log = os.path.join(tmp, "servers.log")
        direct = stack.enter_context(gunicorn("direct", [*APP, "--chdir", HERE, "proxy_rps:app"], {}, log))
        target_port = int(direct.url.rsplit(":", 1)[1])
        setups = [direct]
        txid = 0x2A
        skipped = []
        if shutil.which("litefs") and os.path.exists("/dev/fuse"):
            try:
                go, txid = stack.enter_context(litefs_proxy(target_port, tmp))
            except SystemExit as exc:
                skipped.append(f"LiteFS proxy: {exc}")
            else:
                setups.append(go)
        else:
            skipped.append("LiteFS proxy: no litefs binary on PATH, or no /dev/fuse")
        mount = os.path.join(tmp, "litefs")
        os.makedirs(mount)
        with open(os.path.join(mount, "app.db-pos"), "w") as f:
            f.write(f"{txid:016x}/0000000000000001\n")
        config = common.proxy_config(os.path.join(tmp, "litefs.yml"), mount, f"127.0.0.1:{target_port}")
        ours_env = {"LITEFS_WSGI_CONFIG": config}
        for key in (
            "GUNICORN_WORKERS",
            "GUNICORN_THREADS",
            "GUNICORN_CMD_ARGS",
            "GUNICORN_BIND",
        ):
            os.environ.pop(key, None)
        os.environ["LITEFS_WSGI_CONFIG"] = config
        sys.path.insert(0, ROOT)
        from litefs_wsgi import gunicorn_conf as defaults  # the settings a user gets

        ours = [("litefs-wsgi", {})]
        for variant in args.variant:
            name, _, assignments = variant.partition(":")
            env = dict(item.split("=", 1) for item in assignments.split(",") if item)
            ours.append((f"litefs-wsgi, {name}", env))
        for name, env in ours:
            setups.append(
                stack.enter_context(
                    gunicorn(name, ["-c", os.path.join(ROOT, "gunicorn.conf.py")], {**ours_env, **env}, log)
                )
            )
        same = ["-k", "gthread", "--workers", str(defaults.workers), "--threads", str(defaults.threads)]
        same += ["--keep-alive", "5", "--log-level", "warning", "--chdir", HERE]
        target_env = {"BENCH_TARGET": direct.url}
        setups.append(
            stack.enter_context(
                gunicorn("werkzeug ProxyMiddleware", [*same, "proxy_rps:werkzeug_proxy"], target_env, log)
            )
        )
        setups.append(
            stack.enter_context(
                gunicorn("minimal forwarder", [*same, "minimal_forwarder:application"], target_env, log)
            )
        )
        if shutil.which("nginx"):
            setups.append(stack.enter_context(nginx(target_port, defaults.workers, tmp)))
        else:
            skipped.append("nginx: not installed")
        cookie = f"__txid={txid:016x}"
        print(
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of "
            f"{args.seconds:g} s per load and setup; the proxy's defaults: {defaults.workers} workers x "
            f"{defaults.threads} threads, access log {'on' if defaults.accesslog else 'off'}"
        )
        for line in skipped:
            print("skipped:", line)
        for setup in setups:  # warm up: imports done, pools filled
            for path, connections, with_cookie in loads.values():
                wrk(setup.url, path, connections, 1, cookie if with_cookie else None)
        ratios: dict[tuple[str, str], list[float]] = {}
        absolute: dict[str, list[float]] = {}
        # ours against each other setup, by load: ours' req/s (the mean of the runs just before and
        # just after the other's) over the other's, one value per round
        beside: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}  # CPU seconds per answer of each setup's processes
        switches: dict[tuple[str, str], list[float]] = {}  # their threads' context switches per answer
        problems: set[str] = set()
        anchor = next(setup for setup in setups if setup.name == "litefs-wsgi")
        others = [setup for setup in setups if setup is not anchor]

        def run(setup: Setup, load: str) -> float:
            path, connections, with_cookie = loads[load]
            pids = setup.workers()
            before, switched = cpu_seconds(pids), context_switches(pids)
            rps, problem, count = wrk(setup.url, path, connections, args.seconds, cookie if with_cookie else None)
            if problem:
                problems.add(f"{setup.name}, {load}: {problem}")
            if count and path != "/bench/stream":
                cpu.setdefault((setup.name, load), []).append((cpu_seconds(pids) - before) / count)
                switches.setdefault((setup.name, load), []).append((context_switches(pids) - switched) / count)
            return rps

        for index in range(args.rounds):
            for load in loads:
                # Ours runs before the first setup, between each two and after the last: every
                # other setup is measured between two runs of ours, so that a drift of the machine
                # over those three runs falls on both sides. Each round starts at another setup.
                shift = index % len(others)
                measured: dict[str, float] = {}
                ours_before = run(anchor, load)
                for setup in others[shift:] + others[:shift]:
                    measured[setup.name] = run(setup, load)
                    ours_after = run(anchor, load)
                    ours = (ours_before + ours_after) / 2
                    if setup is direct:
                        measured[anchor.name] = ours
                    if measured[setup.name]:  # a setup that answered nothing is in problems
                        beside.setdefault((setup.name, load), []).append(ours / measured[setup.name])
                    ours_before = ours_after
                base = measured[direct.name]
                absolute.setdefault(load, []).append(base)
                for setup in setups:
                    ratios.setdefault((setup.name, load), []).append(measured[setup.name] / base if base else 0.0)
        print()
        names = [s.name for s in setups]
        width = max(len(n) for n in names) + 2
        print(f"{'ratio to direct (median)':<{width}}" + "".join(f"{load:>12}" for load in loads) + f"{'peak RSS':>22}")
        print(f"{'direct, req/s':<{width}}" + "".join(f"{statistics.median(absolute[load]):>12.0f}" for load in loads))
        for setup in setups:
            rss = [peak_rss_mib(pid) for pid in setup.workers()]
            rss_text = f"{max(rss):.0f} MiB x {len(rss)}" if rss else ""
            cells = "".join(f"{statistics.median(ratios[(setup.name, load)]):>12.2f}" for load in loads)
            print(f"{setup.name:<{width}}{cells}{rss_text:>22}")
        print()

        cpu_loads = [load for load in loads if loads[load][0] != "/bench/stream"]
        if cpu_loads:
            for title, samples, scale, cell, note in (
                (
                    "CPU µs per request (median)",
                    cpu,
                    1e6,
                    "{:>12.0f}",
                    "the setup's own processes; behind a proxy the app's come on top",
                ),
                (
                    "context switches per request",
                    switches,
                    1,
                    "{:>12.1f}",
                    "median; each wait of a thread, for a socket or for the GIL, is one",
                ),
            ):
                print(f"{title:<{width}}" + "".join(f"{load:>12}" for load in cpu_loads) + f"   ({note})")
                for setup in setups:
                    cells = "".join(
                        cell.format(statistics.median(samples[(setup.name, load)]) * scale) for load in cpu_loads
                    )
                    print(f"{setup.name:<{width}}{cells}")
                print()

        print("litefs-wsgi beside each: the median over rounds of its req/s (its runs just before and after)")
        print("over the other's, with the lowest and highest round:")
        for other, target in (("minimal forwarder", 0.9), ("werkzeug ProxyMiddleware", 1.3), ("LiteFS proxy", 1.1)):
            cells = []
            for load in loads:
                values = [v for v in beside.get((other, load), []) if v]
                if values:
                    cells.append(f"{load} {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
            if cells:
                print(f"litefs-wsgi / {other} (target {target}x): " + ", ".join(cells))
        ours, reference = "litefs-wsgi", "minimal forwarder"
        both = [load for load in cpu_loads if cpu.get((ours, load)) and cpu.get((reference, load))]
        if both:
            shares = [
                f"{load} {statistics.median(cpu[(ours, load)]) / statistics.median(cpu[(reference, load)]):.2f}"
                for load in both
            ]
            print(f"CPU per request, {ours} / {reference}: " + ", ".join(shares))
        for problem in sorted(problems):
            print("warning:", problem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
