"""GETs that write: on a replica, SQLite's read-only error sends the request to the primary.

A real Flask app (the ``litefs_wsgi.flask`` extension) on a primary and a replica, each served
over HTTP on 127.0.0.1. The replica opens its SQLite file read-only, as LiteFS serves it there
(``?mode=ro`` fails exactly as a LiteFS replica does: ``attempt to write a readonly database``).
"""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
from contextlib import closing
from urllib.parse import urlsplit

import pytest
import requests
from flask import Blueprint, Flask, Response, request, stream_with_context
from servers import serve

from litefs_wsgi.flask import LiteFS
from litefs_wsgi.readonly import is_readonly_error
from litefs_wsgi.testing import LiteFSMount

TIMEOUT = 30


def ro_uri(path: str) -> str:
    return pathlib.Path(path).as_uri() + "?mode=ro"


def make_db(path: str) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY, path TEXT)")


def create_app(mount: LiteFSMount, readonly: bool, seen: list[str], wrapped: bool = False, **options) -> Flask:
    """An app recording a visit in a GET; ``readonly`` opens the database as a replica has it.
    ``-pos`` moves as each answer starts, as LiteFS's at commit: in an ``after_request``, or
    with ``wrapped`` by a WSGI wrapper between the middleware and Flask, as an app with other
    middlewares has (only the extension can then find the Flask app to register its handler)."""
    app = Flask(__name__)
    path = mount.db_path("app.db")

    def connect():
        if readonly:
            return closing(sqlite3.connect(ro_uri(path), uri=True, timeout=10))
        return closing(sqlite3.connect(path, timeout=10))

    @app.before_request
    def record():
        seen.append(f"{request.method} {request.path}")

    @app.get("/visit")
    def visit():
        with connect() as conn, conn:
            conn.execute("INSERT INTO visits (path) VALUES (?)", (request.path,))
        return "visited\n"

    @app.get("/visit-sqlalchemy")
    def visit_sqlalchemy():
        sqlalchemy = pytest.importorskip("sqlalchemy")
        url = "sqlite:///" + (ro_uri(path) + "&uri=true" if readonly else path)
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("INSERT INTO visits (path) VALUES (:p)"), {"p": request.path})
        finally:
            engine.dispose()
        return "visited\n"

    @app.get("/missing-table")
    def missing_table():
        with connect() as conn:
            conn.execute("INSERT INTO nowhere VALUES (1)")  # an OperationalError, not read-only
        return "unreachable"

    @app.get("/stream")
    def stream():
        def body():
            yield "started\n"
            with connect() as conn, conn:
                conn.execute("INSERT INTO visits (path) VALUES ('stream')")
            yield "wrote\n"

        return Response(stream_with_context(body()))

    @app.get("/items")
    def items():
        with connect() as conn:
            return "".join(f"{p}\n" for (p,) in conn.execute("SELECT path FROM visits ORDER BY id"))

    LiteFS(app, db="app.db", mount_dir=mount.path, **options)

    # A JSON API's blueprint, registered after the extension as an app factory does, with its
    # own handler for every error: Flask looks at a blueprint's handlers before the app's.
    api = Blueprint("api", __name__, url_prefix="/api")

    @api.errorhandler(Exception)
    def api_error(error):
        return {"error": type(error).__name__}, 500

    api.add_url_rule("/visit", view_func=visit, endpoint="visit")
    api.add_url_rule("/missing-table", view_func=missing_table, endpoint="missing_table")
    app.register_blueprint(api)
    if wrapped:
        app.wsgi_app.app = mount.committing(app.wsgi_app.app)
    else:

        @app.after_request
        def commit(response):
            mount.sync("app.db")
            return response

    @app.get("/last-seen")
    def last_seen():
        return "seen\n"

    @app.after_request
    def record_last_seen(response):
        # A "last seen" column updated after every view, as apps do in an after_request hook
        # (registered last: it runs before ``commit``, which syncs the position).
        if request.path == "/last-seen":
            with connect() as conn, conn:
                conn.execute("INSERT INTO visits (path) VALUES (?)", (request.path,))
        return response

    return app


@pytest.fixture
def cluster(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("127.0.0.1")
    make_db(primary.db_path("app.db"))
    primary.sync("app.db")
    replica.replicate(primary, "app.db")
    return primary, replica


@contextlib.contextmanager
def nodes(cluster, primary_options=None, wrapped=False, **replica_options):
    """The primary and the replica, served; yields (primary URL, replica URL, requests each app saw)."""
    primary, replica = cluster
    seen: dict[str, list[str]] = {"primary": [], "replica": []}
    primary_app = create_app(primary, False, seen["primary"], wrapped, **(primary_options or {}))
    with serve(primary_app) as primary_url:
        port = urlsplit(primary_url).port
        options = {"forward": "http", "primary_url": f"http://{{hostname}}:{port}", **replica_options}
        with serve(create_app(replica, True, seen["replica"], wrapped, **options)) as replica_url:
            yield primary_url, replica_url, seen


def rows(mount: LiteFSMount) -> list[str]:
    with closing(sqlite3.connect(mount.db_path("app.db"))) as conn:
        return [p for (p,) in conn.execute("SELECT path FROM visits ORDER BY id")]


def txid_cookie(response) -> int:
    values = [v for v in response.raw.headers.getlist("Set-Cookie") if v.startswith("__txid=")]
    assert len(values) == 1, values
    return int(values[0].split(";")[0].split("=", 1)[1], 16)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("path", ["/visit", "/visit-sqlalchemy"])
def test_a_get_that_writes_on_a_replica_runs_on_the_primary(cluster, path, wrapped):
    primary, replica = cluster
    with nodes(cluster, wrapped=wrapped) as (primary_url, replica_url, seen):
        response = requests.get(replica_url + path, timeout=TIMEOUT)
        assert (response.status_code, response.text) == (200, "visited\n")
        assert txid_cookie(response) == primary.position("app.db") > replica.position("app.db")
        assert rows(primary) == [path] and rows(replica) == []
        assert seen == {"primary": [f"GET {path}"], "replica": [f"GET {path}"]}  # tried, then replayed

        # The cookie makes the next read on the replica wait for the visit: read-your-writes.
        replica.replicate(primary, "app.db")
        assert requests.get(replica_url + "/items", cookies=response.cookies, timeout=TIMEOUT).text == f"{path}\n"


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_get_that_writes_in_an_after_request_hook_is_replayed(cluster, wrapped):
    """README: GETs that write without asking (a "last seen" column) are replayed by
    themselves. In Flask such a write often sits in an ``after_request`` hook, whose error
    Flask hands to ``handle_exception``, not ``handle_user_exception``."""
    primary, replica = cluster
    with nodes(cluster, wrapped=wrapped) as (primary_url, replica_url, seen):
        response = requests.get(replica_url + "/last-seen", timeout=TIMEOUT)
        assert (response.status_code, response.text) == (200, "seen\n")
        assert txid_cookie(response) == primary.position("app.db") > replica.position("app.db")
        assert rows(primary) == ["/last-seen"] and rows(replica) == []
        assert seen == {"primary": ["GET /last-seen"], "replica": ["GET /last-seen"]}


def test_a_get_in_a_blueprint_with_its_own_error_handler_is_replayed(cluster):
    """The blueprint's handler for Exception would win over the extension's for SQLite's error."""
    primary, replica = cluster
    with nodes(cluster) as (primary_url, replica_url, seen):
        response = requests.get(replica_url + "/api/visit", timeout=TIMEOUT)
        assert (response.status_code, response.text) == (200, "visited\n")
        assert txid_cookie(response) == primary.position("app.db")
        assert rows(primary) == ["/api/visit"] and rows(replica) == []
        # Any other error is still the blueprint's own.
        response = requests.get(replica_url + "/api/missing-table", timeout=TIMEOUT)
        assert (response.status_code, response.json()) == (500, {"error": "OperationalError"})
        response = requests.get(replica_url + "/api/visit", headers={"X-LiteFS-Forwarded": "1"}, timeout=TIMEOUT)
        assert (response.status_code, response.json()) == (500, {"error": "OperationalError"})
    assert seen["primary"] == ["GET /api/visit"]


def test_a_head_is_replayed_too(cluster):
    primary, _ = cluster
    with nodes(cluster) as (_, replica_url, _seen):
        response = requests.head(replica_url + "/visit", timeout=TIMEOUT)
    assert response.status_code == 200
    assert txid_cookie(response) == primary.position("app.db")
    assert rows(primary) == ["/visit"]


def test_with_fly_replay_the_replica_answers_fly_replay(cluster):
    primary, _ = cluster
    with nodes(cluster, forward="fly-replay") as (primary_url, replica_url, seen):
        response = requests.get(replica_url + "/visit", timeout=TIMEOUT)
        assert (response.status_code, response.content) == (200, b"")
        assert response.headers["fly-replay"] == "instance=127.0.0.1"
        assert rows(primary) == [] and seen["primary"] == []
        # Fly.io's edge replays it on the primary, which writes and answers with the cookie.
        replayed = {"Fly-Replay-Src": "instance=replica;region=ord;t=1"}
        response = requests.get(primary_url + "/visit", headers=replayed, timeout=TIMEOUT)
        assert response.status_code == 200 and txid_cookie(response) == primary.position("app.db")
        assert rows(primary) == ["/visit"]


def test_off_it_is_the_apps_own_500(cluster):
    primary, _ = cluster
    with nodes(cluster, replay_on_readonly=False) as (_, replica_url, seen):
        response = requests.get(replica_url + "/visit", timeout=TIMEOUT)
    assert response.status_code == 500 and "Internal Server Error" in response.text
    assert "__txid" not in response.cookies
    assert rows(primary) == [] and seen["primary"] == []


@pytest.mark.parametrize("headers", [{"Fly-Replay-Src": "instance=other;region=ord;t=1"}, {"X-LiteFS-Forwarded": "1"}])
def test_a_request_already_forwarded_is_not_replayed_again(cluster, headers):
    primary, _ = cluster
    with nodes(cluster) as (_, replica_url, seen):
        response = requests.get(replica_url + "/visit", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 500 and "Internal Server Error" in response.text
    assert rows(primary) == [] and seen["primary"] == []


def test_other_errors_are_the_apps_own(cluster):
    with nodes(cluster) as (_, replica_url, seen):
        response = requests.get(replica_url + "/missing-table", timeout=TIMEOUT)
    assert response.status_code == 500 and "Internal Server Error" in response.text
    assert seen["primary"] == []


def test_the_apps_own_error_handler_still_runs(cluster, tmp_path):
    """An app's handler for a base class (here Exception) answers what is not replayed."""
    primary, replica = cluster
    app = create_app(replica, True, [], forward="http", replay_on_readonly=True)
    app.register_error_handler(Exception, lambda e: (f"own handler: {type(e).__name__}\n", 500))
    with serve(app) as url:
        response = requests.get(url + "/missing-table", timeout=TIMEOUT)
        assert (response.status_code, response.text) == (500, "own handler: OperationalError\n")
        response = requests.get(url + "/visit", headers={"Fly-Replay-Src": "instance=x"}, timeout=TIMEOUT)
        assert (response.status_code, response.text) == (500, "own handler: OperationalError\n")


def test_nothing_is_replayed_once_the_response_has_started(cluster):
    primary, _ = cluster
    with nodes(cluster) as (_, replica_url, seen):
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(replica_url + "/stream", timeout=TIMEOUT).raise_for_status()
    assert rows(primary) == [] and seen["primary"] == []


def test_a_readonly_error_on_the_primary_is_not_replayed(tmp_path):
    """A node that takes itself for the primary (no .primary file) but cannot write: the
    app's own 500, not a replay to nowhere."""
    node = LiteFSMount(tmp_path / "node")
    node.make_primary()
    make_db(node.db_path("app.db"))
    node.sync("app.db")
    with serve(create_app(node, True, [])) as url:
        response = requests.get(url + "/visit", timeout=TIMEOUT)
    assert response.status_code == 500 and "Internal Server Error" in response.text


# -- recognising the error ------------------------------------------------------------------


def readonly_error(tmp_path) -> sqlite3.OperationalError:
    path = str(tmp_path / "ro.db")
    make_db(path)
    with closing(sqlite3.connect(ro_uri(path), uri=True)) as conn:
        try:
            conn.execute("INSERT INTO visits (path) VALUES ('x')")
        except sqlite3.OperationalError as exc:
            return exc
    raise AssertionError("the read-only database took a write")


def test_sqlites_own_error_is_recognised(tmp_path):
    exc = readonly_error(tmp_path)
    assert str(exc) == "attempt to write a readonly database"
    assert is_readonly_error(exc)


def test_wrapped_errors_are_recognised(tmp_path):
    exc = readonly_error(tmp_path)
    try:
        raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert is_readonly_error(wrapped)
    try:
        try:
            raise exc
        except sqlite3.OperationalError:
            raise KeyError("while handling it")  # noqa: B904 - implicit chaining, on purpose
    except KeyError as chained:
        assert is_readonly_error(chained)
    try:
        try:
            raise exc
        except sqlite3.OperationalError:
            raise KeyError("while handling it") from None
    except KeyError as hidden:
        assert not is_readonly_error(hidden)  # "from None": the app chose to hide it
        assert hidden.__suppress_context__


def test_sqlalchemys_error_is_recognised(tmp_path):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    path = str(tmp_path / "ro.db")
    make_db(path)
    engine = sqlalchemy.create_engine("sqlite:///" + ro_uri(path) + "&uri=true")
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as info, engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO visits (path) VALUES ('x')"))
    finally:
        engine.dispose()
    assert is_readonly_error(info.value)


def test_other_errors_are_not(tmp_path):
    with closing(sqlite3.connect(":memory:")) as conn:
        with pytest.raises(sqlite3.OperationalError) as info:
            conn.execute("INSERT INTO nowhere VALUES (1)")
    assert not is_readonly_error(info.value)
    assert not is_readonly_error(ValueError("attempt to write a readonly database"))
    assert not is_readonly_error(None)
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a loop ends
    assert not is_readonly_error(a)
