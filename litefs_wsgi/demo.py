"""``litefs-wsgi demo``: a primary and a replica on 127.0.0.1, showing read-your-writes at work.

Each node is a small Flask notes app behind LiteFSMiddleware (``forward="http"``), with its
own directory laid out as a LiteFS mount by :class:`litefs_wsgi.testing.LiteFSMount`. A
thread plays LiteFS's part: it copies the primary's database, then its position, to the
replica after ``--lag``, and keeps the replica's ``.lag`` current. No LiteFS, FUSE or Fly.io
is needed. ``--check`` runs the story unattended and exits 0 when read-your-writes held.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from http.cookies import SimpleCookie
from pathlib import Path

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .config import ConfigError, parse_duration
from .middleware import LiteFSMiddleware
from .node import Node
from .testing import LiteFSMount

DB = "notes.db"
HOST = "127.0.0.1"
# A LiteFS replica's .primary holds the primary's hostname only, and LiteFS expects the
# primary to serve the app on the same port. Both nodes share 127.0.0.1 here on different
# ports, so .primary names "localhost" and primary_url carries the primary's port.
PRIMARY_HOSTNAME = "localhost"
HEARTBEAT = 1.0  # LiteFS's primary sends a heartbeat every second: .lag idles 0 to ~1000 ms
STARTED_KEY = "litefs_demo.started"
# What stops the demo. The kernel hands a signal sent to the process to any one thread that does
# not block it, and Python runs the handler in the main thread only when that thread next runs
# Python code. If a server thread took SIGTERM while the main thread sat in recv() (--check's read
# waiting a minute for replication), nothing would wake the main thread until that read ended. So
# every other thread blocks these: the kernel then interrupts the main thread's system call.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ node }} · litefs-wsgi demo</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
.node { padding: .6rem 1rem; border-radius: .5rem; background: {{ color }}; }
textarea { width: 100%; height: 4rem; } li small, .muted { color: #666; }
code { background: #f3f3f3; padding: 0 .2rem; }
</style></head><body>
<p class="node" id="node">This page was served by the <b>{{ node }}</b> (127.0.0.1:{{ port }}):
database position TXID {{ txid }}, replication lag {{ lag }}.</p>
<p id="request">Your <code>__txid</code> cookie: <code id="cookie">{{ cookie or "none" }}</code>.
Before the app ran, this request waited <b id="waited">{{ waited }} ms</b> for replication.</p>
<form method="post" action="/notes">
<textarea name="text" required maxlength="500" placeholder="Write a note"></textarea>
<button type="submit">Post a note</button></form>
<p class="muted">{{ explain }}</p>
<ul id="notes">{% for id, text, created in notes %}<li>{{ text }} <small>#{{ id }}, {{ created }}</small></li>
{% else %}<li class="muted">No notes yet.</li>{% endfor %}</ul>
</body></html>
"""


def create_app(mount: LiteFSMount, node: str, port: int):
    """The notes app of one node: a page listing notes, and a form posting to ``/notes``."""
    from flask import Flask, redirect, render_template_string, request, url_for

    app = Flask(f"litefs_demo_{node}")
    files = Node(mount.path)

    @app.get("/")
    def index():
        pos = files.pos(DB)
        lag = files.lag()
        started = request.environ.get(STARTED_KEY)
        return render_template_string(
            PAGE,
            node=node,
            port=port,
            color="#ffe9c7" if node == "primary" else "#d9ecff",
            txid=pos.txid if pos else "none",
            lag="unreadable" if lag is None else f"{lag} ms",
            cookie=request.cookies.get("__txid"),
            waited=round((time.monotonic() - started) * 1000) if started else 0,
            notes=read_notes(mount.db_path(DB)),
            explain=(
                "Writes are made here, on the primary; the response sets the __txid cookie."
                if node == "primary"
                else "This replica forwards your note to the primary; the redirect back waits "
                "until this replica has replicated your write."
            ),
        )

    @app.post("/notes")
    def add_note():
        text = request.form.get("text", "").strip()[:500]
        if text:
            write_note(mount.db_path(DB), text)
        return redirect(url_for("index"), 303)

    return app


def init_db(path: str) -> None:
    """Create the schema, as a deployment does once on the primary."""
    with sqlite3.connect(path, timeout=10) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL, created TEXT)")
    conn.close()


def read_notes(path: str) -> list[tuple]:
    # Read-only, as a LiteFS replica's database is: a read never creates the file.
    try:
        conn = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:  # not replicated here yet
        return []
    try:
        return conn.execute("SELECT id, text, created FROM notes ORDER BY id DESC LIMIT 50").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def write_note(path: str, text: str) -> None:
    # Rollback-journal mode (SQLite's default): the file's change counter, which
    # LiteFSMount.committing turns into the position, grows by one per commit.
    conn = sqlite3.connect(path, timeout=10)
    try:
        with conn:
            conn.execute("INSERT INTO notes (text, created) VALUES (?, datetime('now'))", (text,))
    finally:
        conn.close()


def _timed(app):
    """Note when a request arrived, so the page can say how long the middleware held it."""

    def wrapped(environ, start_response):
        environ[STARTED_KEY] = time.monotonic()
        return app(environ, start_response)

    return wrapped


class Replication:
    """LiteFS's part: ship each change of the primary's database to the replica ``lag``
    seconds after it is committed (database first, then position), and keep the replica's
    ``.lag`` current, as heartbeats every second would."""

    def __init__(self, primary: LiteFSMount, replica: LiteFSMount, db: str, lag: float, tick: float = 0.002) -> None:
        self.primary, self.replica, self.db, self.lag, self.tick = primary, replica, db, lag, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="litefs-demo-replication", daemon=True)

    def start(self) -> None:
        self.replica.replicate(self.primary, self.db)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        contact = time.monotonic()  # the last data or heartbeat received
        changed_at: float | None = None
        written_lag = None
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            if self.primary.position(self.db) != self.replica.position(self.db):
                changed_at = changed_at or now
                if now - changed_at >= self.lag:
                    self.replica.replicate(self.primary, self.db)
                    contact, changed_at = time.monotonic(), None
            if now - contact >= HEARTBEAT:
                contact = now
            lag_ms = int((time.monotonic() - contact) * 1000) // 50 * 50  # rewrite the file every 50 ms at most
            if lag_ms != written_lag:
                self.replica.set_lag(lag_ms)
                written_lag = lag_ms


@contextlib.contextmanager
def _stop_signals_blocked():
    """Block STOP_SIGNALS in this thread while the block runs: the threads it starts, and the
    threads those start, inherit the mask, so they never take them. One that arrives meanwhile
    waits, and is handled when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks, and signals reach the main thread only
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Cluster:
    """Both nodes, their mounts, servers and replication; ``start()`` then ``stop()``."""

    def __init__(self, port: int, lag: float, directory: str | None, poll_timeout: float, quiet: bool) -> None:
        self.lag, self.poll_timeout, self.quiet = lag, poll_timeout, quiet
        self.keep_dir = directory is not None
        self.dir = os.path.abspath(directory) if directory else tempfile.mkdtemp(prefix="litefs-demo-")
        self.primary = LiteFSMount(os.path.join(self.dir, "primary"))
        self.replica = LiteFSMount(os.path.join(self.dir, "replica"))
        self.port = port
        self.servers: list[BaseWSGIServer] = []
        self.middlewares: list[LiteFSMiddleware] = []
        self.replication = Replication(self.primary, self.replica, DB, lag)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Lay out both mounts, start both servers and the replication; every thread this starts
        leaves SIGINT and SIGTERM to the thread that called it (see STOP_SIGNALS)."""
        with _stop_signals_blocked():
            self.primary.make_primary()
            init_db(self.primary.db_path(DB))
            self.primary.sync(DB)
            self.replica.make_replica(PRIMARY_HOSTNAME)
            # The primary first: the replica's primary_url needs its port.
            primary_server = self._serve("primary", self.primary, self.port + 1 if self.port else 0, commit=True)
            self.primary_url = f"http://{{hostname}}:{primary_server.server_port}"
            self._serve("replica", self.replica, self.port, commit=False, primary_url=self.primary_url)
            self.replication.start()

    def _serve(self, node: str, mount: LiteFSMount, port: int, commit: bool, **options) -> BaseWSGIServer:
        server = make_server(HOST, port, None, threaded=True, request_handler=_handler(node, self.quiet))
        flask_app = create_app(mount, node, server.server_port)
        inner = mount.committing(flask_app.wsgi_app, [DB]) if commit else flask_app.wsgi_app
        middleware = LiteFSMiddleware(
            inner, db=DB, mount_dir=mount.path, forward="http", poll_timeout=self.poll_timeout, **options
        )
        flask_app.wsgi_app = _timed(middleware)
        server.app = flask_app
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        self.servers.append(server)
        self.middlewares.append(middleware)
        self._threads.append(thread)
        return server

    @property
    def primary_base(self) -> str:
        return f"http://{HOST}:{self.servers[0].server_port}"

    @property
    def replica_base(self) -> str:
        return f"http://{HOST}:{self.servers[1].server_port}"

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self.replication.stop()
        for middleware in self.middlewares:
            middleware.forwarder.close()
        # A request thread still running may write while the tree goes: try again.
        for _ in range(5):
            if self.keep_dir or not os.path.exists(self.dir):
                break
            shutil.rmtree(self.dir, ignore_errors=True)
            time.sleep(0.05)


def _handler(node: str, quiet: bool) -> type[WSGIRequestHandler]:
    class Handler(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if not quiet:
                print(f"[{node}] {self.command} {self.path} -> {getattr(code, 'value', code)}", flush=True)

        def log(self, type: str, message: str, *args) -> None:
            if type != "info":
                print(f"[{node}] {type}: {message % args}", file=sys.stderr, flush=True)

    return Handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="run the story without a person; exit 0 if it held")
    parser.add_argument(
        "--port",
        type=int,
        help="the replica's port; the primary's is the next one; 0 for any (default 8080, --check 0)",
    )
    parser.add_argument("--lag", default="500ms", help="replication delay, Go-style: 500ms, 2s (default 500ms)")
    parser.add_argument("--poll-timeout", default="5s", help="how long a read waits for its write (default 5s)")
    parser.add_argument("--dir", help="keep the two mounts here (default: a temporary directory, removed at exit)")


def run(args: argparse.Namespace) -> int:
    lag = parse_duration(args.lag, "--lag")
    poll_timeout = parse_duration(args.poll_timeout, "--poll-timeout")
    port = args.port if args.port is not None else (0 if args.check else 8080)
    if not 0 <= port <= 65534:  # else an OverflowError from bind()
        raise ConfigError(f"--port: expected 0 (any) or 1 to 65534 (the primary takes the next port), got {port}")
    try:
        import flask  # noqa: F401
    except ImportError:
        print("litefs-wsgi demo: the demo app needs Flask: pip install flask", file=sys.stderr)
        return 2
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    if main:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    cluster = None
    try:
        # A signal while the mounts are made waits until there is a cluster to stop.
        with _stop_signals_blocked():
            try:
                cluster = Cluster(port, lag, args.dir, poll_timeout, quiet=args.check)
                cluster.start()
            except (OSError, SystemExit) as exc:  # werkzeug exits when a port is taken
                if cluster is None:  # the mounts could not be made: --dir is a file, or not writable
                    print(f"litefs-wsgi demo: cannot make the mounts: {exc}; try another --dir", file=sys.stderr)
                    return 2
                ports = f"{port} and {port + 1}" if port else "any port"
                detail = "" if isinstance(exc, SystemExit) else f": {exc}"
                print(f"litefs-wsgi demo: cannot listen on {HOST} ({ports}){detail}; try --port 0", file=sys.stderr)
                return 2
        return check(cluster) if args.check else interactive(cluster)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig in previous:  # stopping already: a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(cluster: Cluster) -> None:
    print(f"  replica  {cluster.replica_base}/   <- open this one", flush=True)
    print(f"  primary  {cluster.primary_base}/", flush=True)
    print(
        f"""
The primary's mount has no .primary file, so it takes the writes. The replica's .primary
file names "{PRIMARY_HOSTNAME}", as LiteFS names the primary by hostname only; both nodes share
127.0.0.1 here, so the replica's primary_url is "{cluster.primary_url}" (on a real
cluster the default "http://{{hostname}}:{{port}}" does: same port on another host).
Replication lag: {cluster.lag * 1000:g} ms; a read waits for its write at most {cluster.poll_timeout:g} s.
mounts: {cluster.dir} ({"kept" if cluster.keep_dir else "removed at exit"})""",
        flush=True,
    )


def interactive(cluster: Cluster) -> int:
    print("litefs-wsgi demo: a LiteFS primary and replica on 127.0.0.1 (simulated: no LiteFS needed)\n", flush=True)
    _describe(cluster)
    replica = cluster.replica_base
    print(
        f"""
Try:
  1. Open {replica}/ and post a note. The replica forwards the POST to the primary,
     which writes it and sets the __txid cookie; the redirect back to the replica waits
     until the replica has replicated that far, so you see your note at once.
  2. curl -si -d text=hello {replica}/notes          (the 303 carries Set-Cookie: __txid=...)
  3. curl -s {replica}/litefs/health                (200 OK while the lag is under 10 s)
  4. cat {cluster.replica.path}/.primary {cluster.replica.path}/.lag {cluster.replica.db_path(DB)}-pos
  5. litefs-wsgi demo --lag 7s: the read after a write now answers 504 Proxy timeout (poll_timeout 5s)

Ctrl-C stops both nodes.""",
        flush=True,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("\nstopping: servers shut down" + ("" if cluster.keep_dir else f", {cluster.dir} removed"), flush=True)
    return 0


class _Answer:
    def __init__(self, response: http.client.HTTPResponse, body: bytes, seconds: float) -> None:
        self.status, self.reason, self.body, self.seconds = response.status, response.reason, body, seconds
        self.headers = response.headers

    @property
    def ms(self) -> str:
        return f"{self.seconds * 1000:.0f} ms"


def _request(base: str, method: str, path: str, timeout: float, body: str | None = None, cookie: str | None = None):
    host, port = base.rsplit("//", 1)[1].split(":")
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    if cookie:
        headers["Cookie"] = cookie
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        started = time.monotonic()
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return _Answer(response, data, time.monotonic() - started)
    finally:
        conn.close()


def check(cluster: Cluster) -> int:
    """The story, unattended: write on the replica, read it back there, say what happened."""
    print("litefs-wsgi demo --check: a LiteFS primary and replica on 127.0.0.1 (simulated)\n", flush=True)
    _describe(cluster)
    replica, primary, say = cluster.replica_base, cluster.primary_base, _Steps()
    timeout = cluster.poll_timeout + 15  # every request is bounded; a read may wait poll_timeout
    try:
        page = _request(replica, "GET", "/", timeout)
        say(
            f"GET / on the replica: {page.status} {page.reason} after {page.ms}, at TXID {cluster.replica.position(DB)}"
        )
        note = f"note-{uuid.uuid4().hex[:10]}"
        write = _request(replica, "POST", "/notes", timeout, body=f"text={note}")
        set_cookie = write.headers.get("Set-Cookie", "")
        txid_cookie = SimpleCookie(set_cookie).get("__txid")
        say(
            f'POST /notes "{note}" on the replica (no cookie): {write.status} {write.reason} '
            f"-> {write.headers.get('Location')} after {write.ms}",
            "the replica forwarded it to the primary, which wrote it and answered with",
            f"Set-Cookie: {set_cookie or '(none!)'}",
            f"primary now at TXID {cluster.primary.position(DB)}, replica at TXID {cluster.replica.position(DB)}",
        )
        if write.status != 303 or txid_cookie is None:
            return _verdict(False, "the write did not come back as a 303 with a __txid cookie")
        wanted = int(txid_cookie.value, 16)
        before = cluster.replica.position(DB)
        stale = _request(replica, "GET", "/", timeout)
        seen = note.encode() in stale.body
        say(
            f"GET / on the replica WITHOUT the cookie, right away: {stale.status} after {stale.ms}: "
            + (
                f"the note is {'there (replication beat us to it)' if seen else 'missing: a stale read'}"
                f" (replica was at TXID {before}, the write is TXID {wanted})"
            ),
            "this is what every user would see without litefs-wsgi" if not seen else "",
        )
        cookie = f"__txid={txid_cookie.value}"
        read = _request(replica, "GET", write.headers.get("Location") or "/", timeout, cookie=cookie)
        fresh = read.status == 200 and note.encode() in read.body
        say(
            f"GET {write.headers.get('Location')} on the replica WITH {cookie} (the redirect, as a browser "
            f"follows it): {read.status} {read.reason} after {read.ms}: "
            + ("the note is there" if fresh else "the note is NOT there"),
            (
                f"the replica held the request until it had replicated TXID {wanted}: it waited {read.ms}, "
                f"for a replication lag of {cluster.lag * 1000:g} ms"
                if read.status != 504
                else f"Proxy timeout: the replica did not reach TXID {wanted} within poll_timeout "
                f"({cluster.poll_timeout:g} s) with a lag of {cluster.lag * 1000:g} ms; raise poll_timeout "
                "or fix replication"
            ),
            f"replica now at TXID {cluster.replica.position(DB)}",
        )
        health = [_request(base, "GET", "/litefs/health", timeout) for base in (replica, primary)]
        say(
            "GET /litefs/health: "
            + ", ".join(
                f"{name} {a.status} {a.body.decode().strip()}" for name, a in zip(("replica", "primary"), health)
            )
        )
    except (OSError, http.client.HTTPException) as exc:
        return _verdict(False, f"a request failed: {exc!r}")
    if fresh:
        return _verdict(True, f"the writer read its note on the replica, after waiting {read.ms} for replication")
    return _verdict(False, "the writer did not read its own note on the replica")


class _Steps:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, first: str, *more: str) -> None:
        self.n += 1
        print(f"\n{self.n}. {first}", flush=True)
        for line in more:
            if line:
                print(f"   {line}", flush=True)


def _verdict(held: bool, why: str) -> int:
    print(f"\n{'OK' if held else 'FAILED'}: read-your-writes {'held' if held else 'did not hold'}: {why}.", flush=True)
    return 0 if held else 1
