"""Soak: a real two-node LiteFS cluster under many clients while faults come on a schedule.

    python bench/soak.py                       # 180 s, 8 clients
    python bench/soak.py --duration 60 --clients 16 --relay-delay 0.1

Needs the litefs binary on PATH and FUSE (see the README's "Testing on real LiteFS"). Runs
the cluster of tests/litefs_cluster.py: LiteFS nodes a (primary) and b (replica) on
127.0.0.1, b replicating through a relay that delays every byte ``--relay-delay``, and on
each node the Flask app of tests/litefs_app.py under gunicorn inside LiteFSMiddleware
(``forward="http"``, ``require_mount``, positions and the primary from LiteFS's ``/events``).

Each client, in a loop: writes a row with a unique id through a random node (a replica
forwards it to the primary), then reads it back through the other node with the answer's
``__txid`` cookie. The run is cut into equal phases, one fault in each:

    steady                 no fault
    primary app killed     SIGKILL to the primary's app (gunicorn master and worker), restarted
    primary app stopped    SIGSTOP to the primary's app for read_timeout + 2 s, then SIGCONT
    replica LiteFS killed  SIGKILL to the replica's LiteFS (its mount dies), fusermount3 -u, restart
    failover               the primary's app stopped (drained), the replica caught up, both LiteFS
                           stopped, the static lease swapped to the other node, both restarted
    after failover         no fault, the other node is the primary

Per phase (a request belongs to the phase it started in) it prints: writes sent and
acknowledged (201), acknowledged rows found at the end, rows lost (acknowledged, not found:
must be 0), rows applied twice (a unique id found more than once: must be 0), unacknowledged
writes that were applied anyway (a 502/504 whose request had reached the primary), reads and
stale reads (a 404 for a row the client was told was written: must be 0), answers by status
(``refused``/``timeout``/``error`` when there was none), and the longest answer. Rows are
counted on the final primary once the replica has caught up. The exit status is 1 if a row
was lost or doubled, or a read was stale. Every loop is bounded; everything stops by itself
and the mounts are unmounted.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import os
import random
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from http.cookies import SimpleCookie

from common import ROOT

sys.path.insert(0, ROOT)  # litefs_wsgi from this checkout, installed or not
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the cluster and the app of the tests
from litefs_cluster import DB, Cluster, NodeApp, create_schema, unusable_reason, wait_for  # noqa: E402

CLIENT_TIMEOUT = 30.0  # seconds; no answer this long counts as "timeout"
READ_TIMEOUT = 2.0  # the middleware's read_timeout: a stopped primary answers 504 after it
PHASES = (
    "steady",
    "primary app killed",
    "primary app stopped",
    "replica LiteFS killed",
    "failover",
    "after failover",
)


@dataclasses.dataclass
class Phase:
    name: str
    writes: int = 0
    acked: list = dataclasses.field(default_factory=list)  # wids answered 201
    unacked: list = dataclasses.field(default_factory=list)  # wids not answered 201
    reads: int = 0
    stale: int = 0
    write_answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    read_answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    longest: float = 0.0
    note: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def request(port: int, method: str, path: str, body: str | None = None, cookie: str | None = None):
    """One request on a new connection: (status or "refused"/"timeout"/"error", headers, seconds)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    if cookie:
        headers["Cookie"] = cookie
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.headers, time.monotonic() - started
    except ConnectionRefusedError:
        return "refused", None, time.monotonic() - started
    except (socket.timeout, TimeoutError):
        return "timeout", None, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return "error", None, time.monotonic() - started
    finally:
        conn.close()


def txid_cookie(headers) -> str | None:
    cookies = SimpleCookie()
    for value in headers.get_all("Set-Cookie") or []:
        cookies.load(value)
    return f"__txid={cookies['__txid'].value}" if "__txid" in cookies else None


class Soak:
    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.cluster = Cluster(root)
        # require_mount: a node whose mount is gone never takes itself for the primary.
        options = {"read_timeout": f"{READ_TIMEOUT}s", "connect_timeout": "10s", "require_mount": "true"}
        self.options = options
        self.apps = {node.name: NodeApp(node, threads=max(8, args.clients), **options) for node in self.cluster.nodes}
        self.phases = [Phase(name) for name in PHASES]
        self.current = self.phases[0]
        self.stop = threading.Event()

    # -- the clients --

    def client(self, n: int) -> None:
        rng = random.Random(n)
        for seq in range(1_000_000):  # bounded; the stop event ends it long before
            if self.stop.is_set():
                return
            phase = self.current
            writer, reader = rng.sample(self.cluster.nodes, 2)
            wid = f"{n}-{seq}-{uuid.uuid4().hex[:12]}"
            status, headers, seconds = request(writer.app_port, "POST", "/rows", f"wid={wid}")
            cookie = txid_cookie(headers) if status == 201 else None
            with phase.lock:
                phase.writes += 1
                phase.write_answers[status] += 1
                phase.longest = max(phase.longest, seconds)
                (phase.acked if status == 201 else phase.unacked).append(wid)
            if status == 201:
                status, _headers, seconds = request(reader.app_port, "GET", f"/rows/{wid}", cookie=cookie)
                with phase.lock:
                    phase.reads += 1
                    phase.read_answers[status] += 1
                    phase.stale += status == 404  # served, and the row the client wrote is not there
                    phase.longest = max(phase.longest, seconds)
            if self.args.think:
                time.sleep(self.args.think)

    # -- the faults --

    def primary_app(self) -> NodeApp:
        return self.apps[self.cluster.primary.name]

    def fault(self, name: str) -> str:
        """Bring the phase's fault on and take it off; returns what happened, for the table."""
        cluster = self.cluster
        if name == "primary app killed":
            app = self.primary_app()
            app.kill()
            time.sleep(1.0)  # down for a while: clients are refused, forwards retry
            started = time.monotonic()
            app.start()
            return f"node {app.node.name}'s app down {1.0 + time.monotonic() - started:.1f} s"
        if name == "primary app stopped":
            app = self.primary_app()
            app.pause()
            time.sleep(READ_TIMEOUT + 2.0)  # past read_timeout: forwarded writes answer 504
            app.resume()
            return f"node {app.node.name}'s app stopped {READ_TIMEOUT + 2.0:.1f} s"
        if name == "replica LiteFS killed":
            replica = cluster.replica
            started = time.monotonic()
            replica.kill()
            time.sleep(2.0)  # the mount is dead: "Transport endpoint is not connected"
            replica.unmount()
            replica.start()
            replica.wait_ready(cluster.primary)
            return f"node {replica.name}'s LiteFS down {time.monotonic() - started:.1f} s"
        if name == "failover":
            old, new = cluster.primary, cluster.replica
            started = time.monotonic()
            self.apps[old.name].stop()  # drain: requests in flight finish, no new write commits
            wait_for(lambda: new.pos() == old.pos(), 30, "the replica to catch up before the failover")
            cluster.failover(new)
            self.apps[old.name].start()
            return f"primary {old.name} -> {new.name} in {time.monotonic() - started:.1f} s"
        return ""

    # -- the run --

    def run(self) -> list[Phase]:
        cluster, args = self.cluster, self.args
        cluster.primary.relay.delay = cluster.replica.relay.delay = args.relay_delay
        cluster.start()
        cluster.wait_replicated(create_schema(cluster.primary))
        for app in self.apps.values():
            app.start()
        clients = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(args.clients)]
        length = args.duration / len(self.phases)
        started = time.monotonic()
        try:
            for n, phase in enumerate(self.phases):
                self.current = phase
                if n == 0:
                    for thread in clients:
                        thread.start()
                print(f"[{time.monotonic() - started:6.1f} s] {phase.name}", flush=True)
                time.sleep(min(length / 4, 5.0))  # some requests before the fault
                phase.note = self.fault(phase.name)
                time.sleep(max(0.0, started + (n + 1) * length - time.monotonic()))
        finally:
            self.stop.set()
            for thread in clients:
                thread.join(CLIENT_TIMEOUT + 5)
        cluster.wait_replicated(cluster.primary.pos() or 0, timeout=60)
        return self.phases

    def count_rows(self) -> collections.Counter:
        db = sqlite3.connect(f"file:{self.cluster.primary.fuse_dir / DB}?mode=ro", uri=True, timeout=10)
        try:
            return collections.Counter(dict(db.execute("SELECT wid, count(*) FROM rows GROUP BY wid")))
        finally:
            db.close()

    def close(self) -> None:
        for app in self.apps.values():
            app.stop()
        self.cluster.close()


def answers(counter: collections.Counter) -> str:
    return " ".join(f"{status}:{count}" for status, count in sorted(counter.items(), key=lambda kv: str(kv[0])))


def report(phases: list[Phase], rows: collections.Counter) -> bool:
    """Print the table; True when nothing was lost, doubled or stale."""
    header = ("phase", "writes", "acked", "found", "lost", "twice", "unacked applied", "reads", "stale")
    table = []
    total = collections.Counter()
    for phase in phases:
        found = sum(1 for wid in phase.acked if rows.get(wid))
        twice = sum(1 for wid in phase.acked + phase.unacked if rows.get(wid, 0) > 1)
        applied = sum(1 for wid in phase.unacked if rows.get(wid))
        values = (
            phase.writes,
            len(phase.acked),
            found,
            len(phase.acked) - found,
            twice,
            applied,
            phase.reads,
            phase.stale,
        )
        total.update(dict(zip(header[1:], values)))
        table.append((phase.name, *values, answers(phase.write_answers), answers(phase.read_answers), phase.longest))
    print()
    print("| " + " | ".join((*header, "write answers", "read answers", "longest answer")) + " |")
    print("|" + " --- |" * (len(header) + 3))
    for row in table:
        print("| " + " | ".join(str(v) for v in row[:-1]) + f" | {row[-1]:.2f} s |")
    print("| **total** | " + " | ".join(str(total[h]) for h in header[1:]) + " | | | |")
    print()
    for phase in phases:
        if phase.note:
            print(f"{phase.name}: {phase.note}")
    stray = sum(rows.values()) - sum(1 for phase in phases for wid in phase.acked + phase.unacked if rows.get(wid))
    print(f"rows in the database: {sum(rows.values())} ({stray} not written by this run's clients)")
    return total["lost"] == 0 and total["twice"] == 0 and total["stale"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds in all, cut into equal phases")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--relay-delay", type=float, default=0.05, help="seconds every byte to the replica waits")
    parser.add_argument("--think", type=float, default=0.01, help="seconds a client sleeps between rounds")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (logs, databases)")
    args = parser.parse_args()
    reason = unusable_reason()
    if reason:
        raise SystemExit(f"soak: {reason}")
    root = tempfile.mkdtemp(prefix="litefs-soak-")
    soak = Soak(args, root)
    print(f"cluster in {root}; middleware options: {soak.options}", flush=True)
    try:
        phases = soak.run()
        rows = soak.count_rows()
    finally:
        soak.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if report(phases, rows) else 1


if __name__ == "__main__":
    sys.exit(main())
