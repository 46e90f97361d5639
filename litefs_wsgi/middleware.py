"""The request rules of LiteFS's proxy (passthrough, health, read, write), as a WSGI middleware."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from werkzeug.exceptions import HTTPException

from . import errors, metrics
from .config import Config
from .cookie import COOKIE_NAME, TxidCookie, value_of
from .forwarding import HOP_ENVIRON_KEY, Forwarder
from .node import database_files, describe_mount_problem, mount_problem
from .readonly import REPLAY_ENVIRON_KEY, REPLAY_FAILED_KEY
from .watcher import TooManyWaiters, Watcher, get_watcher, set_default_watcher

log = logging.getLogger("litefs_wsgi")

HEALTH_PATH = "/litefs/health"
FLY_REPLAY_MAX_BODY = 1_000_000  # Fly.io's edge cannot replay a larger request body
REPLAY_HEADER = "X-LiteFS-Replay"  # set by ReplayOnPrimary; never leaves the process
FAR_AHEAD = 1_000_000  # a cookie this many transactions ahead is probably forged or stale
WARN_EVERY = 60.0  # a warning a client's requests can cause is logged at most this often
# Options only the standalone proxy reads: in-process, the app is the target and its own
# server listens and answers (metrics included).
STANDALONE_ONLY = ("target", "addr", "metrics_path", "splice")


class ReplayOnPrimary(HTTPException):
    """Raise in a view that must write during a GET (a login callback, a visit counter):
    on a replica, LiteFSMiddleware sends the request to the primary instead. Flask and
    werkzeug apps turn it into a response by themselves; Django: see ``litefs_wsgi.django``.
    Without the middleware the client gets this 503.
    """

    code = 503
    description = "This request must run on the LiteFS primary, but LiteFSMiddleware is not installed."

    def get_headers(self, environ=None, scope=None) -> list[tuple[str, str]]:
        return [*super().get_headers(environ, scope), (REPLAY_HEADER, "1")]


def answer_replays(flask_app) -> None:
    """Register ``flask_app``'s handler of ReplayOnPrimary, which answers with its 503 as
    werkzeug makes it, header and all, for LiteFSMiddleware to know it. The most specific
    handler there can be, it wins over the app's own for ``HTTPException`` (a JSON API's),
    which would answer a 503 without the header: the request was then never replayed. An
    app that has a handler for ReplayOnPrimary itself keeps it; so does one past its setup,
    which Flask allows no new handler."""
    if flask_app.error_handler_spec[None][ReplayOnPrimary.code].get(ReplayOnPrimary) is not None:
        return
    with contextlib.suppress(AssertionError):  # Flask refuses setup after its first request
        flask_app.register_error_handler(ReplayOnPrimary, _as_is)


def _as_is(error: ReplayOnPrimary) -> ReplayOnPrimary:
    return error  # Flask makes its response: the 503 with the header


def _flask_app_of(app) -> Any | None:
    """The Flask app whose ``wsgi_app`` method ``app`` is, or None."""
    flask = sys.modules.get("flask")  # never imported here: a Flask app has done it already
    owner = getattr(app, "__self__", None)
    return owner if flask is not None and isinstance(owner, flask.Flask) else None


def compile_patterns(patterns: Iterable[str]) -> re.Pattern | None:
    """LiteFS's path patterns: ``*`` matches any characters (``/`` too) but a line feed, as
    ``.*`` in Go's regexp (a path may hold one, sent as ``%0A``); the rest is literal."""
    parts = ["(?:" + ".*".join(re.escape(piece) for piece in p.split("*")) + ")" for p in patterns]
    return re.compile("|".join(parts)) if parts else None


def local_port(environ: dict) -> str | None:
    """The port this request came in on; None when it cannot be known. gunicorn's
    SERVER_PORT follows the client's Host header, so under gunicorn only the socket says:
    on a unix socket, which has no port, None (the client's Host must never choose where a
    request is forwarded). Other servers set SERVER_PORT to the port they listen on."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            address = sock.getsockname()
        except OSError:
            return None
        return str(address[1]) if isinstance(address, tuple) else None  # a unix socket's is a path
    port = str(environ.get("SERVER_PORT", "80"))
    return port if port.isascii() and port.isdigit() and 0 < int(port) < 65536 else None


def request_path(environ: dict) -> str:
    """The path as LiteFS matches it (Go's URL.Path): decoded, and UTF-8 rather than WSGI's
    latin-1 text, so that a pattern such as ``/café/*`` matches."""
    path = environ.get("PATH_INFO", "")
    script_name = environ.get("SCRIPT_NAME")
    if script_name:
        path = script_name + path
    if path.isascii():
        return path
    try:
        return path.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return path


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN, whatever is still unread


def client_alive(environ: dict) -> Callable[[], bool] | None:
    """A callable telling whether the client is still connected, from gunicorn's client
    socket; None under a server that does not expose it. It only peeks: a byte the client
    sent (a pipelined request) stays for the server to read."""
    sock = environ.get("gunicorn.socket")
    if sock is None or not hasattr(sock, "fileno"):
        return None

    def alive() -> bool:
        try:
            poller = select.poll()  # not select.select: it fails on descriptors over 1023
            poller.register(sock, select.POLLIN | _POLLRDHUP)
            events = poller.poll(0)
            if not events:
                return True
            if events[0][1] & (_POLLRDHUP | select.POLLHUP | select.POLLERR):
                return False  # the client's FIN, even behind body bytes nobody has read yet
            # Readable with nothing to read is the client's FIN (or a reset, raising below).
            return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except ValueError:  # a TLS socket cannot peek: keep waiting, as without this check
            return True
        except OSError:  # reset by the client, or already closed
            return False

    return alive


def enable_debug_log() -> None:
    """Show the routing decisions, as LiteFS's ``debug: true`` does: on stderr unless the
    app has configured logging itself."""
    log.setLevel(logging.DEBUG)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s litefs-wsgi: %(message)s"))
        log.addHandler(handler)


class LiteFSMiddleware:
    """Make a WSGI app behave on a LiteFS cluster, as LiteFS's proxy does, in-process.

    Writes (every method but GET and HEAD) run on the primary, which answers them with a
    ``__txid`` cookie holding the database position after the write; on a replica they are
    sent to the primary (``fly-replay`` on Fly.io, HTTP elsewhere). A read carrying the
    cookie waits until this node has replicated that far, so a client always reads its own
    writes. ``GET /litefs/health`` reports the replication lag.

    .. code-block:: python

        from litefs_wsgi import LiteFSMiddleware

        app.wsgi_app = LiteFSMiddleware(app.wsgi_app, db="app.db")          # Flask
        application = LiteFSMiddleware(get_wsgi_application(), db="app.db")  # Django

    Options are those of :class:`~litefs_wsgi.config.Config`, given as keyword arguments
    or as ``config``; the file in ``LITEFS_WSGI_CONFIG`` and ``LITEFS_PROXY_*`` variables
    fill in the rest. A bad option raises ConfigError here, not at the first request.
    """

    def __init__(self, app, config: Config | None = None, *, forwarder: Forwarder | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("pass either config or keyword options, not both")
        self.app = app
        self.config = config = config if config is not None else Config.load(**options)
        _warn_standalone_only(options)
        if config.forward == "fly-replay" and not os.environ.get("FLY_APP_NAME"):
            log.warning(
                "forward is 'fly-replay' but FLY_APP_NAME is not set: this is not Fly.io, whose edge alone "
                "replays a fly-replay answer. On a replica a write then gets an empty 200 and is never run, "
                "unless a proxy in front replays it; set forward to 'http' to send writes to the primary."
            )
        self.watcher: Watcher = get_watcher(config.mount_dir, config.poll_interval, config.api_url)
        set_default_watcher(self.watcher)
        self.cookie = TxidCookie(config.db, config.cookie_expiry, config.cookie_secret)
        self.forwarder = forwarder or Forwarder(config.connect_timeout, config.read_timeout)
        # Each request is counted once, at its decision (README: Metrics); a no-op without
        # prometheus_client.
        self._metrics = metrics.recorder(self.watcher)
        self.forwarder.on_failure = self._metrics.forward_failed
        self._passthrough = compile_patterns(config.passthrough)
        self._always_forward = compile_patterns(config.always_forward)
        self._warned: dict[str, float] = {}  # kind of warning -> when it was last logged
        self._no_position_logged: set[str] = set()
        self._not_mounted = f"Proxy error: LiteFS is not mounted at {config.mount_dir}"
        header = config.txid_header
        # The header's WSGI environ key, as servers name it (LiteFS-TXID: HTTP_LITEFS_TXID).
        self._txid_key = "HTTP_" + header.upper().replace("-", "_") if header else None
        self._replay_readonly = config.replay_on_readonly
        # The standalone proxy's target is another process, which cannot raise ReplayOnPrimary:
        # a read's answer then goes to the server untouched (counted as the read is sent).
        self._may_replay = getattr(app, "may_replay", True)
        flask_app = _flask_app_of(app)
        if flask_app is not None:
            answer_replays(flask_app)
        self._only_db = config.db[0] if len(config.db) == 1 else None
        self._require_mount, self._debug_on = config.require_mount, config.debug  # read on every write
        # The -pos bytes the last write read and the cookie made of them (see _add_cookie).
        # Not with api_url, where a tx event can raise the position past the file's.
        # (bytes, secure, the span of time.time() the cookie serves, its TXID, the cookie)
        self._last_write: tuple[bytes | None, bool | None, float, float, int, str] = (None, None, 0.0, 0.0, 0, "")
        self._keep_last_write = self.watcher.events is None
        # The database of _add_cookie's usual case: one, and no txid_header.
        self._one_cookie_db = self._only_db if self._txid_key is None else None
        self._url_needs_port = "{port}" in config.primary_url
        # Cookie headers whose TXIDs were found reached (Watcher.reached): a client sends the
        # same one until its next write, and each read then costs a look-up. Not with a
        # txid_header, which can ask for more than the cookie; not with debug, which logs them.
        self._reached = None if header or config.debug else self.watcher.memo()
        if config.debug:
            enable_debug_log()
        if config.require_mount:
            self.watcher.require_mount = True  # is_primary() and role() too say "not the primary"
        if config.keep_pos_open is not None:  # else as the mount's Node chose (on LiteFS's mount, kept)
            self.watcher.node.set_keep_open(config.keep_pos_open)
        problem = mount_problem(config.mount_dir)
        if problem is not None:
            log.warning(
                "LiteFS is not mounted at %s (mount_dir): %s. %s",
                config.mount_dir,
                describe_mount_problem(config.mount_dir, problem),
                "With require_mount this node never acts as the primary until the mount is there: "
                "writes and /litefs/health answer 503."
                if config.require_mount
                else "This node acts as the primary: writes run here, in files no LiteFS replicates. "
                "Run the app under LiteFS (its exec: section), fix mount_dir, or set require_mount "
                "to refuse writes instead.",
            )

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        # The hop marker is ours and never reaches the app. It only makes this node refuse
        # to forward the request again (and, on the primary, answer it with the cookie):
        # sent by a client, it can never choose where a request goes.
        replayed = environ.pop(HOP_ENVIRON_KEY, None) is not None or "HTTP_FLY_REPLAY_SRC" in environ
        method = environ.get("REQUEST_METHOD", "GET")
        if self._passthrough is None:
            # No pattern to match the path against: a request is routed by its method, and
            # its path is worked out only where it is said (a log line, an error); for a read,
            # only when it may be /litefs/health (the path ends in PATH_INFO).
            if method != "GET" and method != "HEAD":
                return self._write(environ, start_response, method, None, replayed, True)
            if self._always_forward is None and not HEALTH_PATH.endswith(environ.get("PATH_INFO", "")):
                return self._read(environ, start_response, method, None, replayed)
        path = environ.get("PATH_INFO", "")
        if not path.isascii() or environ.get("SCRIPT_NAME"):
            path = request_path(environ)  # else the same path, without a call on every request
        if self._passthrough is not None and self._passthrough.fullmatch(path):
            self._debug("passthrough", method, path)
            return self._pass(environ, start_response, method, path)
        if method == "GET":
            if path == HEALTH_PATH:
                self._metrics.health()
                return self._health(start_response)
        elif method != "HEAD":
            return self._write(environ, start_response, method, path, replayed, True)
        if self._always_forward is not None and self._always_forward.fullmatch(path):
            # LiteFS sets the cookie by method, never on a GET.
            return self._write(environ, start_response, method, path, replayed, False)
        return self._read(environ, start_response, method, path, replayed)

    def _debug(self, decision: str, method: str, path: str, *details: Any) -> None:
        if self.config.debug:
            log.debug("%s %s: %s%s", method, path, decision, "".join(f" {d}" for d in details))

    def _pass(self, environ, start_response, method, path) -> Iterable[bytes]:
        """The app's answer to a passthrough path, untouched; but a view there that raised
        ReplayOnPrimary asked for what a passthrough path never gets (a forward): its 503,
        and the header that is ours, would reach the client saying the middleware is not
        installed. Said instead, as a replay requested on the primary is. Not in the
        standalone proxy, whose target is another process: its answer is relayed as it came,
        that header and all, as on any other path."""
        if not self._may_replay:
            self._metrics.passthrough()
            return self.app(environ, start_response)
        replay: list[bool] = []
        returned = False

        def checked(status, headers, exc_info=None):
            if "503" <= status < "504" and any(name == REPLAY_HEADER for name, _ in headers):
                if not returned:
                    replay.append(True)
                    return lambda data: None
                headers = [header for header in headers if header[0] != REPLAY_HEADER]  # a generator's
            return start_response(status, headers, exc_info)

        result = self.app(environ, checked)
        returned = True
        if not replay:
            self._metrics.passthrough()  # counted once: as a passthrough, or as the error below
            return result
        if hasattr(result, "close"):
            result.close()
        if self._warning_due("passthrough replay"):
            log.error(
                "ReplayOnPrimary raised for %s %s, a passthrough path: litefs-wsgi serves those untouched and "
                "never sends them to the primary. Remove the path from passthrough (logged at most once a minute)",
                method,
                path,
            )
        self._metrics.error()
        return errors.error(start_response, 500, "Proxy error: replay requested on a passthrough path")

    def _health(self, start_response) -> Iterable[bytes]:
        if self.config.require_mount and self.watcher.mount_problem() is not None:
            self._debug("health: LiteFS not mounted", "GET", HEALTH_PATH)
            return errors.error(start_response, 503, self._not_mounted)
        lag = self.watcher.node.lag()
        # In whole nanoseconds, as Go compares durations: max_lag * 1000 in floats can fall just
        # below the milliseconds it was written in (4.007 * 1000 is 4006.9999999999995), and a lag
        # equal to it, which is not over it, would answer 503.
        if self.config.max_lag and (lag is None or lag * 1_000_000 > round(self.config.max_lag * 1e9)):
            self._debug("health: lag exceeded", "GET", HEALTH_PATH, lag)
            return errors.error(start_response, 503, "Replication lag exceeded")
        self._debug("health: ok", "GET", HEALTH_PATH, lag)
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "3")])
        return [b"OK\n"]

    def _read(self, environ, start_response, method, path, replayed) -> Iterable[bytes]:
        header = environ.get("HTTP_COOKIE")
        memo = self._reached
        if header is None:
            targets = None
        elif memo is not None and COOKIE_NAME in header and memo.get(header, -1.0) >= self.watcher.clock():
            targets = None  # found reached by positions still trusted: nothing to parse or check
        else:
            targets = self.cookie.read(environ)
        if self._txid_key is not None:
            targets = self._with_txid_header(environ, targets)
        served = self._metrics.read
        if targets and not self.watcher.reached(targets, memo, header):  # seen, or one read: counts waits apart
            refusal = self._wait(environ, start_response, method, path or request_path(environ), targets)
            if refusal is not None:
                return refusal
            served = self._metrics.waited
        if self._debug_on:
            self._debug("read", method, path or request_path(environ), targets or "")
        if replayed and self.watcher.role()[0]:
            # Fly.io replayed it here from a replica, as a view asked: the client needs the
            # position after whatever the view writes.
            return self._write(environ, start_response, method, path, replayed, True)
        if not self._may_replay:
            served()
            return self.app(environ, start_response)
        # Call the app; a view that raises ReplayOnPrimary gets its request sent to the
        # primary (here, not in a method of its own: this runs on every read).
        replay: list[bool] = []
        # Django's integration appends to it when Django answers SQLite's read-only error with
        # its own 500 (raised in a middleware, outside the view): replayed as the view's would be.
        environ[REPLAY_FAILED_KEY] = replay
        if self._replay_readonly and not replayed:
            # The Flask extension and Django's middleware may then turn SQLite's read-only
            # error into ReplayOnPrimary (litefs_wsgi.readonly.should_replay).
            environ[REPLAY_ENVIRON_KEY] = self.watcher

        def intercept(status, headers, exc_info=None):
            # ReplayOnPrimary is a 503: other answers need no look at their headers (a
            # comparison, not startswith(): this runs on every read, and costs half as much).
            if replay or ("503" <= status < "504" and any(name == REPLAY_HEADER for name, _ in headers)):
                replay.append(True)
                return _discard
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, intercept)
        except BaseException:
            if not replay:
                served()  # counted once, an app that raises too
            raise
        if not replay:
            # Counted once the app has returned, here and not in intercept: one free variable
            # fewer for each read's closure. A replayed read counts where it goes.
            served()
            return result
        return self._replay(environ, start_response, method, path, replayed, result)

    def _wait(self, environ, start_response, method, path, targets) -> Iterable[bytes] | None:
        """Wait for ``targets``: None once reached, else the error to answer with."""
        started = self._metrics.wait_started()
        try:
            alive = client_alive(environ)
            reached = self.watcher.wait(targets, self.config.poll_timeout, alive, self.config.max_waiters)
        except TooManyWaiters:
            self._metrics.wait_refused(started)
            self._debug("refused, too many waiting", method, path)
            return _too_many(start_response, "replication")
        self._metrics.wait_ended(started)
        if reached:
            return None
        self._metrics.timeout()
        if alive is not None and not alive():
            # Nobody will read the answer: free the thread now, call nothing.
            log.info("client went away while %s %s waited for replication", method, path)
        else:
            self._debug("timed out", method, path, targets)
            self._log_timeout(targets)
        return errors.error(start_response, 504, errors.TIMEOUT)

    def _with_txid_header(self, environ: dict, targets: dict[str, int] | None) -> dict[str, int] | None:
        """The cookie's positions raised to the ``txid_header``'s, database by database."""
        value = environ.get(self._txid_key)
        sent = self.cookie.parse(value.strip()) if value else None
        if not sent:
            return targets
        if not targets:
            return sent
        return {db: max(txid, sent[db]) for db, txid in targets.items()}

    def _warning_due(self, kind: str) -> bool:
        """True, at most once every WARN_EVERY per kind: what clients cause must not flood the log."""
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY) < WARN_EVERY:
            return False
        self._warned[kind] = now
        return True

    def _log_timeout(self, targets: dict[str, int]) -> None:
        for db, target in targets.items():
            txid = self.watcher.txid(db) or 0
            if target - txid > FAR_AHEAD:
                # At most one warning a minute: forged cookies must not flood the log.
                if self._warning_due("far ahead"):
                    log.warning(
                        "a __txid cookie (or txid_header) asks for %s at TXID %d, %d ahead of this node:"
                        " forged or stale? (logged at most once a minute)",
                        db,
                        target,
                        target - txid,
                    )
            else:
                log.info("read timed out waiting for %s to reach TXID %d (at %d)", db, target, txid)

    def _replay(self, environ, start_response, method, path, replayed, result) -> Iterable[bytes]:
        """Send a read whose view raised ReplayOnPrimary to the primary, its answer dropped."""
        if hasattr(result, "close"):
            result.close()
        path = path or request_path(environ)
        is_primary, _ = self.watcher.role()
        if is_primary:
            # A view that asks on the primary would ask again if called again: a bug in the
            # app (or a failover between its check and ours), said plainly rather than looped.
            log.error("ReplayOnPrimary raised on the primary for %s %s", method, path)
            self._metrics.error()
            return errors.error(start_response, 500, "Proxy error: replay requested on the primary")
        self._debug("replayed on the primary by the app", method, path)
        return self._write(environ, start_response, method, path, replayed, True)

    def _write(self, environ, start_response, method, path, replayed, cookie: bool) -> Iterable[bytes]:
        """Run the request on the primary: here, or sent there. ``cookie``: its answer gets the
        cookie if it runs here: a write, or a GET or HEAD whose view asked for the primary
        (this node may have become the primary while it waited for one), not an
        ``always_forward`` read (but for one replayed here). ``path``: None when not found yet (a
        write, routed by its method alone), found here only where it is said."""
        watcher = self.watcher
        if self._require_mount and watcher.mount_problem() is not None:
            self._refuse_unmounted(method, path or request_path(environ))
            self._metrics.no_primary()
            return errors.error(start_response, 503, self._not_mounted)
        if watcher.clock() <= watcher.primary_until:  # the files said so within STATE_TTL
            is_primary, primary = True, None
        else:
            is_primary, primary = watcher.role()
        if not is_primary and (primary is None or replayed):
            # An election; or a request another node already sent here, while two nodes may
            # each name the other (a failover): wait for a primary, and for a replayed
            # request, for this node to become it. Never forward a request twice.
            path = path or request_path(environ)
            try:
                is_primary, primary = self.watcher.wait_for_role(
                    self.config.primary_redirect_timeout,
                    need_primary=replayed,
                    alive=client_alive(environ),
                    max_waiters=self.config.max_waiters,
                )
            except TooManyWaiters:
                self._debug("refused, too many waiting", method, path)
                self._metrics.refused()
                return _too_many(start_response, "a primary")
            if not is_primary and (primary is None or replayed):
                self._debug("no primary", method, path, "(already forwarded once)" if replayed else "")
                self._metrics.no_primary()
                if replayed:
                    self._log_misrouted(environ, method, path, primary)
                    return errors.error(start_response, 503, errors.NOT_PRIMARY)
                return errors.error(start_response, 503, errors.NO_PRIMARY)
        if is_primary:
            if self._debug_on:
                self._debug("write on the primary", method, path or request_path(environ))
            self._metrics.write_primary()
            if not cookie and not replayed:  # an always_forward read
                return self.app(environ, start_response)
            head = _HeldHead(self, start_response, environ.get("wsgi.url_scheme") == "https")
            if not self._may_replay:
                # The standalone proxy's target has sent its head when it calls start_response,
                # which is when LiteFS's proxy reads the position.
                head.released = True
                return self.app(environ, head)
            # The position is read when the server gets the answer's head, as LiteFS's proxy
            # reads it when the head arrives: once the app has returned (Flask runs
            # teardown_request, where some apps commit, after start_response: Pony ORM's
            # db_session, "commit on teardown"), at its first write(), or, for a generator app,
            # at its own start_response (run as its first item is asked for).
            result = self.app(environ, head)
            head.release()
            return result
        path = path or request_path(environ)
        if self.config.forward == "fly-replay" and _replayable(environ):
            self._debug("fly-replay", method, path, primary)
            self._metrics.fly_replay()
            start_response("200 OK", [("fly-replay", f"instance={primary}"), ("Content-Length", "0")])
            return [b""]
        self._metrics.forward()
        port = local_port(environ) if self._url_needs_port else ""
        if port is None:
            return self._no_port(start_response, method, path)
        url = self.config.primary_url.format(hostname=primary, port=port)
        if self.config.debug:
            self._debug("forward", method, path, url)
        return self.forwarder.forward(environ, start_response, url, mark=True)

    def _no_port(self, start_response, method: str, path: str) -> Iterable[bytes]:
        """The 502 of a write to forward by a ``primary_url`` with ``{port}`` that came in on
        a socket without a port (gunicorn bound to a unix socket)."""
        self._debug("no port for primary_url", method, path)
        if self._warning_due("no port"):
            log.error(
                "cannot forward %s %s: primary_url %r has {port}, the port this request came in on, but it "
                "came in on a unix socket, which has none. Set primary_url with the primary's port, "
                "e.g. http://{hostname}:8080 (logged at most once a minute)",
                method,
                path[:200],
                self.config.primary_url,
            )
        self.forwarder.on_failure("url", True)
        return errors.error(start_response, 502, "Proxy error: no port for primary_url (unix socket)")

    def _refuse_unmounted(self, method: str, path: str) -> None:
        self._debug("refused: LiteFS is not mounted (require_mount)", method, path)
        if self._warning_due("unmounted"):
            log.warning(
                "refusing writes with 503: LiteFS is not mounted at %s: %s (require_mount; logged at most "
                "once a minute)",
                self.config.mount_dir,
                self.watcher.mount_problem(),
            )

    def _log_misrouted(self, environ: dict, method: str, path: str, primary: str | None) -> None:
        """Say who sent a request here that only the primary may answer, once a minute at most."""
        if not self._warning_due("misrouted"):
            return
        here = f"the primary is {primary}" if primary else "no primary is known"
        sender = environ.get("REMOTE_ADDR") or "an unknown address"
        if "HTTP_FLY_REPLAY_SRC" in environ:
            log.warning(
                "%s %r was replayed here by Fly.io (Fly-Replay-Src: %r), but this node is not the primary (%s): "
                "the node that answered fly-replay named this one as the primary; its .primary was stale "
                "(a failover?) (logged at most once a minute)",
                method,
                path[:200],
                environ["HTTP_FLY_REPLAY_SRC"][:200],
                here,
            )
        else:
            log.warning(
                "%s %r was forwarded here by %s (X-Forwarded-For: %r), but this node is not the primary (%s): "
                "the primary_url of that node points at a node that is not the primary, unless a failover "
                "is under way or a client sent X-LiteFS-Forwarded itself (logged at most once a minute)",
                method,
                path[:200],
                sender,
                (environ.get("HTTP_X_FORWARDED_FOR") or "")[:200],
                here,
            )

    def _note_no_position(self, txids: dict[str, int | None]) -> None:
        """Say once per database that a write on the primary found no position for it."""
        for db, txid in txids.items():
            if txid is not None or db in self._no_position_logged:
                continue
            self._no_position_logged.add(db)
            if os.path.lexists(os.path.join(self.config.mount_dir, db + "-pos")):
                continue  # there but unreadable: the watcher's node logs that itself
            seen = [name for name in database_files(self.config.mount_dir) if name != db]
            log.warning(
                "a write on the primary found no %s-pos in %s: no __txid cookie covers %s, so reads after "
                "writes do not wait for it. Does db=%r name the database file the app writes? %s "
                "(logged once; a database not created yet has no position either)",
                db,
                self.config.mount_dir,
                db,
                db,
                f"The mount holds: {', '.join(seen)}." if seen else "The mount holds no database.",
            )

    def _add_cookie(self, start_response, secure: bool, status: str, headers: list, exc_info=None):
        """Call the server's ``start_response`` with the ``__txid`` cookie of the position now."""
        only = self._one_cookie_db
        if only is None:
            txids = tuple([self.watcher.txid(db) for db in self.config.db])
            return self._add_cookies(start_response, secure, status, headers, exc_info, txids)
        # The usual case, here and not in _add_cookies: one database, no txid_header. This
        # runs on every write, where a call costs what the pread(2) does: the bytes the last
        # write read, read again within the second, send the same cookie, as long as the
        # watcher has seen no other position since (a restore below it is then noticed here).
        watcher = self.watcher
        data = watcher.node.pos_bytes(only)
        last_data, last_secure, since, until, txid, header = self._last_write
        if data == last_data and secure is last_secure and since <= time.time() < until:
            seen = watcher.seen.get(only)
            if seen is not None and seen[0] == txid:
                return start_response(status, [*headers, ("Set-Cookie", header)], exc_info)
        txid = watcher.txid(only, data)
        if txid is None:
            return self._add_cookies(start_response, secure, status, headers, exc_info, (txid,))
        _, _, since, until, header = self.cookie.made((txid,), secure)
        if self._keep_last_write:
            self._last_write = (data, secure, since, until, txid, header)
        return start_response(status, [*headers, ("Set-Cookie", header)], exc_info)

    def _add_cookies(self, start_response, secure: bool, status: str, headers: list, exc_info, txids: tuple):
        """``_add_cookie`` for the positions ``txids`` read (None: no position), one per database."""
        if None in txids:
            self._note_no_position(dict(zip(self.config.db, txids)))
            if txids.count(None) == len(txids):
                return start_response(status, headers, exc_info)  # no database yet: no cookie
            txids = tuple([txid or 0 for txid in txids])
        cookie = self.cookie.header_of(txids, secure)
        if self._txid_key is not None:
            headers = self._add_txid_header(headers, value_of(cookie))
        return start_response(status, [*headers, ("Set-Cookie", cookie)], exc_info)

    def _add_txid_header(self, headers: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
        """``headers`` with the ``txid_header`` set to ``value``, replacing the app's own."""
        name = self.config.txid_header
        lower = name.lower()
        return [*(h for h in headers if h[0].lower() != lower), (name, value)]


class _HeldHead:
    """A write's ``start_response``, as the app gets it: the head it is given is held until
    ``release``, the first ``write`` or, once released, sent at once, each time through
    ``middleware._add_cookie``, which reads the position. One object, not closures: a write
    then allocates one object where three closures and their cells took a dozen, each one
    more for Python's garbage collector to count and visit (4,200 instructions a write
    fewer, ``bench/overhead.py --instructions``). It holds the middleware, not its bound
    ``_add_cookie`` (a bound method made on every write), and the head's status and headers
    apart, not a tuple that ``release`` would unpack into a call (``bench/overhead.py``: the
    write's CPU time, with the changes in ``Watcher.txid``, 0.02-0.03 of the app's)."""

    __slots__ = ("middleware", "start_response", "secure", "status", "headers", "released", "server_write")

    def __init__(self, middleware: LiteFSMiddleware, start_response: Callable, secure: bool) -> None:
        self.middleware = middleware
        self.start_response = start_response
        self.secure = secure
        self.headers: list | None = None  # given by the app with ``status``, not sent yet
        self.released = False  # the head goes to the server as it is given
        # server_write, the server's write(), is set by release(), before write() reads it.

    def __call__(self, status: str, headers: list, exc_info=None) -> Callable[[bytes], Any]:
        if self.released:
            return self.middleware._add_cookie(self.start_response, self.secure, status, headers, exc_info)
        if self.headers is not None and exc_info is None:  # as the server would say (PEP 3333: a fatal error)
            raise AssertionError("start_response called a second time without exc_info")
        # A second call (an error, with exc_info) replaces the first: the server has seen
        # neither, nothing was sent, and there is nothing to raise again.
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> Any:
        """The server's write(), for an app that writes before it returns."""
        if self.headers is not None:
            self.release()
        return self.server_write(data)

    def release(self) -> None:
        """Send the head held, if any; any head given from now on is sent at once."""
        self.released = True
        headers = self.headers
        if headers is not None:
            self.headers = None
            self.server_write = self.middleware._add_cookie(self.start_response, self.secure, self.status, headers)


def _too_many(start_response, what: str) -> Iterable[bytes]:
    """The 503 of a request refused because ``max_waiters`` requests already wait."""
    return errors.error(
        start_response, 503, f"Proxy error: too many requests waiting for {what}", [("Retry-After", "1")]
    )


def _discard(data: bytes) -> None:
    """The ``write()`` given for an answer that is replaced: its bytes go nowhere."""


def standalone_only(options: Mapping[str, Any]) -> list[str]:
    """The options among ``options`` that only the standalone proxy reads (STANDALONE_ONLY)."""
    return [name for name in STANDALONE_ONLY if name in options]


def _warn_standalone_only(options: dict[str, Any]) -> None:
    """Say that options given to the middleware itself (by keyword, the Flask extension's
    ``LITEFS_*`` keys or Django's ``settings.LITEFS``) do nothing in-process. Not for the
    file in ``LITEFS_WSGI_CONFIG`` or ``LITEFS_PROXY_*``, which a standalone proxy may share."""
    ignored = standalone_only(options)
    if ignored:
        log.warning(
            "LiteFSMiddleware ignores %s: %s only the standalone proxy's (litefs-wsgi serve). In-process the "
            "app is the target, and its own server listens and serves any metrics: remove %s from the options "
            "given to the app (keyword arguments, Flask's app.config, Django's settings.LITEFS).",
            ", ".join(ignored),
            "this option is" if len(ignored) == 1 else "these options are",
            "it" if len(ignored) == 1 else "them",
        )


def _replayable(environ: dict) -> bool:
    """True when Fly.io's edge can replay the request: a known body length up to 1 MB."""
    if "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower():
        return False
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) <= FLY_REPLAY_MAX_BODY
    except ValueError:
        return False
