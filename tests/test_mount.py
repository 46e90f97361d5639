"""A mount directory that is not LiteFS's is a warning at start-up; with require_mount such a
node never acts as the primary (503 on writes and health) until LiteFS has mounted it."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import requests
from servers import ROOT, gunicorn, proxy_config, serve, wait_until
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from litefs_wsgi import LiteFSMiddleware, is_primary, require_primary
from litefs_wsgi.node import litefs_mounts, mount_problem
from litefs_wsgi.testing import LiteFSMount

TEXT = "text/plain; charset=utf-8"


class App:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, environ, start_response):
        self.calls.append(environ["REQUEST_METHOD"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]


def missing(tmp_path) -> str:
    return str(tmp_path / "nowhere")


def empty(tmp_path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def no_lag(tmp_path) -> str:
    # A directory with the app's database but none of LiteFS's files: a plain directory.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "app.db").write_bytes(b"")
    return str(tmp_path / "plain")


def a_file(tmp_path) -> str:
    (tmp_path / "file").write_bytes(b"")
    return str(tmp_path / "file")


NOT_LITEFS = {
    missing: "it does not exist",
    empty: "it is empty (a mount point LiteFS has not mounted, or has left)",
    no_lag: "it has no .lag file, which a LiteFS mount always holds",
    a_file: "it is not a directory",
}


def assert_names(warning: str, mount_dir: str, problem: str) -> None:
    """The warning names the directory and what is wrong with it; then, if LiteFS is mounted
    elsewhere on this machine (another test's real LiteFS), where."""
    assert warning.startswith(f"LiteFS is not mounted at {mount_dir} (mount_dir): {problem}")
    rest = warning[len(f"LiteFS is not mounted at {mount_dir} (mount_dir): {problem}") :]
    assert rest.startswith(". ") or (rest.startswith("; LiteFS is mounted at ") and ": set mount_dir" in rest)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "litefs_wsgi" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("layout", list(NOT_LITEFS), ids=lambda f: f.__name__)
def test_a_mount_that_is_not_litefs_is_one_warning_at_start_up(tmp_path, caplog, layout):
    mount_dir = layout(tmp_path)
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    app = App()
    middleware = LiteFSMiddleware(app, db="app.db", mount_dir=mount_dir)
    (warning,) = warnings(caplog)
    assert_names(warning, mount_dir, NOT_LITEFS[layout])
    assert warning.endswith(
        ". This node acts as the primary: writes run here, in files no LiteFS replicates. Run the app under "
        "LiteFS (its exec: section), fix mount_dir, or set require_mount to refuse writes instead."
    )
    # Without require_mount nothing else changes: the files say primary, as they always did.
    caplog.clear()
    assert Client(middleware).post("/").status_code == 200
    assert Client(middleware).get("/litefs/health").status_code == 200
    assert app.calls == ["POST"]
    assert not [m for m in warnings(caplog) if "not mounted" in m]


def test_a_litefs_mount_is_no_warning(tmp_path, caplog):
    mount = LiteFSMount(tmp_path / "litefs")
    for make in (mount.make_primary, lambda: mount.make_replica("node-a")):
        make()
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="litefs_wsgi")
        LiteFSMiddleware(App(), db="app.db", mount_dir=mount.path, require_mount=True)
        assert warnings(caplog) == []
        assert mount_problem(mount.path) is None


@pytest.mark.parametrize("layout", list(NOT_LITEFS), ids=lambda f: f.__name__)
def test_require_mount_refuses_writes_and_health_until_the_mount_is_there(tmp_path, caplog, layout):
    mount_dir = layout(tmp_path)
    caplog.set_level(logging.WARNING, logger="litefs_wsgi")
    app = App()
    middleware = LiteFSMiddleware(app, db="app.db", mount_dir=mount_dir, require_mount=True)
    (warning,) = warnings(caplog)
    assert_names(warning, mount_dir, NOT_LITEFS[layout])
    assert warning.endswith(
        ". With require_mount this node never acts as the primary until the mount is there: writes and "
        "/litefs/health answer 503."
    )
    c = Client(middleware)
    for method in ("POST", "PUT", "DELETE"):
        response = c.open("/items", method=method)
        assert response.status_code == 503
        assert response.get_data() == f"Proxy error: LiteFS is not mounted at {mount_dir}\n".encode()
        assert response.headers["Content-Type"] == TEXT
        assert "Set-Cookie" not in response.headers
    response = c.get("/litefs/health")
    assert (response.status_code, response.get_data()) == (
        503,
        f"Proxy error: LiteFS is not mounted at {mount_dir}\n".encode(),
    )
    assert not is_primary()  # the view's question gets the same answer as the middleware's
    assert app.calls == []
    assert c.get("/items").status_code == 200  # reads are served: they change nothing
    assert app.calls == ["GET"]
    refused = [m for m in warnings(caplog) if m.startswith("refusing writes with 503")]
    assert refused == [
        f"refusing writes with 503: LiteFS is not mounted at {mount_dir}: {NOT_LITEFS[layout]} (require_mount; "
        "logged at most once a minute)"
    ]

    # LiteFS mounts the directory: the node is the primary again (the check is repeated,
    # at most every 100 ms), then the mount goes away again (LiteFS stopped: an empty dir).
    if os.path.isfile(mount_dir):
        os.remove(mount_dir)
    LiteFSMount(mount_dir).make_primary()
    wait_until(lambda: c.post("/items").status_code == 200, 20, "the write to be served once mounted")
    assert c.get("/litefs/health").get_data() == b"OK\n"
    assert is_primary()
    shutil.rmtree(mount_dir)
    os.mkdir(mount_dir)
    wait_until(lambda: c.post("/items").status_code == 503, 20, "writes refused once the mount has gone")
    assert c.get("/litefs/health").status_code == 503


def test_require_mount_changes_nothing_on_a_litefs_mount(tmp_path):
    primary, replica = LiteFSMount(tmp_path / "a"), LiteFSMount(tmp_path / "b")
    primary.make_primary()
    primary.set_position("app.db", 3)
    replica.make_replica("node-a")
    c = Client(LiteFSMiddleware(App(), db="app.db", mount_dir=primary.path, require_mount=True))
    response = c.post("/")
    assert response.status_code == 200 and "__txid=0000000000000003" in response.headers["Set-Cookie"]
    assert c.get("/litefs/health").status_code == 200
    r = Client(LiteFSMiddleware(App(), db="app.db", mount_dir=replica.path, require_mount=True, forward="fly-replay"))
    assert r.post("/").headers["fly-replay"] == "instance=node-a"


def test_require_mount_is_on_by_default_on_fly(tmp_path, monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "my-app")
    middleware = LiteFSMiddleware(App(), db="app.db", mount_dir=empty(tmp_path))
    assert middleware.config.require_mount is True
    assert Client(middleware).post("/").status_code == 503


def test_a_get_asking_for_the_primary_on_an_unmounted_node_is_refused(tmp_path):
    @Request.application
    def app(request):
        require_primary()  # False without the mount: ReplayOnPrimary, sent to the middleware
        return Response("wrote")

    mount_dir = empty(tmp_path)
    response = Client(LiteFSMiddleware(app, db="app.db", mount_dir=mount_dir, require_mount=True)).get("/visit")
    assert response.status_code == 503
    assert response.get_data() == f"Proxy error: LiteFS is not mounted at {mount_dir}\n".encode()


def test_the_warning_names_where_litefs_is_mounted_instead(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "42 27 0:39 / /var/lib/my\\040app/litefs rw,nosuid,nodev,relatime - fuse litefs rw,user_id=0,group_id=0\n"
        "43 27 0:40 / /mnt/other rw,relatime - fuse sshfs rw\n"
    )
    assert litefs_mounts(str(mountinfo)) == ["/var/lib/my app/litefs"]
    assert litefs_mounts(str(tmp_path / "no-such-file")) == []


def test_the_standalone_proxy_under_gunicorn_warns_and_refuses(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")  # a mount point LiteFS has not mounted: empty
    calls: list = []

    def target(environ, start_response):
        calls.append(environ["REQUEST_METHOD"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"target"]

    with serve(target) as target_url:
        config = proxy_config(tmp_path, mount, target_url.removeprefix("http://"), require_mount="true")
        env = {"LITEFS_WSGI_CONFIG": config, "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2"}
        with gunicorn(["-c", os.path.join(ROOT, "gunicorn.conf.py")], env=env) as (url, proc):
            response = requests.post(url + "/items", data=b"x", timeout=20)
            assert (response.status_code, response.text) == (
                503,
                f"Proxy error: LiteFS is not mounted at {mount.path}\n",
            )
            assert requests.get(url + "/litefs/health", timeout=20).status_code == 503
            assert requests.get(url + "/items", timeout=20).text == "target"
            mount.make_primary()
            wait_until(lambda: requests.post(url + "/items", timeout=20).status_code == 200, 20, "the mount")
            output = b"".join(proc.output).decode()
    assert calls == ["GET", "POST"]
    assert f"LiteFS is not mounted at {mount.path} (mount_dir): it is empty" in output
    assert "With require_mount this node never acts as the primary" in output
