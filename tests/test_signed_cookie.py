"""The signed ``__txid`` cookie: it round-trips primary to replica, and anything forged is ignored."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading

import pytest
import urllib3
from servers import serve, wait_until
from werkzeug.http import parse_cookie
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.cookie import TxidCookie
from litefs_wsgi.testing import LiteFSMount

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret, shared by every node"


def items_app(mount: LiteFSMount, primary: bool = True):
    """POST adds a row to app.db, GET counts them: a real SQLite database in the mount."""

    def app(environ, start_response):
        request = Request(environ)
        with sqlite3.connect(mount.db_path("app.db")) as db:
            db.execute("CREATE TABLE IF NOT EXISTS items (name TEXT)")
            if request.method == "POST":
                db.execute("INSERT INTO items VALUES (?)", (request.get_data(as_text=True),))
            count = db.execute("SELECT count(*) FROM items").fetchone()[0]
        return Response(str(count))(environ, start_response)

    return mount.committing(app) if primary else app


def cookie_value(set_cookie: str) -> str:
    return parse_cookie(set_cookie.split(";", 1)[0])["__txid"]


def signed(txid: int, secret: str = SECRET, expiry: float = 300) -> str:
    return cookie_value(TxidCookie(["app.db"], expiry, secret).header({"app.db": txid}, secure=False))


# -- the round trip --------------------------------------------------------------------------


def test_signed_cookie_round_trips_from_primary_to_replica(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    primary_app = LiteFSMiddleware(items_app(primary), db="app.db", mount_dir=primary.path, cookie_secret=SECRET)
    with serve(primary_app) as primary_url:
        replica.make_replica(primary_url.removeprefix("http://"))
        replica.set_position("app.db", 0)  # the database exists, empty
        replica_app = LiteFSMiddleware(
            items_app(replica, primary=False),
            db="app.db",
            mount_dir=replica.path,
            cookie_secret=SECRET,
            primary_url="http://{hostname}",
            poll_timeout=30,
        )
        with serve(replica_app) as replica_url:
            write = urllib3.request("POST", replica_url + "/items", body=b"first", timeout=20, retries=False)
            assert write.status == 200 and write.data == b"1"
            set_cookie = write.headers["Set-Cookie"]
            value = cookie_value(set_cookie)
            txid, expires, signature = value.split(".")
            assert int(txid, 16) == primary.position("app.db") > 0
            assert re.fullmatch("[0-9a-f]{16}", txid) and re.fullmatch("[0-9a-f]{32}", signature)
            assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie

            # The replica has not caught up: the read waits for it, then sees the write.
            answers = []
            reader = threading.Thread(
                target=lambda: answers.append(
                    urllib3.request("GET", replica_url + "/items", headers={"Cookie": f"__txid={value}"}, timeout=30)
                )
            )
            reader.start()
            wait_until(lambda: replica_app.watcher.waiting == 1, 20, "the read to wait")
            replica.replicate(primary, "app.db")
            reader.join(30)
            assert answers and answers[0].status == 200 and answers[0].data == b"1"


# -- forged, stale and foreign cookies -------------------------------------------------------


@pytest.fixture
def replica(tmp_path) -> Client:
    """A replica at TXID 2 whose reads would wait 300 ms, then answer 504."""
    mount = LiteFSMount(tmp_path / "replica")
    mount.make_replica("127.0.0.1:1")
    mount.set_position("app.db", 2)
    app = LiteFSMiddleware(_ok, db="app.db", mount_dir=mount.path, cookie_secret=SECRET, poll_timeout=0.3)
    return Client(app, use_cookies=False)


def _ok(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"served"]


def _tamper_txid(value: str) -> str:
    txid, rest = value.split(".", 1)
    return "0000000000000009." + rest if txid != "0000000000000009" else "000000000000000a." + rest


def _tamper_signature(value: str) -> str:
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def _extend_expiry(value: str) -> str:
    txid, _, signature = value.split(".")
    return f"{txid}.ffffffffff.{signature}"


FORGED = {
    "unsigned": lambda: "00000000000000ff",
    "txid changed": lambda: _tamper_txid(signed(0xFF)),
    "signature changed": lambda: _tamper_signature(signed(0xFF)),
    "expiry extended": lambda: _extend_expiry(signed(0xFF)),
    "truncated by one": lambda: signed(0xFF)[:-1],
    "signature cut off": lambda: signed(0xFF).rsplit(".", 1)[0],
    "signature empty": lambda: signed(0xFF).rsplit(".", 1)[0] + ".",
    "only the txid": lambda: signed(0xFF).split(".")[0],
    "expired": lambda: signed(0xFF, expiry=-60),
    "wrong secret": lambda: signed(0xFF, secret="another secret"),
    "non-ascii signature": lambda: signed(0xFF)[:-2] + "é!",
}


@pytest.mark.parametrize("name", FORGED)
def test_forged_cookie_is_ignored_and_the_read_served_at_once(replica, name):
    answer = replica.get("/", headers={"Cookie": f"__txid={FORGED[name]()}"})
    assert answer.status_code == 200 and answer.data == b"served"


def test_genuine_cookie_ahead_still_waits(replica):
    # The control for the test above: the same cookie, signed, makes the read wait and time out.
    answer = replica.get("/", headers={"Cookie": f"__txid={signed(0xFF)}"})
    assert answer.status_code == 504 and answer.data == b"Proxy timeout\n"
    assert replica.get("/", headers={"Cookie": f"__txid={signed(2)}"}).status_code == 200


# -- without a secret ------------------------------------------------------------------------


def test_without_a_secret_the_cookie_is_litefs_own(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    client = Client(LiteFSMiddleware(items_app(mount), db="app.db", mount_dir=mount.path), use_cookies=False)
    set_cookie = client.post("/items", data=b"x").headers["Set-Cookie"]
    assert re.fullmatch(r"__txid=0000000000000002; Path=/; Expires=[^;]+ GMT; HttpOnly; SameSite=Lax", set_cookie), (
        set_cookie
    )
    # A signed cookie means nothing to a node without the secret: it reads as no cookie.
    mount.set_position("app.db", 1)
    waiting = Client(LiteFSMiddleware(_ok, db="app.db", mount_dir=mount.path, poll_timeout=0.3), use_cookies=False)
    assert waiting.get("/", headers={"Cookie": f"__txid={signed(9)}"}).status_code == 200
    assert waiting.get("/", headers={"Cookie": "__txid=0000000000000009"}).status_code == 504


# -- a cookie absurdly far ahead -------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, SECRET])
def test_cookie_far_ahead_is_logged_as_forged_or_stale(tmp_path, caplog, secret):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_replica("127.0.0.1:1")
    mount.set_position("app.db", 2)
    app = LiteFSMiddleware(_ok, db="app.db", mount_dir=mount.path, cookie_secret=secret, poll_timeout=0.1)
    client = Client(app, use_cookies=False)
    far, near = 2 + 10**9, 3
    if secret:
        far, near = signed(far), signed(near)
    else:
        far, near = f"{far:016x}", f"{near:016x}"
    with caplog.at_level(logging.INFO, logger="litefs_wsgi"):
        assert client.get("/", headers={"Cookie": f"__txid={near}"}).status_code == 504
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert client.get("/", headers={"Cookie": f"__txid={far}"}).status_code == 504
        # A flood of them is logged once, not once per request.
        assert client.get("/", headers={"Cookie": f"__txid={far}"}).status_code == 504
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1000000000 ahead" in warnings[0] and "forged or stale" in warnings[0]


@pytest.mark.parametrize(
    "value",
    [
        "é.1.x",  # non-ASCII in the TXIDs: once an exception out of the middleware (a 500)
        "0000000000000001é.1.0123456789abcdef0123456789abcdef",
        "0000000000000001.é.x",
        "0000000000000001.1.é",
        "0000000000000001.1_0.x",
        "0000000000000001.-1.x",
        "0000000000000001.ffffffffffffffffff.x",
        ".1.",
        "..",
        "\x00.\x00.\x00",
    ],
)
def test_a_malformed_signed_cookie_reads_as_none_under_a_real_server(tmp_path, value):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 1)
    assert TxidCookie(["app.db"], 300, SECRET).read({"HTTP_COOKIE": "__txid=" + value}) is None
    app = LiteFSMiddleware(items_app(mount), db="app.db", mount_dir=mount.path, cookie_secret=SECRET)
    with serve(app) as url:
        http = urllib3.PoolManager(timeout=20, retries=False)
        response = http.request(
            "GET", url + "/", headers={"Cookie": ("__txid=" + value).encode("utf-8").decode("latin-1")}
        )
    assert (response.status, response.data) == (200, b"0")
