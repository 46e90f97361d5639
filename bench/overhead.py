"""What LiteFSMiddleware costs a real Flask app per request, called in-process.

Run: ``python bench/overhead.py`` (about 15 seconds). A Flask app (one view for GET and
POST, a 200-byte answer) is called through werkzeug's ``run_wsgi_app``, as a WSGI server
would call it, bare and wrapped in LiteFSMiddleware, in interleaved rounds: each round times
every case bare and wrapped, one after the other, and the figures printed are the medians
over rounds, not the best round (CPU time of the calling thread). The rounds are short (250
requests, about 25 ms a side) and many (41): on a shared machine whose speed drifts within
seconds, a drift then falls within a round on both sides alike, where rounds of 2,000
requests gave a read that adds 3% of the app's instructions 0.82 in one run:

- primary read: a GET without a cookie on the primary;
- replica read: a GET on a replica whose ``__txid`` cookie is already satisfied;
- primary write: a POST on the primary (the position read when the response starts, and
  ``Set-Cookie`` added) whose view commits nothing (an OPTIONS, a GraphQL query, a form
  that fails validation), so that the position is the one the last write read;
- primary write, position moved: the same, but the view moves the position (writes a new
  ``-pos``, bare and wrapped alike), as a commit does;
- primary write, position not read: the write that commits nothing, its position given by the
  watcher without reading ``-pos`` (no middleware does this: a reference, that shows what the
  file read costs, the kernel's part included);
- primary write, constant cookie: the same POST through a wrapper of three lines that adds a
  fixed ``Set-Cookie`` and nothing else (a reference too: what the server's handling of one
  more header costs, which any middleware that sets the cookie pays; the rules' own cost is
  the gap between this and the position not read);
- write, -pos read and cookie only: the same POST through a wrapper of a dozen lines that
  holds the head until the app returns, reads ``-pos`` (``pread`` on a descriptor it keeps,
  or the file opened, as the wrapped cases read it), and adds the cookie for it, and nothing
  else: no rules, no role, no restore (a reference: the floor of any middleware that gives a
  write the position after it, which the write's ratio cannot pass on this machine);
- read, start_response wrapper: the satisfied-cookie GET through a wrapper that only
  passes ``start_response`` through a closure of its own, as any middleware must that looks at
  the answer's status (ours does, for ReplayOnPrimary's 503): a reference for the reads.

The ratio is the wrapped app's throughput as a share of the bare app's (1.00: free); beside it,
the middle half of the rounds' ratios (their first and third quartiles): how much one round's
figure moves on this machine.

``--instructions`` counts instead, under valgrind's callgrind, the CPU instructions each
request executes (the difference between runs of two request counts, so start-up cancels out):
the same figure on a busy machine as on a quiet one, where CPU times move by tens of percent.
It leaves out the time spent in the kernel (the ``-pos`` file read of a write).

``--keep-open`` times each wrapped case twice: its ``-pos`` files opened for each read (the
default on a directory laid out like a mount, as here, and with ``keep_pos_open: false``) and
read through kept descriptors (``pread``), the default on LiteFS's own mount.

``--litefs`` runs the same cases on a real LiteFS cluster (tests/litefs_cluster.py: node a
the primary, node b a replica; needs the ``litefs`` binary and FUSE), where every control
file read is a round trip to the LiteFS daemon, and the POST's view inserts a row (bare and
wrapped alike), as a write does. It times the wall clock: the calling thread waits for the
daemon, which CPU time would leave out. Both ways of reading ``-pos`` are timed, as with
``--keep-open``; kept descriptors are the default there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from importlib.metadata import version

import flask
from common import ROOT, callgrind_instructions
from werkzeug.test import EnvironBuilder, run_wsgi_app

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.cookie import TxidCookie
from litefs_wsgi.node import Node
from litefs_wsgi.testing import LiteFSMount
from litefs_wsgi.txid import Pos, format_pos, parse_pos_txid

BODY = "x" * 200
TXID = 42
_COMMITS = itertools.count(TXID + 1)  # the positions /commit moves to, bare and wrapped alike


def flask_app(db_path: str | None = None, mount: LiteFSMount | None = None) -> flask.Flask:
    """The app; with ``db_path``, a POST inserts a row there on one kept connection. A POST to
    ``/commit`` moves the position of ``mount`` (a directory laid out like a mount), as a
    commit moves LiteFS's."""
    app = flask.Flask("bench")
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False) if db_path else None
    pos_fd = os.open(os.path.join(mount.path, "app.db-pos"), os.O_WRONLY) if mount is not None else -1

    def items() -> str:
        if db is not None and flask.request.method == "POST":
            db.execute("INSERT INTO items (body) VALUES (?)", (BODY,))
        return BODY

    def commit() -> str:
        # The new position written over the old in place, one pwrite(2), as LiteFS's file
        # changes under the same name (LiteFSMount's rename and fsync would cost more than
        # the request).
        os.pwrite(pos_fd, format_pos(Pos(next(_COMMITS), 0)), 0)
        return BODY

    app.add_url_rule("/items", "items", items, methods=["GET", "POST"])
    app.add_url_rule("/commit", "commit", commit, methods=["POST"])
    return app


def constant_cookie(app):
    """``app`` answering with one more header, the cookie a write on the primary gets, and no rules."""
    cookie = f"__txid={TXID:016x}; Path=/; Expires=Fri, 04 Dec 2026 18:00:00 GMT; HttpOnly; SameSite=Lax"

    def wrapped(environ, start_response):
        def add_cookie(status, headers, exc_info=None):
            return start_response(status, [*headers, ("Set-Cookie", cookie)], exc_info)

        return app(environ, add_cookie)

    return wrapped


class _PosFile:
    """A ``-pos`` file read by ``pread`` on a kept descriptor, or opened for each read, as the
    harness sets it (``set_keep_open``, as on each wrapped case's node)."""

    def __init__(self, path: str) -> None:
        self.path, self.fd = path, None

    def set_keep_open(self, keep: bool) -> None:
        self.close()
        if keep:
            self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pos_cookie(app, pos: _PosFile):
    """``app`` answering a POST with the cookie of the position read when it has returned, and
    no rules: the least a middleware giving a write its position can do."""
    cookie = TxidCookie(["app.db"], 300, None)

    def wrapped(environ, start_response):
        if environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            return app(environ, start_response)
        head = []

        def held(status, headers, exc_info=None):
            head.append((status, headers))

        result = app(environ, held)
        if pos.fd is not None:
            data = os.pread(pos.fd, 64, 0)
        else:  # open(2), read(2), close(2), as litefs_wsgi.node does: no io objects
            fd = os.open(pos.path, os.O_RDONLY)
            try:
                data = os.read(fd, 64)
            finally:
                os.close(fd)
        status, headers = head[-1]
        start_response(status, [*headers, ("Set-Cookie", cookie.header_of((parse_pos_txid(data),), False))])
        return result

    wrapped.watcher = types.SimpleNamespace(node=pos)  # its file kept open or not, as the nodes'
    return wrapped


def status_wrapper(app):
    """``app`` behind a ``start_response`` of its own that looks at the status and does nothing else."""

    def wrapped(environ, start_response):
        seen = []

        def looked_at(status, headers, exc_info=None):
            if seen or "503" <= status < "504":
                seen.append(status)
            return start_response(status, headers, exc_info)

        return app(environ, looked_at)

    return wrapped


def per_request(app, environ: dict, n: int, clock=time.thread_time) -> float:
    """Seconds per request, the answer read and closed as a server would. By default this
    thread's CPU time, not the wall clock: other processes on a shared machine then shift it
    little."""
    started = clock()
    for _ in range(n):
        run_wsgi_app(app, environ.copy(), buffered=True)  # buffered: read whole and closed
    return (clock() - started) / n


def environ(method: str, cookie: str | None = None, path: str = "/items") -> dict:
    headers = {"Cookie": f"session=abc123; __txid={cookie}; theme=dark"} if cookie else {}
    return EnvironBuilder(path=path, method=method, headers=headers).get_environ()


def setup(tmp: str, cluster=None) -> tuple:
    """The bare app and the cases: (name, wrapped app, environ), each checked once. With
    ``cluster`` (a running tests/litefs_cluster.Cluster), on its mounts."""
    if cluster is None:
        primary, replica = LiteFSMount(f"{tmp}/primary"), LiteFSMount(f"{tmp}/replica")
        primary.make_primary()
        primary.set_position("app.db", TXID)
        replica.make_replica("node-a")
        replica.set_position("app.db", TXID)
        primary_dir, replica_dir, db_path, txid = primary.path, replica.path, None, TXID
    else:
        primary_dir, replica_dir = str(cluster.primary.fuse_dir), str(cluster.replica.fuse_dir)
        db_path = os.path.join(primary_dir, "app.db")
        with sqlite3.connect(db_path) as db:
            db.executescript("PRAGMA journal_mode = WAL; CREATE TABLE IF NOT EXISTS items (body TEXT);")
        txid = cluster.primary.pos()
        cluster.wait_replicated(txid)
    options = {"db": "app.db", "forward": "http"}
    on_primary = LiteFSMiddleware(flask_app(db_path).wsgi_app, mount_dir=primary_dir, **options)
    on_replica = LiteFSMiddleware(flask_app(db_path).wsgi_app, mount_dir=replica_dir, **options)
    cases = [
        ("primary read (GET, no cookie)", on_primary, environ("GET")),
        ("replica read (cookie satisfied)", on_replica, environ("GET", f"{txid:016x}")),
        ("primary write (POST, cookie set)", on_primary, environ("POST")),
    ]
    if cluster is None:  # on LiteFS the POST above commits already
        committing = LiteFSMiddleware(flask_app(mount=primary).wsgi_app, mount_dir=primary_dir, **options)
        cases.append(("primary write, position moved", committing, environ("POST", path="/commit")))
        # On a mount of its own: a process has one watcher per mount, which the others share.
        known = LiteFSMount(f"{tmp}/known")
        known.make_primary()
        known.set_position("app.db", TXID)
        unread = LiteFSMiddleware(flask_app().wsgi_app, mount_dir=known.path, **options)
        known_bytes = format_pos(Pos(TXID, 0))
        unread.watcher.node.pos_bytes = lambda db: known_bytes  # the position as if known: no -pos read
        cases.append(("primary write, position not read", unread, environ("POST")))
        cases.append(("primary write, constant cookie", constant_cookie(flask_app().wsgi_app), environ("POST")))
        pos = _PosFile(os.path.join(known.path, "app.db-pos"))
        cases.append(("write, -pos read and cookie only", pos_cookie(flask_app().wsgi_app, pos), environ("POST")))
        cases.append(
            ("read, start_response wrapper", status_wrapper(flask_app().wsgi_app), environ("GET", f"{txid:016x}"))
        )
    for _name, wrapped, env in cases:  # warm up, and check that each case is what it says
        _body, status, headers = run_wsgi_app(wrapped, env.copy(), buffered=True)
        assert status.startswith("200"), status
        assert ("Set-Cookie" in headers) == (env["REQUEST_METHOD"] == "POST"), headers
    return flask_app(db_path, primary if cluster is None else None).wsgi_app, cases


@contextlib.contextmanager
def litefs_cluster(tmp: str) -> Iterator:
    """A running two-node LiteFS cluster (tests/litefs_cluster.py), or SystemExit saying why not."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from litefs_cluster import Cluster, unusable_reason

    why = unusable_reason()
    if why:
        raise SystemExit(f"--litefs: {why}")
    with Cluster(os.path.join(tmp, "cluster")) as cluster:
        yield cluster


def position_reads(cluster, rounds: int, n: int = 50) -> list[str]:
    """Lines saying what reading the primary's position right after a commit costs on the real mount,
    the file opened for each read and read through a kept descriptor, in alternating rounds."""
    mount = str(cluster.primary.fuse_dir)
    db = sqlite3.connect(os.path.join(mount, "app.db"), isolation_level=None)
    nodes = {"-pos opened": Node(mount, keep_open=False), "-pos kept open": Node(mount, keep_open=True)}
    times: dict[str, list[float]] = {name: [] for name in nodes}
    try:
        for index in range(rounds):
            for name in nodes if index % 2 == 0 else reversed(list(nodes)):
                for _ in range(n):
                    db.execute("INSERT INTO items (body) VALUES (?)", (BODY,))
                    started = time.perf_counter()
                    nodes[name].txid("app.db")
                    times[name].append(time.perf_counter() - started)
    finally:
        db.close()
        for node in nodes.values():
            node.close()
    lines = [f"the primary's position read right after a commit ({rounds} x {n} commits each, wall clock):"]
    for name, samples in times.items():
        samples.sort()
        median, p90 = samples[len(samples) // 2], samples[len(samples) * 9 // 10]
        lines.append(f"  {name:<24} median {median * 1e6:6.0f} µs, p90 {p90 * 1e6:6.0f} µs")
    return lines


def count_instructions(args: argparse.Namespace) -> int:
    def instructions(case: int, side: str, n: int) -> int:
        return callgrind_instructions(__file__, ["--one", str(case), side, "-n", str(n)])

    n = args.n
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", type=int, help="requests per case, per round (default: 250; 300 with --litefs; 500 with --instructions)"
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds; medians are printed (default: 41; 9 with --litefs)"
    )
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--litefs", action="store_true", help="on a real LiteFS cluster, by the wall clock")
    parser.add_argument(
        "--keep-open",
        action="store_true",
        help="also time the wrapped app reading -pos through kept descriptors, as on LiteFS's mount",
    )
    parser.add_argument("--one", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.n = args.n or (500 if args.instructions else 300 if args.litefs else 250)
    args.rounds = args.rounds or (9 if args.litefs else 41)
    if args.instructions:
        return count_instructions(args)
    if args.litefs and (args.instructions or args.one):
        parser.error("--litefs times the wall clock; it does not count instructions")
    clock = time.perf_counter if args.litefs else time.thread_time
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        cluster = stack.enter_context(litefs_cluster(tmp)) if args.litefs else None
        bare, cases = setup(tmp, cluster)
        if args.one:  # one case, one side, for count_instructions
            name, wrapped, env = cases[int(args.one[0])]
            app = bare if args.one[1] == "bare" else wrapped
            for _ in range(args.n):
                run_wsgi_app(app, env.copy(), buffered=True)
            return 0
        # With --litefs or --keep-open, the wrapped app twice: its -pos file opened for each read
        # (keep_pos_open: false), and read through a kept descriptor (the default on LiteFS's mount).
        watchers = [wrapped.watcher for _, wrapped, _ in cases if hasattr(wrapped, "watcher")]
        nodes = {id(watcher.node): watcher.node for watcher in watchers}
        for node in nodes.values():
            stack.callback(node.close)  # before the cluster stops: LiteFS cannot unmount past them
        # node.keep_open of each wrapped side (None: as the node chose: opened on a plain directory)
        keep = [False, True] if args.litefs or args.keep_open else [None]
        samples: dict[str, list[list[float]]] = {name: [] for name, _, _ in cases}
        for index in range(args.rounds):
            for name, wrapped, env in cases:
                # The bare app (side 0) first in one round, last in the next: whatever drifts
                # within a round (the machine, the heap) falls on every side alike.
                sides = list(range(len(keep) + 1))
                times = [0.0] * len(sides)
                for side in sides if index % 2 == 0 else reversed(sides):
                    if side and keep[side - 1] is not None:
                        for node in nodes.values():
                            node.set_keep_open(keep[side - 1])
                    times[side] = per_request(wrapped if side else bare, env, args.n, clock)
                samples[name].append(times)
        reads = position_reads(cluster, args.rounds) if cluster is not None else []
    where = "a real LiteFS cluster, wall clock" if args.litefs else "CPU time"
    print(
        f"python {sys.version.split()[0]}, Flask {version('flask')}, {where}, "
        f"{args.n} requests per case and round, medians of {args.rounds} interleaved rounds"
    )
    labels = ["-pos opened", "-pos kept open"] if args.litefs or args.keep_open else ["wrapped"]
    widths = [max(11, len(label) + 3) for label in labels]
    header = f"{'case':<34} {'bare µs':>8}"
    header += "".join(
        f" | {label + ' µs':>{width}} {'ratio':>6} {'mid half':>9}" for label, width in zip(labels, widths)
    )
    print(header)
    print("-" * len(header))
    for name, rounds in samples.items():
        bare_t = statistics.median(r[0] for r in rounds)
        line = f"{name:<34} {bare_t * 1e6:>8.1f}"
        for side, width in enumerate(widths, 1):
            wrapped_t = statistics.median(r[side] for r in rounds)
            ratios = [r[0] / r[side] for r in rounds]  # throughput kept, per round
            # The middle half of the rounds' ratios: how far one round's figure moves here.
            low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            line += f" | {wrapped_t * 1e6:>{width}.1f} {statistics.median(ratios):>6.2f} {low:>4.2f}-{high:.2f}"
        print(line)
    if reads:
        print("", *reads, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
