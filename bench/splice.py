"""What splicing large answers costs whom: the standalone proxy spliced and copied, side by side.

Run: ``python bench/splice.py`` (about a minute; needs ``wrk``). Everything on 127.0.0.1: the
app of bench/proxy_rps.py (1 worker x 8 threads) and two standalone proxies in front of it as
``gunicorn -c gunicorn.conf.py`` gives them (2 workers x 32 threads): one with ``splice:
always``, whose 64 MiB answers go by splice(2), and one with ``splice: never``, whose answers
are copied through Python and gunicorn as smaller ones are (as the default, ``remote``, does for
this client on 127.0.0.1). wrk downloads 64 MiB answers at 4 connections from each in turn,
alternating rounds. Printed, medians over rounds: the throughput, and the CPU time per GiB
moved of each party: the proxy's workers and the app's (from /proc), wrk's (its rusage), and
the whole machine's (from /proc/stat). On loopback the client shares the proxy's cores, so a
cost moved from the proxy to the client shows here as lost throughput; in production the
client is on another machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack

import common
from proxy_rps import APP, STREAM, wrk

SETUPS = ("spliced", "copied")


def machine_busy() -> float:
    """Seconds of CPU time the whole machine has spent busy (not idle or waiting), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:3]) + fields[5] + fields[6]  # user, nice, system, irq, softirq: not idle, iowait or steal
    return busy / os.sysconf("SC_CLK_TCK")


def wrk_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child waited for
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are printed")
    parser.add_argument("--seconds", type=int, default=3, help="length of each wrk run")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (Debian: apt-get install wrk)")
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        sys.path.insert(0, common.ROOT)
        from litefs_wsgi.testing import LiteFSMount

        mount = LiteFSMount(os.path.join(tmp, "mount"))
        mount.make_primary()
        mount.set_position("app.db", 1)
        log = open(os.path.join(tmp, "servers.log"), "w")  # closed by the stack, before the directory goes
        stack.callback(log.close)
        app_port = common.free_port()
        app = stack.enter_context(
            common.gunicorn([*APP, "proxy_rps:app"], app_port, {"PYTHONPATH": here}, here, stderr=log)
        )
        config = common.proxy_config(os.path.join(tmp, "litefs.yml"), mount.path, f"127.0.0.1:{app_port}")
        proxies = {}
        for name in SETUPS:
            port = common.free_port()
            # splice: always splices to this loopback client too; never (as the default,
            # remote, does on loopback) copies through gunicorn as smaller answers are.
            env = {"LITEFS_WSGI_CONFIG": config, "LITEFS_PROXY_SPLICE": "always" if name == "spliced" else "never"}
            conf = os.path.join(common.ROOT, "gunicorn.conf.py")
            proxies[name] = (stack.enter_context(common.gunicorn(["-c", conf], port, env, stderr=log)), port)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in SETUPS}
        for index in range(args.rounds + 1):  # the first round warms up and is not counted
            for name in SETUPS if index % 2 else reversed(SETUPS):
                master, port = proxies[name]
                proxy_pids = [master.pid, *common.children(master.pid)]
                app_pids = [app.pid, *common.children(app.pid)]
                before = (common.cpu_seconds(proxy_pids), common.cpu_seconds(app_pids), wrk_cpu(), machine_busy())
                rate, problems, _ = wrk(f"http://127.0.0.1:{port}", "/bench/stream", 4, args.seconds, None)
                after = (common.cpu_seconds(proxy_pids), common.cpu_seconds(app_pids), wrk_cpu(), machine_busy())
                if problems:
                    raise SystemExit(f"{name}: {problems}")
                if index == 0:
                    continue
                gib = rate * STREAM * args.seconds / 2**30
                spent = [b - a for a, b in zip(before, after)]
                for key, value in zip(("proxy", "app", "wrk", "machine"), spent):
                    samples[name].setdefault(key, []).append(value / gib)
                samples[name].setdefault("GiB/s", []).append(rate * STREAM / 2**30)
    print(
        f"{os.cpu_count()} cores, load average {load:.1f}; 64 MiB answers at 4 connections, "
        f"{args.rounds} alternating rounds of {args.seconds} s, medians; CPU seconds per GiB moved"
    )
    print(f"{'':10} {'GiB/s':>7} {'proxy':>7} {'app':>7} {'wrk':>7} {'machine':>8}")
    for name in SETUPS:
        row = {key: statistics.median(values) for key, values in samples[name].items()}
        print(
            f"{name:10} {row['GiB/s']:7.2f} {row['proxy']:7.2f} {row['app']:7.2f} {row['wrk']:7.2f} "
            f"{row['machine']:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
