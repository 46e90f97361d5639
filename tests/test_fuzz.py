"""Property-based fuzzing of the middleware and the control-file readers: hostile input never breaks them.

A torn, garbled or unreadable ``-pos`` reads as no position, which is what a missing file
means: the database is not there to wait for, so the read is served at once (SPEC.md 2.4).
LiteFS writes ``-pos`` from memory in one FUSE read, so a real mount never shows half of
one; what is left (ENOENT, ENOTCONN, EIO while LiteFS restarts) comes with the database
itself gone. Waiting instead would hold a thread per cookie-carrying read for poll_timeout
all through an outage, turning a LiteFS restart into an outage of the whole app.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import serve
from werkzeug.test import run_wsgi_app

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.cookie import TxidCookie
from litefs_wsgi.node import Node, valid_hostname
from litefs_wsgi.txid import Pos, format_pos, parse_pos

FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"  # the long run: see tests/conftest.py
pytestmark = pytest.mark.timeout(0 if FUZZING else 120)


def examples(count: int, share: int = 1) -> settings:
    """``count`` examples in the normal suite; in the long run the fuzz profile's count (10^5 by
    default), divided by ``share`` for a test that costs a socket and a server per input."""
    if FUZZING:
        profile = settings.get_profile("fuzz")
        return settings(profile, max_examples=max(1, profile.max_examples // share))
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


FUZZ = examples(150)

# Every status the middleware documents, plus what the app or the primary answers (200, or
# 400 for a request the primary's server refuses, or one whose body is short).
DOCUMENTED = {200, 400, 502, 503, 504}
SECRET = "fuzz secret"

# -- the states a control file can be in ----------------------------------------------------

MISSING, DIRECTORY, LOOP = "missing", "directory", "symlink loop"


def file_states(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[object]:
    """A control file: its real format, cut mid-write, garbage, huge, or not a readable file."""
    return st.one_of(
        valid,
        valid.flatmap(lambda data: st.integers(0, len(data)).map(lambda n: data[:n])),  # truncated
        valid.map(lambda data: data + data),  # two writes run together
        st.binary(max_size=64),
        st.sampled_from([b"", b"\n", b"\x00" * 34, b"7" * 100_000, "é".encode() * 20]),
        st.sampled_from([MISSING, DIRECTORY, LOOP]),  # a loop fails to open even as root
    )


txids = st.integers(0, 2**64 - 1)
POSITIONS = file_states(st.builds(lambda t, c: format_pos(Pos(t, c)), txids, txids))
LAGS = file_states(st.integers(-(2**31), 2**31 - 1).map(lambda ms: b"%+010d\n" % ms))
HOSTS = st.sampled_from([b"node-a", b"127.0.0.1", b"primary.internal:20202"]) | st.binary(max_size=40)
PRIMARIES = file_states(HOSTS.map(lambda host: host + b"\n"))


def lay_out(mount: str, name: str, state: object) -> None:
    path = os.path.join(mount, name)
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    if state == DIRECTORY:
        os.mkdir(path)
    elif state == LOOP:
        os.symlink(path, path)
    elif state != MISSING:
        with open(path, "wb") as f:
            f.write(state)


@pytest.fixture(scope="module")
def mount_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="litefs-fuzz-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the readers -----------------------------------------------------------------------------


@FUZZ
@given(pos=POSITIONS, primary=PRIMARIES, lag=LAGS)
def test_control_file_readers_never_raise(mount_dir, pos, primary, lag):
    for name, state in (("app.db-pos", pos), (".primary", primary), (".lag", lag)):
        lay_out(mount_dir, name, state)
    node = Node(mount_dir)

    read = node.pos("app.db")
    if isinstance(pos, bytes):
        assert read == parse_pos(pos)
        assert read is None or format_pos(read) == pos  # only LiteFS's exact format counts
    else:
        assert read is None

    host = node.primary()
    assert host is None or (valid_hostname(host) and isinstance(primary, bytes))
    assert node.is_primary() == (primary == MISSING)

    ms = node.lag()
    assert ms is None or -(2**31) <= ms < 2**31 or lag == MISSING
    if lag == MISSING:
        assert ms == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway; the symlink loop covers it")
def test_unreadable_control_files_read_as_absent_or_unhealthy(tmp_path):
    for name in ("app.db-pos", ".primary", ".lag"):
        (tmp_path / name).write_bytes(b"0000000000000001/0000000000000001\n")
        (tmp_path / name).chmod(0)
    node = Node(str(tmp_path))
    assert node.pos("app.db") is None and node.primary() is None and node.lag() is None
    assert node.is_primary() is False  # a .primary is there: this node is not the primary


# -- the middleware --------------------------------------------------------------------------

# Header values as a server hands them over: latin-1 text, control characters included.
LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
values = st.text(LATIN1, max_size=40)
header_names = st.text(st.sampled_from("abcXYZ019-_ .:;é\t"), min_size=1, max_size=12) | st.sampled_from(
    [
        "Cookie",
        "Connection",
        "Transfer-Encoding",
        "Content-Length",
        "Upgrade",
        "Host",
        "X-LiteFS-Forwarded",
        "Fly-Replay-Src",
        "X-Forwarded-For",
        "Expect",
        "Keep-Alive",
    ]
)
signed = st.builds(lambda t: TxidCookie(["app.db"], 300, SECRET).header({"app.db": t}, False), txids).map(
    lambda header: header.split(";", 1)[0]
)


def _mutate(cookie: str, where: int, char: str, cut: bool) -> str:
    """One character of a cookie replaced (or the cookie cut there): a tampered signed cookie."""
    where %= len(cookie)
    return cookie[:where] if cut else cookie[:where] + char + cookie[where + 1 :]


cookies = st.one_of(
    st.builds(lambda t: f"__txid={t:016x}", txids),
    st.builds(lambda t: f"__txid={t:016x}", st.integers(0, 8)),
    signed,
    st.builds(_mutate, signed, st.integers(7, 200), st.characters(min_codepoint=0, max_codepoint=255), st.booleans()),
    # The signed format's shape, TXIDs.expiry.signature, with anything in each part.
    st.builds(lambda a, b, c: f"__txid={a}.{b}.{c}", values, values, values),
    st.builds(lambda v: f"__txid={v}", values),
    st.builds(lambda a, b: f"{a}; __txid={b}; __txid=0000000000000001", values, values),
    values,
)
paths = st.one_of(
    st.sampled_from(["/", "/litefs/health", "/static/x.png", "/always/x", "//evil.example/x", "/%2e%2e/"]),
    st.text(LATIN1, max_size=30).map(lambda p: "/" + p),
    st.text(LATIN1, max_size=30),
)
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]) | st.text(
    st.sampled_from("GETPOSTx-_ é\r\n"), min_size=1, max_size=8
)


@st.composite
def environs(draw) -> dict:
    body = draw(st.binary(max_size=256))
    path = draw(paths)
    environ = {
        "REQUEST_METHOD": draw(methods),
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": draw(values),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8080",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": draw(st.sampled_from(["http", "https"])),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if draw(st.booleans()):
        environ["RAW_URI"] = draw(st.sampled_from([path, "/" + path, "//x", "*"]) | values)
    length = draw(st.sampled_from([str(len(body)), "", "0", "-1", "abc", " 5", "99999", "1e3"]))
    if length:
        environ["CONTENT_LENGTH"] = length
    if draw(st.booleans()):
        environ["HTTP_COOKIE"] = draw(cookies)
    for name, value in draw(st.dictionaries(header_names, values, max_size=4)).items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in ("HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"):
            continue  # a WSGI server never sets those
        environ[key] = value
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        environ["wsgi.input_terminated"] = True
    return environ


def _app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app"]


@pytest.fixture(scope="module")
def primary_url() -> Iterator[str]:
    """A real primary on 127.0.0.1 that every forwarded write reaches, whatever .primary says."""
    with serve(_app) as url:
        yield url


@pytest.fixture(scope="module")
def middlewares(mount_dir, primary_url) -> list[LiteFSMiddleware]:
    # The long run looks for exceptions, not for timing: its waits are as short as can be.
    wait = 0.002 if FUZZING else 0.05
    quick = dict(
        db="app.db",
        mount_dir=mount_dir,
        poll_timeout=wait,
        primary_redirect_timeout=wait,
        connect_timeout=0,
        read_timeout=10,
        passthrough=["/static/*"],
        always_forward=["/always*"],
        # {hostname} goes in the path: every request stays on 127.0.0.1.
        primary_url=primary_url + "/via-{hostname}",
    )
    return [
        LiteFSMiddleware(_app, forward="http", **quick),
        LiteFSMiddleware(_app, forward="fly-replay", cookie_secret=SECRET, max_lag=1, **quick),
        LiteFSMiddleware(
            _app, forward="http", cookie_secret=SECRET, max_waiters=1, max_lag=0, require_mount=True, **quick
        ),
    ]


@FUZZ
@given(
    which=st.integers(0, 2),
    environ=environs(),
    pos=POSITIONS,
    primary=PRIMARIES,
    lag=LAGS,
)
def test_middleware_answers_only_documented_statuses(mount_dir, middlewares, which, environ, pos, primary, lag):
    for name, state in (("app.db-pos", pos), (".primary", primary), (".lag", lag)):
        lay_out(mount_dir, name, state)
    app_iter, status, headers = run_wsgi_app(middlewares[which], environ, buffered=True)
    body = b"".join(app_iter)
    code = int(status.split(" ", 1)[0])
    assert code in DOCUMENTED, (status, body)
    assert b"Traceback" not in body
    if code != 200 and body != b"app":
        # Ours, or the primary's own error page for a request it refuses (werkzeug's server and
        # its HTTPException write the doctype in different cases).
        assert body.startswith((b"Proxy", b"Replication lag exceeded")) or body.lower().startswith(b"<!doctype html>")


@examples(300)
@given(header=cookies | values, secret=st.sampled_from([None, SECRET, "é secret", "x"]), dbs=st.integers(1, 3))
def test_reading_a_cookie_never_raises(header, secret, dbs):
    names = ["app.db", "b.db", "c.db"][:dbs]
    read = TxidCookie(names, 300, secret).read({"HTTP_COOKIE": header})
    assert read is None or (
        set(read) == set(names) and all(0 <= t < 2**64 for t in read.values()) and any(read.values())
    )


# -- the same through gunicorn: bytes on a socket ----------------------------------------------

TOKEN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_!#$%&'*+.^`|~"), min_size=1, max_size=12)
raw_values = st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v)
raw_heads = st.builds(
    lambda method, target, fields, cookie: (
        b"%s %s HTTP/1.1\r\nHost: x\r\n%s%s\r\n"
        % (method, target, b"".join(b"%s: %s\r\n" % field for field in fields), cookie)
    ),
    st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE", b"OPTIONS"]) | TOKEN.map(str.encode),
    st.sampled_from([b"/", b"/litefs/health", b"/static/a", b"*", b"http://evil.example/x", b"//x"])
    | st.binary(min_size=1, max_size=30).filter(lambda t: not set(t) & set(b" \r\n")),
    st.lists(st.tuples(TOKEN.map(str.encode) | st.binary(max_size=10), raw_values), max_size=4),
    st.sampled_from([b"", b"Cookie: __txid=0000000000000009\r\n", b"Cookie: __txid=ffffffffffffffff\r\n"])
    | raw_values.map(lambda v: b"Cookie: __txid=" + v + b"\r\n"),
)
# What gunicorn answers itself to a request it cannot parse, besides the middleware's own.
GUNICORN_REFUSALS = {400, 403, 404, 405, 414, 417, 431, 501}


@pytest.fixture(scope="module")
def gunicorn_proxy(tmp_path_factory, primary_url) -> Iterator[str]:
    from test_faults import proxy

    from litefs_wsgi.testing import LiteFSMount

    tmp = tmp_path_factory.mktemp("fuzz-proxy")
    mount = LiteFSMount(tmp / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 5)
    options = dict(poll_timeout="50ms", passthrough="[/static/*]", read_timeout="5s")
    with proxy(tmp, mount, primary_url.removeprefix("http://"), threads=4, **options) as url:
        yield url


@examples(60, share=10)
@given(head=raw_heads, body=st.binary(max_size=64))
def test_proxy_under_gunicorn_never_answers_500(gunicorn_proxy, head, body):
    from test_faults import exchange

    data = head.replace(b"Host: x\r\n", b"Host: x\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body)) + body
    answer = exchange(gunicorn_proxy, data)
    code = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None
    assert code in DOCUMENTED | GUNICORN_REFUSALS, answer[:300]
    assert b"Traceback" not in answer
