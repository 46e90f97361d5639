"""Faults with real processes: peers killed mid-request, slow peers, clients that leave, a vanishing mount."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import urllib3
from servers import free_port, opens, proxy_config, serve, standalone_proxy, wait_until
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

pytestmark = pytest.mark.timeout(120)

# -- real peers ------------------------------------------------------------------------------

# A peer we can kill: a raw HTTP server in its own process. What it does depends on the path;
# it prints one line per step so that a test knows when to strike.
PEER = textwrap.dedent(
    r"""
    import socket, sys, threading, time

    def handle(conn):
        conn.settimeout(60)
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        path = data.split(b" ", 2)[1].decode()
        print("request", path, flush=True)
        if path == "/partial-length":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        elif path == "/partial-large":  # many blocks: cut after the first
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000)
        elif path == "/partial-chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n")
        elif path == "/upload":
            conn.recv(65536)  # the upload has begun
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        print("sent", path, flush=True)
        time.sleep(60)  # until the test kills this process

    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
    """
)


class Peer:
    """A killable HTTP server process; ``expect(line)`` waits for it to print ``line``."""

    def __init__(self, tmp_path) -> None:
        script = tmp_path / "peer.py"
        script.write_text(PEER)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.port)], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._more = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._more:
                self.lines.append(line.strip())
                self._more.notify_all()

    def expect(self, line: str, timeout: float = 20.0) -> None:
        with self._more:
            if not self._more.wait_for(lambda: line in self.lines, timeout):
                raise AssertionError(f"peer never printed {line!r}; it printed {self.lines}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def peer(tmp_path) -> Iterator[Peer]:
    p = Peer(tmp_path)
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.kill()


class Recorder:
    """A WSGI app answering 200 ``ok`` and recording each request it received in full."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.requests: list[tuple[str, str, bytes]] = []
        self.incomplete: list[str] = []
        self.release = threading.Event()  # a path starting /slow waits for it

    def __call__(self, environ, start_response):
        request = Request(environ)
        self.started.append(request.path)
        if request.path.startswith("/slow"):
            self.release.wait(30)
        try:
            body = request.get_data()
        except Exception as exc:  # the upload was cut: the framing says so
            self.incomplete.append(f"{request.path}: {type(exc).__name__}")
            raise
        self.requests.append((request.method, request.path, body))
        return Response("ok")(environ, start_response)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


def proxy(tmp_path, mount: LiteFSMount, target: str, threads: int = 1, **options):
    """The standalone proxy in front of ``target``, one worker; yields its URL."""
    return standalone_proxy(proxy_config(tmp_path, mount, target, **options), threads)


def exchange(url: str, data: bytes, timeout: float = 20.0) -> bytes:
    """Send raw bytes to the server at ``url`` and return all it answers until it closes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def get(url: str, path: str = "/", timeout: float = 20.0, **kwargs) -> urllib3.BaseHTTPResponse:
    return urllib3.request("GET", url + path, timeout=timeout, retries=False, **kwargs)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    app = Recorder()
    try:
        with serve(app) as url:
            yield app, url
    finally:
        app.release.set()


# -- the target dies mid-response ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["length", "large", "chunked"])
def test_target_dying_mid_response_cuts_the_client_off(tmp_path, mount, peer, kind):
    with proxy(tmp_path, mount, f"127.0.0.1:{peer.port}") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(f"GET /partial-{kind} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            peer.expect(f"sent /partial-{kind}")
            peer.kill()
            answer = read_all(client)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:200]
    if kind in ("length", "large"):
        size = 100000 if kind == "length" else 10000000
        assert f"Content-Length: {size}".encode() in head
        assert 1000 <= len(body) < size  # what came, and short: the client can tell
    else:
        assert b"Transfer-Encoding: chunked" in head
        assert b"x" * 1000 in body
        assert not body.endswith(b"0\r\n\r\n")  # the terminating chunk never comes


# -- the primary dies or is slow while a replica forwards a write ------------------------------


def test_primary_dying_mid_upload_answers_502_and_frees_the_worker(tmp_path, peer, recorder):
    app, target = recorder
    replica = LiteFSMount(tmp_path / "replica")
    replica.make_replica(f"127.0.0.1:{peer.port}")
    with proxy(tmp_path, replica, target, primary_url="http://{hostname}", connect_timeout=0) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            # The replica forwards an upload 64 KiB at a time.
            client.sendall((b"400\r\n" + b"a" * 1024 + b"\r\n") * 100)
            peer.expect("sent /upload")
            peer.kill()
            # The replica notices when it next writes to the dead primary: keep uploading,
            # slowly, until an answer comes.
            for _ in range(100):
                if select.select([client], [], [], 0.2)[0]:
                    break
                with contextlib.suppress(OSError):
                    client.sendall((b"400\r\n" + b"b" * 1024 + b"\r\n") * 64)
            answer = http.client.HTTPResponse(client)
            answer.begin()
            assert answer.status == 502
            assert answer.read().startswith(b"Proxy error: ")
        # One thread: it is free again.
        assert get(url, "/after").status == 200
    assert app.paths() == ["/after"]


def test_slow_primary_answers_504_at_read_timeout(tmp_path, recorder):
    app, primary = recorder
    replica = LiteFSMount(tmp_path / "replica")
    replica.make_replica(primary.removeprefix("http://"))
    with proxy(tmp_path, replica, primary, primary_url="http://{hostname}", read_timeout="500ms") as url:
        answer = urllib3.request("POST", url + "/slow", body=b"data", timeout=20, retries=False)
        assert answer.status == 504
        assert answer.data.startswith(b"Proxy error: no answer from ")
        app.release.set()
        assert get(url, "/after").status == 200


# -- the client leaves -----------------------------------------------------------------------


def test_client_leaving_while_waiting_frees_the_worker_and_nothing_is_forwarded(tmp_path, mount, recorder):
    app, target = recorder
    mount.set_position("app.db", 1)
    with proxy(tmp_path, mount, target, poll_timeout="60s") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"GET /waiting HTTP/1.1\r\nHost: x\r\nCookie: __txid=0000000000000005\r\n\r\n")
            # One thread: while the read waits, a second request cannot be served.
            with pytest.raises(urllib3.exceptions.ReadTimeoutError):
                get(url, "/while-waiting", timeout=urllib3.Timeout(connect=5, read=1))
        # The client has gone: the thread is freed long before poll_timeout.
        assert get(url, "/after", timeout=30).status == 200
    assert "/waiting" not in app.paths()
    assert app.paths()[-1] == "/after"


def test_client_that_stays_is_served_when_the_position_arrives(tmp_path, mount, recorder):
    app, target = recorder
    mount.set_position("app.db", 1)
    with proxy(tmp_path, mount, target, poll_timeout="60s", threads=2) as url, opens(mount.path) as opened:
        results = []
        waiting = threading.Thread(
            target=lambda: results.append(get(url, "/waiting", headers={"Cookie": "__txid=0000000000000005"}))
        )
        waiting.start()
        wait_until(lambda: opened("app.db-pos") >= 3 or results, 20, "the read to wait in the proxy")
        # Still waiting a while later, its watcher still polling (the position cannot move by
        # itself): the liveness check, every 50 ms, does not take an idle client for a gone one.
        time.sleep(0.5)
        before = opened("app.db-pos")
        wait_until(lambda: opened("app.db-pos") > before + 2 or results, 20, "the watcher to poll on")
        assert not results and waiting.is_alive()
        mount.set_position("app.db", 5)
        waiting.join(30)
    assert results and results[0].status == 200
    assert app.paths().count("/waiting") >= 1


def test_request_pipelined_behind_a_waiting_read_is_not_consumed_by_the_liveness_check(tmp_path, mount, recorder):
    app, target = recorder
    mount.set_position("app.db", 1)
    with proxy(tmp_path, mount, target, poll_timeout="60s") as url, opens(mount.path) as opened:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\nCookie: __txid=0000000000000005\r\n\r\n")
            # The first read waits, checking its socket, when the second arrives.
            wait_until(lambda: opened("app.db-pos") >= 3, 20, "the first read to wait in the proxy")
            client.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            # Weak by nature: nothing outside the worker shows its liveness checks (every 50 ms).
            # The watcher polling on for 0.3 s more makes several of them likely, not certain.
            time.sleep(0.3)
            before = opened("app.db-pos")
            wait_until(lambda: opened("app.db-pos") > before + 2, 20, "the watcher to poll on")
            mount.set_position("app.db", 5)
            answer = read_all(client)
    assert re.findall(rb"HTTP/1\.1 (\d+) ", answer) == [b"200", b"200"], answer
    assert app.paths() == ["/first", "/second"]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_client_leaving_mid_upload_frees_the_worker_and_the_primary_gets_no_complete_request(
    tmp_path, recorder, framing
):
    app, primary = recorder
    replica = LiteFSMount(tmp_path / "replica")
    replica.make_replica(primary.removeprefix("http://"))
    head = b"Content-Length: 100000" if framing == "length" else b"Transfer-Encoding: chunked"
    part = b"a" * 1000 if framing == "length" else b"3e8\r\n" + b"a" * 1000 + b"\r\n"
    with proxy(tmp_path, replica, primary, primary_url="http://{hostname}", read_timeout="60s") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + part)
            wait_until(lambda: "/upload" in app.started, 20, "the upload to reach the primary")
        # One thread: it is free again well before read_timeout.
        assert get(url, "/after", timeout=30).status == 200
        wait_until(lambda: app.incomplete, 20, "the primary to see the upload cut")
    assert app.paths() == ["/after"]
    assert app.incomplete[0].startswith("/upload")


# -- the mount goes away ---------------------------------------------------------------------


def _app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


@pytest.mark.parametrize("replacement", ["gone", "empty", "file"])
def test_mount_disappearing_serves_reads_and_writes(tmp_path, replacement):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 3)
    client = Client(LiteFSMiddleware(_app, db="app.db", mount_dir=mount.path, poll_timeout=30), use_cookies=False)
    assert client.get("/", headers={"Cookie": "__txid=0000000000000003"}).status_code == 200
    # LiteFS restarting: the FUSE mount goes away, leaving nothing, an empty directory or worse.
    shutil.rmtree(mount.path)
    if replacement == "empty":
        os.mkdir(mount.path)
    elif replacement == "file":
        open(mount.path, "wb").close()
    # No position: the database does not exist here, so there is nothing to wait for.
    assert client.get("/", headers={"Cookie": "__txid=0000000000000009"}).status_code == 200
    write = client.post("/", data=b"x")
    assert write.status_code == 200 and "Set-Cookie" not in write.headers
    assert client.get("/litefs/health").status_code == 200
    # LiteFS is back, as a replica behind: reads wait again.
    if replacement == "file":
        os.remove(mount.path)
    mount = LiteFSMount(mount.path)
    mount.make_replica("127.0.0.1:1")
    mount.set_position("app.db", 3)
    slow = Client(LiteFSMiddleware(_app, db="app.db", mount_dir=mount.path, poll_timeout=0.05), use_cookies=False)
    assert slow.get("/", headers={"Cookie": "__txid=0000000000000009"}).status_code == 504


def test_mount_disappearing_under_gunicorn_never_answers_500(tmp_path, recorder):
    app, target = recorder
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_replica(target.removeprefix("http://"))
    mount.set_position("app.db", 3)
    with proxy(tmp_path, mount, target, threads=2, primary_url="http://{hostname}", poll_timeout="30s") as url:
        cookie = {"Cookie": "__txid=0000000000000009"}
        shutil.rmtree(mount.path)
        assert get(url, "/read", headers=cookie).status == 200  # nothing to wait for
        assert get(url, "/litefs/health").status == 200
        # No .primary: this node takes itself for the primary and serves the write, no cookie.
        write = urllib3.request("POST", url + "/write", body=b"x", timeout=20, retries=False)
        assert write.status == 200 and "Set-Cookie" not in write.headers
        # LiteFS is back, as a replica: the write goes to the primary again.
        mount = LiteFSMount(mount.path)
        mount.make_replica(target.removeprefix("http://"))
        assert urllib3.request("POST", url + "/again", body=b"x", timeout=20, retries=False).status == 200
    assert app.paths() == ["/read", "/write", "/again"]
