"""The standalone proxy of another git revision against this checkout's, side by side, with wrk.

Run: ``python bench/proxy_ab.py REV`` (about two minutes; needs ``wrk`` and git). REV (a commit,
a tag, ``HEAD~1``) is checked out in a temporary git worktree; both proxies run as a user gets
them (``gunicorn -c gunicorn.conf.py``, each from its own tree) in front of one app (the 512-byte
app of bench/proxy_rps.py under gunicorn, 1 worker x 8 threads), on a mount where this node is
the primary. For each load (GET at 32 connections, without and with a satisfied ``__txid``
cookie), each round runs old, new, new, old (then new, old, old, new) for 2 s each, and the
ratio new/old of each round's summed req/s is printed: the median and every round; then the
median ratio new/old of the CPU time each proxy's processes spent per request (user and system,
from ``/proc``), which moves less than req/s on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile

import common
from common import ROOT, children, cpu_seconds, free_port, gunicorn

HERE = os.path.dirname(os.path.abspath(__file__))
APP = ["-k", "gthread", "--workers", "1", "--threads", "8", "--log-level", "warning", "--chdir", HERE, "proxy_rps:app"]
TXID = 0x2A
LOADS = {"GET c32": None, "c32 cookie": f"__txid={TXID:016x}"}


def wrk(port: int, cookie: str | None, seconds: int) -> tuple[float, int]:
    """(req/s, requests) of one wrk run; (0.0, 0) when wrk printed none."""
    command = ["wrk", "-t2", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/bench/items"]
    if cookie:
        command[1:1] = ["-H", f"Cookie: {cookie}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    rate, count = re.search(r"Requests/sec:\s+([\d.]+)", out), re.search(r"(\d+) requests in", out)
    return (float(rate[1]), int(count[1])) if rate and count else (0.0, 0)


@contextlib.contextmanager
def worktree(rev: str):
    """REV checked out in a temporary git worktree, removed afterwards."""
    path = tempfile.mkdtemp(prefix="litefs-wsgi-ab-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", path, rev], check=True, timeout=60)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("rev", help="the git revision to compare with this checkout")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds; the median is printed")
    parser.add_argument("--seconds", type=int, default=2, help="length of each wrk run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        old_root = stack.enter_context(worktree(args.rev))
        target = free_port()
        stack.enter_context(gunicorn(APP, target, {}, HERE, stderr=subprocess.DEVNULL))
        mount = os.path.join(tmp, "litefs")
        os.makedirs(mount)
        with open(os.path.join(mount, "app.db-pos"), "w") as f:
            f.write(f"{TXID:016x}/0000000000000001\n")
        config = common.proxy_config(os.path.join(tmp, "litefs.yml"), mount, f"127.0.0.1:{target}")
        ports, masters = {}, {}
        for name, root in (("old", old_root), ("new", ROOT)):
            # Started in its own tree: ``python -m gunicorn`` imports litefs_wsgi from there.
            ports[name] = free_port()
            conf = ["-c", os.path.join(root, "gunicorn.conf.py")]
            env = {"LITEFS_WSGI_CONFIG": config}
            masters[name] = stack.enter_context(gunicorn(conf, ports[name], env, root, stderr=subprocess.DEVNULL))
        print(f"new ({ROOT}) over old ({args.rev}), req/s, {args.rounds} rounds of 4 x {args.seconds} s")
        for load, cookie in LOADS.items():
            ratios, cpu_ratios = [], []
            for index in range(args.rounds):
                order = ("old", "new", "new", "old") if index % 2 == 0 else ("new", "old", "old", "new")
                rps = {"old": 0.0, "new": 0.0}
                cpu = {"old": 0.0, "new": 0.0}
                served = {"old": 0, "new": 0}
                for name in order:
                    # The workers looked up at each run: gunicorn listens before it forks them.
                    pids = [masters[name].pid, *children(masters[name].pid)]
                    before = cpu_seconds(pids)
                    rate, count = wrk(ports[name], cookie, args.seconds)
                    cpu[name] += cpu_seconds(pids) - before
                    rps[name] += rate
                    served[name] += count
                ratios.append(rps["new"] / rps["old"] if rps["old"] else float("nan"))
                if served["old"] and served["new"] and cpu["old"]:
                    cpu_ratios.append((cpu["new"] / served["new"]) / (cpu["old"] / served["old"]))
            rounds = " ".join(f"{r:.2f}" for r in ratios)
            cpu_median = f"{statistics.median(cpu_ratios):.2f}" if cpu_ratios else "n/a"
            print(f"{load:<11} median {statistics.median(ratios):.2f}  rounds {rounds}  CPU per request {cpu_median}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
