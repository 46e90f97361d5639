"""Pipe a WebSocket between gunicorn's client socket and the target, for the standalone proxy.

gunicorn's threaded worker hands the app the client's socket as ``environ["gunicorn.socket"]``.
The upgrade request goes to the target as is; when the target answers ``101``, gunicorn sends
that head to the client and this module pipes bytes both ways on that thread until a side
closes or the tunnel goes idle. Any other answer is relayed as an ordinary response.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from werkzeug.datastructures import EnvironHeaders

from .errors import error
from .forwarding import (
    CHUNK,
    MAX_POLL_MS,
    BadAnswer,
    Forwarder,
    describe,
    dial,
    read_answer,
    request_headers,
    request_target,
    response_headers,
)

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
    if environ.get("HTTP_TRANSFER_ENCODING") or (environ.get("CONTENT_LENGTH") or "0") != "0":
        # An opening handshake is a GET without content (RFC 6455); a body would be taken
        # neither by this pipe nor, unsent, by a target waiting for it.
        forwarder.on_failure("invalid", False)
        log.info("refusing a WebSocket upgrade with a request body for %s", netloc)
        return error(start_response, 400, "Proxy error: a WebSocket upgrade request cannot have a body")
    try:
        upstream = connect(base, forwarder.connect_timeout)
    except OSError as exc:
        return forwarder.failed(environ, start_response, 502, netloc, describe(exc, netloc), cause="connect")
    try:
        upstream.settimeout(forwarder.read_timeout or None)
        upstream.sendall(upgrade_request(environ, base.path, netloc))
        # The head only: the first frames a target sends right behind its 101 stay in
        # answer.rest, for the client.
        answer = read_answer(upstream, environ["REQUEST_METHOD"])
    except socket.timeout:
        upstream.close()
        why = f"no answer from {netloc} within {forwarder.read_timeout:g}s"
        return forwarder.failed(environ, start_response, 504, netloc, why, cause="timeout")
    except (OSError, BadAnswer) as exc:
        upstream.close()
        detail = str(exc) if isinstance(exc, BadAnswer) else type(exc).__name__
        why = f"{netloc} closed the connection or sent a bad answer ({detail})"
        return forwarder.failed(environ, start_response, 502, netloc, why)
    headers = response_headers(answer.headers, upgrade=answer.status == 101)
    if answer.status != 101:
        status, on_end = answer.status_line(), lambda reusable: upstream.close()
        return forwarder.relay(environ, start_response, status, headers, answer, upstream, on_end, netloc)
    client = environ["gunicorn.socket"]
    # gunicorn writes the head itself (it keeps Upgrade and sends Connection: upgrade);
    # without a write before the pipe it would send its 101 head later, into the stream.
    write = start_response(answer.status_line(), headers)
    # gunicorn's write is its Response's method: once the tunnel is over, the connection
    # must close, or bytes the client sent after the last frame are served as a request.
    getattr(getattr(write, "__self__", None), "force_close", lambda: None)()
    try:
        write(b"")
        if answer.rest:
            client.sendall(answer.rest)
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
    # As Go does on every connection, and Forwarder.connect: small frames go out at once,
    # not after the target's delayed ACK of the one before (about 40 ms on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if base.scheme == "https":
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()  # the handshake failed: its descriptor, not left for the collector
            raise
    return sock


def upgrade_request(environ: dict, base_path: str = "", netloc: str | None = None) -> bytes:
    """The upgrade request's head for the target (``netloc``): the request target byte for
    byte, the headers as for any forwarded request but with ``Upgrade``, ``Connection:
    Upgrade`` and every ``Sec-WebSocket-*`` header kept."""
    headers = request_headers(environ, netloc=netloc)
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
        # epoll takes a C int of milliseconds: a longer idle limit is capped there.
        wait = None if idle_timeout is None else min(idle_timeout, MAX_POLL_MS // 1000 - 1)
        while True:
            ready = {key.fileobj for key, _ in selector.select(wait)}
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
