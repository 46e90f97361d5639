"""A tiny RFC 6455 client and echo server on raw sockets, to test WebSockets through the proxy."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import socket
import struct
import threading
from collections.abc import Iterator

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
GREETING = b"hello from the target"
TIMEOUT = 10.0


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients mask, servers do not (RFC 6455 5.1)."""
    head = bytes([0x80 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", length)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", length)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of the next frame; EOFError when the peer closed."""
    first, second = recv_exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack(">H", recv_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack(">Q", recv_exact(sock, 8))[0]
    key = recv_exact(sock, 4) if second & 0x80 else None
    payload = recv_exact(sock, length)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


def read_head(sock: socket.socket) -> bytes:
    """The bytes of an HTTP head, read one at a time so that nothing behind it is consumed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise EOFError(f"connection closed inside the head: {head!r}")
        head += byte
    return head


class Client:
    """A WebSocket client: ``Client.open(port, path)`` does the handshake; ``status`` is
    the answer's code, ``headers`` its headers and, when it is not 101, ``body`` its body."""

    def __init__(self, sock: socket.socket, response: http.client.HTTPResponse, key: str) -> None:
        self.sock = sock
        self.status = response.status
        self.headers = response.headers
        self.key = key
        self.body = response.read() if response.status != 101 else b""

    @classmethod
    def open(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None) -> Client:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = http.client.HTTPResponse(_Raw(sock), method="GET")
        response.begin()
        return cls(sock, response, key)

    def send(self, payload: bytes, opcode: int = BINARY) -> None:
        self.sock.sendall(encode_frame(opcode, payload, mask=True))

    def recv(self) -> tuple[int, bytes]:
        return read_frame(self.sock)

    def close(self) -> None:
        """The closing handshake: send Close, read the echo, then expect EOF."""
        self.send(struct.pack(">H", 1000), CLOSE)
        opcode, _ = self.recv()
        assert opcode == CLOSE
        assert self.sock.recv(1) == b"", "the connection should end after the closing handshake"
        self.sock.close()


class _Raw:
    """Lets http.client read the head without buffering past it (frames may follow)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def makefile(self, mode, *args, **kwargs):
        return self.sock.makefile(mode, buffering=0)


class EchoServer:
    """A WebSocket echo server: on ``/ws`` it answers 101 and, in the same packet, a text
    frame GREETING; then it echoes every frame. Other paths get ``403 Forbidden``.
    ``heads`` holds every request head received; ``closed`` counts connections that ended."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.closed = 0
        self.open = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with self._lock:
            self.open += 1
        try:
            head = read_head(conn)
            with self._lock:
                self.heads.append(head)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            if request_line.split(" ")[1] != "/ws":
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nX-Target: yes\r\n\r\nforbidden")
                return
            answer = (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n\r\n"
            )
            conn.sendall(answer.encode() + encode_frame(TEXT, GREETING, mask=False))
            while True:
                opcode, payload = read_frame(conn)
                if opcode == PING:
                    conn.sendall(encode_frame(PONG, payload, mask=False))
                    continue
                conn.sendall(encode_frame(opcode, payload, mask=False))
                if opcode == CLOSE:
                    return
        except (OSError, EOFError):
            return
        finally:
            conn.close()
            with self._lock:
                self.open -= 1
                self.closed += 1

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self.listener.close()
        self._thread.join(5)


@contextlib.contextmanager
def echo_server(port: int = 0) -> Iterator[EchoServer]:
    with EchoServer(port) as server:
        yield server
