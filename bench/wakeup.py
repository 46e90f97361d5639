"""Wake-up latency and CPU cost of waiting reads: one Watcher thread against per-request 1 ms polling.

Run: ``python bench/wakeup.py`` (about a minute). For 1, 100 and 1000 reads waiting at once
it measures, side by side in one process:

- CPU seconds the process burns per second while they wait (``time.process_time``);
- how long after the ``-pos`` file moves each waiter is released (p50, p99, max).

"polling" is what LiteFS's proxy does for each waiting request: its own loop reading the
position every 1 ms. "watcher" is litefs-wsgi: one thread per process reads the file every
``poll_interval`` (1 ms, the same) and wakes every waiter whose TXID has arrived.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time

from litefs_wsgi.node import Node
from litefs_wsgi.testing import LiteFSMount
from litefs_wsgi.watcher import Watcher

DB = "app.db"


def poll_like_litefs(node: Node, target: int, interval: float, timeout: float) -> bool:
    """One request's own loop, as LiteFS's proxy waits: read the position, sleep, again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pos = node.pos(DB)
        if pos is None or pos.txid >= target:
            return True
        time.sleep(interval)
    return False


def run(kind: str, n: int, idle: float, mount: LiteFSMount) -> dict:
    mount.set_position(DB, 1)
    node = Node(mount.path)
    watcher = Watcher(node, poll_interval=0.001)
    released: list[float] = []
    lock = threading.Lock()
    started = threading.Barrier(n + 1, timeout=60)

    def waiter() -> None:
        started.wait()
        if kind == "watcher":
            ok = watcher.wait({DB: 2}, 60)
        else:
            ok = poll_like_litefs(node, 2, 0.001, 60)
        now = time.monotonic()
        with lock:
            released.append(now if ok else float("nan"))

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    started.wait()
    if kind == "watcher":
        deadline = time.monotonic() + 30
        while watcher.waiting < n and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(0.2)  # let every loop settle into its steady state
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(idle)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    changed = time.monotonic()
    mount.set_position(DB, 2)
    for thread in threads:
        thread.join(60)
    latencies = sorted((at - changed) * 1000 for at in released)
    return {
        "cpu": cpu,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max": latencies[-1],
        "released": sum(1 for x in latencies if x == x),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--waiters", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of waiting measured for CPU")
    args = parser.parse_args(argv)
    threading.stack_size(256 * 1024)
    print(f"python {sys.version.split()[0]}, poll interval 1 ms, {args.idle:g} s of waiting measured per run")
    header = f"{'waiters':>7}  {'method':<8} {'CPU s/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  released"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        mount = LiteFSMount(tmp)
        mount.make_replica("node-a")
        for n in args.waiters:
            results = {kind: run(kind, n, args.idle, mount) for kind in ("polling", "watcher")}
            for kind, r in results.items():
                print(
                    f"{n:>7}  {kind:<8} {r['cpu']:>8.3f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['max']:>8.2f}"
                    f"  {r['released']}/{n}"
                )
            poll, watch = results["polling"], results["watcher"]
            print(
                f"{'':>7}  ratio    CPU polling/watcher {poll['cpu'] / max(watch['cpu'], 1e-9):.1f}x, "
                f"p99 polling/watcher {poll['p99'] / max(watch['p99'], 1e-9):.1f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
