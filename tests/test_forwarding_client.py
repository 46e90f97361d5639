"""The forwarding client against real servers on 127.0.0.1: kept-alive connections the other
side closes, what is sent again and what never is, framing of answers, failures logged.

Most tests drive ``Forwarder`` in this process with the environ a WSGI server would give
(werkzeug's ``EnvironBuilder``) against ``Upstream``, a raw HTTP/1.1 server whose every
connection and request is recorded; some go through the standalone proxy under gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from proxy_ws import read_head
from servers import ROOT, RawServer, free_port, gunicorn, listening, proxy_config, standalone_proxy, wait_until
from test_faults import read_all
from werkzeug.test import EnvironBuilder

from litefs_wsgi import forwarding
from litefs_wsgi.forwarding import SMALL_BODY, FailureLog, Forwarder
from litefs_wsgi.testing import LiteFSMount

pytestmark = pytest.mark.timeout(120)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Upstream(RawServer):
    """A raw HTTP/1.1 server. ``answer(request, n)`` gives the bytes to send for the ``n``-th
    request (from 1) on its connection, or None to close that connection without answering.
    ``requests`` records (connection number, method, path, body) of each complete request;
    with ``idle_close``, a connection idle that long after an answer is closed and the
    ``closed_idle`` counter goes up."""

    def __init__(self, answer: Callable[[dict, int], bytes | None] | None = None, idle_close: float = 0) -> None:
        self.answer = answer or (lambda request, n: OK)
        self.idle_close = idle_close
        self.requests: list[tuple[int, str, str, bytes]] = []
        self.closed_idle = 0
        self._lock = threading.Condition()
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        buf = b""
        with conn:
            for n in range(1, 1000):
                conn.settimeout(self.idle_close if n > 1 and self.idle_close else 20)
                try:
                    while b"\r\n\r\n" not in buf:
                        more = conn.recv(65536)
                        if not more:
                            return
                        buf += more
                except TimeoutError:
                    with self._lock:
                        self.closed_idle += 1
                        self._lock.notify_all()
                    return
                conn.settimeout(20)
                head, _, buf = buf.partition(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
                method, path, _ = line.split(" ")
                request = {"method": method, "path": path, "headers": headers}
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                length = int(headers.get("content-length", 0))
                while len(buf) < length:
                    more = conn.recv(65536)
                    if not more:
                        return
                    buf += more
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append((number, method, path, body))
                    self._lock.notify_all()
                data = self.answer(request, n)
                if data is None:
                    return  # closed without a byte of an answer
                close = isinstance(data, tuple)  # (bytes, "close"): send them, then close
                conn.sendall(data[0] if close else data)
                if close:
                    return


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(*args, **kwargs) -> Upstream:
        made.append(Upstream(*args, **kwargs))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def forward(
    forwarder: Forwarder,
    url: str,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    mark: bool = False,
    **kw,
):
    """Forward one request as a WSGI server would hand it over (``mark``: to the primary):
    (status, headers, body)."""
    environ = EnvironBuilder(method=method, path=path, data=body, **kw).get_environ()
    environ["REMOTE_ADDR"] = "127.0.0.1"
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=headers)

    result = forwarder.forward(environ, start_response, url, mark=mark)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return int(started["status"].split()[0]), started["headers"], data


def pooled(forwarder: Forwarder) -> list:
    return [conn for idle in forwarder._idle.values() for conn in idle]


# -- a kept-alive connection the other side closed while it was idle ---------------------------


def test_connection_closed_while_idle_is_not_used(upstream_factory):
    upstream = upstream_factory(idle_close=0.2)
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    assert forward(forwarder, upstream.url, "POST", "/first", b"x")[0] == 200
    assert len(pooled(forwarder)) == 1
    wait_until(lambda: upstream.closed_idle == 1, 20, "the upstream to close the idle connection")
    # A write on it: it must not be a 502, and it must arrive once.
    status, _, body = forward(forwarder, upstream.url, "POST", "/second", b"y")
    assert (status, body) == (200, b"ok")
    assert [(n, path, data) for n, _, path, data in upstream.requests] == [(1, "/first", b"x"), (2, "/second", b"y")]


class SpeaksWhileIdle(RawServer):
    """Answers every request with OK; on its first connection, once ``go`` is set, it then
    sends ``after`` while the connection is idle, or with ``after=None`` resets it."""

    def __init__(self, after: bytes | None) -> None:
        self.after = after
        self.go = threading.Event()
        self.requests: list[tuple[int, str, bytes]] = []
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(20)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        more = conn.recv(65536)
                    except ConnectionResetError:  # closed with the stray bytes unread
                        return
                    if not more:
                        return
                    buf += more
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int((re.search(rb"(?im)^content-length:\s*(\d+)", head) or [b"", b"0"])[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append((number, head.split(b" ")[1].decode(), buf[:length]))
                buf = buf[length:]
                conn.sendall(OK)
                if number == 1:
                    self.go.wait(20)
                    if self.after is None:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed with a reset
                    conn.sendall(self.after)


def test_bytes_sent_on_an_idle_connection_are_never_taken_for_the_next_answer():
    server = SpeaksWhileIdle(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        assert forward(forwarder, server.url, "GET", "/a")[::2] == (200, b"ok")
        (conn,) = pooled(forwarder)
        server.go.set()
        assert select.select([conn.sock], [], [], 20)[0], "the stray answer never arrived"
        assert forward(forwarder, server.url, "GET", "/b")[::2] == (200, b"ok")  # not "stray"
        assert [(n, path) for n, path, _ in server.requests] == [(1, "/a"), (2, "/b")]
    finally:
        server.close()


def test_connection_reset_while_idle_sends_the_write_once_on_a_new_one():
    server = SpeaksWhileIdle(None)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        assert forward(forwarder, server.url, "POST", "/first", b"x")[::2] == (200, b"ok")
        (conn,) = pooled(forwarder)
        server.go.set()
        assert select.select([conn.sock], [], [], 20)[0], "the reset never arrived"
        assert forward(forwarder, server.url, "POST", "/second", b"y")[::2] == (200, b"ok")
        assert server.requests == [(1, "/first", b"x"), (2, "/second", b"y")]
    finally:
        server.close()


def test_gunicorn_closing_idle_keep_alive_connections(tmp_path):
    """gunicorn closes a client's keep-alive connection after ``--keep-alive`` seconds idle."""
    log = tmp_path / "requests.log"
    app = tmp_path / "keepalive_app.py"
    app.write_text(
        "def app(environ, start_response):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(environ['REQUEST_METHOD'] + ' ' + environ['PATH_INFO'] + '\\n')\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n"
    )
    args = [
        "-k",
        "gthread",
        "-w",
        "1",
        "--threads",
        "2",
        "--keep-alive",
        "1",
        "--chdir",
        str(tmp_path),
        "keepalive_app:app",
    ]
    with gunicorn(args, cwd=str(tmp_path)) as (url, _proc):
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        for n in range(3):
            assert forward(forwarder, url, "PUT", f"/w{n}", b"data")[0] == 200
            (conn,) = pooled(forwarder)
            # Wait for gunicorn's FIN to reach the pooled connection: it is closed.
            assert select.select([conn.sock], [], [], 20)[0], "gunicorn never closed the idle connection"
        assert forward(forwarder, url, "DELETE", "/last")[0] == 200
    assert log.read_text().splitlines() == ["PUT /w0", "PUT /w1", "PUT /w2", "DELETE /last"]


def test_standalone_proxy_survives_the_target_closing_idle_connections(tmp_path, upstream_factory):
    upstream = upstream_factory(idle_close=0.2)
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    with standalone_proxy(proxy_config(tmp_path, mount, f"127.0.0.1:{upstream.port}"), threads=1) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                client.sendall(
                    f"POST /w{n} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".encode()
                )
                answer = read_all(client)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            wait_until(lambda n=n: upstream.closed_idle == n + 1, 20, "the target to close the idle connection")
    assert [path for _, _, path, _ in upstream.requests] == ["/w0", "/w1", "/w2"]


# -- what is sent again when a reused connection is closed before any answer ----------------


def drop_second(request: dict, n: int) -> bytes | None:
    """Answer the first request on a connection; close on the second without answering, as a
    server does whose idle timeout fired just as the request arrived."""
    return OK if n == 1 else None


@pytest.mark.parametrize(
    ("method", "body", "headers", "sent_again"),
    [
        ("GET", None, {}, True),
        ("HEAD", None, {}, True),
        ("OPTIONS", None, {}, True),
        ("DELETE", None, {}, False),
        ("POST", b"small", {}, False),
        ("PUT", b"small", {}, False),
        ("POST", b"small", {"Idempotency-Key": "k1"}, True),
        ("POST", b"big" * 40000, {"Idempotency-Key": "k1"}, False),  # over 64 KiB: streamed, not held
    ],
)
def test_reused_connection_closed_before_the_answer(upstream_factory, method, body, headers, sent_again):
    upstream = upstream_factory(drop_second)
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    assert forward(forwarder, upstream.url, "GET", "/warm")[0] == 200
    status, _, data = forward(forwarder, upstream.url, method, "/again", body, headers=headers)
    tries = [(n, m) for n, m, path, _ in upstream.requests if path == "/again"]
    if sent_again:  # Go's Transport would: an idempotent request, its body held whole or none
        assert status == 200 and data == (b"" if method == "HEAD" else b"ok")
        assert tries == [(1, method), (2, method)]
    else:  # its bytes reached the other side, which may have acted on them: never twice
        assert status == 502
        assert data.startswith(b"Proxy error: 127.0.0.1:")
        assert tries == [(1, method)]


@pytest.mark.parametrize(
    ("method", "body", "headers"),
    [("GET", None, {}), ("OPTIONS", None, {}), ("POST", b"small", {"Idempotency-Key": "k1"})],
)
def test_a_request_to_the_primary_is_never_sent_again_once_written(upstream_factory, method, body, headers):
    # What goes to the primary is a write (OPTIONS is one, as for LiteFS) or a GET whose view
    # writes (ReplayOnPrimary, always_forward): whatever its method says, never twice.
    upstream = upstream_factory(drop_second)
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    assert forward(forwarder, upstream.url, "GET", "/warm")[0] == 200
    status, _, data = forward(forwarder, upstream.url, method, "/write", body, headers=headers, mark=True)
    assert status == 502 and data.startswith(b"Proxy error: 127.0.0.1:")
    assert [(n, m) for n, m, path, _ in upstream.requests if path == "/write"] == [(1, method)]


def test_new_connection_closed_before_the_answer_is_not_sent_again(upstream_factory):
    upstream = upstream_factory(lambda request, n: None)
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    status, _, data = forward(forwarder, upstream.url, "GET", "/once")
    assert status == 502
    assert (
        data
        == f"Proxy error: 127.0.0.1:{upstream.port} closed the connection or sent a bad response "
        "(connection closed before any answer)\n".encode()
    )
    assert len(upstream.requests) == 1


def test_connection_closed_after_part_of_the_answer_is_not_sent_again(upstream_factory):
    upstream = upstream_factory(lambda request, n: OK if n == 1 else (b"HTTP/1.1 200 OK\r\nContent-Le", "close"))
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    assert forward(forwarder, upstream.url, "GET", "/warm")[0] == 200
    assert forward(forwarder, upstream.url, "GET", "/cut")[0] == 502
    assert [path for _, _, path, _ in upstream.requests] == ["/warm", "/cut"]


# -- framing of answers ----------------------------------------------------------------------


def by_path(answers: dict[str, bytes]) -> Callable[[dict, int], bytes]:
    return lambda request, n: answers[request["path"]]


def test_answers_without_a_body_keep_the_connection_in_step(upstream_factory):
    upstream = upstream_factory(
        by_path(
            {
                "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-A: 1\r\n\r\n",
                "/204": b"HTTP/1.1 204 No Content\r\nX-A: 2\r\n\r\n",
                "/304": b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: "e"\r\n\r\n',
                "/after": OK,
            }
        )
    )
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    status, headers, body = forward(forwarder, upstream.url, "HEAD", "/head")
    assert (status, body) == (200, b"")
    assert ("Content-Length", "1000") in headers
    assert forward(forwarder, upstream.url, "GET", "/after")[::2] == (200, b"ok")
    assert forward(forwarder, upstream.url, "GET", "/204")[::2] == (204, b"")
    assert forward(forwarder, upstream.url, "GET", "/after")[::2] == (200, b"ok")
    status, headers, body = forward(forwarder, upstream.url, "GET", "/304", headers={"If-None-Match": '"e"'})
    assert (status, body) == (304, b"")
    assert ("ETag", '"e"') in headers
    assert forward(forwarder, upstream.url, "GET", "/after")[::2] == (200, b"ok")
    # All on one connection: no answer's missing body was taken from the next one.
    assert {n for n, *_ in upstream.requests} == {1}


def test_a_head_seen_before_is_answered_as_the_first_time(upstream_factory):
    # Within a second an app sends the same head again and again: the second and later ones
    # are copied from what the first gave (forwarding._KNOWN_HEADS), with the method's framing.
    get_first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen: get-first\r\n\r\n"
    head_first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen: head-first\r\n\r\n"
    upstream = upstream_factory(
        lambda request, n: (
            (get_first if request["path"] == "/a" else head_first) + (b"" if request["method"] == "HEAD" else b"ok")
        )
    )
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    for method, path in [("GET", "/a"), ("HEAD", "/a"), ("GET", "/a"), ("HEAD", "/b"), ("GET", "/b"), ("HEAD", "/b")]:
        status, headers, body = forward(forwarder, upstream.url, method, path)
        assert (status, body) == (200, b"" if method == "HEAD" else b"ok"), (method, path)
        assert headers == [("Content-Length", "2"), ("X-Seen", "get-first" if path == "/a" else "head-first")]
        headers.append(("X-Added", "by the server"))  # the list is the server's: the next answer has its own
    assert {n for n, *_ in upstream.requests} == {1}  # no body taken from the next answer


def test_a_repeated_head_that_closes_the_connection_closes_it_each_time(upstream_factory):
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    upstream = upstream_factory(lambda request, n: (closing, "close"))
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    for _ in range(3):
        status, headers, body = forward(forwarder, upstream.url, "GET", "/")
        assert (status, body) == (200, b"ok")
        assert not [name for name, _ in headers if name.lower() == "connection"]
        assert pooled(forwarder) == []
    assert [n for n, *_ in upstream.requests] == [1, 2, 3]


def test_known_heads_are_bounded(upstream_factory):
    upstream = upstream_factory(lambda request, n: b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 2\r\n\r\nok" % n)
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    for n in range(1, 301):  # each answer's head new, as with a Set-Cookie per answer
        status, headers, body = forward(forwarder, upstream.url, "GET", "/")
        assert (status, headers[0], body) == (200, ("X-N", str(n)), b"ok")
        assert len(forwarding._KNOWN_HEADS) <= 256 and len(forwarding._SEEN_HEADS) <= 256
    long = b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * forwarding.KNOWN_HEAD_MAX + b"\r\nContent-Length: 2\r\n\r\nok"
    upstream.answer = lambda request, n: long
    assert forward(forwarder, upstream.url, "GET", "/")[::2] == (200, b"ok")
    assert not [head for head in forwarding._KNOWN_HEADS if b"X-Long" in head]  # too long to keep


def test_chunked_answer_with_extensions_and_trailers(upstream_factory):
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
    )
    upstream = upstream_factory(by_path({"/chunked": chunked, "/after": OK}))
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    status, headers, body = forward(forwarder, upstream.url, "GET", "/chunked")
    assert (status, body) == (200, b"hello world")
    names = {name.lower() for name, _ in headers}
    assert not names & {"transfer-encoding", "trailer", "x-sum"}  # the WSGI server frames it anew
    assert forward(forwarder, upstream.url, "GET", "/after")[::2] == (200, b"ok")
    assert {n for n, *_ in upstream.requests} == {1}


def test_interim_100_continue_is_not_relayed(upstream_factory):
    upstream = upstream_factory()  # sends 100 Continue to a request that expects it
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    status, headers, body = forward(
        forwarder, upstream.url, "POST", "/upload", b"payload", headers={"Expect": "100-continue"}
    )
    assert (status, body) == (200, b"ok")
    assert upstream.requests[0][3] == b"payload"


def test_bytes_after_the_answer_end_its_connection(upstream_factory):
    upstream = upstream_factory(lambda request, n: OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    assert forward(forwarder, upstream.url, "GET", "/a")[::2] == (200, b"ok")
    assert forward(forwarder, upstream.url, "GET", "/b")[::2] == (200, b"ok")  # not "stray"
    assert [n for n, *_ in upstream.requests] == [1, 2]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF line ends
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
def test_answer_with_ambiguous_framing_is_a_502_at_once(upstream_factory, answer):
    upstream = upstream_factory(lambda request, n: answer)  # and keeps the connection open
    forwarder = Forwarder(connect_timeout=5, read_timeout=60)
    status, headers, body = forward(forwarder, upstream.url, "GET", "/")
    assert status == 502, body  # not a 504 after read_timeout: refused as it arrived
    assert body.startswith(f"Proxy error: 127.0.0.1:{upstream.port} closed the connection or sent a bad".encode())


# A head, then a failure before the body's first byte: (what the target sends, the code, the
# cause); ("bytes", "close"): sent, then the connection closed.
FAILS_BEFORE_THE_BODY = {
    "bad-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n", 502, "protocol"),
    "closed": ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "close"), 502, "protocol"),
    "silent": (b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 10\r\n\r\n", 504, "timeout"),
}


def _proxy_error(code: int, port: int) -> bytes:
    if code == 504:
        return f"Proxy error: no answer from 127.0.0.1:{port} within 1s\n".encode()
    return f"Proxy error: 127.0.0.1:{port} closed the connection or sent a bad response (".encode()


@pytest.mark.parametrize("kind", FAILS_BEFORE_THE_BODY)
def test_a_target_failing_before_the_body_gets_the_proxys_error(upstream_factory, kind):
    sent, code, cause = FAILS_BEFORE_THE_BODY[kind]
    upstream = upstream_factory(lambda request, n: sent)
    # 1 s only for the silent target, which must time out; the others fail at once, and a
    # busy machine must not turn their 502 into a 504.
    forwarder = Forwarder(connect_timeout=5, read_timeout=1 if code == 504 else 20)
    causes = []
    forwarder.on_failure = lambda cause, to_primary: causes.append(cause)
    status, headers, body = forward(forwarder, upstream.url, "GET", "/x")
    assert (status, causes) == (code, [cause]), body
    assert body.startswith(_proxy_error(code, upstream.port))
    assert "Set-Cookie" not in dict(headers)  # nothing of the failed answer's head
    assert pooled(forwarder) == []


@pytest.mark.parametrize("kind", FAILS_BEFORE_THE_BODY)
def test_a_target_failing_before_the_body_gets_the_proxys_error_from_gunicorn(tmp_path, upstream_factory, kind):
    sent, code, _ = FAILS_BEFORE_THE_BODY[kind]
    upstream = upstream_factory(lambda request, n: sent)
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    timeout = "1s" if code == 504 else "20s"  # as above
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{upstream.port}", read_timeout=timeout)
    env = {"LITEFS_WSGI_CONFIG": config, "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "1"}
    with gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env) as (url, proc):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as client:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = read_all(client)
        logged = f"forward GET /x to 127.0.0.1:{upstream.port} failed, answered {code}".encode()
        wait_until(lambda: any(logged in line for line in list(proc.output)), 20, "the failure logged")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % code), answer
    assert body.startswith(_proxy_error(code, upstream.port)) and body.endswith(b"\n"), answer
    # The proxy's error alone: one framing, none of the failed answer's headers.
    assert head.lower().count(b"content-length: ") == 1 and f"Content-Length: {len(body)}".encode() in head
    assert b"Set-Cookie" not in head and b"Transfer-Encoding" not in head


# -- the request head: header lines made once per client ----------------------------------------


class RecordsHeads(RawServer):
    """Answers each request ``OK`` on kept-alive connections; ``received`` holds each
    request's bytes as they came (head and body)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        buf = b""
        with conn:
            conn.settimeout(20)
            while True:
                while b"\r\n\r\n" not in buf:
                    more = conn.recv(65536)
                    if not more:
                        return
                    buf += more
                head, _, buf = buf.partition(b"\r\n\r\n")
                found = re.search(rb"\r\nContent-Length: (\d+)", head)
                length = int(found[1]) if found else 0
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.received.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                conn.sendall(OK)


def test_each_head_sent_is_the_one_made_afresh_for_its_request():
    # Header lines are kept per set of headers (and address, scheme, length): whatever
    # repeats or changes between requests, each head on the wire must be the one made from
    # its own request with nothing kept.
    upstream = RecordsHeads()
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    same = {"Cookie": "x=2", "Accept": "*/*"}
    variants = [
        dict(path="/a", headers={"Cookie": "x=1", "Accept": "*/*"}),
        dict(path="/b", headers={"Cookie": "x=1", "Accept": "*/*"}),  # same headers, other path
        dict(path="/b", headers=same),  # one value changed
        dict(path="/b", headers={**same, "Connection": "Accept"}),  # which drops Accept
        dict(path="/b", headers=same, environ_base={"REMOTE_ADDR": "10.0.0.9"}),
        dict(path="/b", headers=same, base_url="https://example.com/"),
        dict(path="/b", method="POST", data=b"12345", headers=same),
        dict(path="/b", method="POST", data=b"123456", headers=same),
        dict(path="/c", headers={"Cookie": "x=1", "Accept": "*/*"}),  # the first headers again
    ]
    forwarding._BLOCKS.clear()
    try:
        for variant in variants * 2:
            environ = EnvironBuilder(**{"method": "GET", **variant}).get_environ()
            environ.setdefault("REMOTE_ADDR", "127.0.0.1")
            body = environ["wsgi.input"].getvalue()
            assert forward_environ(forwarder, upstream.url, dict(environ))[0] == 200
            kept = dict(forwarding._BLOCKS)
            forwarding._BLOCKS.clear()
            target = forwarding.request_target(environ)
            netloc = f"127.0.0.1:{upstream.port}"
            fresh = forwarding.request_head(
                environ, environ["REQUEST_METHOD"], target, length=len(body) or None, netloc=netloc
            )
            assert upstream.received.pop() == fresh + body
            forwarding._BLOCKS.update(kept)
        # One set of lines per distinct set of headers: the paths /a, /b and /c share one.
        assert len(forwarding._BLOCKS) == len(variants) - 2
    finally:
        upstream.close()


def test_a_request_without_host_gets_the_host_of_each_destination():
    # HTTP/1.1, as every request goes on, must have a Host: one without gets its
    # destination's, which the kept header lines must not carry to another destination.
    a, b = RecordsHeads(), RecordsHeads()
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    try:
        for upstream in (a, b, a, b):
            environ = EnvironBuilder(path="/x", headers={"Accept": "*/*"}).get_environ()
            del environ["HTTP_HOST"]
            environ["REMOTE_ADDR"] = "127.0.0.1"
            assert forward_environ(forwarder, upstream.url, environ)[0] == 200
            hosts = re.findall(rb"\r\nHost: ([^\r]*)", upstream.received[-1], re.IGNORECASE)
            assert hosts == [f"127.0.0.1:{upstream.port}".encode()]
        environ = EnvironBuilder(path="/x", headers={"Accept": "*/*", "Host": "app.example"}).get_environ()
        environ["REMOTE_ADDR"] = "127.0.0.1"
        assert forward_environ(forwarder, a.url, environ)[0] == 200
        assert re.findall(rb"\r\nHost: ([^\r]*)", a.received[-1], re.IGNORECASE) == [b"app.example"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("upgrade", [b"", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"], ids=["get", "websocket"])
def test_an_http_1_0_request_without_host_reaches_the_target_with_its_host(tmp_path, upgrade):
    upstream = RecordsHeads()
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    try:
        with standalone_proxy(proxy_config(tmp_path, mount, f"127.0.0.1:{upstream.port}")) as url:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as client:
                client.sendall(b"GET /x HTTP/1.0\r\n" + upgrade + b"\r\n")
                answer = read_all(client)
    finally:
        upstream.close()
    assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(b"\r\n\r\nok"), answer
    (head,) = upstream.received
    assert head.startswith(b"GET /x HTTP/1.1\r\n"), head
    assert re.findall(rb"\r\nHost: ([^\r]*)", head, re.IGNORECASE) == [f"127.0.0.1:{upstream.port}".encode()], head


def test_a_line_break_in_a_value_is_refused_every_time_not_only_the_first(upstream_factory):
    upstream = upstream_factory()
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    for _ in range(3):
        environ = EnvironBuilder(path="/", headers={"X-Bad": "a"}).get_environ()
        environ["HTTP_X_BAD"] = "a\r\nX-Smuggled: 1"
        assert forward_environ(forwarder, upstream.url, environ)[0] == 400
        environ["HTTP_X_BAD"] = "fine"
        assert forward_environ(forwarder, upstream.url, environ)[0] == 200
    assert [path for _, _, path, _ in upstream.requests] == ["/"] * 3


def test_kept_header_lines_are_bounded_by_entries_and_bytes(upstream_factory):
    upstream = upstream_factory()
    forwarder = Forwarder(connect_timeout=5, read_timeout=10)
    for n in range(1100):  # many clients with small headers, then some with large cookies
        environ = EnvironBuilder(path="/", headers={"X-N": str(n)}).get_environ()
        environ["REMOTE_ADDR"] = "127.0.0.1"
        forward_environ(forwarder, upstream.url, environ)
        assert len(forwarding._BLOCKS) <= forwarding.BLOCKS_MAX
    for n in range(300):
        environ = EnvironBuilder(path="/", headers={"Cookie": f"s={n:08d}" + "x" * 8000}).get_environ()
        forward_environ(forwarder, upstream.url, environ)
        assert 0 < sum(2 * len(block) for block in forwarding._BLOCKS.values()) <= forwarding.BLOCKS_BYTES


def forward_environ(forwarder: Forwarder, url: str, environ: dict) -> tuple[int, bytes]:
    started = {}
    result = forwarder.forward(environ, lambda status, headers, exc_info=None: started.update(status=status), url)
    body = b"".join(result)
    if hasattr(result, "close"):
        result.close()
    return int(started["status"].split()[0]), body


# -- large answers moved by splice(2) to the WSGI server's socket ---------------------------------


@contextlib.contextmanager
def server_socket() -> Iterator[tuple[socket.socket, bytearray, threading.Thread]]:
    """A TCP connection on 127.0.0.1 standing for gunicorn's to its client: (its server end,
    the bytes its client end receives, the thread reading them until it closes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=20)
    server, _ = listener.accept()
    listener.close()
    received = bytearray()

    def read() -> None:
        while data := client.recv(1 << 20):
            received.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield server, received, reader
    finally:
        server.close()
        reader.join(20)
        client.close()


def spliced_forward(forwarder: Forwarder, url: str, client: socket.socket, path: str = "/"):
    """``forward`` with ``client`` as the server's socket: (status, the items the WSGI server
    got, the answer iterable, closed)."""
    environ = EnvironBuilder(method="GET", path=path).get_environ()
    environ.update(REMOTE_ADDR="127.0.0.1")
    environ["gunicorn.socket"] = client
    started = {}
    result = forwarder.forward(environ, lambda status, headers, exc_info=None: started.update(status=status), url)
    items = []
    try:
        for item in result:
            items.append(item)
    finally:
        if hasattr(result, "close"):
            result.close()
    return int(started["status"].split()[0]), items


def test_a_large_body_goes_to_the_servers_socket_by_splice_and_the_connection_stays_in_step(upstream_factory):
    size = 3 * forwarding.SPLICE_MIN + 7
    body = bytes(range(256)) * (size // 256) + b"tail..."
    answers = {"/large": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body, "/small": OK}
    upstream = upstream_factory(lambda request, n: answers[request["path"]])
    forwarder = Forwarder(connect_timeout=5, read_timeout=10, splice=True)
    with server_socket() as (client, received, reader):
        status, items = spliced_forward(forwarder, upstream.url, client, "/large")
        # The server got only what came with the head (it sends the head on the first item);
        # the rest went to its socket, byte for byte, without passing through Python.
        assert status == 200 and len(items) == 1 and len(items[0]) < size
        client.shutdown(socket.SHUT_WR)
        reader.join(20)
    assert bytes(received) == body[len(items[0]) :]
    assert len(pooled(forwarder)) == 1  # read to its end: kept for the next request
    assert forward(forwarder, upstream.url, "GET", "/small")[::2] == (200, b"ok")
    assert upstream.connections == 1


def test_no_splice_unasked_below_its_size_or_to_a_socket_with_a_timeout(upstream_factory):
    size = forwarding.SPLICE_MIN * 2
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size
    small = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"s" * 1000
    upstream = upstream_factory(lambda request, n: big if request["path"] == "/big" else small)
    cases = [
        (Forwarder(5, 10), "/big", size, None),
        (Forwarder(5, 10, splice=True), "/small", 1000, None),
        (Forwarder(5, 10, splice=True), "/big", size, 20.0),  # a server socket with a timeout
    ]
    for forwarder, path, length, timeout in cases:
        with server_socket() as (client, received, reader):
            client.settimeout(timeout)
            _, items = spliced_forward(forwarder, upstream.url, client, path)
        assert len(b"".join(items)) == length and not received


def test_a_target_silent_mid_splice_ends_the_answer_after_the_read_timeout(upstream_factory):
    size = 4 * forwarding.SPLICE_MIN
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * forwarding.SPLICE_MIN
    upstream = upstream_factory(lambda request, n: answer)  # then silent, the connection open
    forwarder = Forwarder(connect_timeout=5, read_timeout=0.3, splice=True)
    with server_socket() as (client, received, reader):
        with pytest.raises((BlockingIOError, TimeoutError)):
            spliced_forward(forwarder, upstream.url, client)
    assert 0 < len(received) < size
    assert pooled(forwarder) == []  # cut mid-body: never reused


def test_expect_100_continue_through_the_standalone_proxy(tmp_path, upstream_factory):
    upstream = upstream_factory()
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    with standalone_proxy(proxy_config(tmp_path, mount, f"127.0.0.1:{upstream.port}"), threads=2) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += client.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
            client.sendall(b"body")
            client.shutdown(socket.SHUT_WR)
            answer = interim + read_all(client)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"100", b"200"], answer
    assert answer.endswith(b"\r\n\r\nok")
    assert [(path, body) for _, _, path, body in upstream.requests] == [("/up", b"body")]


# -- an answer that comes before the whole body was sent -------------------------------------


class _AnswersEarly:
    """What EarlyAnswer and EarlyAnswerOverTLS share: the answer, and one connection's part."""

    def _early(self, answer: bytes, reads_on: bool, hold: float) -> None:
        self.answer, self.reads_on, self.hold = answer, reads_on, hold
        self.received: list[int] = []
        self.done = threading.Event()
        self.gave_up = threading.Event()
        self._release = threading.Event()

    def close(self) -> None:
        self._release.set()
        super().close()

    def _answer_early(self, conn) -> None:
        try:
            head = read_head(conn)  # nothing of the body read
        except EOFError:
            return
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        conn.sendall(self.answer)
        if not self.reads_on:
            if not self._release.wait(self.hold):  # neither reads nor closes
                self.gave_up.set()
            return
        got = 0
        while got < length:
            more = conn.recv(1 << 20)
            if not more:
                break
            got += len(more)
        self.received.append(got)
        self.done.set()


class EarlyAnswer(_AnswersEarly, RawServer):
    """Answers ``answer`` as soon as a request's head is in, before its body. Then, with
    ``reads_on``, reads the whole body and counts it in ``received``; without, reads nothing
    more and holds the connection open (as a server that refused the body may) until the
    test closes the server or ``hold`` seconds pass (then ``gave_up`` is set: an answer
    relayed only after that came from the close, not from what was sent first)."""

    def __init__(self, answer: bytes, reads_on: bool = False, hold: float = 60) -> None:
        self._early(answer, reads_on, hold)
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(20)
            self._answer_early(conn)


TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large"
REFUSED = {
    "413": TOO_LARGE,
    "401, then close": b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 4\r\n\r\nwho?",
    "307": b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
    "100, then 413": b"HTTP/1.1 100 Continue\r\n\r\n" + TOO_LARGE,
}
BIG = 48 * 1024 * 1024  # more than loopback's socket buffers hold, both ends together


@pytest.mark.parametrize("kind", REFUSED)
def test_an_upload_refused_before_its_body_is_read_gets_that_answer_not_a_504(kind):
    # Sent blindly, the body would stop in full socket buffers and the client get a 504
    # after read_timeout (20 s here); the target's own answer is what the client must see.
    target = EarlyAnswer(REFUSED[kind])
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=20)
        causes = []
        forwarder.on_failure = lambda cause, to_primary: causes.append(cause)
        status, headers, body = forward(forwarder, target.url, "POST", "/upload", b"x" * BIG)
        final = REFUSED[kind].rpartition(b"HTTP/1.1 ")[2]
        assert (status, causes) == (int(final[:3]), []), body
        assert body == final.partition(b"\r\n\r\n")[2]
        assert pooled(forwarder) == []  # its body cut short: never reused
        assert not target.gave_up.is_set()  # answered while the target still held on
    finally:
        target.close()


def test_an_answer_of_2xx_before_the_body_still_gets_the_whole_body():
    # A target that answers at once and reads on (it streams, or it logs the upload):
    # nothing of the body is held back.
    target = EarlyAnswer(OK, reads_on=True)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=20)
        assert forward(forwarder, target.url, "POST", "/upload", b"x" * (8 << 20))[::2] == (200, b"ok")
        assert target.done.wait(20)
        assert target.received == [8 << 20]
    finally:
        target.close()


def test_an_answer_of_2xx_before_the_body_is_relayed_when_the_target_then_reads_no_more():
    # A target that answers 200 at once and never reads the body (it needed none): its
    # answer is relayed once it has taken no more for read_timeout, as Go's Transport
    # relays it (at once). Before, the client got a 504 for an answer that had come.
    target = EarlyAnswer(OK)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=1)
        status, headers, body = forward(forwarder, target.url, "POST", "/upload", b"x" * (16 << 20))
        assert (status, body) == (200, b"ok"), (status, body)
        assert not target.gave_up.is_set()  # relayed while the target still held on
    finally:
        target.close()


CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


def test_an_early_2xx_answered_whole_in_chunks_is_relayed_too():
    target = EarlyAnswer(b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED_OK)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=1)
        status, headers, body = forward(forwarder, target.url, "POST", "/upload", b"x" * (16 << 20))
        assert (status, body) == (200, b"ok"), (status, body)
        assert not target.gave_up.is_set()
    finally:
        target.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
    ],
    ids=["head only", "chunks still coming"],
)
def test_an_early_2xx_still_coming_when_the_target_reads_no_more_is_a_504_not_relayed_cut(answer):
    # A target whose answer is not all there is still at work: the rest of the body may be
    # what it waits for. Relayed, the client would get a 200 whose body never ends (or is
    # cut at read_timeout) while the upload was never all sent: it gets the 504 of a
    # target that took no more of the body instead.
    target = EarlyAnswer(answer)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=1)
        causes = []
        forwarder.on_failure = lambda cause, to_primary: causes.append(cause)
        status, headers, body = forward(forwarder, target.url, "POST", "/upload", b"x" * (16 << 20))
        assert status == 504, (status, body)
        assert causes and not target.gave_up.is_set()
    finally:
        target.close()


def test_a_large_upload_expecting_100_continue_is_sent_whole(upstream_factory):
    upstream = upstream_factory()  # sends 100 Continue, then reads the body
    forwarder = Forwarder(connect_timeout=5, read_timeout=20)
    payload = os.urandom(3 << 20)
    status, _, body = forward(forwarder, upstream.url, "POST", "/up", payload, headers={"Expect": "100-continue"})
    assert (status, body) == (200, b"ok")
    assert upstream.requests[0][3] == payload


def test_an_upload_refused_early_through_the_standalone_proxy(tmp_path):
    target = EarlyAnswer(REFUSED["413"])
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    try:
        with standalone_proxy(proxy_config(tmp_path, mount, f"127.0.0.1:{target.port}"), threads=2) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                client.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG)
                answer = b""
                block = b"x" * (1 << 20)
                # Send until the answer comes, as a client that reads while it sends does.
                for _ in range(BIG >> 20):
                    if select.select([client], [], [], 0)[0]:
                        break
                    try:
                        client.sendall(block)
                    except OSError:
                        break
                while b"too large" not in answer:
                    more = client.recv(65536)
                    if not more:
                        break
                    answer += more
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert answer.endswith(b"\r\n\r\ntoo large")
        assert not target.gave_up.is_set()
    finally:
        target.close()


class TLSServer(RawServer):
    """A RawServer over TLS with ``cert`` and ``key``: each connection, once its handshake is
    done, goes to ``_tls_connection(conn, number)``."""

    def __init__(self, cert: str, key: str) -> None:
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        super().__init__()

    def _connection(self, raw: socket.socket, number: int) -> None:
        raw.settimeout(20)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()
            return
        with conn:
            self._tls_connection(conn, number)

    def _tls_connection(self, conn, number: int) -> None:
        raise NotImplementedError


class EarlyAnswerOverTLS(TLSServer):
    """Over TLS, answers ``answer`` once a request's head is in, then closes as Go's server
    does after refusing a body: its write side at once, the connection a moment later
    (the unread body then resets it)."""

    def __init__(self, cert: str, key: str, answer: bytes) -> None:
        self.answer = answer
        super().__init__(cert, key)

    def _tls_connection(self, conn, number: int) -> None:
        try:
            read_head(conn)
        except EOFError:
            return
        conn.sendall(self.answer)
        conn.shutdown(socket.SHUT_WR)
        threading.Event().wait(0.3)


def test_an_https_upload_refused_early_then_closed_gets_that_answer(tls_files):
    # Over https the body is sent blindly, "to the end or until the target closes" (README):
    # the close must end the upload as over http, with the target's answer, not a 502.
    import ssl

    cert, key = tls_files
    answer = b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large"
    target = EarlyAnswerOverTLS(cert, key, answer)
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=20)
        forwarder._tls = ssl.create_default_context(cafile=cert)
        causes = []
        forwarder.on_failure = lambda cause, to_primary: causes.append(cause)
        url = f"https://127.0.0.1:{target.port}"
        status, _, body = forward(forwarder, url, "POST", "/upload", b"x" * BIG)
        assert (status, body, causes) == (413, b"too large", []), body
        assert pooled(forwarder) == []
    finally:
        target.close()


class HeldEarlyAnswerOverTLS(_AnswersEarly, TLSServer):
    """EarlyAnswer over TLS."""

    def __init__(self, cert: str, key: str, answer: bytes, reads_on: bool = False, hold: float = 60) -> None:
        self._early(answer, reads_on, hold)
        super().__init__(cert, key)

    def _tls_connection(self, conn, number: int) -> None:
        self._answer_early(conn)


def tls_forwarder(cert: str, read_timeout: float) -> tuple[Forwarder, list]:
    import ssl

    forwarder = Forwarder(connect_timeout=5, read_timeout=read_timeout)
    forwarder._tls = ssl.create_default_context(cafile=cert)
    causes: list = []
    forwarder.on_failure = lambda cause, to_primary: causes.append(cause)
    return forwarder, causes


@pytest.mark.parametrize("kind", REFUSED)
def test_an_https_upload_refused_before_its_body_is_read_gets_that_answer_not_a_504(tls_files, kind):
    # As over http: sent blindly (sendall), the body stopped in full buffers and the client
    # got a 504 after read_timeout, for a target that neither reads nor closes.
    cert, key = tls_files
    target = HeldEarlyAnswerOverTLS(cert, key, REFUSED[kind])
    try:
        forwarder, causes = tls_forwarder(cert, read_timeout=20)
        status, _, body = forward(forwarder, f"https://127.0.0.1:{target.port}", "POST", "/upload", b"x" * BIG)
        final = REFUSED[kind].rpartition(b"HTTP/1.1 ")[2]
        assert (status, causes) == (int(final[:3]), []), body
        assert body == final.partition(b"\r\n\r\n")[2]
        assert pooled(forwarder) == []
        assert not target.gave_up.is_set()  # answered while the target still held on
    finally:
        target.close()


def test_an_https_upload_answered_2xx_at_once_still_sends_the_whole_body(tls_files):
    cert, key = tls_files
    target = HeldEarlyAnswerOverTLS(cert, key, OK, reads_on=True)
    try:
        forwarder, causes = tls_forwarder(cert, read_timeout=20)
        url = f"https://127.0.0.1:{target.port}"
        assert forward(forwarder, url, "POST", "/upload", b"x" * (8 << 20))[::2] == (200, b"ok")
        assert target.done.wait(20)
        assert target.received == [8 << 20] and causes == []
    finally:
        target.close()


def test_an_https_upload_answered_2xx_then_read_no_more_is_relayed(tls_files):
    cert, key = tls_files
    target = HeldEarlyAnswerOverTLS(cert, key, OK)
    try:
        forwarder, causes = tls_forwarder(cert, read_timeout=1)
        url = f"https://127.0.0.1:{target.port}"
        status, _, body = forward(forwarder, url, "POST", "/upload", b"x" * (16 << 20))
        assert (status, body, causes) == (200, b"ok", [])
        assert not target.gave_up.is_set()
    finally:
        target.close()


def test_an_upload_with_a_read_timeout_of_weeks_is_forwarded(upstream_factory):
    # read_timeout "720h" (a month, for long-lived streams) is a valid option; poll(2) takes
    # at most 2**31 - 1 ms (24.8 days): every body sent by _send_body raised OverflowError, a 500.
    upstream = upstream_factory()
    forwarder = Forwarder(connect_timeout=5, read_timeout=720 * 3600)
    payload = b"x" * (SMALL_BODY + 1)
    assert forward(forwarder, upstream.url, "POST", "/up", payload)[::2] == (200, b"ok")
    assert upstream.requests[0][3] == payload


# -- failed forwards are logged, boundedly ---------------------------------------------------


def test_failed_forward_to_a_dead_port_is_logged(caplog):
    port = free_port()  # nothing listens there
    forwarder = Forwarder(connect_timeout=0.3, read_timeout=10)
    with caplog.at_level(logging.WARNING, logger="litefs_wsgi"), _fresh_failure_log():
        status, _, body = forward(forwarder, f"http://127.0.0.1:{port}", "POST", "/orders/7", b"x")
    assert (status, body) == (502, f"Proxy error: connection refused by 127.0.0.1:{port}\n".encode())
    (record,) = [r for r in caplog.records if r.name == "litefs_wsgi" and r.levelno == logging.WARNING]
    message = record.getMessage()
    for part in ("POST", "/orders/7", f"127.0.0.1:{port}", "502", "connection refused"):
        assert part in message, message


def test_silent_upstream_is_logged_as_a_504(caplog, upstream_factory):
    release = threading.Event()
    upstream = upstream_factory(lambda request, n: OK if release.wait(20) else None)
    forwarder = Forwarder(connect_timeout=5, read_timeout=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="litefs_wsgi"):
            status, _, body = forward(forwarder, upstream.url, "GET", "/slow")
    finally:
        release.set()
    assert (status, body) == (504, f"Proxy error: no answer from 127.0.0.1:{upstream.port} within 0.3s\n".encode())
    assert any("GET /slow" in r.getMessage() and "504" in r.getMessage() for r in caplog.records)


def test_a_dead_primary_cannot_flood_the_log(caplog):
    port = free_port()
    forwarder = Forwarder(connect_timeout=0, read_timeout=10)
    with caplog.at_level(logging.WARNING, logger="litefs_wsgi"), _fresh_failure_log():
        for n in range(50):
            assert forward(forwarder, f"http://127.0.0.1:{port}", "POST", f"/w{n}", b"x")[0] == 502
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(lines) <= 5
    assert "/w0" in lines[0]


def test_failure_log_says_how_many_it_left_out():
    now = [0.0]
    failures = FailureLog(burst=2, period=60, clock=lambda: now[0])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("litefs_wsgi")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        for n in range(10):
            failures(502, "POST", f"/w{n}", "primary:8080", "connection refused by primary:8080")
        now[0] = 61.0
        failures(502, "POST", "/later", "primary:8080", "connection refused by primary:8080")
        failures(502, "GET", "/other", "target:8081", "connection refused by target:8081")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 4
    assert "/w0" in messages[0] and "/w1" in messages[1]
    assert "/later" in messages[2] and "8 more failed forwards to primary:8080 not logged" in messages[2]
    assert "/other" in messages[3] and "more" not in messages[3]


@contextlib.contextmanager
def _fresh_failure_log():
    """The process-wide failure log, emptied for the block (other tests failed forwards too)."""
    from litefs_wsgi import forwarding

    saved = forwarding.failure_log
    forwarding.failure_log = FailureLog()
    try:
        yield
    finally:
        forwarding.failure_log = saved


# -- the access log: off by default, one setting away -----------------------------------------


@pytest.mark.parametrize("access_log", [None, "-"])
def test_access_log_is_off_unless_asked_for(tmp_path, upstream_factory, access_log):
    upstream = upstream_factory()
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    config = proxy_config(tmp_path, mount, f"127.0.0.1:{upstream.port}")
    port = free_port()
    beside = os.path.join(os.path.dirname(sys.executable), "litefs-wsgi")
    command = [beside if os.path.exists(beside) else shutil.which("litefs-wsgi"), "serve", "--config", config]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2"]
    if access_log:
        command += ["--access-logfile", access_log]  # gunicorn's own option, passed on
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "LITEFS_"))}
    with listening(command, port, env) as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"GET /logged-or-not HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(client).startswith(b"HTTP/1.1 200 ")
        if access_log:
            wait_until(lambda: any(b"GET /logged-or-not" in line for line in list(proc.output)), 20, "the log line")
    assert upstream.requests and upstream.requests[0][2] == "/logged-or-not"
    if not access_log:
        # Weak by nature (a line not written shows no event): gunicorn writes its access-log
        # line before it closes the connection, so one would most likely have been read by now.
        assert not any(b"/logged-or-not" in line for line in list(proc.output))


def test_codings_of_a_chunked_body_keep_their_order():
    # gunicorn refuses codings other than chunked; other WSGI servers may pass them on.
    # The other side undoes them last to first: "br, gzip" is not "gzip, br".
    environ = {"REQUEST_METHOD": "POST", "HTTP_TRANSFER_ENCODING": "gzip, br, chunked", "wsgi.url_scheme": "http"}
    assert forwarding.request_headers(environ, chunked=True)["Transfer-Encoding"] == "gzip, br, chunked"
    environ["HTTP_TRANSFER_ENCODING"] = "br,gzip , chunked"
    assert forwarding.request_headers(environ, chunked=True)["Transfer-Encoding"] == "br, gzip, chunked"


def test_a_client_on_this_host_is_told_apart(tmp_path):
    # What splice="remote" (the standalone proxy's default) asks before splicing: a client
    # on this host reads the spliced pages on the same cores, so its answer is copied.
    with server_socket() as (server, _, _):
        assert forwarding.on_this_host(server)  # 127.0.0.1
    own = socket.gethostbyname(socket.gethostname())
    if not own.startswith("127."):
        listener = socket.create_server((own, 0))
        with listener, socket.create_connection(listener.getsockname(), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert forwarding.on_this_host(accepted)  # this host's own address, not loopback
    left, right = socket.socketpair()
    with left, right:
        assert forwarding.on_this_host(left)  # a Unix socket


def test_splice_remote_copies_to_a_client_on_this_host(upstream_factory):
    size = forwarding.SPLICE_MIN * 2
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size
    upstream = upstream_factory(lambda request, n: big)
    with server_socket() as (client, received, _):
        _, items = spliced_forward(Forwarder(5, 10, splice="remote"), upstream.url, client)
    assert len(b"".join(items)) == size and not received  # through the server, not spliced


@contextlib.contextmanager
def other_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair, as another host on a network:
    (its name, this side's address, its address). Needs root and ``ip``."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip(8) for a network namespace")
    tag = f"lfw{os.getpid() % 100000}"
    octet = os.getpid() % 250 + 1
    mine, theirs = f"10.231.{octet}.1", f"10.231.{octet}.2"
    steps = [
        ["ip", "netns", "add", tag],
        ["ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"],
        ["ip", "link", "set", f"{tag}b", "netns", tag],
        ["ip", "addr", "add", f"{mine}/30", "dev", f"{tag}a"],
        ["ip", "link", "set", f"{tag}a", "up"],
        ["ip", "netns", "exec", tag, "ip", "addr", "add", f"{theirs}/30", "dev", f"{tag}b"],
        ["ip", "netns", "exec", tag, "ip", "link", "set", f"{tag}b", "up"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=10)
            if done.returncode:
                pytest.skip(f"no network namespace here: {' '.join(step)}: {done.stderr.strip()}")
        yield tag, mine, theirs
    finally:
        subprocess.run(["ip", "link", "del", f"{tag}a"], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=10)


def test_splice_remote_splices_to_a_client_on_another_host(upstream_factory):
    size = 3 * forwarding.SPLICE_MIN + 7
    body = bytes(range(256)) * (size // 256) + b"tail..."
    upstream = upstream_factory(lambda request, n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
    with other_host() as (namespace, mine, theirs):
        listener = socket.create_server((mine, 0))
        reader = (
            "import socket, sys\n"
            f"s = socket.create_connection(({mine!r}, {listener.getsockname()[1]}), timeout=20)\n"
            "got = bytearray()\n"
            "while data := s.recv(1 << 20):\n"
            "    got.extend(data)\n"
            "sys.stdout.buffer.write(got)\n"
        )
        with (
            listener,
            subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-c", reader], stdout=subprocess.PIPE
            ) as client_process,
        ):
            listener.settimeout(20)
            server, (peer, _) = listener.accept()
            with server:
                server.settimeout(None)  # as gunicorn's gthread worker leaves it
                assert peer == theirs and not forwarding.on_this_host(server)
                _, items = spliced_forward(Forwarder(5, 10, splice="remote"), upstream.url, server)
                server.shutdown(socket.SHUT_WR)
            received = client_process.communicate(timeout=30)[0]
    assert len(items) == 1 and len(items[0]) < size  # the rest went by splice(2)
    assert received == body[len(items[0]) :]


# -- https:// targets ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl's command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


class TLSOverlong(TLSServer):
    """An https server whose first answer (of all) sends ``extra`` bytes past its Content-Length,
    in the same TLS record as the body's last bytes (an app that counted characters, not
    bytes, say); every later answer is ``fresh``."""

    def __init__(self, cert: str, key: str, extra: bytes) -> None:
        self.extra = extra
        self.answered = 0
        super().__init__(cert, key)

    def _tls_connection(self, conn, number: int) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    more = conn.recv(65536)
                except OSError:
                    return
                if not more:
                    return
                buf += more
            buf = buf.partition(b"\r\n\r\n")[2]
            self.answered += 1
            if self.answered == 1:
                body = b"a" * 100_000  # several records: the last one is read on its own
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:-10])
                time.sleep(0.2)
                conn.sendall(body[-10:] + self.extra)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")


def test_bytes_past_an_https_answer_are_never_taken_for_the_next_answer(tls_files):
    # Over plain TCP such bytes wait in the socket, and the poll before reuse sees them
    # (test_bytes_sent_on_an_idle_connection_are_never_taken_for_the_next_answer). Over TLS
    # they may already sit decrypted in the TLS buffer, where a poll cannot see them.
    import ssl

    cert, key = tls_files
    server = TLSOverlong(cert, key, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        forwarder._tls = ssl.create_default_context(cafile=cert)
        url = f"https://127.0.0.1:{server.port}"
        status, _, body = forward(forwarder, url, "GET", "/first")
        assert (status, len(body)) == (200, 100_000)
        assert forward(forwarder, url, "GET", "/second")[::2] == (200, b"fresh")  # not "stale"
        assert server.connections == 2
    finally:
        server.close()


CHUNKED_FIRST = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n"


class Pieces(RawServer):
    """Answers the first request of its first connection with ``pieces``, sent 0.1 s apart,
    then OK to any other; records (connection number, path) of each request."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.requests: list[tuple[int, str]] = []
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(20)
        with conn:
            for n in range(1, 100):
                try:
                    head = read_head(conn)
                except (EOFError, OSError):
                    return
                self.requests.append((number, head.split(b" ")[1].decode()))
                if number > 1 or n > 1:
                    conn.sendall(OK)
                    continue
                for index, piece in enumerate(self.pieces):
                    if index:
                        time.sleep(0.1)
                    conn.sendall(piece)


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nSMUGGLED-BYTES",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["a 200", "a 101"],
)
@pytest.mark.parametrize("together", [True, False], ids=["with the head", "after it"])
def test_a_second_answer_after_a_chunked_one_is_never_relayed_with_it(extra, together):
    head, _, chunks = CHUNKED_FIRST.partition(b"\r\n\r\n")
    server = Pieces([CHUNKED_FIRST + extra] if together else [head + b"\r\n\r\n", chunks + extra])
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        assert forward(forwarder, server.url, "GET", "/a")[::2] == (200, b"first")
        assert pooled(forwarder) == []  # out of step: never reused
        assert forward(forwarder, server.url, "GET", "/b")[::2] == (200, b"ok")
        assert server.requests == [(1, "/a"), (2, "/b")]
    finally:
        server.close()


def test_a_101_to_a_request_that_asked_no_upgrade_is_a_502_and_its_connection_dropped():
    server = Pieces([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"])
    try:
        forwarder = Forwarder(connect_timeout=5, read_timeout=10)
        status, _, body = forward(forwarder, server.url, "GET", "/a", headers={"Upgrade": "websocket"})
        assert status == 502 and b"switched protocols (101) for a request that asked for no upgrade" in body
        assert pooled(forwarder) == []
        assert forward(forwarder, server.url, "GET", "/b")[::2] == (200, b"ok")
        assert server.requests == [(1, "/a"), (2, "/b")]
    finally:
        server.close()


@pytest.mark.parametrize(
    "codings",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_an_answer_with_a_transfer_coding_besides_chunked_is_a_502(upstream_factory, codings):
    # Relayed, the framing undone, a gzip coding would reach the client as the content itself
    # (Transfer-Encoding is hop-by-hop, never relayed): Go's Transport refuses these too.
    answer = b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n5\r\nfirst\r\n0\r\n\r\n"
    upstream = upstream_factory(lambda request, n: (answer, "close"))
    status, _, body = forward(Forwarder(connect_timeout=5, read_timeout=10), upstream.url, "GET", "/")
    assert status == 502 and b"unsupported Transfer-Encoding" in body, body


@pytest.mark.parametrize(
    "before",
    [b"\r\n", b"\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n\r\n"],
    ids=["an empty line", "two", "after a 100 Continue"],
)
def test_empty_lines_before_the_status_line_are_skipped(upstream_factory, before):
    upstream = upstream_factory(lambda request, n: before + OK)
    status, headers, body = forward(Forwarder(connect_timeout=5, read_timeout=10), upstream.url, "GET", "/")
    assert (status, body) == (200, b"ok") and headers == [("Content-Length", "2")]


@pytest.mark.parametrize("code", [b"000", b"099"])
def test_a_status_below_100_is_a_502(upstream_factory, code):
    upstream = upstream_factory(lambda request, n: b"HTTP/1.1 " + code + b" Odd\r\nContent-Length: 2\r\n\r\nok")
    status, _, body = forward(Forwarder(connect_timeout=5, read_timeout=10), upstream.url, "GET", "/")
    assert status == 502 and body.endswith(b"(status %d)\n" % int(code)), body


@pytest.mark.parametrize(("interim", "expected"), [(5, 200), (6, 502)])
def test_more_than_five_1xx_answers_are_a_502(upstream_factory, interim, expected):
    # Each comes within read_timeout: without a bound, a target sending them for ever would
    # hold the thread for ever (Go's Transport stops at 5 as well).
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    upstream = upstream_factory(lambda request, n: early_hints * interim + OK)
    status, _, body = forward(Forwarder(connect_timeout=5, read_timeout=10), upstream.url, "GET", "/")
    assert status == expected, body


def test_a_content_length_the_answer_names_in_connection_is_still_relayed(upstream_factory):
    # A confused app's Connection header names the framing: dropped, gunicorn would chunk the
    # body, and a spliced one would go out raw inside those chunks.
    answer = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 2\r\n\r\nok"
    upstream = upstream_factory(lambda request, n: answer)
    status, headers, body = forward(Forwarder(connect_timeout=5, read_timeout=10), upstream.url, "GET", "/")
    assert (status, headers, body) == (200, [("Content-Length", "2")], b"ok")
