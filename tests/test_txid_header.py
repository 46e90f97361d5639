"""``txid_header``: read-your-writes for clients that keep no cookies, in-process, forwarded over
HTTP between two gunicorn nodes, and through the standalone proxy."""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

import pytest
from fwd_client import request, txid_cookie
from proxy_target import Target
from servers import ROOT, gunicorn, in_thread, proxy_config, serve, standalone_proxy, unreleased, wait_until
from werkzeug.test import Client

from litefs_wsgi import Config, ConfigError, LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

HEADER = "LiteFS-TXID"
GARBAGE = ["zz", "5", "0000000000000000", "00000000000000050", "0x00000000000005", "0000000000000005-1", " , "]


class App:
    """A WSGI app answering 200 ``app``; ``before`` runs first (a commit moving ``-pos``)."""

    def __init__(self, before=None, headers=()):
        self.before, self.headers, self.calls = before, list(headers), 0

    def __call__(self, environ, start_response):
        self.calls += 1
        if self.before is not None:
            self.before()
        start_response("200 OK", [("Content-Type", "text/plain"), *self.headers])
        return [b"app"]


def client(mount: LiteFSMount, app, **options) -> tuple[Client, LiteFSMiddleware]:
    options = {"db": "app.db", "mount_dir": mount.path, "txid_header": HEADER, "forward": "fly-replay", **options}
    middleware = LiteFSMiddleware(app, **options)
    return Client(middleware), middleware


def cookie_value(response) -> str:
    values = [v for v in response.headers.getlist("Set-Cookie") if v.startswith("__txid=")]
    assert len(values) == 1, values
    return values[0].split(";")[0][len("__txid=") :]


def read_in_thread(c: Client, **kwargs):
    thread, result = in_thread(lambda: c.get("/", **kwargs))
    return thread, result


# -- the option --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("LiteFS_TXID", "has '_'"),
        ("LiteFS TXID", "is not an HTTP header name"),
        ("LiteFS-TXID:", "is not an HTTP header name"),
        ("Set-Cookie", "already has a meaning"),
        ("connection", "already has a meaning"),
        ("Transfer-Encoding", "already has a meaning"),
        ("X-LiteFS-Forwarded", "already has a meaning"),
        (7, "expected a string"),
    ],
)
def test_a_bad_header_name_is_a_config_error(mount, value, message):
    with pytest.raises(ConfigError, match=f"^txid_header: .*{message}"):
        LiteFSMiddleware(App(), db="app.db", mount_dir=mount.path, txid_header=value)


def test_the_option_is_off_by_default_and_read_from_the_environment(mount):
    assert Config(db="app.db").txid_header is None
    assert Config(db="app.db", txid_header="").txid_header is None
    config = Config.load(env={"LITEFS_PROXY_TXID_HEADER": "X-TXID"}, db="app.db")
    assert config.txid_header == "X-TXID"
    with pytest.raises(ConfigError, match=r"^txid_header: .*\(set by LITEFS_PROXY_TXID_HEADER\)"):
        Config.load(env={"LITEFS_PROXY_TXID_HEADER": "X_TXID"}, db="app.db")


# -- in-process ----------------------------------------------------------------------------


def test_a_write_carries_the_cookies_value_in_the_header(mount):
    mount.set_position("app.db", 6)
    c, _ = client(mount, App(before=lambda: mount.set_position("app.db", 7)))
    response = c.post("/")
    assert cookie_value(response) == "0000000000000007"
    assert response.headers.getlist(HEADER) == ["0000000000000007"]


def test_a_signed_cookie_and_its_header_are_the_same_and_both_read(mount):
    mount.set_position("app.db", 6)
    app = App(before=lambda: mount.set_position("app.db", 7))
    c, _ = client(mount, app, cookie_secret="s3cret", poll_timeout="30s")
    response = c.post("/")
    value = cookie_value(response)
    assert value.startswith("0000000000000007.") and response.headers.getlist(HEADER) == [value]
    mount.set_position("app.db", 8)
    assert c.get("/", headers={HEADER: value}).status_code == 200  # a valid signed value is read
    # An unsigned value, with a secret, is garbage: served at once although it is far ahead.
    c2, _ = client(mount, App(), cookie_secret="s3cret", poll_timeout="30s")
    assert c2.get("/", headers={HEADER: "00000000000000ff"}).status_code == 200


def test_no_header_without_the_option_on_reads_or_before_the_database_exists(mount):
    c, _ = client(mount, App(), txid_header=None)
    mount.set_position("app.db", 3)
    response = c.post("/")
    assert cookie_value(response) == "0000000000000003" and HEADER not in response.headers
    c, _ = client(mount, App())
    assert HEADER not in c.get("/").headers
    mount.remove_position("app.db")
    response = c.post("/")
    assert HEADER not in response.headers and "Set-Cookie" not in response.headers


def test_the_apps_own_header_of_that_name_is_replaced(mount):
    mount.set_position("app.db", 3)
    c, _ = client(mount, App(headers=[("litefs-txid", "app's"), ("X-Other", "kept")]))
    response = c.post("/")
    assert response.headers.getlist(HEADER) == ["0000000000000003"]
    assert response.headers["X-Other"] == "kept"


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_a_read_with_the_header_ahead_waits_then_504(mount, replica, role):
    node = mount if role == "primary" else replica
    node.set_position("app.db", 4)
    app = App()
    c, middleware = client(node, app, poll_timeout="1s")
    thread, result = read_in_thread(c, headers={HEADER: "0000000000000005"})
    wait_until(lambda: unreleased(middleware.watcher) == [{"app.db": 5}] or result, 20, "the read to wait")
    thread.join(30)
    assert result[0].status_code == 504 and result[0].get_data() == b"Proxy timeout\n"
    assert app.calls == 0


def test_a_read_with_the_header_runs_once_the_position_arrives(replica):
    replica.set_position("app.db", 4)
    app = App()
    c, middleware = client(replica, app, poll_timeout="30s")
    thread, result = read_in_thread(c, headers={HEADER: "0000000000000006"})
    wait_until(lambda: middleware.watcher.waiting == 1, 20, "the read to wait")
    assert app.calls == 0 and unreleased(middleware.watcher) == [{"app.db": 6}]
    replica.set_position("app.db", 6)
    thread.join(30)
    assert result[0].status_code == 200 and app.calls == 1


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_in_the_header_is_no_header(replica, garbage):
    replica.set_position("app.db", 4)
    app = App()
    c, middleware = client(replica, app, poll_timeout="30s")
    with_cookie = {"Cookie": "__txid=0000000000000003"}  # satisfied: the read does not wait for it
    for headers in ({HEADER: garbage}, {HEADER: garbage, **with_cookie}):
        assert c.get("/", headers=headers).status_code == 200  # at once: a wait would be 30 s
    assert app.calls == 2 and middleware.watcher.waiting == 0


def test_the_header_is_ignored_without_the_option(replica):
    replica.set_position("app.db", 4)
    c, _ = client(replica, App(), txid_header=None, poll_timeout="30s")
    assert c.get("/", headers={HEADER: "00000000000000ff"}).status_code == 200


@pytest.mark.parametrize(("cookie", "header"), [(3, 9), (9, 3)])
def test_cookie_and_header_together_wait_for_the_higher(replica, cookie, header):
    replica.set_position("app.db", 5)
    c, middleware = client(replica, App(), poll_timeout="30s")
    c.set_cookie("__txid", f"{cookie:016x}")
    thread, result = read_in_thread(c, headers={HEADER: f"{header:016x}"})
    wait_until(lambda: middleware.watcher.waiting == 1, 20, "the read to wait")
    assert unreleased(middleware.watcher) == [{"app.db": 9}]
    replica.set_position("app.db", 9)
    thread.join(30)
    assert result[0].status_code == 200


def test_several_databases_take_the_higher_of_each(tmp_path):
    node = LiteFSMount(tmp_path / "node")
    node.make_replica("node-a")
    node.set_position("a.db", 1)
    node.set_position("b.db", 1)
    c, middleware = client(node, App(), db=["a.db", "b.db"], poll_timeout="30s")
    c.set_cookie("__txid", f"{8:016x}-{2:016x}")
    thread, result = read_in_thread(c, headers={HEADER: f"{3:016x}-{7:016x}"})
    wait_until(lambda: middleware.watcher.waiting == 1, 20, "the read to wait")
    assert unreleased(middleware.watcher) == [{"a.db": 8, "b.db": 7}]
    node.set_position("a.db", 8)
    node.set_position("b.db", 7)
    thread.join(30)
    assert result[0].status_code == 200


# -- forwarded over HTTP: a replica's gunicorn sends the write to the primary's ---------------


@contextlib.contextmanager
def fwd_node(mount: LiteFSMount, **options: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
    env.update({"FWD_MOUNT": mount.path, "LITEFS_PROXY_TXID_HEADER": HEADER})
    env.update({"LITEFS_PROXY_" + k.upper(): v for k, v in options.items()})
    args = ["-w", "1", "--threads", "4", "--timeout", "60", "fwd_app:application"]
    with gunicorn(args, env=env, cwd=os.path.join(ROOT, "tests")) as (url, _proc):
        yield urlsplit(url).port


def test_the_primarys_header_comes_back_through_http_forwarding(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("127.0.0.1")
    with (
        fwd_node(primary) as primary_port,
        fwd_node(replica, primary_url=f"http://{{hostname}}:{primary_port}", poll_timeout="500ms") as replica_port,
    ):
        status, headers, _ = request(replica_port, "POST", "/echo", body=b"write")
        assert status == 200
        txid = txid_cookie(headers)
        assert txid == primary.position("app.db") and txid > 0
        assert headers.get_all(HEADER) == [f"{txid:016x}"]  # relayed, once, as the cookie's value

        # The replica is behind: a read with the header (and no cookie) waits, then 504.
        replica.set_position("app.db", txid - 1)
        status, _, body = request(replica_port, "GET", "/echo", headers={HEADER: f"{txid:016x}"})
        assert (status, body) == (504, b"Proxy timeout\n")
        for garbage in GARBAGE:
            assert request(replica_port, "GET", "/echo", headers={HEADER: garbage})[0] == 200
        replica.replicate(primary, "app.db")
        assert request(replica_port, "GET", "/echo", headers={HEADER: f"{txid:016x}"})[0] == 200


# -- the standalone proxy --------------------------------------------------------------------


def test_the_standalone_proxy_sets_and_reads_the_header(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 1)
    app = Target(mount)
    with serve(app) as target:
        config = proxy_config(tmp_path, mount, urlsplit(target).netloc, txid_header=HEADER, poll_timeout="500ms")
        with standalone_proxy(config, threads=4) as url:
            port = urlsplit(url).port
            status, headers, _ = request(port, "POST", "/echo", body=b"write")
            assert status == 200
            txid = txid_cookie(headers)
            assert txid == mount.position("app.db") == 2
            assert headers.get_all(HEADER) == [f"{txid:016x}"]

            before = len(app.requests)
            status, _, body = request(port, "GET", "/echo", headers={HEADER: f"{txid + 1:016x}"})
            assert (status, body) == (504, b"Proxy timeout\n")
            assert len(app.requests) == before  # it never reached the app
            for garbage in GARBAGE:
                assert request(port, "GET", "/echo", headers={HEADER: garbage})[0] == 200
            assert request(port, "GET", "/echo", headers={HEADER: f"{txid:016x}"})[0] == 200
