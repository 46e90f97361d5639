"""A real Flask app on a primary and a replica, over real HTTP: a client reads its own writes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from contextlib import closing

import pytest
import requests
from flask import Blueprint, Flask, Response, request
from servers import Clock, serve, wait_until
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from litefs_wsgi import ConfigError, LiteFSMiddleware, ReplayOnPrimary
from litefs_wsgi.flask import LiteFS
from litefs_wsgi.testing import LiteFSMount

TIMEOUT = 30  # seconds, for every HTTP call: bounded, generous on a busy machine


def create_app(mount: LiteFSMount) -> Flask:
    """A small app keeping items in ``app.db`` in the mount, as a user would write it."""
    app = Flask(__name__)
    path = mount.db_path("app.db")

    def connect():
        return closing(sqlite3.connect(path, timeout=10))

    @app.post("/items")
    def add_item():
        with connect() as conn, conn:
            conn.execute("INSERT INTO items (name) VALUES (?)", (request.form["name"],))
        return "added\n", 201

    @app.get("/items")
    def list_items():
        with connect() as conn:
            names = [name for (name,) in conn.execute("SELECT name FROM items ORDER BY id")]
        return "".join(f"{name}\n" for name in names)

    @app.post("/fail")
    def fail():
        with connect() as conn, conn:
            conn.execute("INSERT INTO items (name) VALUES ('half')")
        raise RuntimeError("after the commit")

    return app


@pytest.fixture
def cluster(tmp_path):
    """A primary and a replica mount, the database created on the primary and replicated."""
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("node-a")
    with closing(sqlite3.connect(primary.db_path("app.db"))) as conn, conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    primary.sync("app.db")
    replica.replicate(primary, "app.db")
    return primary, replica


def wrap(app: Flask, mount: LiteFSMount, **options) -> LiteFSMiddleware:
    app.wsgi_app = LiteFSMiddleware(mount.committing(app.wsgi_app), db="app.db", mount_dir=mount.path, **options)
    return app.wsgi_app


def txid_cookie(response) -> str:
    values = [v for v in response.raw.headers.getlist("Set-Cookie") if v.startswith("__txid=")]
    assert len(values) == 1, values
    return values[0].split(";")[0].split("=", 1)[1]


def test_read_your_writes_across_primary_and_replica(cluster):
    primary, replica = cluster
    primary_app, replica_app = create_app(primary), create_app(replica)
    wrap(primary_app, primary, forward="fly-replay")
    replica_mw = wrap(replica_app, replica, forward="fly-replay", poll_timeout="30s")
    before = primary.position("app.db")

    with serve(primary_app) as primary_url, serve(replica_app) as replica_url:
        # A write on the primary answers with the position after it.
        response = requests.post(primary_url + "/items", data={"name": "apple"}, timeout=TIMEOUT)
        assert response.status_code == 201
        txid = txid_cookie(response)
        assert int(txid, 16) == before + 1 == primary.position("app.db")

        # The replica has not caught up: a read with the cookie waits for it.
        result = {}

        def read():
            result["response"] = requests.get(replica_url + "/items", cookies={"__txid": txid}, timeout=TIMEOUT)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: replica_mw.watcher.waiting == 1, 20, "the read to wait on the replica")
        assert "response" not in result
        with closing(sqlite3.connect(replica.db_path("app.db"))) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        replica.replicate(primary, "app.db")  # what LiteFS does, from another thread
        reader.join(TIMEOUT + 5)
        assert result["response"].status_code == 200
        assert result["response"].text == "apple\n"

        # Without the cookie nothing waits, and the replica now has the row anyway.
        assert requests.get(replica_url + "/items", timeout=TIMEOUT).text == "apple\n"

        # A write on the replica is replayed on the primary by Fly.io: the app never runs.
        response = requests.post(replica_url + "/items", data={"name": "pear"}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["fly-replay"] == "instance=node-a"
        assert "__txid" not in response.cookies
        assert requests.get(primary_url + "/items", timeout=TIMEOUT).text == "apple\n"


def test_read_times_out_when_the_replica_never_catches_up(cluster):
    primary, replica = cluster
    replica_app = create_app(replica)
    wrap(replica_app, replica, poll_timeout="300ms")
    ahead = f"{replica.position('app.db') + 1:016x}"
    with serve(replica_app) as url:
        response = requests.get(url + "/items", cookies={"__txid": ahead}, timeout=TIMEOUT)
    assert response.status_code == 504
    assert response.text == "Proxy timeout\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_a_failing_write_still_sets_the_cookie(cluster):
    primary, _ = cluster
    app = create_app(primary)
    wrap(app, primary)
    before = primary.position("app.db")
    with serve(app) as url:
        response = requests.post(url + "/fail", timeout=TIMEOUT)
    assert response.status_code == 500
    assert int(txid_cookie(response), 16) == before + 1  # the commit happened before the error


def test_extension_reads_litefs_config_keys(cluster):
    primary, replica = cluster
    app = create_app(replica)
    app.config.update(
        LITEFS_DB="app.db",
        LITEFS_DIR=replica.path,
        LITEFS_POLL_TIMEOUT="300ms",
        LITEFS_FORWARD="fly-replay",
        LITEFS_PASSTHROUGH=["/static/*"],
        LITEFS_MAX_LAG="2s",
        SECRET_KEY="not a LiteFS option",
    )
    litefs = LiteFS()
    litefs.init_app(app)
    config = litefs.middleware.config
    assert app.extensions["litefs"] is litefs
    assert app.wsgi_app is litefs.middleware
    assert (config.db, config.mount_dir, config.poll_timeout) == (("app.db",), replica.path, 0.3)
    assert (config.forward, config.passthrough, config.max_lag) == ("fly-replay", ("/static/*",), 2.0)

    replica.set_lag(2001)
    ahead = f"{replica.position('app.db') + 1:016x}"
    with serve(app) as url:
        response = requests.post(url + "/items", data={"name": "x"}, timeout=TIMEOUT)
        assert response.headers["fly-replay"] == "instance=node-a"
        assert requests.get(url + "/items", cookies={"__txid": ahead}, timeout=TIMEOUT).status_code == 504
        assert requests.get(url + "/litefs/health", timeout=TIMEOUT).status_code == 503


def test_extension_arguments_win_over_config(cluster):
    primary, _ = cluster
    app = create_app(primary)
    app.config.update(LITEFS_DB="other.db", LITEFS_DIR=primary.path, LITEFS_POLL_TIMEOUT="1s")
    litefs = LiteFS(app, db="app.db")
    assert litefs.middleware.config.db == ("app.db",)
    assert litefs.middleware.config.poll_timeout == 1.0
    with serve(app) as url:
        response = requests.post(url + "/items", data={"name": "x"}, timeout=TIMEOUT)
    assert int(txid_cookie(response), 16) == primary.position("app.db")


def test_extension_bad_option_fails_at_init_app(cluster):
    primary, _ = cluster
    app = create_app(primary)
    app.config.update(LITEFS_DB="app.db", LITEFS_DIR=primary.path, LITEFS_POLL_TIMEOUT="soonish")
    with pytest.raises(ConfigError, match="^poll_timeout: "):
        LiteFS(app)


def test_extension_without_litefs_db_says_how_to_set_it(cluster, monkeypatch):
    for name in ("LITEFS_PROXY_DB", "LITEFS_WSGI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    primary, _ = cluster
    app = create_app(primary)
    app.config.update(LITEFS_DIR=primary.path)
    with pytest.raises(ConfigError) as error:
        LiteFS(app)
    assert str(error.value) == (
        'db: set app.config["LITEFS_DB"] to the database file in the LiteFS mount, e.g. '
        'app.config["LITEFS_DB"] = "app.db" (or LiteFS(app, db="app.db"), or LITEFS_PROXY_DB)'
    )


def test_extension_bad_value_names_its_config_key(cluster):
    primary, _ = cluster
    app = create_app(primary)
    app.config.update(LITEFS_DB="app.db", LITEFS_DIR=primary.path, LITEFS_TARGET="https://[::1")
    with pytest.raises(ConfigError) as error:
        LiteFS(app)
    assert str(error.value) == (
        "target: 'https://[::1' is not a valid URL: Invalid IPv6 URL (set by app.config[\"LITEFS_TARGET\"])"
    )
    # A template str.format cannot fill with plain names raised AttributeError.
    app = create_app(primary)
    app.config.update(LITEFS_DB="app.db", LITEFS_DIR=primary.path, LITEFS_PRIMARY_URL="http://{hostname.vm}:{port}")
    with pytest.raises(ConfigError) as error:
        LiteFS(app)
    assert str(error.value).startswith("primary_url: 'http://{hostname.vm}:{port}' may only use {hostname}")
    assert str(error.value).endswith('(set by app.config["LITEFS_PRIMARY_URL"])')
    # A keyword argument is the caller's own: no key to name.
    with pytest.raises(ConfigError, match=r"^max_lag: 'soon' is not a duration") as error:
        LiteFS(create_app(primary), db="app.db", mount_dir=primary.path, max_lag="soon")
    assert "set by" not in str(error.value)


# -- ReplayOnPrimary in a Flask app ---------------------------------------------------------


def visiting_app(mount: LiteFSMount, seen: list[str], json_errors: bool = False) -> Flask:
    """An app whose GET /visit writes, so on a replica it asks for the primary; with
    ``json_errors``, it answers every HTTPException itself, as JSON APIs do. (Not
    ``litefs_wsgi.is_primary()``: two nodes in one process, it asks the last one made.)"""
    app = Flask(__name__)

    @app.get("/visit")
    def visit():
        seen.append("visit")
        if os.path.exists(os.path.join(mount.path, ".primary")):  # a replica: it names the primary
            raise ReplayOnPrimary()
        with closing(sqlite3.connect(mount.db_path("app.db"), timeout=10)) as conn, conn:
            conn.execute("INSERT INTO items (name) VALUES ('visit')")
        return "visited on the primary\n"

    @app.after_request
    def commit(response):
        mount.sync("app.db")  # -pos moves at commit, before the answer starts, as in LiteFS
        return response

    if json_errors:

        @app.errorhandler(HTTPException)
        def as_json(error):
            return {"error": error.code}, error.code

    return app


class OwnResponse(Response):
    """A response class an app sets after LiteFSMiddleware is made."""


def install(app: Flask, how: str, mount: LiteFSMount, **options) -> None:
    options = {"db": "app.db", "mount_dir": mount.path, **options}
    if how == "middleware":
        app.wsgi_app = LiteFSMiddleware(app.wsgi_app, **options)
    elif how == "middleware, then response_class":
        app.wsgi_app = LiteFSMiddleware(app.wsgi_app, **options)
        app.response_class = OwnResponse
    elif how == "extension":
        LiteFS(app, **options)
    elif how == "extension around ProxyFix":
        app.wsgi_app = ProxyFix(app.wsgi_app)
        LiteFS(app, **options)
    else:
        assert how == "middleware around ProxyFix"
        app.wsgi_app = LiteFSMiddleware(ProxyFix(app.wsgi_app), **options)


# How the middleware is installed, and whether the app answers every HTTPException itself (a
# JSON API), which without the handler the middleware registers dropped ReplayOnPrimary's
# header; around ProxyFix only the extension can find the app to register it.
REPLAY_SETUPS = [
    ("middleware", True),
    ("middleware", False),
    ("middleware, then response_class", True),
    ("extension", True),
    ("extension around ProxyFix", True),
    ("middleware around ProxyFix", False),
]


@contextlib.contextmanager
def replaying(cluster, how: str, json_errors: bool, change=lambda app: None):
    """The primary and the replica of ``visiting_app``, each installed ``how`` and changed by
    ``change``, served; yields (replica URL, the views each ran)."""
    primary, replica = cluster
    seen: dict[str, list[str]] = {"primary": [], "replica": []}
    primary_app = visiting_app(primary, seen["primary"], json_errors)
    install(primary_app, how, primary)
    change(primary_app)
    with serve(primary_app) as primary_url:
        port = primary_url.rsplit(":", 1)[1]
        app = visiting_app(replica, seen["replica"], json_errors)
        install(app, how, replica, forward="http", primary_url=f"http://127.0.0.1:{port}")
        change(app)
        with serve(app) as replica_url:
            yield replica_url, seen


def assert_replayed(cluster, response, seen) -> None:
    primary, replica = cluster
    assert (response.status_code, response.text) == (200, "visited on the primary\n")
    assert int(txid_cookie(response), 16) == primary.position("app.db") > replica.position("app.db")
    assert "X-LiteFS-Replay" not in response.headers
    assert seen == {"primary": ["visit"], "replica": ["visit"]}


@pytest.mark.parametrize(("how", "json_errors"), REPLAY_SETUPS)
def test_a_view_raising_replay_on_primary_runs_on_the_primary(cluster, how, json_errors):
    with replaying(cluster, how, json_errors) as (url, seen):
        response = requests.get(url + "/visit", timeout=TIMEOUT)
    assert_replayed(cluster, response, seen)


def own_handler_returning_the_error(app: Flask) -> None:
    app.register_error_handler(ReplayOnPrimary, lambda error: error)  # after the middleware's: it wins


def blueprint_handler_returning_the_error(app: Flask) -> None:
    blueprint = Blueprint("visits", __name__)
    blueprint.register_error_handler(ReplayOnPrimary, lambda error: error)

    @blueprint.get("/visit")
    def visit():
        return app.view_functions["visit"]()  # the app's own view, which raises on a replica

    app.register_blueprint(blueprint, url_prefix="/bp")


def after_request_rebuilding_the_answer(app: Flask) -> None:
    @app.after_request
    def rebuild(response):
        return Response(response.get_data(), response.status_code, list(response.headers.items()))


def view_returning_the_answer(app: Flask) -> None:
    view = app.view_functions["visit"]

    def visit():
        try:
            return view()
        except ReplayOnPrimary as error:
            return error.get_response()

    app.view_functions["visit"] = visit


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (own_handler_returning_the_error, "/visit"),
        (blueprint_handler_returning_the_error, "/bp/visit"),
        (after_request_rebuilding_the_answer, "/visit"),
        (view_returning_the_answer, "/visit"),
    ],
)
def test_any_answer_carrying_replay_on_primarys_header_is_replayed(cluster, change, path):
    with replaying(cluster, "extension", False, change) as (url, seen):
        response = requests.get(url + path, timeout=TIMEOUT)
    assert_replayed(cluster, response, seen)


@pytest.mark.parametrize("how", ["middleware", "middleware around ProxyFix"])
def test_replay_on_primary_raised_on_the_primary_is_a_500(cluster, how):
    primary, _ = cluster
    seen: list[str] = []
    app = visiting_app(primary, seen)

    @app.get("/confused")
    def confused():
        raise ReplayOnPrimary()  # on the primary: an app's bug, said plainly rather than looped

    install(app, how, primary)
    with serve(app) as url:
        response = requests.get(url + "/confused", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (500, "Proxy error: replay requested on the primary\n")


def test_without_the_middleware_in_the_way_replay_on_primary_is_the_503(cluster):
    """A Flask app whose handler the middleware registered, served without it: the client gets
    ReplayOnPrimary's 503, as without litefs-wsgi."""
    _, replica = cluster
    app = visiting_app(replica, [])
    LiteFSMiddleware(app.wsgi_app, db="app.db", mount_dir=replica.path)  # made, but not installed
    with serve(app) as url:
        response = requests.get(url + "/visit", timeout=TIMEOUT)
    assert response.status_code == 503 and "LiteFSMiddleware is not installed" in response.text


def test_an_apps_own_handler_for_replay_on_primary_is_kept(cluster):
    _, replica = cluster
    app = visiting_app(replica, [])
    app.register_error_handler(ReplayOnPrimary, lambda error: ("the app's own answer\n", 409))
    app.wsgi_app = LiteFSMiddleware(app.wsgi_app, db="app.db", mount_dir=replica.path)
    with serve(app) as url:
        response = requests.get(url + "/visit", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (409, "the app's own answer\n")


def test_a_replay_that_finds_this_node_elected_runs_here_with_the_cookie(cluster):
    """During an election (a replica that knows no primary) a view asks for the primary, and the
    request waits for one; when this node wins, the view runs here, and its write gets the
    ``__txid`` cookie as any write on the primary does."""
    _, replica = cluster
    primary_file = os.path.join(replica.path, ".primary")
    with open(primary_file, "w") as f:
        f.write("\n")  # no host name: a replica that knows no primary
    seen: list[str] = []
    app = visiting_app(replica, seen)
    app.wsgi_app = middleware = LiteFSMiddleware(app.wsgi_app, db="app.db", mount_dir=replica.path)
    middleware.watcher.clock = Clock()  # the role read when the view asks stays the one trusted
    view = app.view_functions["visit"]

    def visit():
        try:
            return view()
        except ReplayOnPrimary:
            assert middleware.watcher.role() == (False, None)  # read now, and kept
            os.remove(primary_file)  # the election ends: this node is the primary
            raise

    app.view_functions["visit"] = visit
    with serve(app) as url:
        response = requests.get(url + "/visit", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (200, "visited on the primary\n")
    assert seen == ["visit", "visit"]  # asked, then ran here once elected
    assert int(txid_cookie(response), 16) == replica.position("app.db")


def test_a_write_committed_in_teardown_gets_the_position_after_it(cluster):
    """An app that commits as the request ends, in ``teardown_request`` (Pony ORM's Flask
    integration, "commit on teardown"): Flask runs teardown after start_response but before
    ``wsgi_app`` returns, so before the server sends the head. LiteFS's proxy reads the
    position when the head arrives, after that commit: so must the middleware."""
    from flask import g

    primary, _ = cluster
    app = Flask(__name__)

    @app.post("/items")
    def add_item():
        g.db = sqlite3.connect(primary.db_path("app.db"), timeout=10)
        g.db.execute("INSERT INTO items (name) VALUES (?)", (request.form["name"],))
        return "added\n", 201

    @app.teardown_request
    def commit(exc):
        conn = g.pop("db", None)
        if conn is not None:
            if exc is None:
                conn.commit()
            conn.close()
            primary.sync("app.db")  # LiteFS moves the position at commit

    app.wsgi_app = LiteFSMiddleware(app.wsgi_app, db="app.db", mount_dir=primary.path)
    before = primary.position("app.db")
    with serve(app) as url:
        response = requests.post(url + "/items", data={"name": "plum"}, timeout=TIMEOUT)
    assert response.status_code == 201
    assert primary.position("app.db") == before + 1
    assert int(txid_cookie(response), 16) == before + 1


def test_replay_on_primary_on_a_passthrough_path_is_said_not_leaked(replica, caplog):
    # A passthrough path is served untouched, never sent to the primary: a view there that
    # asks for the primary is a conflict in the setup. Before, the client got the 503 "LiteFSMiddleware
    # is not installed" with the internal X-LiteFS-Replay header, and nothing was logged.
    seen: list[str] = []
    app = visiting_app(replica, seen)

    @app.get("/static/<name>")
    def static_file(name):
        return f"file {name}\n"

    install(app, "extension", replica, passthrough=["/visit", "/static/*"])
    with caplog.at_level("ERROR", logger="litefs_wsgi"), serve(app) as url:
        response = requests.get(url + "/visit", timeout=10)
        again = requests.get(url + "/visit", timeout=10)
        other = requests.get(url + "/static/a.css", timeout=10)
    for answer in (response, again):
        assert answer.status_code == 500
        assert answer.text == "Proxy error: replay requested on a passthrough path\n"
        assert "X-LiteFS-Replay" not in answer.headers and "fly-replay" not in answer.headers
    assert seen == ["visit", "visit"]
    assert (other.status_code, other.text) == (200, "file a.css\n")  # the rest untouched
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "/visit" in errors[0] and "passthrough" in errors[0], errors
