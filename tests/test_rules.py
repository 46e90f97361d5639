"""Every request rule of LiteFS's proxy (SPEC.md section 2), through LiteFSMiddleware."""

from __future__ import annotations

import io
import logging
import sys
import threading

import pytest
import urllib3
from servers import NOT_PRIMARY, answers, in_thread, serve, unreleased, wait_until
from werkzeug.test import Client, create_environ

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount

TEXT = "text/plain; charset=utf-8"


class App:
    """A WSGI app that records what reached it and answers ``status``."""

    def __init__(self, status="200 OK", body=b"app", before=None, headers=()):
        self.status, self.body, self.before, self.headers = status, body, before, list(headers)
        self.calls: list[dict] = []

    def __call__(self, environ, start_response):
        self.calls.append(dict(environ))
        if self.before is not None:
            self.before()
        start_response(self.status, [("Content-Type", "text/plain"), *self.headers])
        return [self.body]


def client(mount, app, **options) -> tuple[Client, LiteFSMiddleware]:
    options.setdefault("forward", "fly-replay")
    middleware = LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, **options)
    return Client(middleware), middleware


@pytest.fixture
def replica(tmp_path):
    m = LiteFSMount(tmp_path / "replica")
    m.make_replica("node-a")
    return m


def cookie_of(response) -> str | None:
    values = response.headers.getlist("Set-Cookie")
    assert len(values) <= 1
    return values[0].split(";")[0] if values else None


def assert_error(response, status, body):
    assert response.status_code == status
    assert response.get_data() == body
    assert response.headers["Content-Type"] == TEXT


# -- 1. passthrough ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "passes"),
    [
        ("/static/app.css", True),
        ("/static/a/b/c.js", True),  # * matches /
        ("/static/", True),  # * matches nothing too
        ("/static", False),
        ("/x/static/app.css", False),  # the whole path must match
        ("/img/logo.png", True),
        ("/logo.png", True),
        ("/logo.png.bak", False),
        ("/logopng", False),  # "." is literal, not a regular expression's any character
        ("/debug/a/b", True),
        ("/debugger", False),
        ("/static/a%0Ab.css", False),  # Go's .* matches no line feed (the path is decoded)
        ("/img/a%0A.png", False),
    ],
)
def test_passthrough_patterns(replica, path, passes):
    app = App()
    c, _ = client(replica, app, passthrough=["/static/*", "*.png", "/debug/*"])
    response = c.post(path)
    if passes:
        assert response.get_data() == b"app" and len(app.calls) == 1
        assert "fly-replay" not in response.headers
    else:
        assert response.headers["fly-replay"] == "instance=node-a" and not app.calls


def test_passthrough_matches_the_path_not_the_query(replica):
    app = App()
    c, _ = client(replica, app, passthrough=["*.png"])
    assert c.post("/page?file=a.png").headers.get("fly-replay") == "instance=node-a"
    assert c.post("/a.png?v=2").get_data() == b"app"


def test_passthrough_does_not_wait_nor_set_cookie(mount):
    mount.set_position("app.db", 3)
    app = App()
    c, _ = client(mount, app, passthrough=["/static/*"], poll_timeout="2s")
    c.set_cookie("__txid", "0000000000000009")
    assert c.get("/static/a.css").status_code == 200  # the position is behind: no wait
    response = c.post("/static/upload")
    assert response.status_code == 200 and cookie_of(response) is None
    assert cookie_of(c.post("/other")) == "__txid=0000000000000003"  # a write elsewhere does


def test_passthrough_hides_health(mount):
    mount.set_lag(60_000)
    app = App(body=b"the app's own health")
    c, _ = client(mount, app, passthrough=["/litefs/*"], max_lag="1s")
    response = c.get("/litefs/health")
    assert response.status_code == 200 and response.get_data() == b"the app's own health"


# -- 2. health -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lag_ms", "max_lag", "healthy"),
    [
        (0, "10s", True),
        (463, "10s", True),
        (10_000, "10s", True),  # "over" is strictly greater
        (10_001, "10s", False),
        (250, "250ms", True),
        (251, "250ms", False),
        (-5, "1s", True),  # clock skew
        (2147483647, "10s", False),  # not synced yet
        (2147483647, 0, True),  # 0 turns the check off
        # A lag equal to max_lag is not over it, whatever the float of max_lag * 1000 rounds to
        # (4.007 * 1000 is 4006.9999999999995).
        (4007, "4007ms", True),
        (4008, "4007ms", False),
        (1001, 1.001, True),
        (1002, 1.001, False),
    ],
)
def test_health(replica, lag_ms, max_lag, healthy):
    replica.set_lag(lag_ms)
    app = App()
    c, _ = client(replica, app, max_lag=max_lag)
    response = c.get("/litefs/health")
    if healthy:
        assert response.status_code == 200 and response.get_data() == b"OK\n"
    else:
        assert_error(response, 503, b"Replication lag exceeded\n")
    assert not app.calls


@pytest.mark.parametrize(
    ("script_name", "path_info", "health"),
    [
        ("", "/litefs/health", True),
        ("/litefs", "/health", True),  # the app mounted at /litefs: the same path for LiteFS
        ("/litefs/health", "", True),
        ("/app", "/litefs/health", False),  # /app/litefs/health is the app's
        ("", "/litefs/healthz", False),
    ],
)
def test_health_is_the_whole_path_however_the_server_splits_it(replica, script_name, path_info, health):
    replica.set_lag(0)
    app = App()
    c, _ = client(replica, app)
    response = c.get(path_info, environ_overrides={"SCRIPT_NAME": script_name})
    assert (response.get_data() == b"OK\n") == health
    assert bool(app.calls) != health


def test_health_default_max_lag_is_10s(replica):
    c, _ = client(replica, App())
    replica.set_lag(10_000)
    assert c.get("/litefs/health").status_code == 200
    replica.set_lag(10_001)
    assert c.get("/litefs/health").status_code == 503


def test_health_without_lag_file_is_healthy(tmp_path):
    c, _ = client(LiteFSMount(tmp_path), App())
    response = c.get("/litefs/health")
    assert response.status_code == 200 and response.get_data() == b"OK\n"


@pytest.mark.parametrize("data", [b"", b"463\n", b"+00000x463\n", b"+000000463\n\n", b"garbage"])
def test_health_garbled_lag_is_unhealthy(replica, data):
    with open(f"{replica.path}/.lag", "wb") as f:
        f.write(data)
    c, _ = client(replica, App())
    assert_error(c.get("/litefs/health"), 503, b"Replication lag exceeded\n")


def test_health_is_only_get(mount, replica):
    replica.set_lag(60_000)
    app = App(body=b"app")
    c, _ = client(replica, app, max_lag="1s")
    assert c.head("/litefs/health").status_code == 200 and len(app.calls) == 1  # a read like any
    assert c.post("/litefs/health").headers["fly-replay"] == "instance=node-a"  # a write like any
    assert c.get("/litefs/health/").get_data() == b"app"  # another path
    mount.set_position("app.db", 4)
    c, _ = client(mount, App())
    response = c.post("/litefs/health")
    assert response.get_data() == b"app" and cookie_of(response) == "__txid=0000000000000004"


# -- 3. read or write ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "write"),
    [("GET", False), ("HEAD", False), ("POST", True), ("PUT", True), ("PATCH", True), ("DELETE", True),
     ("OPTIONS", True), ("PROPFIND", True)],
)  # fmt: skip
def test_methods(replica, method, write):
    app = App()
    c, _ = client(replica, app)
    response = c.open("/thing", method=method)
    assert ("fly-replay" in response.headers) is write
    assert len(app.calls) == (0 if write else 1)


def test_always_forward_turns_reads_into_writes(replica):
    app = App()
    c, _ = client(replica, app, always_forward=["/login", "/oauth/*"])
    for path in ["/login", "/oauth/callback"]:
        assert c.get(path).headers["fly-replay"] == "instance=node-a"
        assert c.head(path).headers["fly-replay"] == "instance=node-a"
    assert c.get("/login/help").get_data() == b"app"  # whole path only
    assert c.get("/").get_data() == b"app"
    assert len(app.calls) == 2


# -- 4. read -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cookie", [None, "", "zzzz", "00000000000000f", "00000000000000000f", "0x0000000000000f", "0000000000000000"]
)  # fmt: skip
def test_read_without_usable_cookie_is_served_at_once(mount, cookie):
    mount.set_position("app.db", 1)
    app = App()
    c, _ = client(mount, app, poll_timeout="2s")
    if cookie is not None:
        c.set_cookie("__txid", cookie)
    assert c.get("/").status_code == 200
    assert len(app.calls) == 1


def test_read_without_position_file_is_served_at_once(mount):
    app = App()
    c, _ = client(mount, app, poll_timeout="2s")
    c.set_cookie("__txid", "00000000000000ff")
    assert c.get("/").status_code == 200 and len(app.calls) == 1


@pytest.mark.parametrize("data", [b"", b"0000000000000009", b"garbage\n", b"0000000000000009/00000000DEADBEEF\n"])
def test_read_with_garbled_position_file_waits(mount, data):
    # The file exists, so the database does: its position is unknown, not "nothing to wait for".
    with open(f"{mount.path}/app.db-pos", "wb") as f:
        f.write(data)
    app = App()
    c, _ = client(mount, app, poll_timeout="200ms")
    c.set_cookie("__txid", "0000000000000005")
    assert_error(c.get("/"), 504, b"Proxy timeout\n")
    assert not app.calls


def test_read_waits_through_a_garbled_position_file(mount):
    with open(f"{mount.path}/app.db-pos", "wb") as f:
        f.write(b"00000000")
    app = App()
    c, middleware = client(mount, app, poll_timeout="30s")
    c.set_cookie("__txid", "0000000000000005")
    result = {}
    reader = threading.Thread(target=lambda: result.update(response=c.get("/")))
    reader.start()
    wait_until(lambda: middleware.watcher.waiting == 1, 20, "the read to wait")
    mount.set_position("app.db", 5)
    reader.join(40)
    assert result["response"].status_code == 200 and len(app.calls) == 1


@pytest.mark.parametrize(("position", "cookie"), [(5, "0000000000000005"), (9, "0000000000000005")])
def test_read_at_or_past_cookie_is_served(mount, position, cookie):
    mount.set_position("app.db", position)
    app = App()
    c, _ = client(mount, app, poll_timeout="2s")
    c.set_cookie("__txid", cookie)
    assert c.get("/").status_code == 200 and len(app.calls) == 1


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_read_times_out_with_504(mount, replica, role):
    node = mount if role == "primary" else replica
    node.set_position("app.db", 4)
    app = App()
    c, _ = client(node, app, poll_timeout="200ms")
    c.set_cookie("__txid", "0000000000000005")
    assert_error(c.get("/"), 504, b"Proxy timeout\n")
    response = c.head("/")  # the server drops a HEAD's body
    assert response.status_code == 504 and response.headers["Content-Type"] == TEXT
    assert not app.calls


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_read_waits_until_another_thread_moves_the_position(mount, replica, role):
    """Over real HTTP: the read blocks until the position reaches its cookie, then runs."""
    node = mount if role == "primary" else replica
    node.set_position("app.db", 4)
    order = []
    app = App(before=lambda: order.append("served"))
    middleware = LiteFSMiddleware(app, db="app.db", mount_dir=node.path, poll_timeout="30s")
    result = {}
    with serve(middleware) as url, urllib3.PoolManager(timeout=40, retries=False) as http:

        def read():
            result["response"] = http.request("GET", url + "/", headers={"Cookie": "__txid=0000000000000006"})

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: middleware.watcher.waiting == 1, 20, "the read to wait")
        with answers(middleware.watcher, "txid") as reads:
            node.set_position("app.db", 5)  # not far enough yet
            # Read three times: the watcher has weighed the waiting read against 5 at least once.
            wait_until(lambda: reads["app.db", 5] >= 3 or app.calls, 20, "the watcher to read TXID 5")
        assert not app.calls and unreleased(middleware.watcher) == [{"app.db": 6}]
        order.append("replicated")
        node.set_position("app.db", 6)
        reader.join(40)
    assert result["response"].status == 200
    assert result["response"].data == b"app"
    assert order == ["replicated", "served"]


# -- 5. write on the primary ---------------------------------------------------------------


@pytest.mark.parametrize("status", ["200 OK", "201 Created", "302 Found", "404 Not Found", "500 Internal Server Error"])
def test_write_on_primary_sets_cookie_whatever_the_status(mount, status):
    mount.set_position("app.db", 6)
    app = App(status=status, before=lambda: mount.set_position("app.db", 7))
    c, _ = client(mount, app)
    response = c.post("/")
    assert response.status == status
    assert cookie_of(response) == "__txid=0000000000000007"  # the position after the write


def test_write_cookie_reads_the_position_at_start_response(mount):
    mount.set_position("app.db", 1)

    def app(environ, start_response):
        mount.set_position("app.db", 2)
        start_response("200 OK", [])
        mount.set_position("app.db", 3)  # a later transaction, in the body
        yield b"done"

    c, _ = client(mount, app)
    assert cookie_of(c.post("/")) == "__txid=0000000000000002"


def test_write_cookie_keeps_the_apps_own_cookies(mount):
    mount.set_position("app.db", 1)
    c, _ = client(mount, App(headers=[("Set-Cookie", "session=abc; Path=/")]))
    values = c.post("/").headers.getlist("Set-Cookie")
    assert values[0] == "session=abc; Path=/"
    assert values[1].startswith("__txid=0000000000000001;")


def test_no_cookie_before_the_database_exists(mount):
    app = App()
    c, _ = client(mount, app)
    response = c.post("/")
    assert response.status_code == 200 and cookie_of(response) is None


def test_no_cookie_on_reads(mount):
    mount.set_position("app.db", 1)
    c, _ = client(mount, App())
    assert cookie_of(c.get("/")) is None
    assert cookie_of(c.head("/")) is None


def test_always_forwarded_get_on_primary_runs_without_cookie(mount):
    mount.set_position("app.db", 1)
    app = App()
    c, _ = client(mount, app, always_forward=["/login"])
    response = c.get("/login")
    assert response.get_data() == b"app"
    assert cookie_of(response) is None
    assert cookie_of(c.post("/login")) == "__txid=0000000000000001"


def test_writes_on_primary_do_not_wait_for_their_cookie(mount):
    mount.set_position("app.db", 1)
    app = App()
    c, _ = client(mount, app, poll_timeout="5s")
    c.set_cookie("__txid", "00000000000000ff")
    response = c.post("/")
    assert response.status_code == 200 and len(app.calls) == 1


# -- 6. write on a replica -----------------------------------------------------------------


class Unreadable(io.RawIOBase):
    """A request body that records any attempt to read it."""

    def __init__(self):
        self.reads = 0

    def readable(self):
        return True

    def readinto(self, b):
        self.reads += 1
        return 0


def test_write_on_replica_fly_replay(replica):
    app = App()
    _, middleware = client(replica, app, forward="fly-replay")
    body = Unreadable()
    environ = create_environ("/items", method="POST", headers={"Content-Length": "10", "Content-Type": "text/plain"})
    environ["wsgi.input"] = body
    started = []
    chunks = middleware(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
    assert b"".join(chunks) == b""
    [(status, headers)] = started
    assert status == "200 OK"
    assert ("fly-replay", "instance=node-a") in headers
    assert not any(name.lower() == "set-cookie" for name, _ in headers)
    assert not app.calls
    assert body.reads == 0


def test_write_on_replica_does_not_wait_for_its_cookie(replica):
    replica.set_position("app.db", 1)
    c, _ = client(replica, App(), poll_timeout="5s")
    c.set_cookie("__txid", "00000000000000ff")
    assert c.post("/").headers["fly-replay"] == "instance=node-a"


@pytest.mark.parametrize(
    "content",
    [
        b"node-a\r\nX-Evil: 1\n",
        b"node-a\nX-Evil: 1\n",
        b"node a\n",
        b"node-a/admin\n",
        b"http://node-a\n",
        b"\n",
        b"",
        b"node-a\x00\n",
        b"n\xc3\xb6de\n",
        b"-node\n",
    ],
)
def test_no_primary_answers_503(replica, content):
    with open(f"{replica.path}/.primary", "wb") as f:
        f.write(content)
    app = App()
    c, _ = client(replica, app, primary_redirect_timeout="100ms")
    response = c.post("/")
    assert_error(response, 503, b"Proxy error: no primary available\n")
    assert "fly-replay" not in response.headers
    assert all(b"node" not in value.encode("latin-1") for _, value in response.headers.items())
    assert not app.calls
    assert c.get("/").status_code == 200  # reads still work


def test_write_waits_for_a_primary_to_be_known(replica):
    with open(f"{replica.path}/.primary", "wb") as f:
        f.write(b"\n")  # during an election
    app = App()
    c, middleware = client(replica, app, primary_redirect_timeout="30s")
    with answers(middleware.watcher, "role") as roles:
        writer, result = in_thread(c.post, "/")
        # Told "no primary" three times and still no answer: the write waits for one.
        wait_until(lambda: roles[((False, None),)] >= 3 or result, 20, "the write to look for a primary")
        assert result == [] and not app.calls
        replica.make_replica("node-b")
        writer.join(40)
    assert result[0].headers["fly-replay"] == "instance=node-b"


# -- the hop marker ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_hop_marker_never_reaches_the_app(mount, method):
    mount.set_position("app.db", 1)
    app = App()
    c, _ = client(mount, app, passthrough=["/static/*"])
    c.open("/", method=method, headers={"X-LiteFS-Forwarded": "1"})
    c.open("/static/x", method=method, headers={"X-LiteFS-Forwarded": "1"})
    assert len(app.calls) == 2
    assert all("HTTP_X_LITEFS_FORWARDED" not in environ for environ in app.calls)


def test_hop_marker_only_makes_a_replica_refuse(replica):
    app = App()
    c, _ = client(replica, app, primary_redirect_timeout="100ms")
    response = c.post("/", headers={"X-LiteFS-Forwarded": "1"})
    assert_error(response, 503, NOT_PRIMARY)
    assert not app.calls


# -- debug logging -------------------------------------------------------------------------


def test_debug_logs_one_line_per_decision(mount, replica, caplog):
    caplog.set_level(logging.DEBUG, logger="litefs_wsgi")
    mount.set_position("app.db", 1)
    primary, _ = client(mount, App(), debug=True, passthrough=["/static/*"], poll_timeout="100ms")
    on_replica, _ = client(replica, App(), debug=True, primary_redirect_timeout="100ms")
    requests = [
        (primary, "GET", "/static/a.css", None),
        (primary, "GET", "/litefs/health", None),
        (primary, "GET", "/page", None),
        (primary, "GET", "/late", "00000000000000ff"),
        (primary, "POST", "/form", None),
        (on_replica, "POST", "/form", None),
    ]
    for c, method, path, cookie in requests:
        caplog.clear()
        if cookie:
            c.set_cookie("__txid", cookie)
        c.open(path, method=method)
        c.delete_cookie("__txid")
        lines = [r for r in caplog.records if r.name == "litefs_wsgi" and r.levelno == logging.DEBUG]
        assert len(lines) == 1, (method, path, [r.getMessage() for r in lines])
        assert path in lines[0].getMessage()
    with open(f"{replica.path}/.primary", "wb") as f:
        f.write(b"\n")
    caplog.clear()
    on_replica.post("/form")
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 1


def test_no_debug_lines_without_debug(mount, caplog):
    caplog.set_level(logging.DEBUG, logger="litefs_wsgi")
    mount.set_position("app.db", 1)
    c, _ = client(mount, App())
    c.get("/")
    c.post("/")
    c.get("/litefs/health")
    assert not [r for r in caplog.records if r.name == "litefs_wsgi" and r.levelno == logging.DEBUG]


def test_a_write_gets_the_position_after_the_app_returns(mount):
    """The position is read once the app has returned its answer (a framework may commit after
    start_response, as Flask's teardown_request does), or as soon as it writes or yields."""
    mount.set_position("app.db", 3)

    def late_commit(environ, start_response):
        start_response("200 OK", [])
        mount.set_position("app.db", 4)  # committed after start_response, before returning
        return [b"ok"]

    def legacy_write(environ, start_response):
        write = start_response("200 OK", [])
        mount.set_position("app.db", 5)
        write(b"written")  # the head goes out with this write: the position is read here
        mount.set_position("app.db", 6)
        return []

    def generator(environ, start_response):
        mount.set_position("app.db", 7)
        start_response("201 Created", [])
        yield b"generated"

    def error_after_start(environ, start_response):
        start_response("200 OK", [])
        mount.set_position("app.db", 8)
        try:
            raise ValueError("after start_response")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())  # nothing sent yet: replaces it
        return [b"failed"]

    cases = [(late_commit, 4, b"ok"), (legacy_write, 5, b"written"), (generator, 7, b"generated")]
    for app, txid, body in [*cases, (error_after_start, 8, b"failed")]:
        c, _ = client(mount, app)
        response = c.post("/w")
        assert response.get_data() == body
        assert cookie_of(response) == f"__txid={txid:016x}"
    assert response.status_code == 500


def test_a_write_may_call_write_while_its_iterable_is_iterated(mount):
    """The ``write`` start_response returned still writes once the app has returned: an app
    may call it from the iterable it returned, as servers allow (here werkzeug's)."""
    mount.set_position("app.db", 3)

    def write_from_iterable(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            write(b"written, ")
            yield b"yielded"

        return body()

    middleware = LiteFSMiddleware(write_from_iterable, db="app.db", mount_dir=mount.path)
    with serve(middleware) as url:
        response = urllib3.request("POST", url + "/w", retries=False, timeout=10)
    assert (response.status, response.data) == (200, b"written, yielded")
    assert response.headers["Set-Cookie"].split(";")[0] == f"__txid={3:016x}"


def test_a_second_start_response_without_exc_info_is_still_an_error(mount):
    """PEP 3333: calling start_response again without exc_info is a fatal error, which the
    server reports (werkzeug's: a 500); holding the first call must not hide it."""
    mount.set_position("app.db", 3)

    def twice(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"twice"]

    for app in (twice, LiteFSMiddleware(twice, db="app.db", mount_dir=mount.path)):
        with serve(app) as url:
            response = urllib3.request("POST", url + "/w", retries=False, timeout=10)
        assert response.status == 500
        assert b"twice" not in response.data
