"""Request smuggling: ambiguous framing is refused, or forwarded as exactly one well-framed request.

Raw bytes go over a socket to the standalone proxy under gunicorn (``-c gunicorn.conf.py``),
once as a primary forwarding everything to its target and once as a replica forwarding
writes to its primary. Behind it a strict recorder parses what arrives: any byte it cannot
frame unambiguously, or a request the client did not send, fails the test.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator

import pytest
from servers import RawServer
from test_faults import proxy, read_all

from litefs_wsgi.testing import LiteFSMount

pytestmark = pytest.mark.timeout(120)


class Recorder(RawServer):
    """A strict HTTP/1.1 server on 127.0.0.1 that records each request it can frame, any bytes
    it cannot (``malformed``) and requests cut short by a closed connection (``cut``),
    answering ``200 ok`` with keep-alive."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []
        self.malformed: list[bytes] = []
        self.cut: list[bytes] = []
        super().__init__()

    def _connection(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        buf = bytearray()
        with conn:
            while True:
                try:
                    if not buf:
                        more = conn.recv(65536)
                        if not more:
                            return  # closed between requests: clean
                        buf += more
                    request = self._one(conn, buf)
                except EOFError:
                    self.cut.append(bytes(buf))  # closed mid-request: the peer gave up on it
                    return
                except (OSError, ValueError) as exc:
                    self.malformed.append(bytes(buf) + repr(exc).encode())
                    return
                self.requests.append(request)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def _read_until(self, conn, buf: bytearray, marker: bytes) -> bytes:
        while marker not in buf:
            more = conn.recv(65536)
            if not more:
                raise EOFError("connection closed")
            buf += more
        index = buf.index(marker) + len(marker)
        data = bytes(buf[:index])
        del buf[:index]
        return data

    def _read_exactly(self, conn, buf: bytearray, size: int) -> bytes:
        while len(buf) < size:
            more = conn.recv(65536)
            if not more:
                raise EOFError("connection closed mid-body")
            buf += more
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def _one(self, conn, buf: bytearray) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
        head = self._read_until(conn, buf, b"\r\n\r\n")
        line, *fields = head[:-4].split(b"\r\n")
        if not re.fullmatch(rb"[A-Z]+ /\S* HTTP/1\.1", line):
            raise ValueError(f"bad request line {line!r}")
        headers: dict[bytes, list[bytes]] = {}
        for field in fields:
            match = re.fullmatch(
                rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff]*))?", field
            )
            if match is None or b"\n" in field or b"\r" in field:
                raise ValueError(f"bad header line {field!r}")
            headers.setdefault(match[1].lower(), []).append(match[2] or b"")
        te, cl = headers.get(b"transfer-encoding"), headers.get(b"content-length")
        if te and cl or len(te or []) > 1 or len(cl or []) > 1:
            raise ValueError("ambiguous framing")
        if te:
            if not te[0].lower().endswith(b"chunked"):
                raise ValueError("unframed body")
            body = b""
            while True:
                size_line = self._read_until(conn, buf, b"\r\n")[:-2]
                if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_line):
                    raise ValueError(f"bad chunk size {size_line!r}")
                size = int(size_line, 16)
                if size == 0:
                    if self._read_until(conn, buf, b"\r\n") != b"\r\n":
                        raise ValueError("trailers")
                    return line, headers, body
                body += self._read_exactly(conn, buf, size)
                if self._read_exactly(conn, buf, 2) != b"\r\n":
                    raise ValueError("chunk without CRLF")
        if cl:
            if not re.fullmatch(rb"[0-9]{1,12}", cl[0]):
                raise ValueError(f"bad Content-Length {cl[0]!r}")
            return line, headers, self._read_exactly(conn, buf, int(cl[0]))
        return line, headers, b""


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module", params=["primary", "replica"])
def proxy_url(request, tmp_path_factory, recorder) -> Iterator[str]:
    """The standalone proxy; as a replica its writes go to the recorder too, as the primary."""
    tmp = tmp_path_factory.mktemp(request.param)
    mount = LiteFSMount(tmp / "litefs")
    if request.param == "primary":
        mount.make_primary()
    else:
        mount.make_replica(f"127.0.0.1:{recorder.port}")
    with proxy(tmp, mount, f"127.0.0.1:{recorder.port}", threads=4, primary_url="http://{hostname}") as url:
        yield url


def send(url: str, data: bytes) -> list[int]:
    """Send raw bytes, half-close, and return the status of every answer until the proxy closes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


H = b"Host: x\r\n"

# (name, raw bytes) of requests whose framing is ambiguous or whose head is malformed.
REFUSED = {
    "Content-Length and Transfer-Encoding": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    "Transfer-Encoding and Content-Length": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    "two different Content-Lengths": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 38\r\n"
    b"\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    "two equal Content-Lengths": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "Content-Length list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
    "Content-Length with a sign": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "Content-Length in hex": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc",
    "space before the colon": b"POST / HTTP/1.1\r\n" + H + b"Content-Length : 3\r\n\r\nabc",
    "space in a header name": b"GET / HTTP/1.1\r\n" + H + b"X Smuggle: 1\r\n\r\n",
    "tab before the colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
    "CR in a value": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\rX-B: 2\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\x002\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"X-A: 1\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
    "obs-fold of Transfer-Encoding": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked"
    b"\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding twice": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked, chunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "chunked not last": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "identity only": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
    "unknown coding": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "chunked on HTTP/1.0": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "absurd chunk size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"10000000000000000000000003\r\nabc\r\n0\r\n\r\n",
    "chunk size with a sign": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
    "chunk size in 0x form": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk without its CRLF": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
}


@pytest.mark.parametrize("name", REFUSED)
def test_ambiguous_or_malformed_request_is_refused_and_never_forwarded(proxy_url, recorder, name):
    before = len(recorder.requests)
    statuses = send(proxy_url, REFUSED[name])
    assert statuses and statuses[0] in (400, 501), statuses
    assert 200 not in statuses, statuses
    assert not recorder.malformed
    # A body already being read may reach the recorder cut short; never as a whole request.
    assert all(body != b"abc" and b"/smuggled" not in line for line, _, body in recorder.requests[before:])


# (name, raw bytes, what the recorder must receive: (request line start, body) per request).
FORWARDED = {
    "body that looks like a request": (
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        [(b"POST /a ", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")],
    ),
    "chunked body that looks like a request": (
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"23\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        [(b"POST /a ", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")],
    ),
    "two pipelined requests": (
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n" + H + b"\r\n",
        [(b"POST /a ", b"abc"), (b"GET /b ", b"")],
    ),
    "chunk extensions": (
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
        [(b"POST /a ", b"abc")],
    ),
    "Content-Length with leading zeros": (
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0003\r\n\r\nabc",
        [(b"POST /a ", b"abc")],
    ),
    "Content-Length named in Connection": (
        b"POST /a HTTP/1.1\r\n" + H + b"Connection: Content-Length, Transfer-Encoding\r\nContent-Length: 3\r\n\r\nabc",
        [(b"POST /a ", b"abc")],
    ),
    "absolute-form target naming another host": (
        b"GET http://evil.example/b HTTP/1.1\r\n" + H + b"\r\n",
        [(b"GET /b ", b"")],
    ),
    "gzip, chunked": (
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        [(b"POST /a ", b"abc")],
    ),
}


@pytest.mark.parametrize("name", FORWARDED)
def test_request_is_forwarded_exactly_once_and_well_framed(proxy_url, recorder, name):
    data, expected = FORWARDED[name]
    before = len(recorder.requests)
    statuses = send(proxy_url, data)
    assert statuses == [200] * len(expected)
    assert not recorder.malformed
    received = recorder.requests[before:]
    assert [(line[: len(start)], body) for (line, _, body), (start, _) in zip(received, expected)] == expected
    assert len(received) == len(expected)
    for _, headers, _ in received:
        assert len(headers.get(b"content-length", [])) + len(headers.get(b"transfer-encoding", [])) <= 1
    if name == "gzip, chunked":  # the coding still applies to the body: it goes on with it
        assert received[0][1][b"transfer-encoding"] == [b"gzip, chunked"]
