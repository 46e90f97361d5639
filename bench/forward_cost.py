"""What one forward costs the proxy's process, against the minimal forwarder, called in-process.

Run: ``python bench/forward_cost.py`` (about 20 seconds). The app of bench/proxy_rps.py (512
bytes) runs under gunicorn (1 worker x 8 threads) on 127.0.0.1, its answers carrying gunicorn's
own ``Date`` and ``Server``. This process sends it GETs, each handed over as a WSGI server would,
in interleaved rounds (each case in turn, in alternating order), through:

- minimal: ``bench/minimal_forwarder.py``, the reference of bench/proxy_rps.py;
- forwarder: litefs-wsgi's forwarding client alone (the standalone proxy's ``TargetApp``);
- proxy: the standalone proxy's whole app (LiteFS's rules, then the forwarding client), on a
  LiteFS-style mount where this node is the primary;
- proxy, cookie: the same with a ``__txid`` cookie the primary has reached.

It prints the medians of this thread's CPU time per request (user and kernel). CPU time still
moves with the machine: ``--instructions`` counts instead, under valgrind's callgrind, the CPU
instructions each request executes in this process (the difference between runs of two request
counts, so start-up cancels out; the kernel's share left out).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

from common import callgrind_instructions, free_port, gunicorn

CASES = ("minimal", "forwarder", "proxy", "proxy, cookie")


def environ(port: int, cookie: bool) -> dict:
    """A GET as gunicorn hands it over, with wrk's headers."""
    env = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/bench/items",
        "RAW_URI": "/bench/items",
        "QUERY_STRING": "",
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(port),
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "HTTP_HOST": f"127.0.0.1:{port}",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    if cookie:
        env["HTTP_COOKIE"] = "__txid=000000000000002a"
    return env


def cases(target: str, tmp: str) -> dict:
    """Each case's (WSGI app, environ); the minimal forwarder reads its target at import."""
    os.environ["BENCH_TARGET"] = f"http://{target}"
    import minimal_forwarder

    from litefs_wsgi.config import Config
    from litefs_wsgi.proxy import make_application
    from litefs_wsgi.testing import LiteFSMount

    mount = LiteFSMount(os.path.join(tmp, "litefs"))
    mount.make_primary()
    mount.set_position("app.db", 42)
    proxy = make_application(Config(target=target, db="app.db", mount_dir=mount.path), pool_size=1)
    apps = [minimal_forwarder.application, proxy.app, proxy, proxy]
    made = {name: (app, environ(8000, name.endswith("cookie"))) for name, app in zip(CASES, apps)}
    for name, (app, env) in made.items():  # each answers as it should
        assert serve(app, env) == 512, name
    return made


def serve(app, env: dict) -> int:
    """One request through ``app``, its answer read and closed as a server would; its length."""
    statuses = []
    result = app(dict(env), lambda status, headers, exc_info=None: statuses.append(status))
    try:
        size = sum(len(chunk) for chunk in result)
    finally:
        if hasattr(result, "close"):
            result.close()
    assert statuses[0].startswith("200"), statuses
    return size


def per_request(app, env: dict, n: int) -> float:
    started = time.thread_time()
    for _ in range(n):
        serve(app, env)
    return (time.thread_time() - started) / n


def count_instructions(args: argparse.Namespace, target: str) -> None:
    def instructions(case: int, n: int) -> int:
        return callgrind_instructions(__file__, ["--one", str(case), target, "-n", str(n)])

    n = max(args.n // 4, 200)
    print(f"python {sys.version.split()[0]}, instructions per request (callgrind, {n} and {2 * n} requests)")
    counts = {}
    for case, name in enumerate(CASES):
        counts[name] = (instructions(case, 2 * n) - instructions(case, n)) / n
    for name, count in counts.items():
        print(f"{name:<14} {count:>9.0f}  {count / counts['minimal']:>5.2f}x the minimal forwarder's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="requests per case, per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians are printed")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.one:  # one case against a running app, for count_instructions
            app, env = cases(args.one[1], tmp)[CASES[int(args.one[0])]]
            for _ in range(args.n):
                serve(app, env)
            return 0
        port = free_port()
        upstream = ["-k", "gthread", "--workers", "1", "--threads", "8", "--log-level", "warning", "proxy_rps:app"]
        with gunicorn(upstream, port, cwd=os.path.dirname(os.path.abspath(__file__))):
            target = f"127.0.0.1:{port}"
            if args.instructions:
                count_instructions(args, target)
                return 0
            made = cases(target, tmp)
            samples: dict[str, list[float]] = {name: [] for name in made}
            for index in range(args.rounds):
                for name in made if index % 2 == 0 else reversed(list(made)):
                    samples[name].append(per_request(*made[name], args.n))
    print(
        f"python {sys.version.split()[0]}, CPU time of this thread per request, {args.n} requests per case "
        f"and round, medians of {args.rounds} interleaved rounds"
    )
    minimal = statistics.median(samples["minimal"])
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"{name:<14} {median * 1e6:>7.1f} µs  {median / minimal:>5.2f}x the minimal forwarder's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
