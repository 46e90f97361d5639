"""Follow LiteFS's ``/events`` stream: positions and primary changes as they happen."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable

from .node import valid_hostname
from .txid import parse_txid

log = logging.getLogger("litefs_wsgi")

# LiteFS writes its init event as soon as the stream opens: an answer (head or first line)
# slower than this is a server that is not LiteFS's API, or one that hangs, and is said so.
INIT_TIMEOUT = 5.0
# After init, LiteFS sends nothing while the cluster is idle, so silence is no failure: a read
# timeout would only drop a healthy stream every so often (and leave the files in charge
# meanwhile). TCP keepalive instead notices a connection whose peer vanished (no FIN ever
# arrives), after about KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT seconds.
READ_TIMEOUT = None
CONNECT_TIMEOUT = 5.0
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
_SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),  # urllib3's default, which these options replace
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        )
        if hasattr(socket, name)  # Linux names; elsewhere the system's defaults apply
    ),
]
MAX_LINE = 1 << 20
_NOT_LITEFS = " (is api_url LiteFS's HTTP API, its http.addr?)"


class EventStream:
    """A background thread reading ``{api_url}/events``, reconnecting with backoff.

    While ``connected`` (an ``init`` event has arrived on the current connection) the stream
    is the truth about the primary; ``txids`` holds the last TXID seen per database. Each
    change calls ``on_change()`` so that waiters can be woken at once, and a tx event below
    the one before it on this connection (a restore) first calls ``on_restore()``.
    """

    def __init__(
        self,
        api_url: str,
        on_change: Callable[[], None],
        max_backoff: float = 5.0,
        on_restore: Callable[[], None] | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + "/events"
        self.on_change = on_change
        self.on_restore = on_restore
        self.max_backoff = max_backoff
        self.connected = False
        self.is_primary = False
        self.hostname: str | None = None
        self.txids: dict[str, int] = {}
        self._stop = threading.Event()
        import urllib3  # here, not at the top: only a node with api_url pays its memory (2 MiB)

        self._http = urllib3.PoolManager(
            num_pools=1,
            maxsize=1,
            retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=INIT_TIMEOUT),  # READ_TIMEOUT once connected
            socket_options=_SOCKET_OPTIONS,
        )
        self._response = None
        self._failing = False
        self._read_timeout = urllib3.exceptions.ReadTimeoutError
        self._thread = threading.Thread(target=self._run, name="litefs-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and drop the connection."""
        self._stop.set()
        response = self._response
        if response is not None:
            # response.close() would block on the buffer lock the reading thread holds while
            # the stream is idle; shutting the socket down ends that read at once instead.
            # (http.client has dropped its own reference to the socket by then: use a dup.)
            # AttributeError: the reading thread closed it meanwhile (the stream ended), and
            # http.client's response, its file gone, has no fileno() to give.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                with socket.fromfd(response.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._follow()
                backoff = 0.1  # the stream ended cleanly after working: reconnect soon
            except Exception as exc:  # noqa: BLE001 - any failure means: files decide, retry later
                if not self._stop.is_set():
                    # Once per outage: an API that is not there would otherwise log every 5 s.
                    level = logging.DEBUG if self._failing else logging.WARNING
                    log.log(level, "LiteFS event stream %s: %s; using the mount's files meanwhile", self.url, exc)
                    self._failing = True
            self._set_disconnected()
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)

    def _follow(self) -> None:
        try:
            response = self._http.request("GET", self.url, preload_content=False, redirect=False)
        except self._read_timeout as exc:
            raise OSError(f"no answer within {INIT_TIMEOUT:g} s{_NOT_LITEFS}") from exc
        self._response = response
        try:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            buffer = b""
            # Each chunk as it arrives: read(4096) on an unframed stream would wait for 4 KiB.
            chunks = response.stream(4096) if response.chunked else iter(lambda: response.read1(4096), b"")
            for chunk in chunks:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._handle(line)
                if len(buffer) > MAX_LINE:
                    raise OSError("an event line over 1 MiB")
            if not self.connected:  # else a server that is not LiteFS would be asked again every 0.1 s
                raise OSError(f"the answer ended without LiteFS's init event{_NOT_LITEFS}")
        except (self._read_timeout, TimeoutError) as exc:
            response.close()
            if self.connected:  # a socket whose timeout could not be lifted (see _no_read_timeout)
                raise
            raise OSError(f"no init event within {INIT_TIMEOUT:g} s{_NOT_LITEFS}") from exc
        except BaseException:
            response.close()  # never return a connection mid-stream to the pool
            raise
        finally:
            self._response = None
            response.release_conn()

    def _handle(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
            kind, data = event.get("type"), event.get("data") or {}
        except (ValueError, AttributeError):
            if not self.connected:  # LiteFS's first line is always init: this is not LiteFS
                raise OSError(f"the answer starts with {line[:100]!r}, not LiteFS's init event{_NOT_LITEFS}") from None
            log.warning("ignoring a malformed LiteFS event: %r", line[:200])
            return
        if not self.connected and kind != "init":
            raise OSError(f"the answer starts with {line[:100]!r}, not LiteFS's init event{_NOT_LITEFS}")
        if kind in ("init", "primaryChange") and isinstance(data, dict):
            hostname = data.get("hostname") or None
            if hostname is not None and not (isinstance(hostname, str) and valid_hostname(hostname)):
                log.error("ignoring primary hostname %r from LiteFS events: not a plain host name", hostname)
                hostname = None
            self.is_primary, self.hostname = bool(data.get("isPrimary")), hostname
            if kind == "init":
                # TXIDs from an earlier connection may predate a restart on a restored
                # database: until the next tx event the file decides.
                self.txids = {}
                self._no_read_timeout()
                self.connected = True
                if self._failing:
                    log.warning("LiteFS event stream %s is back", self.url)
                    self._failing = False
        elif kind == "tx" and isinstance(data, dict) and isinstance(event.get("db"), str):
            txid = parse_txid(data.get("txID"))
            if txid is not None:
                # The last one, not the highest: LiteFS sends one after applying a snapshot
                # too (a restore, a replica ahead of a new primary), at a lower TXID, and the
                # events of one stream arrive in order.
                previous = self.txids.get(event["db"])
                self.txids[event["db"]] = txid
                if previous is not None and txid < previous and self.on_restore is not None:
                    # Only against the stream's own last event: the files run ahead of the
                    # stream, and a tx event below a position read from them is no restore.
                    self.on_restore()
        else:
            return
        self.on_change()

    def _no_read_timeout(self) -> None:
        """From init on, the stream may be silent for as long as the cluster is idle."""
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is None:
            # An answer with "Connection: close" took the socket from its connection: it is
            # the one under the response's file (http.client's, then socket.SocketIO's).
            raw = getattr(getattr(getattr(response, "_fp", None), "fp", None), "raw", None)
            sock = getattr(raw, "_sock", None)
        if isinstance(sock, socket.socket):
            sock.settimeout(READ_TIMEOUT)

    def _set_disconnected(self) -> None:
        if self.connected:
            self.connected = False
            self.on_change()
