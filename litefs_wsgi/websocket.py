"""Pipe a WebSocket between gunicorn's client socket and the target, for the standalone proxy.

gunicorn's threaded worker hands the app the client's socket as ``environ["gunicorn.socket"]``.
The upgrade request goes to the target as is; when the target answers ``101``, gunicorn sends
that head to the client and this module pipes bytes both ways on that thread until a side
closes or the tunnel goes idle. Any other answer is relayed as an ordinary response.
"""

from __future__ import annotations

import http.client
import logging
import selectors
import socket
import ssl
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from werkzeug.datastructures import EnvironHeaders
from werkzeug.wsgi import ClosingIterator

from .errors import error
from .forwarding import CHUNK, Forwarder, describe, dial, request_headers, request_target, response_headers, status_of

log = logging.getLogger("litefs_wsgi")

STALLED_SEND = 300.0  # without an idle limit, a peer not reading this long is dropped


def is_websocket_upgrade(environ: dict) -> bool:
    """True for an ``Upgrade: websocket`` request."""
    return "websocket" in (environ.get("HTTP_UPGRADE") or "").lower()


def tunnel(environ: dict, start_response, target: str, forwarder: Forwarder, idle_timeout: float) -> Iterable[bytes]:
    """Send the upgrade request in ``environ`` to ``target`` and, on ``101``, pipe the two
    sockets until either side closes or nothing moves for ``idle_timeout`` seconds (0: no
    idle limit). Returns once the tunnel is over, the client's socket shut down.
    """
    base = urlsplit(target)
    netloc = base.netloc
    try:
        upstream = connect(base, forwarder.connect_timeout)
    except OSError as exc:
        return error(start_response, 502, f"Proxy error: {describe(exc, netloc)}")
    try:
        upstream.settimeout(forwarder.read_timeout or None)
        upstream.sendall(upgrade_request(environ, base.path))
        # Unbuffered, so that http.client never reads past the head: the first frames a
        # target sends right behind its 101 stay in the socket for the pipe.
        response = http.client.HTTPResponse(_Unbuffered(upstream), method=environ["REQUEST_METHOD"])
        response.begin()
    except socket.timeout:
        upstream.close()
        return error(start_response, 504, f"Proxy error: no answer from {netloc} within {forwarder.read_timeout:g}s")
    except (OSError, http.client.HTTPException) as exc:
        upstream.close()
        return error(start_response, 502, f"Proxy error: {netloc} closed the connection or sent a bad answer ({exc!r})")
    try:
        headers = response_headers(response, upgrade=response.status == 101)
    except ValueError as exc:
        upstream.close()
        log.warning("%s: %s", netloc, exc)
        return error(start_response, 502, f"Proxy error: {netloc} sent an invalid response header")
    if response.status != 101:
        start_response(status_of(response), headers)
        return ClosingIterator(_body(response), upstream.close)
    client = environ["gunicorn.socket"]
    # gunicorn writes the head itself (it keeps Upgrade and sends Connection: upgrade);
    # without a write before the pipe it would send its 101 head later, into the stream.
    write = start_response(status_of(response), headers)
    # gunicorn's write is its Response's method: once the tunnel is over, the connection
    # must close, or bytes the client sent after the last frame are served as a request.
    getattr(getattr(write, "__self__", None), "force_close", lambda: None)()
    try:
        write(b"")
    except OSError:
        upstream.close()
        raise
    return _finish(client, upstream, idle_timeout)


def _finish(client: socket.socket, upstream: socket.socket, idle_timeout: float) -> list[bytes]:
    try:
        pipe(client, upstream, idle_timeout or None)
    finally:
        upstream.close()
        # Without this gunicorn would read later client bytes as a new request; the client
        # sees EOF at once, and gunicorn's own cleanup finds nothing left to send.
        try:
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return []


def connect(base, connect_timeout: float) -> socket.socket:
    """A connection to ``base`` (a split URL), dialled again every 100 ms while refused."""
    host = base.hostname or "localhost"
    port = base.port or (443 if base.scheme == "https" else 80)
    sock = dial(lambda time_left: socket.create_connection((host, port), timeout=time_left), connect_timeout)
    if base.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    return sock


def upgrade_request(environ: dict, base_path: str = "") -> bytes:
    """The upgrade request's head for the target: the request target byte for byte, the
    headers as for any forwarded request but with ``Upgrade``, ``Connection: Upgrade`` and
    every ``Sec-WebSocket-*`` header kept."""
    headers = request_headers(environ)
    source = EnvironHeaders(environ)
    for name, value in source.items():
        if name.lower().startswith("sec-websocket-"):
            # Spelled as RFC 6455 does: the environ lost the case, and some servers care.
            headers.pop(name, None)
            headers["Sec-WebSocket-" + name[14:]] = value
    headers["Upgrade"] = source.get("Upgrade", "websocket")
    headers["Connection"] = "Upgrade"
    target = base_path.rstrip("/") + request_target(environ)
    lines = [f"{environ['REQUEST_METHOD']} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _body(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while data := response.read(CHUNK):
        yield data


def pipe(client: socket.socket, upstream: socket.socket, idle_timeout: float | None) -> None:
    """Copy bytes both ways until a side closes, fails, or nothing moves for ``idle_timeout``."""
    # A peer that stops reading blocks a send; past the idle limit (or, with none, a
    # generous bound) that counts as gone.
    for sock in (client, upstream):
        sock.settimeout(idle_timeout or STALLED_SEND)
    other = {client: upstream, upstream: client}
    with selectors.DefaultSelector() as selector:
        for sock in other:
            selector.register(sock, selectors.EVENT_READ)
        while True:
            ready = {key.fileobj for key, _ in selector.select(idle_timeout)}
            ready.update(sock for sock in other if _pending(sock))  # TLS bytes select() cannot see
            if not ready:
                log.info("closing a WebSocket idle for %gs", idle_timeout)
                return
            for source in ready:
                try:
                    data = source.recv(CHUNK)
                    if not data:
                        return
                    other[source].sendall(data)
                except OSError:  # a reset, or a peer not reading for idle_timeout
                    return


def _pending(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


class _Unbuffered:
    """Hands http.client the socket without a read buffer (its ``makefile`` is all it uses)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str, *args, **kwargs):
        return self._sock.makefile(mode, buffering=0)
