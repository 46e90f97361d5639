"""Real servers on 127.0.0.1 for the tests: werkzeug in a thread, gunicorn and other commands in a subprocess."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.client
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from litefs_wsgi.testing import LiteFSMount

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The 503 body for a request that was already forwarded once and reached a node that is not the primary.
NOT_PRIMARY = b"Proxy error: no primary available: the request was forwarded to a node that is not the primary\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Clock:
    """A watcher's or node's clock that moves only when told: what it stamped stays trusted."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # not earlier than what the watcher stamped before

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def advance_past(self, seconds: float) -> None:
        """Move a microsecond past ``seconds``: ``(t + s) - t >= s`` is not always true in
        floating point, whether it is depends on ``t``, the machine's uptime."""
        self.now += seconds + 1e-6


@contextlib.contextmanager
def answers(obj: object, method: str) -> Iterator[collections.Counter]:
    """Count what ``obj.method`` answers, as ``(*positional arguments, result)``, while the
    block runs.

    A spy, not a stand-in: the real method still answers. A test waits for the code under
    test to have looked (the watcher read TXID 5 three times, a write was told "no primary"
    three times) instead of sleeping and hoping that it did.
    """
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    real = getattr(obj, method)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        with lock:
            counts[(*args, result)] += 1
        return result

    setattr(obj, method, spy)
    try:
        yield counts
    finally:
        delattr(obj, method)


def unreleased(watcher) -> list[dict[str, int]]:
    """The targets of the reads still waiting in ``watcher`` that it has not woken."""
    with watcher._cond:
        return [waiter.targets for waiter in watcher._waiters if not waiter.done.is_set()]


class Opens:
    """Counts the opens of each file in a directory by any process, with Linux's inotify.

    How a test sees that a read waits inside a server process: the waiting read's watcher
    opens the ``-pos`` file again and again (every ``poll_interval``), which nothing else does.
    Identical events that follow one another unread are merged by the kernel, so closes are
    watched too: open, close, open, close... are counted one by one.
    """

    IN_CLOSE_NOWRITE, IN_OPEN = 0x10, 0x20

    def __init__(self, directory: str) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if (
            self._fd < 0
            or self._libc.inotify_add_watch(self._fd, os.fsencode(directory), self.IN_OPEN | self.IN_CLOSE_NOWRITE) < 0
        ):
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")
        self._counts: collections.Counter = collections.Counter()

    def __call__(self, name: str) -> int:
        """How many times ``name`` was opened since this was made."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return self._counts[name]
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                event_name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                if mask & self.IN_OPEN:
                    self._counts[event_name] += 1
                offset += 16 + length

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def opens(directory: str) -> Iterator[Opens]:
    """``Opens`` of ``directory`` while the block runs; the test is skipped without inotify."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's inotify to see a server process read a file")
    counter = Opens(directory)
    try:
        yield counter
    finally:
        counter.close()


def in_thread(target: Callable, *args) -> tuple[threading.Thread, list]:
    """Call ``target(*args)`` in a daemon thread; its return value is appended to the list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def recording_app(calls: list, body: bytes = b"ok", record: str = "PATH_INFO"):
    """A WSGI app answering 200 ``body`` that appends each request's ``environ[record]`` to ``calls``."""

    def app(environ, start_response):
        calls.append(environ[record])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return app


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RawServer:
    """A raw TCP server on 127.0.0.1 for tests that speak HTTP byte by byte: each accepted
    connection is handed to ``_connection(conn, number)`` (numbered from 1) in its own thread.
    Subclasses set their own state before calling ``__init__``, which starts accepting."""

    def __init__(self) -> None:
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1  # only this thread counts
            threading.Thread(target=self._connection, args=(conn, self.connections), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def serve(app, port: int = 0) -> Iterator[str]:
    """Serve a WSGI app with werkzeug's threaded server; yields its base URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def listening(command: list[str], port: int, env: dict[str, str] | None = None, cwd: str = ROOT):
    """Run ``command`` until it listens on 127.0.0.1:``port``; yields the process, stopped on exit.

    Its output is read all along: a server that logs each request would block on a full pipe.
    Its last 100 lines are in ``proc.output``.
    """
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: collections.deque[bytes] = collections.deque(maxlen=100)
    proc.output = output
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 60, f"{command[:3]} on port {port}")
        if proc.poll() is not None:
            reader.join(5)
            raise AssertionError(f"{command[:3]} exited {proc.returncode}: {b''.join(output).decode()[-3000:]}")
        yield proc
    finally:
        stop(proc)
        reader.join(5)


@contextlib.contextmanager
def gunicorn(
    args: list[str], env: dict[str, str] | None = None, port: int | None = None, cwd: str = ROOT
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``gunicorn ARGS`` bound to 127.0.0.1; yields (base URL, process) once it listens."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {}), "GUNICORN_BIND": f"127.0.0.1:{port}"}
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *args]
    with listening(command, port, full_env, cwd) as proc:
        yield f"http://127.0.0.1:{port}", proc


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the standalone proxy ----------------------------------------------------------------------


def proxy_config(directory, mount: LiteFSMount, target: str, **options: object) -> str:
    """A new litefs.yml in ``directory`` for the standalone proxy in front of ``target`` (host:port)
    on ``mount``, tracking app.db; ``options`` go under ``proxy:`` (``poll_timeout`` as ``poll-timeout``).
    Returns its path."""
    lines = [f"  {key.replace('_', '-')}: {value}\n" for key, value in options.items()]
    fd, path = tempfile.mkstemp(prefix="litefs-", suffix=".yml", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(f'fuse:\n  dir: "{mount.path}"\nproxy:\n  target: "{target}"\n  db: "app.db"\n' + "".join(lines))
    return path


@contextlib.contextmanager
def standalone_proxy(config: str, threads: int = 1) -> Iterator[str]:
    """The standalone proxy, ``gunicorn -c gunicorn.conf.py`` with one worker, reading ``config``; yields its URL."""
    env = {"LITEFS_WSGI_CONFIG": config, "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": str(threads)}
    with gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env) as (url, _proc):
        yield url


def form_request(url: str, method: str = "GET", path: str = "/", body: str | None = None, cookie: str | None = None):
    """One request as a browser sends it (a form body, a Cookie header); (status, headers, text)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    if cookie:
        headers["Cookie"] = cookie
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        conn.close()


# -- LiteFS's HTTP API ---------------------------------------------------------------------------


def tx_event(db: str, txid: int) -> dict:
    """A ``tx`` event exactly as LiteFS writes it."""
    return {
        "type": "tx",
        "db": db,
        "data": {
            "txID": f"{txid:016x}",
            "postApplyChecksum": f"{txid * 7919:016x}",
            "pageSize": 4096,
            "commit": 2,
            "timestamp": "2026-11-24T13:30:00.123456789Z",
        },
    }


def primary_change(is_primary: bool, hostname: str | None = None) -> dict:
    """A ``primaryChange`` event; LiteFS omits ``hostname`` when it is empty."""
    data: dict = {"isPrimary": is_primary}
    if hostname:
        data["hostname"] = hostname
    return {"type": "primaryChange", "data": data}


class FakeLiteFS:
    """LiteFS's HTTP API on 127.0.0.1: ``GET /info`` and a chunked, never-ending ``GET /events``.

    Each ``/events`` connection first gets ``init`` (built from ``is_primary`` and
    ``hostname`` as they are when it connects), then whatever ``send()`` broadcasts;
    ``drop()`` ends every open stream, as LiteFS does to a slow reader.
    """

    def __init__(self, is_primary: bool = False, hostname: str | None = "node-a") -> None:
        self.is_primary = is_primary
        self.hostname = hostname
        self.info: dict = {}
        self.connections = 0
        self._streams: list[queue.Queue] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.url = ""

    def send(self, event: dict) -> None:
        self.send_raw(json.dumps(event).encode() + b"\n")

    def send_raw(self, line: bytes) -> None:
        """Broadcast ``line`` as it is, even when it is not an event."""
        with self._lock:
            for stream in self._streams:
                stream.put(line)

    def drop(self) -> None:
        with self._lock:
            for stream in self._streams:
                stream.put(None)

    def _events(self) -> Iterator[bytes]:
        stream: queue.Queue = queue.Queue()
        init = {"isPrimary": self.is_primary}
        if self.hostname:
            init["hostname"] = self.hostname
        with self._lock:
            self.connections += 1
            self._streams.append(stream)
        try:
            yield json.dumps({"type": "init", "data": init}).encode() + b"\n"
            while not self._stopped.is_set():
                try:
                    line = stream.get(timeout=0.1)
                except queue.Empty:
                    continue
                if line is None:
                    return
                yield line
        finally:
            with self._lock:
                self._streams.remove(stream)

    def __call__(self, environ, start_response):
        request = Request(environ)
        if request.path == "/events":
            # No Content-Length: werkzeug's HTTP/1.1 server sends it chunked, as Go's does.
            return Response(self._events(), content_type="application/json")(environ, start_response)
        if request.path == "/info":
            info = {"id": "ABC", "clusterID": "LFSC1", "isPrimary": self.is_primary, "candidate": True}
            info.update(path="/litefs", primary={"hostname": self.hostname} if self.hostname else {})
            info.update(self.info)
            return Response(json.dumps(info), content_type="application/json")(environ, start_response)
        return Response("not found", 404)(environ, start_response)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeLiteFS]:
        with serve(self) as url:
            self.url = url
            try:
                yield self
            finally:
                self._stopped.set()
                self.drop()
