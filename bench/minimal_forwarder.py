"""A minimal forwarder, the reference bench/proxy_rps.py measures the proxy against: not a proxy.

A WSGI app (``minimal_forwarder:application``, target in ``BENCH_TARGET``) that keeps one
keep-alive socket per thread, formats the request head in one string, splits the answer's
head by hand and knows only ``Content-Length`` bodies: no request bodies, no chunked answers,
no hop-by-hop care, no timeouts or error answers. Whatever a forwarder must do beyond this is
what the proxy may spend on top of what gunicorn's server side costs.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

_target = urlsplit(os.environ.get("BENCH_TARGET", "http://127.0.0.1:8081"))
_address = (_target.hostname, _target.port)
_local = threading.local()
_SKIP = ("connection", "keep-alive", "transfer-encoding", "date", "server")


def _socket() -> socket.socket:
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.create_connection(_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exchange(head: bytes) -> bytes:
    for _ in range(2):  # once more on a new socket if the kept one was closed while idle
        sock = _socket()
        sock.sendall(head)
        data = sock.recv(65536)
        if data:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            return data
        sock.close()
        _local.sock = None
    raise ConnectionError("the target closed the connection")


def application(environ, start_response):
    lines = [f"{environ['REQUEST_METHOD']} {environ.get('RAW_URI') or environ['PATH_INFO']} HTTP/1.1\r\n"]
    for key, value in environ.items():
        if key[:5] == "HTTP_" and key != "HTTP_CONNECTION":
            lines.append(f"{key[5:].replace('_', '-').title()}: {value}\r\n")
    lines.append("\r\n")
    data = _exchange("".join(lines).encode("latin-1"))
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers, length = [], 0
    for field in fields:
        name, _, value = field.partition(":")
        value = value.strip()
        lower = name.lower()
        if lower == "content-length":
            length = int(value)
        if lower not in _SKIP:
            headers.append((name, value))
    start_response(status_line.split(" ", 1)[1], headers)
    if len(rest) >= length:
        return [rest[:length]]
    return _body(_local.sock, rest, length)


class _body:
    """The rest of a body; a socket left mid-body (the client went away) is not kept."""

    def __init__(self, sock: socket.socket, rest: bytes, length: int) -> None:
        self.sock, self.rest, self.left = sock, rest, length - len(rest)

    def __iter__(self):
        yield self.rest
        while self.left:
            data = self.sock.recv(min(self.left, 1024 * 1024))
            if not data:
                raise ConnectionError("the target closed the connection mid-body")
            self.left -= len(data)
            yield data

    def close(self) -> None:
        if self.left:
            self.sock.close()
            _local.sock = None
