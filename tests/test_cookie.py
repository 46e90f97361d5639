"""The ``__txid`` cookie: LiteFS's format, SameSite and Secure, bad cookies ignored."""

import os
import re
import socket
import time
from email.utils import parsedate_to_datetime

import pytest
from servers import gunicorn
from werkzeug.test import Client, create_environ

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.cookie import TxidCookie
from litefs_wsgi.testing import LiteFSMount


def attributes(header):
    """``Set-Cookie`` as (name=value, {attribute (lower case): value})."""
    first, *rest = [part.strip() for part in header.split(";")]
    attrs = {}
    for part in rest:
        key, _, value = part.partition("=")
        attrs[key.lower()] = value
    return first, attrs


def environ_with(cookie):
    return create_environ("/", headers={"Cookie": cookie} if cookie is not None else {})


def test_header_has_litefs_format():
    before = time.time()
    value, attrs = attributes(TxidCookie(["app.db"], expiry=300).header({"app.db": 0x2A}, secure=False))
    assert value == "__txid=000000000000002a"
    assert attrs["path"] == "/"
    assert "httponly" in attrs
    assert attrs["samesite"] == "Lax"
    assert "secure" not in attrs
    expires = parsedate_to_datetime(attrs["expires"]).timestamp()
    # Expires has a resolution of one second.
    assert before + 300 - 1 <= expires <= time.time() + 300 + 1


def test_header_is_byte_for_byte_go_order():
    """LiteFS's Go writes Path, Expires, HttpOnly in this order; ours add Secure, SameSite."""
    header = TxidCookie(["app.db"], expiry=300).header({"app.db": 7}, secure=True)
    assert re.fullmatch(
        r"__txid=0000000000000007; Path=/; Expires=\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT; "
        r"HttpOnly; Secure; SameSite=Lax",
        header,
    ), header


def test_header_secure():
    _, attrs = attributes(TxidCookie(["app.db"], expiry=60).header({"app.db": 1}, secure=True))
    assert "secure" in attrs


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("__txid=0000000000000007", {"app.db": 7}),
        ("__txid=00000000000000FF", {"app.db": 255}),
        ("other=1; __txid=0000000000000007; more=2", {"app.db": 7}),
        ('__txid="0000000000000007"', {"app.db": 7}),
        ("__txid=0000000000000007; __txid=00000000000000ff", {"app.db": 7}),  # the first, as Go's r.Cookie
        # Two Cookie lines, as WSGI servers join them: Go reads each line on its own.
        ("theme=dark,__txid=0000000000000007", {"app.db": 7}),
        ("__txid=0000000000000007,theme=dark", {"app.db": 7}),
        ("a=1; b=2, __txid=0000000000000007; c=3", {"app.db": 7}),
    ],
)
def test_read(cookie, expected):
    assert TxidCookie(["app.db"], 300).read(environ_with(cookie)) == expected


@pytest.mark.parametrize(
    "cookie",
    [
        None,
        "",
        "other=0000000000000007",
        "__txid=",
        "__txid=0000000000000000",  # zero: nothing to wait for
        "__txid=7",
        "__txid=000000000000007",
        "__txid=00000000000000007",
        "__txid=0x00000000000007",
        "__txid=+000000000000007",
        "__txid=0000_00000000007",
        # WSGI gives header bytes as latin-1: Arabic-Indic digits sent in UTF-8.
        "__txid=" + ("\u0660" * 15 + "\u0661").encode().decode("latin-1"),
        "__txid=\xff\xfe0000000000000007",  # not UTF-8 at all
        "__txid=zzzzzzzzzzzzzzzz",
        "__txid=0000000000000007-0000000000000008",  # two TXIDs for one database
    ],
)
def test_read_ignores_missing_invalid_and_zero(cookie):
    assert TxidCookie(["app.db"], 300).read(environ_with(cookie)) is None


@pytest.mark.parametrize(
    ("txid", "status"), [("0000000000000001", "201 Created"), ("0000000000000002", "504 Gateway Timeout")]
)
def test_non_utf8_header_neither_breaks_nor_hides_the_cookie(mount, txid, status):
    # Another cookie's stray bytes must not turn a read into a 500, nor lose the __txid:
    # at position 1 a cookie for 1 is served, one for 2 waits and times out.
    mount.set_position("app.db", 1)
    middleware = LiteFSMiddleware(writer, db="app.db", mount_dir=mount.path, poll_timeout="200ms")
    environ = create_environ("/", headers={"Cookie": f"a=\xff\xfe; __txid={txid}"})
    statuses = []
    body = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == [status]
    assert b"".join(body) == (b"written" if status.startswith("201") else b"Proxy timeout\n")


def test_several_databases_round_trip():
    cookie = TxidCookie(["a.db", "b.db"], 300)
    value, _ = attributes(cookie.header({"a.db": 3, "b.db": 0}, secure=False))
    assert value == "__txid=0000000000000003-0000000000000000"
    assert cookie.read(environ_with(value)) == {"a.db": 3, "b.db": 0}
    assert cookie.read(environ_with("__txid=0000000000000000-0000000000000000")) is None
    assert cookie.read(environ_with("__txid=0000000000000003")) is None


def test_signed_cookie_round_trips_and_refuses_forgeries():
    cookie = TxidCookie(["app.db"], 300, secret="s3cret")
    value, _ = attributes(cookie.header({"app.db": 9}, secure=False))
    assert value.startswith("__txid=0000000000000009.")
    assert cookie.read(environ_with(value)) == {"app.db": 9}
    assert cookie.read(environ_with("__txid=0000000000000009")) is None
    forged = value.replace("0000000000000009", "00000000000f4240")
    assert cookie.read(environ_with(forged)) is None
    assert TxidCookie(["app.db"], 300, secret="other").read(environ_with(value)) is None


def test_signed_cookie_expires():
    cookie = TxidCookie(["app.db"], -10, secret="s3cret")
    value, _ = attributes(cookie.header({"app.db": 9}, secure=False))
    assert cookie.read(environ_with(value)) is None


# -- through the middleware ----------------------------------------------------------------


def writer(environ, start_response):
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"written"]


@pytest.mark.parametrize(("scheme", "secure"), [("http", False), ("https", True)])
def test_middleware_cookie_secure_iff_https(mount, scheme, secure):
    mount.set_position("app.db", 0x1F)
    client = Client(LiteFSMiddleware(writer, db="app.db", mount_dir=mount.path, cookie_expiry="2m"))
    response = client.post("/", base_url=f"{scheme}://localhost/")
    value, attrs = attributes(response.headers["Set-Cookie"])
    assert value == "__txid=000000000000001f"
    assert ("secure" in attrs) is secure
    assert attrs["samesite"] == "Lax"
    assert attrs["path"] == "/"
    assert "httponly" in attrs
    expires = parsedate_to_datetime(attrs["expires"]).timestamp()
    assert time.time() + 60 < expires < time.time() + 181


def test_middleware_ignores_invalid_cookie(mount):
    # The position is behind the cookie: a valid cookie would wait, an invalid one is ignored.
    mount.set_position("app.db", 1)
    seen = []

    def reader(environ, start_response):
        seen.append(environ.get("HTTP_COOKIE"))
        start_response("200 OK", [])
        return [b"read"]

    client = Client(LiteFSMiddleware(reader, db="app.db", mount_dir=mount.path, poll_timeout="10s"))
    for value in ["0x00000000000063", "000000000000063", "0000000000000000", "garbage"]:
        client.set_cookie("__txid", value)
        response = client.get("/")
        assert response.status_code == 200
        assert response.get_data() == b"read"
    # The cookie still reaches the app: the middleware reads it, it does not strip it.
    assert seen[-1] == "__txid=garbage"


@pytest.mark.parametrize(
    "lines",
    [
        ["Cookie: theme=dark", "Cookie: __txid=0000000000000009"],
        ["Cookie: __txid=0000000000000009", "Cookie: theme=dark"],
    ],
)
def test_a_cookie_on_a_second_cookie_line_is_waited_for_under_gunicorn(tmp_path, lines):
    """A client may send several Cookie lines; gunicorn joins them with ",". The __txid in
    either is the client's, as Go's r.Cookie finds it: the read waits for it (here, in vain)."""
    mount = LiteFSMount(str(tmp_path / "replica"))
    mount.make_replica("node-a")
    mount.set_position("app.db", 1)
    env = {"FWD_MOUNT": mount.path, "LITEFS_PROXY_POLL_TIMEOUT": "100ms"}
    with gunicorn(["-k", "gthread", "fwd_app:application"], env, cwd=os.path.dirname(__file__)) as (url, _):
        port = int(url.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            head = ["GET /whoami HTTP/1.1", "Host: x", "Connection: close", *lines]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 504") and answer.endswith(b"Proxy timeout\n"), answer
