"""Send a WSGI request to another HTTP server and relay its answer, streaming both ways."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import itertools
import logging
import os
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar
from urllib.parse import quote, urlsplit

import httptools
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import parse_list_header
from werkzeug.wsgi import get_content_length, get_input_stream

from .errors import error, status_line

log = logging.getLogger("litefs_wsgi")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

# Set on a request that one node forwards to another. A node that is not the primary never
# forwards such a request again, so two replicas that each think the other is the primary
# cannot bounce a write between them. Fly.io's edge marks the requests it replays likewise.
HOP_HEADER = "X-LiteFS-Forwarded"
HOP_ENVIRON_KEY = "HTTP_" + HOP_HEADER.upper().replace("-", "_")

# A request head as it may go out: a token method, a target without spaces or controls,
# then "Name: value" lines whose names are tokens and whose values hold no CR, LF or NUL.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[^\x00-\x20\x7f]+")
_TOKENS_SEEN: set[str] = set()  # methods and header names found to be tokens (bounded, as _keep)
CHUNK = 64 * 1024
# A body of known length, and answers, are copied in larger blocks: gunicorn's wsgi.input
# reads 64 KiB at a time at about 200 MiB/s and 1 MiB about four times faster (bench/stream.py).
# It costs up to this much memory per request streaming a body. A chunked upload is still
# read 64 KiB at a time: a read waits until its block is full, and the upload may be slow.
BLOCK = 1024 * 1024
# An answer's body is read in smaller blocks: a recv(2) on loopback returns a few hundred KiB
# at most, so a larger block buys no speed, and each block allocated larger than it is filled
# leaves memory that glibc keeps: with 4 downloads of 64 MiB at once a worker peaked at 54-58
# MiB with 1 MiB blocks, 43-47 MiB with these (before one arena per worker and malloc_trim).
ANSWER_BLOCK = 256 * 1024
# Under gunicorn the standalone proxy moves a plain answer body of known length of at least
# SPLICE_MIN bytes with splice(2) (_spliced) through a pipe of SPLICE_PIPE bytes: with the
# default pipe (64 KiB) splicing costs about what copying does; with 1 MiB (Linux's default
# pipe-max-size) the relaying process spends a third of the CPU (scratch relay on loopback).
# Only to a client on another host, by default: one on this host copies the spliced pages out
# on the same cores, later and from colder memory than the proxy's own copy would leave them,
# and the machine spends more per byte (bench/splice.py: 1.07-1.13 CPU s/GiB spliced, 0.90-0.93
# copied).
SPLICE_MIN = 256 * 1024
SPLICE_PIPE = 1024 * 1024
_SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")  # Linux, Python 3.10+
# A body up to this size is read whole before it is sent: it leaves with the head in one
# write, and a request that met a connection the other side had just closed can be sent again.
SMALL_BODY = 64 * 1024
MAX_INTERIM = 5  # 1xx answers before the final one, as Go's Transport allows
MAX_HEAD = 64 * 1024  # an answer's head larger than this is refused (Go's default is 1 MiB, nginx's 4-8 KiB)
RETRY_REFUSED_EVERY = 0.1  # as LiteFS: the app behind may be restarting
# poll(2) takes a C int of milliseconds (about 24.8 days): a longer timeout is capped there,
# not an OverflowError (a 500) for every request that waits on one.
MAX_POLL_MS = 2**31 - 1
# Methods whose request Go's http.Transport sends again when a reused connection turns out
# closed before any byte of the answer came (RFC 9110 section 9.2.2: idempotent).
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))


class CannotConnect(OSError):
    """No connection could be made: nothing of the request was sent."""


class BadAnswer(Exception):
    """The other side's answer could not be read as HTTP/1.1."""


class _Closed(BadAnswer):
    """The connection closed (or was reset) before the first byte of an answer."""

    def __init__(self) -> None:
        super().__init__("connection closed before any answer")


class Destination(NamedTuple):
    """Where requests for one base URL go."""

    scheme: str
    host: str
    port: int
    netloc: str
    prefix: str  # the base URL's path, put before each request target


def destination(base_url: str) -> Destination:
    """``base_url`` split for forwarding; ValueError when it cannot be used."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {base_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Destination(parts.scheme, parts.hostname, port, parts.netloc, parts.path.rstrip("/"))


def _keep(memo: dict[K, V], key: K, value: V, most: int) -> V:
    """Put ``value`` in ``memo`` and return it; a memo of ``most`` entries is emptied first.
    What this module remembers (heads, header lines, names) is the other side's or the
    client's to choose: every memo is bounded, and starts again when full."""
    if len(memo) >= most:
        memo.clear()
    memo[key] = value
    return value


class Connection:
    """A keep-alive connection to one destination, with the bytes read past the last answer."""

    __slots__ = ("sock", "reused", "poll")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reused = False
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        # poll(0) is empty on an idle connection that is still open: neither the other side's
        # close (a FIN or a reset) nor bytes it should not have sent. One poll(2), no wait.
        self.poll = poller.poll

    def close(self) -> None:
        self.sock.close()


class Answer:
    """An answer's head as checked by httptools (llhttp) and how its body is framed.

    llhttp is strict: it refuses bare LF line ends, obs-fold, a name that is not a token,
    control characters in a value, a ``Content-Length`` that is not digits or comes twice,
    and ``Content-Length`` with ``Transfer-Encoding``. What it lets through is relayed. The
    head it accepted is then split in one pass (``take_head``), not by a callback per header:
    the callbacks cost four times llhttp's own parse."""

    __slots__ = (
        "status",
        "reason",
        "headers",
        "lowers",
        "done",
        "complete",
        "extra",
        "pieces",
        "length",
        "chunked",
        "keep_alive",
        "connection",
        "tokens",
        "parser",
        "rest",
        "upgrade",
        "relay",
        "line",
    )

    def __init__(self) -> None:
        self.reason = ""
        self.headers: list[tuple[str, str]] = []  # as sent, in order, latin-1 (a tuple in a template and its copies)
        self.lowers: list[str] = []  # their names in lower case, in the same order
        self.done = False  # the head is complete
        self.complete = False  # the whole message is
        self.extra = False  # bytes came after it: a second answer, never asked for
        self.pieces: list[bytes] = []
        self.length: int | None = None
        self.chunked = False
        self.connection: str | None = None
        self.upgrade = False
        self.relay: tuple[tuple[str, str], ...] | None = None  # the headers to relay, once known
        self.line: str | None = None  # status_line(), once known

    # httptools callbacks (none per header: see take_head)
    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_headers_complete(self) -> None:
        self.done = True

    def on_body(self, data: bytes) -> None:
        if not self.complete:  # else a second answer's, never asked for (extra): never relayed
            self.pieces.append(data)

    def on_message_complete(self) -> None:
        self.complete = True

    def take_head(self, head: bytes) -> None:
        """The reason, headers and framing from ``head`` (through its blank line), which
        llhttp has accepted: CRLF line ends, ``name: value`` lines with token names."""
        # llhttp skips empty lines before the status line (after a 100 Continue, say).
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        status = lines[0].split(" ", 2)
        self.reason = status[2] if len(status) > 2 else ""
        headers, lowers = self.headers, self.lowers
        split = _HEADER_LINES
        for line in lines[1:-2]:  # the head ends with an empty line, and "" after its CRLF
            entry = split.get(line)
            if entry is None:
                name, _, value = line.partition(":")
                entry = (name, value.strip(" \t")), name.lower()
                if len(line) < 256:
                    _keep(split, line, entry, 512)
            header, lower = entry
            headers.append(header)
            lowers.append(lower)
            if lower in _FRAMING:
                value = header[1]
                if lower == "content-length":
                    self.length = int(value)  # llhttp checked it: digits, and only one
                elif lower == "transfer-encoding":
                    # Only chunked, once, as Go's Transport takes: a coding besides (gzip) would
                    # reach the client as the content itself once the framing is undone.
                    if self.chunked or value.strip(" \t").lower() != "chunked":
                        raise BadAnswer(f"unsupported Transfer-Encoding {value[:64]!r}")
                    self.chunked = True
                else:
                    self.connection = f"{self.connection}, {value}" if self.connection else value

    def header(self, name: str) -> str | None:
        lower = name.lower()
        values = [v for (_, v), low in zip(self.headers, self.lowers) if low == lower]
        return ", ".join(values) if values else None

    def status_line(self) -> str:
        """The answer's status line for ``start_response``."""
        if self.line is None:
            self.line = f"{self.status} {self.reason}" if self.reason else status_line(self.status)
        return self.line

    def relayed(self) -> list[tuple[str, str]]:
        """The headers to relay (``response_headers``): a new list, the server's to keep."""
        if self.relay is not None:
            return list(self.relay)
        return response_headers(self.headers, tokens=self.tokens, lowers=self.lowers)

    def template(self) -> Answer:
        """This answer's head, for ``_KNOWN_HEADS``: what ``fresh`` copies, worked out once
        (this answer keeps it too)."""
        self.headers, self.lowers = tuple(self.headers), tuple(self.lowers)
        self.relay, self.line = tuple(self.relayed()), self.status_line()
        return self.fresh(b"")

    def fresh(self, rest: bytes) -> Answer:
        """A new answer with the head of this template and ``rest`` read past it."""
        answer = Answer()
        answer.status, answer.reason, answer.length, answer.keep_alive = (
            self.status,
            self.reason,
            self.length,
            self.keep_alive,
        )
        answer.headers, answer.lowers, answer.tokens = self.headers, self.lowers, self.tokens
        answer.relay, answer.line, answer.rest, answer.done = self.relay, self.line, rest, True
        return answer


_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
# An app sends the same header lines again and again (only Date changes, once a second):
# each is split once. Bounded: the lines are the other side's to choose.
_HEADER_LINES: dict[str, tuple[tuple[str, str], str]] = {}
# And often the same heads: within a second, every answer of one view of a fixed length has
# the same head, byte for byte. A head llhttp accepted once is accepted again, and means the
# same again, so from its second time on it is checked, split and filtered once; later answers
# with it are copied from a template (_remember). Only heads of a known length or none (not
# chunked, not an upgrade, not 1xx), up to KNOWN_HEAD_MAX bytes; bounded like _HEADER_LINES.
_KNOWN_HEADS: dict[bytes, Answer] = {}
_SEEN_HEADS: dict[bytes, None] = {}
KNOWN_HEAD_MAX = 2048


def read_answer(sock: socket.socket, method: str, data: bytes = b"") -> Answer:
    """Read one answer's head from ``sock`` (``data``: bytes already read from it).

    1xx answers other than ``101`` are skipped. The bytes read past the head are in
    ``answer.rest``. Raises ``_Closed`` when the connection ends before any byte came,
    ``BadAnswer`` for anything llhttp refuses, ``socket.timeout`` or ``BlockingIOError``
    after the read timeout."""
    received = bool(data)
    interim = 0
    while True:
        answer = parser = None
        fed = 0
        while True:
            end = data.find(b"\r\n\r\n", max(0, fed - 3))
            if end == 0 and not fed:  # empty lines before the status line, which llhttp skips
                data = data.lstrip(b"\r\n")
                continue
            if 0 <= end and not fed and end + 4 <= KNOWN_HEAD_MAX:
                known = _KNOWN_HEADS.get(data[: end + 4])
                if known is not None:
                    answer = known.fresh(data[end + 4 :])
                    if method == "HEAD":
                        answer.length = 0
                    return answer
            if parser is None and data:
                answer = Answer()
                parser = httptools.HttpResponseParser(answer)
            try:
                if end >= 0:
                    end += 4
                    parser.feed_data(data[fed:end] if fed else data[:end])
                    if not answer.done:
                        raise BadAnswer("malformed head")
                    break
                if fed < len(data):
                    # Fed as it comes, so that llhttp refuses a bad head (bare LF line ends,
                    # say) at once instead of this waiting for a CRLF CRLF that never comes.
                    parser.feed_data(data[fed:])
                    fed = len(data)
                    if answer.done:
                        raise BadAnswer("head with bare LF line ends")
            except httptools.HttpParserUpgrade:
                answer.upgrade = True
                end = data.find(b"\r\n\r\n") + 4
                break
            except httptools.HttpParserError as exc:
                raise BadAnswer(str(exc) or type(exc).__name__) from exc
            if len(data) > MAX_HEAD:
                raise BadAnswer(f"head over {MAX_HEAD} bytes")
            try:
                more = sock.recv(CHUNK)
            except (ConnectionResetError, BrokenPipeError) as exc:
                if received:
                    raise
                raise _Closed() from exc
            if not more:
                if received:
                    raise BadAnswer("connection closed in the middle of the head")
                raise _Closed()
            received = True
            data += more
        status = answer.status = parser.get_status_code()
        answer.rest = data[end:]
        if status < 100:
            raise BadAnswer(f"status {status}")
        if 100 <= status < 200 and status != 101:
            interim += 1
            if interim > MAX_INTERIM:  # each within read_timeout, but never ending: Go stops at 5
                raise BadAnswer(f"more than {MAX_INTERIM} 1xx answers")
            data = answer.rest  # 100 Continue, 103 Early Hints: WSGI relays only the final answer
            continue
        head = data[:end]
        answer.take_head(head)
        tokens = answer.tokens = _connection_tokens(answer.connection)
        if parser.get_http_version() == "1.1":
            answer.keep_alive = "close" not in tokens
        else:
            answer.keep_alive = "keep-alive" in tokens
        if status == 204 or status == 304 or status == 101:
            answer.length, answer.chunked = 0, False
        elif answer.chunked:
            answer.length, answer.parser = None, parser
        elif answer.length is None:
            answer.keep_alive = False  # the body ends when the connection does
        if not answer.chunked and not answer.upgrade and len(head) <= KNOWN_HEAD_MAX:
            _remember(head, answer)
        if method == "HEAD":
            answer.length, answer.chunked = 0, False
        return answer


def _remember(head: bytes, answer: Answer) -> None:
    """Keep ``answer`` as the template of ``head`` the second time ``head`` comes: a head
    seen once only (its own Content-Length, Set-Cookie or ETag) costs a set entry, no template."""
    if head not in _SEEN_HEADS:
        _keep(_SEEN_HEADS, head, None, 256)  # a new Date each second, a Set-Cookie each answer
        return
    _keep(_KNOWN_HEADS, head, answer.template(), 256)


def body_of(
    answer: Answer,
    sock: socket.socket,
    on_end: Callable[[bool], None],
    client: socket.socket | None = None,
    remote_only: bool = False,
) -> Iterable[bytes]:
    """The answer's body as an iterable for a WSGI server. ``on_end(reusable)`` is called
    once: when the body is all read (``reusable``: the connection may carry another
    request), or when it is closed early or fails (``False``). With ``client``, the WSGI
    server's own socket to the client, a large body of known length goes there by
    ``splice(2)`` (``_spliced``); with ``remote_only``, unless the client is on this host."""
    rest = answer.rest
    if answer.length is not None and len(rest) >= answer.length:
        # The whole body came with the head: no generator, the connection goes back at once.
        on_end(answer.keep_alive and len(rest) == answer.length)
        return [rest[: answer.length]] if answer.length else []
    if answer.chunked:
        try:
            if rest:
                _feed(answer, rest)
        except httptools.HttpParserError:
            on_end(False)
            raise
        if answer.complete:
            on_end(answer.keep_alive and not answer.extra)
            return [b"".join(answer.pieces)] if answer.pieces else []
        chunks = _chunked(answer, sock)
    elif answer.length is None:
        chunks = _until_closed(rest, sock)
    elif (
        client is not None
        and answer.length - len(rest) >= SPLICE_MIN
        and _can_splice(sock, client)
        and not (remote_only and on_this_host(client))
    ):
        chunks = _spliced(rest, answer.length, sock, client)
    else:
        chunks = _sized(rest, answer.length, sock)
    return _Body(chunks, on_end, answer)


def _sized(rest: bytes, length: int, sock: socket.socket) -> Iterator[bytes]:
    left = length
    if rest:
        yield rest
        left -= len(rest)
    while left:
        data = sock.recv(min(left, ANSWER_BLOCK))
        if not data:
            raise BadAnswer(f"connection closed {left} bytes before the end of the body")
        left -= len(data)
        yield data


def _can_splice(sock: socket.socket, client: socket.socket) -> bool:
    # Plain sockets both (TLS bytes pass through Python to be encrypted), on Linux, and the
    # client's blocking, as gunicorn's sync and gthread workers leave it: a timeout would make
    # it non-blocking, and a full send buffer would end the copy.
    return _SPLICE and type(sock) is socket.socket and type(client) is socket.socket and client.gettimeout() is None


def on_this_host(client: socket.socket) -> bool:
    """True when the other end of ``client`` is on this host: a loopback address, this
    socket's own address, or a Unix socket (and when it cannot be told)."""
    try:
        if client.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        peer, own = client.getpeername()[0], client.getsockname()[0]
        address = ipaddress.ip_address(peer.partition("%")[0])
    except (OSError, ValueError):
        return True
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or peer == own


def _spliced(rest: bytes, length: int, sock: socket.socket, client: socket.socket) -> Iterator[bytes]:
    """A body of ``length`` bytes, ``rest`` of them read with the head, whose remainder goes
    from ``sock`` to the client's socket by ``splice(2)`` through a pipe: the kernel moves it
    without copying it into Python and out again.

    Its one item, ``rest`` (even empty), makes the WSGI server send the answer's head and
    that much; the remainder then goes to the server's socket behind its back. Only the
    standalone proxy asks for it (``Forwarder(splice=True)``), where gunicorn serves the
    answer directly and frames it by the relayed ``Content-Length``. The timeouts hold: a
    silent target ends it with ``BlockingIOError`` after ``read_timeout`` (SO_RCVTIMEO),
    as ``_sized``; a client gone raises ``BrokenPipeError``, as the server's own write."""
    yield rest
    left = length - len(rest)
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):  # a pipe of 64 KiB where the system allows no more
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SPLICE_PIPE)
        upstream, downstream = sock.fileno(), client.fileno()
        while left:
            moved = os.splice(upstream, write_end, min(left, SPLICE_PIPE))
            if not moved:
                raise BadAnswer(f"connection closed {left} bytes before the end of the body")
            left -= moved
            while moved:
                moved -= os.splice(read_end, downstream, moved)
    finally:
        os.close(read_end)
        os.close(write_end)


def _chunked(answer: Answer, sock: socket.socket) -> Iterator[bytes]:
    pieces = answer.pieces
    if pieces:  # one item per chunk as it arrives, so that server-sent events are not held back
        yield b"".join(pieces)
        pieces.clear()
    while not answer.complete:
        data = sock.recv(ANSWER_BLOCK)
        if not data:
            raise BadAnswer("connection closed before the last chunk")
        _feed(answer, data)
        if pieces:
            yield b"".join(pieces) if len(pieces) > 1 else pieces[0]
            pieces.clear()


def _feed(answer: Answer, data: bytes) -> None:
    """Feed a chunked answer's parser ``data``; bytes past its end are a second answer,
    never asked for (``extra``), the 101 llhttp stops at too."""
    try:
        answer.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        if not answer.complete:
            raise httptools.HttpParserError("an upgrade inside a chunked answer") from None
        answer.extra = True


def _until_closed(rest: bytes, sock: socket.socket) -> Iterator[bytes]:
    if rest:
        yield rest
    while data := sock.recv(ANSWER_BLOCK):
        yield data


class _Body:
    """An answer's body for the WSGI server; ``close()`` (which the server calls) ends it."""

    __slots__ = ("_chunks", "_on_end", "_answer", "_finished", "_relayed")

    def __init__(self, chunks: Iterator[bytes], on_end: Callable[[bool], None], answer: Answer) -> None:
        self._chunks, self._on_end, self._answer = chunks, on_end, answer
        self._finished = False
        self._relayed = 0

    def start(self) -> None:
        """Read the body's first item now (still the first it yields); a failure before it
        raises here, the connection closed."""
        try:
            first = next(self._chunks, None)
        except BaseException:
            self.close()
            raise
        if first is not None:
            self._chunks = itertools.chain((first,), self._chunks)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._relayed += len(chunk)
            yield chunk
        self._finished = True

    def close(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            # Not read to its end: the client went away, or the other side failed mid-answer.
            on_end(self._finished and self._answer.keep_alive and not self._answer.extra)
            after_large_body(self._relayed)


TRIM_AFTER = 8 * 1024 * 1024


def after_large_body(size: int) -> None:
    """After a body of ``TRIM_AFTER`` bytes or more, hand the memory its blocks left free back
    to the system (glibc's ``malloc_trim``; elsewhere nothing). glibc keeps what it freed, in
    scattered pieces, so four 64 MiB downloads at once left a worker's peak RSS 8 MiB higher
    without this (bench/proxy_rps.py); a trim takes well under a millisecond, with the GIL
    released, once per large body."""
    if size >= TRIM_AFTER and (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class FailureLog:
    """Logs failed forwards at WARNING, at most ``burst`` lines per ``period`` seconds for
    each destination: a dead primary must not flood the log. The first line after a quiet
    spell says how many failures were not logged."""

    def __init__(self, burst: int = 5, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.period, self._clock = burst, period, clock
        self._lock = threading.Lock()
        self._windows: dict[str, list] = {}  # destination: [window start, lines logged, not logged]

    def __call__(self, code: int, method: str, path: str, where: str, why: str) -> None:
        now = self._clock()
        with self._lock:
            window = self._windows.get(where)
            if window is None or now - window[0] >= self.period:
                if len(self._windows) > 1000:
                    self._windows.clear()
                window = self._windows[where] = [now, 0, window[2] if window else 0]
            if window[1] >= self.burst:
                window[2] += 1
                return
            window[1] += 1
            skipped, window[2] = window[2], 0
        more = f" ({skipped} more failed forwards to {where} not logged)" if skipped else ""
        log.warning("forward %s %s to %s failed, answered %d: %s%s", method, path, where, code, why, more)


failure_log = FailureLog()


class Forwarder:
    """An HTTP/1.1 client for relaying WSGI requests, keeping connections open between them.

    Its own, and small: each request's head is formatted in one string and written with its
    small body in one send; the answer's head and chunked framing are parsed by httptools
    (llhttp, Node's parser, strict about framing). Idle connections are kept per
    destination, up to ``pool_size`` (a worker's thread count), and checked with one poll
    before reuse. Nothing is added to a request or an answer but the proxy headers, nothing
    is decompressed, no redirect is followed, and no cookie is kept.

    A request is sent twice only when Go's http.Transport (LiteFS's own proxy) would: on a
    reused connection that the other side closed before any byte of the answer came, when
    nothing of the request was written or the request is idempotent (GET, HEAD, OPTIONS,
    TRACE, or with an Idempotency-Key) with no body or one held whole in memory. A refused
    connection (nothing sent) is tried again every 100 ms for up to ``connect_timeout``.

    With ``splice``, for an app that gunicorn serves with nothing around it (the standalone
    proxy), a large answer body goes from the target's socket to gunicorn's by splice(2):
    ``True`` or ``"always"``; ``"remote"``, only to a client on another host; ``False`` or
    ``"never"``.
    """

    def __init__(
        self,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        pool_size: int = 10,
        splice: bool | str = False,
    ) -> None:
        self.connect_timeout = connect_timeout
        # See the class's docstring and _spliced.
        self.splice = "always" if splice is True else "never" if splice is False else splice
        if self.splice not in ("always", "remote", "never"):
            raise ValueError(f"splice: expected True, False, 'always', 'remote' or 'never', got {splice!r}")
        self.read_timeout = read_timeout
        self.pool_size = max(1, pool_size)
        self._read = read_timeout or None  # 0: no limit
        self._idle: dict[Destination, list[Connection]] = {}
        self._destinations: dict[str, Destination] = {}
        self._tls: ssl.SSLContext | None = None
        # Told of each failed forward: (a cause of FORWARD_CAUSES, whether it went to the
        # primary rather than the standalone proxy's target). LiteFSMiddleware sets it to
        # its metrics recorder.
        self.on_failure: Callable[[str, bool], None] = _ignore

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            while connections:
                connections.pop().close()

    # -- connections ---------------------------------------------------------------------

    def connect(self, dest: Destination) -> socket.socket:
        """A new connection to ``dest``, dialled again every 100 ms while refused; raises
        ``CannotConnect`` saying why there is none."""
        try:
            sock = dial(
                lambda left: socket.create_connection((dest.host, dest.port), timeout=left), self.connect_timeout
            )
        except OSError as exc:
            raise CannotConnect(describe(exc, dest.netloc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if dest.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=dest.host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise CannotConnect(f"TLS handshake with {dest.netloc} failed ({exc})") from exc
        if dest.scheme == "https":
            sock.settimeout(self._read)
        else:
            # A blocking socket with the kernel's timeouts: one recv(2) per wait. With
            # settimeout, CPython polls first, then reads: three system calls, and the GIL
            # won back after each, which costs under a worker's busy threads.
            sock.settimeout(None)
            if self._read:
                seconds = int(self._read)
                timeval = struct.pack("ll", seconds, int((self._read - seconds) * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock

    def _pooled(self, dest: Destination) -> Connection | None:
        idle = self._idle.get(dest)
        while idle:
            try:
                conn = idle.pop()  # the most recently used: the least likely to have been closed
            except IndexError:
                return None
            if not conn.poll(0):  # idle, and still open
                return conn
            conn.close()
        return None

    def _release(self, dest: Destination, conn: Connection, reusable: bool) -> None:
        idle = self._idle.get(dest)
        if idle is None:
            idle = self._idle.setdefault(dest, [])
        # Over TLS, bytes past the answer may sit decrypted in the TLS buffer, where the
        # poll before reuse (_pooled) cannot see them: such a connection is out of step.
        if reusable and len(idle) < self.pool_size and not (dest.scheme == "https" and conn.sock.pending()):
            conn.reused = True
            idle.append(conn)
        else:
            conn.close()

    # -- forwarding ----------------------------------------------------------------------

    def forward(self, environ: dict, start_response, base_url: str, mark: bool = False) -> Iterable[bytes]:
        """Relay the request in ``environ`` to ``base_url`` and its answer to ``start_response``.

        ``mark`` adds the hop header (a write going to the primary). Failures answer 502
        ``Proxy error: …`` (504 when the other side stays silent past ``read_timeout``),
        each logged at WARNING (a bounded number per minute).
        """
        method = environ["REQUEST_METHOD"]
        # Python calls are most of what a forward costs here (each about what a system call
        # does): where a look-up will do, this path makes none (here, in _pooled, and for the
        # answer's head and a body that came with it, below).
        dest = self._destinations.get(base_url)
        if dest is None:
            try:
                dest = _keep(self._destinations, base_url, destination(base_url), 256)
            except ValueError as exc:
                why = f"cannot forward to {base_url!r}: {exc}"
                return self.failed(environ, start_response, 502, base_url, why, cause="url", mark=mark)
        chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
        # werkzeug's parse only for a length sent: a GET has none.
        length = None if chunked or "CONTENT_LENGTH" not in environ else get_content_length(environ)
        try:
            head = request_head(
                environ, method, dest.prefix + request_target(environ), mark, chunked, length, dest.netloc
            )
            body: bytes | Iterator[bytes] | None = None
            if chunked:
                body = _chunked_body(get_input_stream(environ))
            elif length:
                body = (
                    _read_input(environ["wsgi.input"], length)
                    if length <= SMALL_BODY
                    else _sized_body(environ["wsgi.input"], length)
                )
        except ClientDisconnected:
            self.on_failure("client", mark)
            log.info("client went away while its request body was being read for %s", dest.netloc)
            return error(start_response, 400, "Proxy error: client disconnected")
        except ValueError as exc:
            # A method or header name that is not a token, or a value with a line break:
            # gunicorn never lets one through, other servers may; forwarding it could only
            # be read two ways.
            self.on_failure("invalid", mark)
            log.info("refusing to forward %r to %s: %s", method, base_url, exc)
            return error(start_response, 400, "Proxy error: request has an invalid method or header")
        # Sent again after its bytes may have arrived only where Go's Transport would, and never
        # to the primary: what goes there is a write, or a GET that writes (ReplayOnPrimary).
        replayable = not mark and (
            method in _IDEMPOTENT or "HTTP_IDEMPOTENCY_KEY" in environ or "HTTP_X_IDEMPOTENCY_KEY" in environ
        )
        try:
            conn, answer = self._exchange(dest, method, head, body, replayable)
        except ClientDisconnected:
            self.on_failure("client", mark)
            log.info("client went away while its request body was being forwarded to %s", dest.netloc)
            return error(start_response, 400, "Proxy error: client disconnected")
        except CannotConnect as exc:
            return self.failed(environ, start_response, 502, dest.netloc, str(exc), cause="connect", mark=mark)
        except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO or SO_SNDTIMEO passed
            why = f"no answer from {dest.netloc} within {self.read_timeout:g}s"
            return self.failed(environ, start_response, 504, dest.netloc, why, cause="timeout", mark=mark)
        except (OSError, BadAnswer) as exc:
            why = f"{dest.netloc} closed the connection or sent a bad response ({_why(exc)})"
            return self.failed(environ, start_response, 502, dest.netloc, why, cause="protocol", mark=mark)
        if answer.status == 101:
            # Upgrade is hop-by-hop, never sent on here (websocket.tunnel sends its own): the
            # connection now speaks another protocol, and its answer is no HTTP answer to relay.
            conn.close()
            why = f"{dest.netloc} switched protocols (101) for a request that asked for no upgrade"
            return self.failed(environ, start_response, 502, dest.netloc, why, cause="protocol", mark=mark)
        line, relay = answer.line, answer.relay  # a head copied from a template has both
        status = line if line is not None else answer.status_line()
        headers = list(relay) if relay is not None else answer.relayed()
        rest, length = answer.rest, answer.length
        if length is not None and len(rest) >= length:
            # The whole body came with the head (body_of's first case, without its calls).
            start_response(status, headers)
            self._release(dest, conn, answer.keep_alive and len(rest) == length)
            return [rest[:length]] if length else []
        splice = self.splice
        client = environ.get("gunicorn.socket") if splice != "never" else None
        return self.relay(
            environ,
            start_response,
            status,
            headers,
            answer,
            conn.sock,
            lambda reusable: self._release(dest, conn, reusable),
            dest.netloc,
            client,
            remote_only=splice == "remote",
            mark=mark,
        )

    def relay(
        self,
        environ: dict,
        start_response,
        status: str,
        headers: list[tuple[str, str]],
        answer: Answer,
        sock: socket.socket,
        on_end: Callable[[bool], None],
        where: str,
        client: socket.socket | None = None,
        remote_only: bool = False,
        mark: bool = False,
    ) -> Iterable[bytes]:
        """Answer ``status`` and ``headers`` with ``answer``'s body from ``sock`` (``body_of``'s,
        with ``on_end``, ``client`` and ``remote_only``), or 502 or 504 when ``where`` fails
        before the body's first item."""
        # The body's first item is read before start_response, so that a target failing
        # before it gets the proxy's own 502 or 504 (no server sends the head before that
        # item anyway). Not by a second start_response with exc_info: gunicorn adds its
        # headers to the first call's, two Content-Length in one head.
        try:
            body = body_of(answer, sock, on_end, client, remote_only)
            if type(body) is _Body:
                body.start()
        except (socket.timeout, BlockingIOError):
            why = f"no answer from {where} within {self.read_timeout:g}s"
            return self.failed(environ, start_response, 504, where, why, cause="timeout", mark=mark)
        except (OSError, BadAnswer, httptools.HttpParserError) as exc:
            why = f"{where} closed the connection or sent a bad response ({_why(exc)})"
            return self.failed(environ, start_response, 502, where, why, cause="protocol", mark=mark)
        start_response(status, headers)
        return body

    def _exchange(self, dest: Destination, method: str, head: bytes, body, replayable: bool):
        rewindable = body is None or isinstance(body, bytes)
        if isinstance(body, bytes):
            head, body = head + body, None
        while True:
            conn = self._pooled(dest)
            if conn is None:
                conn = Connection(self.connect(dest))
            written = cut = False
            early = b""
            try:
                cut = not _send(conn.sock, head)
                written = True
                if body is not None and not cut:
                    cut, early = _send_body(conn.sock, body, self._read)
                answer = read_answer(conn.sock, method, early)
                if cut:
                    answer.keep_alive = False
                return conn, answer
            except _Closed as exc:
                conn.close()
                # The other side closed a reused connection before answering: most likely
                # it timed out while idle just as this request went out. Nothing written
                # (the body not read either), or an idempotent request held whole: safe.
                if conn.reused and (not written or (replayable and rewindable)):
                    log.debug("%s closed a kept-alive connection; sending %s again on a new one", dest.netloc, method)
                    continue
                raise BadAnswer("connection closed before any answer") from exc
            except BaseException:
                conn.close()
                raise

    def failed(
        self,
        environ: dict,
        start_response,
        code: int,
        where: str,
        why: str,
        detail: str = "",
        cause: str = "protocol",
        mark: bool = False,
    ) -> list[bytes]:
        """Answer ``code`` with ``Proxy error: why``, log it (bounded), and tell
        ``on_failure`` its ``cause`` (one of metrics.FORWARD_CAUSES); ``mark``: it went to
        the primary."""
        self.on_failure(cause, mark)
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "?")
        failure_log(code, method, path[:200], where, why + (f": {detail}" if detail else ""))
        return error(start_response, code, f"Proxy error: {why}")


# A write to a connection the other side closed: over TLS, OpenSSL reports the broken pipe as
# an EOF (ssl.SSLEOFError), and what the other side sent before it closed can still be read.
_CUT = (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError)


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False when the other side stopped taking it part way (read what it
    answered, if anything). A reset or broken pipe on the first write means nothing was
    written: raised as ``_Closed``."""
    try:
        sent = sock.send(data)
    except _CUT as exc:
        raise _Closed() from exc
    if sent < len(data):
        try:
            sock.sendall(memoryview(data)[sent:])
        except _CUT:
            return False
    return True


def _send_body(sock: socket.socket, body: Iterable[bytes], timeout: float | None) -> tuple[bool, bytes]:
    """Send ``body`` on ``sock`` while watching for an answer: (cut, what came).

    A target may refuse a body before it reads it (a 413, a 401, a redirect) and then stop
    reading: sent blindly, the rest would wait in a full socket buffer until ``timeout``,
    and the client would get a 504 instead of that answer. So each block goes out as the
    socket takes it, and an answer that starts with a status of 300 or more ends the
    sending (``cut``: the connection is not reused). Interim answers (100 Continue) are
    kept for read_answer to skip; after a 2xx head the rest is sent as before, since such
    a target is reading (Go's Transport writes on while it reads; this client cannot). If it
    then takes no more of the body for ``timeout``, its answer is relayed (``cut``) when it
    is whole or the target closed: it has said all it will (Go's Transport relays it as soon
    as it comes). An answer still coming is a target still at work, which the rest of the
    body would have reached: a timeout, as without an early answer. Over TLS alike, the
    socket in non-blocking mode meanwhile (an SSL socket takes no MSG_DONTWAIT)."""
    if not isinstance(sock, ssl.SSLSocket):
        return _watching(sock, body, timeout)
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return _watching(sock, body, timeout)
    finally:
        sock.settimeout(previous)


def _watching(sock: socket.socket, body: Iterable[bytes], timeout: float | None) -> tuple[bool, bytes]:
    poller = select.poll()
    watch = select.POLLIN | select.POLLOUT
    poller.register(sock, watch)
    wait = -1 if timeout is None else min(max(1, int(timeout * 1000)), MAX_POLL_MS)
    tls = isinstance(sock, ssl.SSLSocket)
    early = b""
    for block in body:
        view = memoryview(block)
        while view:
            # Over TLS a record already decrypted waits in the SSL object, not the socket.
            pending = tls and watch & select.POLLIN and sock.pending()
            ready = [(sock.fileno(), select.POLLIN)] if pending else poller.poll(wait)
            if not ready:
                if watch == select.POLLOUT:  # after its 2xx head
                    early, closed = _take_available(sock, early)
                    if closed or _whole_answer(early):
                        return True, early
                raise socket.timeout("the other side took no more of the body")
            events = ready[0][1]
            if events & select.POLLIN and watch & select.POLLIN:
                try:
                    more = _recv_now(sock)
                except _CUT:
                    return True, early
                if more == b"":
                    return True, early  # closed: read_answer says what came, if anything
                if more:
                    early += more
                    refused = _refused_early(early)
                    if refused:
                        return True, early
                    if refused is False:  # a 2xx head: it reads on; stop looking
                        watch = select.POLLOUT
                        poller.modify(sock, watch)
                continue
            if events & (select.POLLERR | select.POLLHUP) and not events & select.POLLOUT:
                return True, early
            try:
                # Over TLS the same view again after SSLWantWriteError, as OpenSSL asks.
                sent = sock.send(view) if tls else sock.send(view, socket.MSG_DONTWAIT)
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            except ssl.SSLWantReadError:  # TLS wants the peer's records first (a renegotiation)
                reader = select.poll()
                reader.register(sock, select.POLLIN)
                if not reader.poll(wait):
                    raise socket.timeout("the other side took no more of the body") from None
                continue
            except _CUT:
                return True, early
            view = view[sent:]
    return False, early


def _recv_now(sock: socket.socket) -> bytes | None:
    """What the other side has sent, without waiting: None when nothing (over TLS, no
    application data: a session ticket, say); b"" when it closed."""
    try:
        if isinstance(sock, ssl.SSLSocket):
            return sock.recv(CHUNK)  # in non-blocking mode: see _send_body
        return sock.recv(CHUNK, socket.MSG_DONTWAIT)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None


def _take_available(sock: socket.socket, early: bytes) -> tuple[bytes, bool]:
    """``early`` and what the target has sent since, without waiting (a bounded amount);
    and whether it closed."""
    while len(early) < MAX_HEAD + CHUNK:
        try:
            more = _recv_now(sock)
        except _CUT:
            return early, True
        if more is None:
            return early, False
        if not more:
            return early, True
        early += more
    return early, False


def _whole_answer(early: bytes) -> bool:
    """True when ``early`` holds a final answer to its end (past interim 1xx heads), as
    llhttp frames it: a ``Content-Length`` body all in, or a chunked one to its last chunk."""
    early = _past_interim(early)
    if early is None:
        return False
    answer = Answer()
    try:
        httptools.HttpResponseParser(answer).feed_data(early)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return True  # no plain answer: read_answer says what it is (a 502, an upgrade)
    return answer.complete


def _refused_early(early: bytes) -> bool | None:
    """Whether ``early``, what a target sent before its request's body was all sent, starts
    a final answer of 300 or more (True), of 2xx (False), or cannot tell yet (None): past
    any interim 1xx heads. Bytes that are no HTTP answer count as refused: read_answer
    turns them into the proxy's 502."""
    early = _past_interim(early)
    if early is None or len(early) < 12:  # "HTTP/1.1 NNN"
        return None
    kind = early[9:10]
    if not early.startswith(b"HTTP/") or kind not in b"2345":
        return True
    return kind != b"2"


def _past_interim(early: bytes) -> bytes | None:
    """``early`` past its interim (1xx) heads, which have no body; None while one is not all in."""
    while early[9:10] == b"1" and early.startswith(b"HTTP/"):
        end = early.find(b"\r\n\r\n")
        if end < 0:
            return None
        early = early[end + 4 :]
    return early


def _ignore(cause: str, to_primary: bool) -> None:
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, BadAnswer):
        return str(exc)
    if isinstance(exc, httptools.HttpParserError):  # a bad chunk: llhttp says what was wrong
        return str(exc) or type(exc).__name__
    return type(exc).__name__


def _read_input(stream, length: int) -> bytes:
    data = b""
    while len(data) < length:
        try:
            more = stream.read(length - len(data))
        except OSError as exc:  # gunicorn's NoMoreData: the client stopped mid-body
            raise ClientDisconnected() from exc
        if not more:
            raise ClientDisconnected()
        data += more
    return data


def _sized_body(stream, length: int) -> Iterator[bytes]:
    # Exactly ``length`` bytes, even when the server says its stream ends by itself
    # (gunicorn's wsgi.input_terminated): a client that leaves mid-upload must end the
    # forward with ClientDisconnected, not a short body the other side waits on.
    left = length
    while left:
        try:
            data = stream.read(min(left, BLOCK))
        except OSError as exc:
            raise ClientDisconnected() from exc
        if not data:
            raise ClientDisconnected()
        left -= len(data)
        yield data
    after_large_body(length)


def _chunked_body(stream) -> Iterator[bytes]:
    while True:
        try:
            chunk = stream.read(CHUNK)
        except OSError as exc:  # gunicorn's NoMoreData: the client stopped mid-body, not the primary
            raise ClientDisconnected() from exc
        if not chunk:
            yield b"0\r\n\r\n"
            return
        yield b"%x\r\n%s\r\n" % (len(chunk), chunk)


def dial(attempt: Callable[[float], T], connect_timeout: float) -> T:
    """``attempt(time_left)``, again every 100 ms while the connection is refused (nothing
    was sent, so trying again is safe), until ``connect_timeout``. Each attempt gets the time
    left: a host that drops packets is given the whole ``connect_timeout``, as by LiteFS."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), RETRY_REFUSED_EVERY))
        except Exception as exc:
            if not refused(exc) or time.monotonic() + RETRY_REFUSED_EVERY > deadline:
                raise
        time.sleep(RETRY_REFUSED_EVERY)


def refused(exc: BaseException) -> bool:
    """True when the connection was refused: nothing was sent, so trying again is safe."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(exc: BaseException, netloc: str) -> str:
    """A one-line account of a failure to reach ``netloc``, for a 502 body and the log."""
    if isinstance(exc, CannotConnect):
        return str(exc)
    if refused(exc):
        return f"connection refused by {netloc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot connect to {netloc} (unknown host)"
    if isinstance(exc, TimeoutError):
        return f"timed out connecting to {netloc}"
    if isinstance(exc, OSError):
        return f"cannot connect to {netloc} ({exc})"
    return f"{netloc} closed the connection or sent a bad response ({type(exc).__name__})"


def request_target(environ: dict) -> str:
    """The request target as the client sent it, byte for byte when the server kept it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and raw[0] == "/" != raw[1:2]:  # a path, not "//host/..."
        return raw
    path = quote(
        (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1"), safe="/:@!$&'()*+,;=~"
    )
    query = environ.get("QUERY_STRING")
    return (path or "/") + ("?" + query if query else "")


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return _NO_TOKENS
    tokens = _TOKENS_OF.get(value)
    if tokens is None:
        if '"' not in value:  # the usual "keep-alive", "close" or "Upgrade": no quoting to undo
            tokens = frozenset({token.strip().lower() for token in value.split(",")} - {""})
        else:
            tokens = frozenset(token.lower() for token in parse_list_header(value))
        _keep(_TOKENS_OF, value, tokens, 64)
    return tokens


_NO_TOKENS: frozenset[str] = frozenset()
_TOKENS_OF: dict[str, frozenset[str]] = {}  # Connection values seen (bounded): their tokens


# Hop-by-hop headers (RFC 9110 section 7.6.1): for one connection, never passed on either way.
# Proxy-Connection is no standard's, but curl still sends it and Go's ReverseProxy drops it.
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)

# Request headers never sent on: hop-by-hop ones, the body's framing (set again for the body
# as it is sent) and the hop marker (added only by ``mark``).
_DROP = _HOP_BY_HOP | {"content-length", HOP_HEADER.lower()}


def _name_of(key: str) -> tuple[str, str] | None:
    """(header name, lower case) for an environ key, None when it is not a header to send."""
    if key[:5] == "HTTP_":
        if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):  # not headers: CGI's names are
            return None
        name = key[5:].replace("_", "-").title()
    elif key == "CONTENT_TYPE":
        name = "Content-Type"
    else:
        return None
    lower = name.lower()
    return None if lower in _DROP else (name, lower)


_NAMES: dict[str, tuple[str, str] | None] = {}  # environ key: _name_of(key), for the keys seen


def request_headers(
    environ: dict,
    mark: bool = False,
    chunked: bool = False,
    length: int | None | bool = False,
    netloc: str | None = None,
) -> dict[str, str]:
    """The headers to send on: hop-by-hop ones dropped, ``X-Forwarded-*`` added, ``Host`` kept
    (or, when the client sent none, ``netloc``'s host and port, as Go's proxy sends)."""
    connection = environ.get("HTTP_CONNECTION")
    named = _connection_tokens(connection) if connection else ()
    headers: dict[str, str] = {}
    names = _NAMES
    for key, value in environ.items():
        try:
            entry = names[key]
        except KeyError:
            entry = _name_of(key)
            _keep(names, key, entry, 4096)
        if entry is None or not value and key == "CONTENT_TYPE":
            continue
        name, lower = entry
        if named and lower in named:
            continue
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if chunked:
        # A coding the body still carries (Transfer-Encoding: gzip, chunked) goes on with it:
        # dropped, the other side would take the compressed bytes for the content itself.
        # In their order: the other side undoes them last to first.
        sent = (environ.get("HTTP_TRANSFER_ENCODING") or "").split(",")
        codings = [c for c in (c.strip(" \t").lower() for c in sent) if c not in ("", "chunked", "identity")]
        headers["Transfer-Encoding"] = ", ".join([*codings, "chunked"])
    else:
        if length is False:  # not given
            length = get_content_length(environ)
        if length is not None:
            headers["Content-Length"] = str(length)
    remote = environ.get("REMOTE_ADDR")
    if remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    headers.setdefault("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http"))
    if "Host" in headers:
        headers.setdefault("X-Forwarded-Host", headers["Host"])
    elif netloc:
        # An HTTP/1.0 request may come without Host; it goes on as HTTP/1.1, which must have one.
        headers["Host"] = netloc.rpartition("@")[2]
    if mark:
        headers[HOP_HEADER] = "1"
    return headers


def request_head(
    environ: dict,
    method: str,
    target: str,
    mark: bool = False,
    chunked: bool = False,
    length: int | None = None,
    netloc: str | None = None,
) -> bytes:
    """The request's head as it goes out, in one piece, to ``netloc`` (for a request without
    ``Host``); ValueError when it could be read two ways (a method or name that is not a
    token, a line break in a value)."""
    if not _TARGET.fullmatch(target):
        raise ValueError("not a well-formed request head")
    if method not in _TOKENS_SEEN:
        _check_tokens((method,))
    block = None if chunked else _known_block(environ, mark, length, netloc)
    if block is None:
        block = _header_block(request_headers(environ, mark, chunked, length, netloc))
    return f"{method} {target} HTTP/1.1\r\n{block}".encode("latin-1")


def _header_block(headers: dict[str, str]) -> str:
    """The header lines (and the blank line) of ``headers``, checked."""
    lines = [f"{k}: {v}\r\n" for k, v in headers.items()]
    block = "".join(lines) + "\r\n"
    # Every CR and LF is one of the line ends just written: none is in a value.
    ends = len(lines) + 1
    if block.count("\n") != ends or block.count("\r") != ends or "\x00" in block:
        raise ValueError("not a well-formed request head")
    if not _TOKENS_SEEN.issuperset(headers):
        _check_tokens(headers)
    return block


def _check_tokens(tokens: Iterable[str]) -> None:
    for token in tokens:
        if token not in _TOKENS_SEEN:
            if not _TOKEN.fullmatch(token):
                raise ValueError("not a well-formed request head")
            if len(_TOKENS_SEEN) >= 4096:  # a set, for issuperset above: _keep's policy by hand
                _TOKENS_SEEN.clear()
            _TOKENS_SEEN.add(token)


# A client sends the same headers request after request, whatever the path: the header
# lines made of them are formatted and checked once, keyed by what they are made of. Not for
# a chunked body, whose codings go into them. The headers are the clients' to choose, so the
# memo is bounded (and emptied when full, as every memo here) by entries and by bytes.
_BLOCKS: dict[tuple, str] = {}
BLOCKS_MAX = 1024
BLOCKS_BYTES = 2 * 1024 * 1024  # what the kept lines and the header values in their keys hold
_blocks_bytes = 0
_ALWAYS_UNSEEN = itertools.repeat(("", ""))  # for an environ key _NAMES has no entry for yet


def _block_key(environ: dict, mark: bool, length: int | None, netloc: str | None) -> tuple:
    # The environ's header items, picked out in C: _NAMES maps the other keys to None. A key
    # not seen yet is kept in: its request makes the lines afresh (request_headers learns it).
    return (
        tuple(itertools.compress(environ.items(), map(_NAMES.get, environ, _ALWAYS_UNSEEN))),
        environ.get("HTTP_CONNECTION"),  # not sent, but names headers not to send
        environ.get("REMOTE_ADDR"),
        environ.get("wsgi.url_scheme"),
        mark,
        length,
        netloc,  # the Host of a request that has none
    )


def _known_block(environ: dict, mark: bool, length: int | None, netloc: str | None) -> str | None:
    """``_header_block(request_headers(...))`` for this request: the kept one, or made now
    and kept; None when its environ holds a value no WSGI server gives (not hashable)."""
    global _blocks_bytes
    key = _block_key(environ, mark, length, netloc)
    try:
        block = _BLOCKS.get(key)
    except TypeError:
        return None
    if block is None:
        names = len(_NAMES)
        block = _header_block(request_headers(environ, mark, False, length, netloc))
        if len(_NAMES) != names:  # keys it had not seen: without them in it, the key is another
            key = _block_key(environ, mark, length, netloc)
        size = 2 * len(block)  # the lines, and about as much in the key's values
        if len(_BLOCKS) >= BLOCKS_MAX or _blocks_bytes + size > BLOCKS_BYTES:
            _BLOCKS.clear()
            _blocks_bytes = 0
        if size <= BLOCKS_BYTES // 64:
            _BLOCKS[key] = block
            _blocks_bytes += size
    return block


# Answer headers never relayed: hop-by-hop ones, and Date and Server, which the WSGI server
# writes itself (gunicorn always does: relayed too, the client would get each twice).
_DROP_ANSWER = _HOP_BY_HOP | {"date", "server"}
_DROP_NAMED: dict[frozenset[str], frozenset[str]] = {}  # Connection tokens: _DROP_ANSWER with them


def response_headers(
    headers: Iterable[tuple[str, str]],
    upgrade: bool = False,
    tokens: Iterable[str] | None = None,
    lowers: Sequence[str] | None = None,
) -> list[tuple[str, str]]:
    """The answer's headers to relay, each repeated header (``Set-Cookie``) kept apart, in
    order; hop-by-hop ones and those named in ``Connection`` dropped. For a ``101``
    (``upgrade``), ``Upgrade`` and ``Connection`` are kept: gunicorn needs them to send its
    upgrade head. ``tokens``: those of its ``Connection`` headers, and ``lowers``: the
    headers' names in lower case, when already known."""
    headers = list(headers)
    drop = _DROP_ANSWER
    if tokens is None:
        for name, value in headers:
            if name.lower() == "connection":
                drop = drop | _connection_tokens(value)
    elif tokens:
        drop = _DROP_NAMED.get(tokens) if isinstance(tokens, frozenset) else None
        if drop is None:
            drop = _DROP_ANSWER | set(tokens)
            if isinstance(tokens, frozenset):
                _keep(_DROP_NAMED, tokens, drop, 64)  # an app sends the same Connection header each time
    if upgrade:
        drop = drop - {"upgrade", "connection"}
    if "content-length" in drop:
        # Named in Connection by a confused app: the body's framing is every recipient's (and
        # a spliced body goes out by it), never a connection option.
        drop = drop - {"content-length"}
    if lowers is None:
        return [(name, value) for name, value in headers if name.lower() not in drop]
    return [header for header, lower in zip(headers, lowers) if lower not in drop]


def status_of(answer: Answer) -> str:
    """The answer's status line for ``start_response``."""
    return answer.status_line()
