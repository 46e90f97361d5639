"""A misconfigured node says so: a ``db`` naming a file the app does not write, a request sent to
a node that is not the primary (a ``primary_url`` pointing at a replica), a fixed ``primary_url``."""

from __future__ import annotations

import logging

import requests
from servers import NOT_PRIMARY, serve
from werkzeug.test import Client

from litefs_wsgi import LiteFSMiddleware
from litefs_wsgi.testing import LiteFSMount


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app:" + environ["PATH_INFO"].encode()]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "litefs_wsgi" and r.levelno == logging.WARNING]


def test_a_db_naming_no_position_is_said_once_with_the_databases_the_mount_holds(tmp_path, caplog):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("app.db", 4)  # the app writes app.db
    mount.set_position("users.db", 2)
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    c = Client(LiteFSMiddleware(app, db="apps.db", mount_dir=mount.path))
    for _ in range(3):
        response = c.post("/items")
        assert response.status_code == 200 and "Set-Cookie" not in response.headers
    assert warnings(caplog) == [
        f"a write on the primary found no apps.db-pos in {mount.path}: no __txid cookie covers apps.db, so reads "
        "after writes do not wait for it. Does db='apps.db' name the database file the app writes? The mount "
        "holds: app.db, users.db. (logged once; a database not created yet has no position either)"
    ]


def test_a_missing_position_among_several_databases_is_named_and_the_others_still_set_the_cookie(tmp_path, caplog):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    mount.set_position("a.db", 4)
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    c = Client(LiteFSMiddleware(app, db=["a.db", "b.db"], mount_dir=mount.path))
    assert c.post("/").headers["Set-Cookie"].startswith("__txid=0000000000000004-0000000000000000;")
    c.post("/")
    assert len(warnings(caplog)) == 1
    assert warnings(caplog)[0].startswith(f"a write on the primary found no b.db-pos in {mount.path}:")
    assert "The mount holds: a.db." in warnings(caplog)[0]
    # Once the database exists, nothing more is said.
    mount.set_position("b.db", 1)
    caplog.clear()
    assert "-0000000000000001;" in c.post("/").headers["Set-Cookie"]
    assert warnings(caplog) == []


def test_an_empty_mount_says_it_holds_no_database(tmp_path, caplog):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    Client(LiteFSMiddleware(app, db="app.db", mount_dir=mount.path)).post("/")
    assert warnings(caplog)[-1].endswith(
        "The mount holds no database. (logged once; a database not created yet has no position either)"
    )


def test_a_fixed_primary_url_pointing_at_a_replica_is_refused_there_and_logged(tmp_path, caplog):
    """Node A forwards its writes to a fixed primary_url, which (wrongly) is node B, another
    replica. B refuses the forwarded write, says why in the answer, and logs who sent it."""
    a, b = LiteFSMount(tmp_path / "a"), LiteFSMount(tmp_path / "b")
    a.make_replica("node-c")  # A's primary is node-c, but primary_url does not use {hostname}
    b.make_replica("node-c")
    calls: list = []

    def b_app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        return app(environ, start_response)

    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    node_b = LiteFSMiddleware(b_app, db="app.db", mount_dir=b.path, forward="http", primary_redirect_timeout=0.2)
    with serve(node_b) as b_url:
        node_a = LiteFSMiddleware(app, db="app.db", mount_dir=a.path, forward="http", primary_url=b_url)
        with serve(node_a) as a_url:
            for _ in range(2):
                response = requests.post(a_url + "/items", data=b"x", timeout=20)
                assert (response.status_code, response.content) == (503, NOT_PRIMARY)
    assert calls == []
    assert warnings(caplog) == [
        "POST '/items' was forwarded here by 127.0.0.1 (X-Forwarded-For: '127.0.0.1'), but this node is not the "
        "primary (the primary is node-c): the primary_url of that node points at a node that is not the primary, "
        "unless a failover is under way or a client sent X-LiteFS-Forwarded itself (logged at most once a minute)"
    ]


def test_a_request_fly_replayed_to_a_replica_names_the_replay_source(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "myapp")  # on Fly.io
    mount = LiteFSMount(tmp_path / "b")
    mount.make_replica("node-c")
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    c = Client(
        LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, forward="fly-replay", primary_redirect_timeout=0.1)
    )
    response = c.post("/items", headers={"Fly-Replay-Src": "instance=e784079b;region=ord;t=1700000000000"})
    assert (response.status_code, response.get_data()) == (503, NOT_PRIMARY)
    assert warnings(caplog) == [
        "POST '/items' was replayed here by Fly.io (Fly-Replay-Src: 'instance=e784079b;region=ord;t=1700000000000'), "
        "but this node is not the primary (the primary is node-c): the node that answered fly-replay named this "
        "one as the primary; its .primary was stale (a failover?) (logged at most once a minute)"
    ]


def test_a_fixed_primary_url_reaches_the_primary_whatever_the_hostname(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "p"), LiteFSMount(tmp_path / "r")
    primary.make_primary()
    primary.set_position("app.db", 9)
    replica.make_replica("some-name-nobody-resolves")  # a static lease names the primary so
    with serve(LiteFSMiddleware(app, db="app.db", mount_dir=primary.path)) as primary_url:
        node = LiteFSMiddleware(app, db="app.db", mount_dir=replica.path, forward="http", primary_url=primary_url)
        with serve(node) as replica_url:
            response = requests.post(replica_url + "/items", data=b"x", timeout=20)
    assert (response.status_code, response.text) == (200, "app:/items")
    assert response.headers["Set-Cookie"].startswith("__txid=0000000000000009;")


def test_options_of_the_standalone_proxy_given_in_process_are_said_to_do_nothing(tmp_path, caplog):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, target="localhost:8081", splice="never")
    assert warnings(caplog) == [
        "LiteFSMiddleware ignores target, splice: these options are only the standalone proxy's (litefs-wsgi "
        "serve). In-process the app is the target, and its own server listens and serves any metrics: remove "
        "them from the options given to the app (keyword arguments, Flask's app.config, Django's settings.LITEFS)."
    ]


def test_flask_config_naming_a_standalone_option_is_said_to_do_nothing(tmp_path, caplog):
    from flask import Flask

    from litefs_wsgi.flask import LiteFS

    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    flask_app = Flask(__name__)
    flask_app.config.update(LITEFS_DB="app.db", LITEFS_DIR=mount.path, LITEFS_METRICS_PATH="/metrics")
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    LiteFS(flask_app)
    assert [m.partition(":")[0] for m in warnings(caplog)] == ["LiteFSMiddleware ignores metrics_path"]


def test_a_shared_config_file_or_environment_naming_the_target_says_nothing(tmp_path, caplog, monkeypatch):
    # One litefs.yml (or environment) for the standalone proxy and the app beside it is fine.
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    config = tmp_path / "litefs.yml"
    config.write_text(f"fuse:\n  dir: {mount.path}\nproxy:\n  target: localhost:8081\n  db: app.db\n")
    monkeypatch.setenv("LITEFS_WSGI_CONFIG", str(config))
    monkeypatch.setenv("LITEFS_PROXY_ADDR", ":8080")
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    middleware = LiteFSMiddleware(app)
    assert (middleware.config.target, middleware.config.addr) == ("http://localhost:8081", ":8080")
    assert warnings(caplog) == []


def test_fly_replay_off_fly_io_is_said_at_start_up(tmp_path, caplog, monkeypatch):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_replica("node-a")
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, forward="http")
    assert warnings(caplog) == []
    LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, forward="fly-replay")
    assert [m.partition(":")[0] for m in warnings(caplog)] == ["forward is 'fly-replay' but FLY_APP_NAME is not set"]
    caplog.clear()
    monkeypatch.setenv("FLY_APP_NAME", "myapp")  # on Fly.io: the default, and nothing to say
    LiteFSMiddleware(app, db="app.db", mount_dir=mount.path, require_mount=False)
    assert warnings(caplog) == []
