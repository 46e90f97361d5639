"""Send a WSGI request to another HTTP server and relay its answer, streaming both ways."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar
from urllib.parse import quote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ReadTimeoutError
from urllib3.util import SKIP_HEADER
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import is_hop_by_hop_header, parse_list_header
from werkzeug.wsgi import ClosingIterator, LimitedStream, get_content_length, get_input_stream

from .errors import error, status_line

log = logging.getLogger("litefs_wsgi")
T = TypeVar("T")

# Set on a request that one node forwards to another. A node that is not the primary never
# forwards such a request again, so two replicas that each think the other is the primary
# cannot bounce a write between them. Fly.io's edge marks the requests it replays likewise.
HOP_HEADER = "X-LiteFS-Forwarded"
HOP_ENVIRON_KEY = "HTTP_" + HOP_HEADER.upper().replace("-", "_")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
CHUNK = 64 * 1024
# A body of known length, and answers, are copied in larger blocks: gunicorn's wsgi.input
# reads 64 KiB at a time at about 200 MiB/s and 1 MiB about four times faster (bench/stream.py).
# It costs up to this much memory per request streaming a body. A chunked upload is still
# read 64 KiB at a time: a read waits until its block is full, and the upload may be slow.
BLOCK = 1024 * 1024
RETRY_REFUSED_EVERY = 0.1  # as LiteFS: the app behind may be restarting


class Forwarder:
    """An HTTP client for relaying WSGI requests, with one connection pool per process.

    It is urllib3, the transport under requests, used directly: a requests ``Session``
    would share a cookie jar between users, add ``User-Agent`` and ``Accept-Encoding``,
    read proxy settings and ``.netrc`` from the environment and re-quote the URL, all wrong
    for a proxy. Nothing is decompressed, no redirect is followed, and a request is sent at
    most once: only a refused connection (no byte has left) is tried again, for up to
    ``connect_timeout``.
    """

    def __init__(self, connect_timeout: float = 30.0, read_timeout: float = 60.0, pool_size: int = 10) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._read = read_timeout or None  # 0: no limit
        self._pools = urllib3.PoolManager(
            num_pools=16, maxsize=max(1, pool_size), block=False, retries=False, blocksize=BLOCK
        )
        # Told of each failed forward: (a cause of FORWARD_CAUSES, whether it went to the
        # primary rather than the standalone proxy's target). LiteFSMiddleware sets it to
        # its metrics recorder.
        self.on_failure: Callable[[str, bool], None] = _ignore

    def close(self) -> None:
        self._pools.clear()

    def forward(self, environ: dict, start_response, base_url: str, mark: bool = False) -> Iterable[bytes]:
        """Relay the request in ``environ`` to ``base_url`` and its answer to ``start_response``.

        ``mark`` adds the hop header (a write going to the primary). Failures answer 502
        ``Proxy error: …`` (504 when the other side stays silent past ``read_timeout``).
        """
        base = urlsplit(base_url)
        body, chunked = request_body(environ)
        headers = request_headers(environ, mark=mark, chunked=chunked)
        # urllib3 would add "User-Agent: python-urllib3/…" and "Accept-Encoding: identity"
        # to a request that came without them; a proxy sends on only what the client sent.
        present = {name.lower() for name in headers}
        for name in ("User-Agent", "Accept-Encoding"):
            if name.lower() not in present:
                headers[name] = SKIP_HEADER
        target = base.path.rstrip("/") + request_target(environ)
        method = environ["REQUEST_METHOD"]
        try:
            pool = self._pools.connection_from_url(base_url)
            response = self._send(pool, method, target, body, headers, chunked)
        except ClientDisconnected:
            self.on_failure("client", mark)
            log.info("client went away while its request body was being forwarded to %s", base_url)
            return error(start_response, 400, "Proxy error: client disconnected")
        except ReadTimeoutError:
            self.on_failure("timeout", mark)
            return error(
                start_response, 504, f"Proxy error: no answer from {base.netloc} within {self.read_timeout:g}s"
            )
        except HTTPError as exc:
            self.on_failure(failure_cause(exc), mark)
            return error(start_response, 502, f"Proxy error: {describe(exc, base.netloc)}")
        except urllib3.exceptions.LocationParseError as exc:
            self.on_failure("url", mark)
            return error(start_response, 502, f"Proxy error: cannot forward to {base_url!r}: {exc}")
        except ValueError as exc:
            # http.client refuses to write a method or header name that is not a token, or a
            # value with a line break: it checks before sending a byte. Gunicorn never lets
            # one through, other servers may; forwarding it could only be read two ways.
            self.on_failure("invalid", mark)
            log.info("refusing to forward %r to %s: %s", method, base_url, exc)
            return error(start_response, 400, "Proxy error: request has an invalid method or header")
        try:
            headers = response_headers(response)
        except ValueError as exc:
            response.close()
            response.release_conn()
            self.on_failure("protocol", mark)
            log.warning("%s: %s", base.netloc, exc)
            return error(start_response, 502, f"Proxy error: {base.netloc} sent an invalid response header")
        start_response(status_of(response), headers)
        return relay(response)

    def _send(self, pool, method, target, body, headers, chunked):
        def attempt(time_left: float):
            return pool.urlopen(
                method,
                target,
                body=body,
                headers=headers,
                chunked=chunked,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                release_conn=False,
                timeout=urllib3.Timeout(connect=time_left, read=self._read),
            )

        return dial(attempt, self.connect_timeout)


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


def describe(exc: Exception, netloc: str) -> str:
    """A one-line account of a failure to reach ``netloc``, for a 502 body and the log."""
    if refused(exc):
        return f"connection refused by {netloc}"
    if isinstance(exc, NewConnectionError):
        return f"cannot connect to {netloc}"
    if isinstance(exc, (urllib3.exceptions.ConnectTimeoutError, TimeoutError)):
        return f"timed out connecting to {netloc}"
    if isinstance(exc, OSError):
        return f"cannot connect to {netloc} ({exc})"
    return f"{netloc} closed the connection or sent a bad response ({type(exc).__name__})"


def failure_cause(exc: Exception) -> str:
    """``describe`` in one word, for metrics: ``connect`` (no connection was made) or ``protocol``."""
    connecting = (NewConnectionError, urllib3.exceptions.ConnectTimeoutError, TimeoutError, OSError)
    return "connect" if refused(exc) or isinstance(exc, connecting) else "protocol"


def _ignore(cause: str, to_primary: bool) -> None:
    return None


def request_target(environ: dict) -> str:
    """The request target as the client sent it, byte for byte when the server kept it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and raw.startswith("/") and not raw.startswith("//"):
        return raw
    path = quote(
        (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1"), safe="/:@!$&'()*+,;=~"
    )
    query = environ.get("QUERY_STRING")
    return (path or "/") + ("?" + query if query else "")


def _connection_tokens(value: str | None) -> set[str]:
    return {token.lower() for token in parse_list_header(value or "")}


def request_headers(environ: dict, mark: bool = False, chunked: bool = False) -> dict[str, str]:
    """The headers to send on: hop-by-hop ones dropped, ``X-Forwarded-*`` added, ``Host`` kept."""
    source = EnvironHeaders(environ)
    drop = _connection_tokens(source.get("Connection")) | {HOP_HEADER.lower(), "content-length"}
    headers: dict[str, str] = {}
    for name, value in source.items():
        lower = name.lower()
        if lower in drop or is_hop_by_hop_header(name):
            continue
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if chunked:
        # A coding the body still carries (Transfer-Encoding: gzip, chunked) goes on with it:
        # dropped, the other side would take the compressed bytes for the content itself.
        codings = [c for c in _connection_tokens(source.get("Transfer-Encoding")) if c not in ("chunked", "identity")]
        if codings:
            headers["Transfer-Encoding"] = ", ".join([*codings, "chunked"])
    length = get_content_length(environ)
    if length is not None and not chunked:
        headers["Content-Length"] = str(length)
    remote = environ.get("REMOTE_ADDR")
    if remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    headers.setdefault("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http"))
    if "Host" in headers:
        headers.setdefault("X-Forwarded-Host", headers["Host"])
    if mark:
        headers[HOP_HEADER] = "1"
    return headers


def request_body(environ: dict) -> tuple[object | None, bool]:
    """(the body to send, whether to frame it chunked): a stream bounded by Content-Length,
    chunks of a chunked upload, or nothing."""
    chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
    if chunked:
        stream = get_input_stream(environ)
        return _chunks(stream), True
    length = get_content_length(environ)
    if length:
        # Bounded even when the server says its stream ends by itself (gunicorn's
        # wsgi.input_terminated): a client that leaves mid-upload must end the forward with
        # ClientDisconnected, not a short body that the primary waits on until read_timeout.
        return LimitedStream(environ["wsgi.input"], length), False
    return None, False


def _chunks(stream) -> Iterator[bytes]:
    while True:
        try:
            chunk = stream.read(CHUNK)
        except OSError as exc:  # gunicorn's NoMoreData: the client stopped mid-body, not the primary
            raise ClientDisconnected() from exc
        if not chunk:
            return
        yield chunk


def response_headers(response, upgrade: bool = False) -> list[tuple[str, str]]:
    """The answer's headers as sent (urllib3's or http.client's), each repeated header
    (``Set-Cookie``) kept apart, hop-by-hop ones dropped; for a ``101`` (``upgrade``),
    ``Upgrade`` and ``Connection`` are kept: gunicorn needs them to send its upgrade head.

    ``Date`` and ``Server`` are left to the WSGI server, which writes its own (gunicorn
    always does): relayed too, the client would get each twice."""
    drop = _connection_tokens(response.headers.get("Connection")) | {"date", "server"}
    headers = []
    for name, value in response.headers.items():
        lower = name.lower()
        if upgrade and lower in ("upgrade", "connection"):
            pass
        elif is_hop_by_hop_header(name) or lower in drop:
            continue
        # http.client lets these through; the WSGI server would refuse them mid-answer.
        if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise ValueError(f"invalid response header {name!r}: {value[:64]!r}")
        headers.append((name, value))
    return headers


def status_of(response) -> str:
    """The answer's status line for ``start_response``."""
    return f"{response.status} {response.reason}" if response.reason else status_line(response.status)


def relay(response) -> Iterable[bytes]:
    """The answer's body, streamed, releasing the connection when the server is done with it."""
    finished = []

    def chunks() -> Iterator[bytes]:
        if response.chunked:
            # One item per chunk as it arrives, so server-sent events are not held back.
            yield from response.stream(CHUNK, decode_content=False)
        else:
            while data := response.read1(BLOCK, decode_content=False):
                yield data
        finished.append(True)

    def release() -> None:
        if not finished:  # the client went away, or the server failed mid-answer
            response.close()
        response.release_conn()

    return ClosingIterator(chunks(), release)
