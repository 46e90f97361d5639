"""A real Django project on a primary and a replica: a client reads its own writes.

Each node is the project in tests/django_project served by its own gunicorn process, its
wsgi.py calling ``litefs_wsgi.django.get_wsgi_application()`` with the ``LITEFS`` setting,
as a user deploys it. Django is configured once per process: in subprocesses, the settings
of this test never reach the other test modules, which share pytest's process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import pytest
import requests
from servers import free_port, gunicorn, opens, wait_until

from litefs_wsgi.testing import LiteFSMount

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30


@contextlib.contextmanager
def node(mount: LiteFSMount, **env: str):
    """The Django project serving ``mount``, as a node of the cluster; yields its URL."""
    env = {"DJANGO_SETTINGS_MODULE": "django_project.settings", "LITEFS_DIR": mount.path, **env}
    args = ["--worker-class", "gthread", "--threads", "4", "--workers", "1", "--timeout", "60"]
    # cwd: the project is importable from there, and the repository's gunicorn.conf.py is not read.
    with gunicorn([*args, "django_project.wsgi:application"], env=env, cwd=TESTS) as (url, _):
        yield url


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    for name in list(os.environ):  # the settings decide, not the machine's environment
        if name.startswith(("LITEFS_PROXY_", "FLY_")) or name == "LITEFS_WSGI_CONFIG":
            monkeypatch.delenv(name)
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("node-a")
    with closing(sqlite3.connect(primary.db_path("db.sqlite3"))) as conn, conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    primary.sync("db.sqlite3")
    replica.replicate(primary, "db.sqlite3")
    return primary, replica


def txid_cookie(response) -> str:
    values = [v for v in response.raw.headers.getlist("Set-Cookie") if v.startswith("__txid=")]
    assert len(values) == 1, values
    return values[0].split(";")[0].split("=", 1)[1]


def rows(mount: LiteFSMount) -> list[str]:
    with closing(sqlite3.connect(mount.db_path("db.sqlite3"))) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM items ORDER BY id")]


def test_read_your_writes_across_primary_and_replica(cluster):
    primary, replica = cluster
    before = primary.position("db.sqlite3")
    with node(primary) as primary_url, node(replica) as replica_url:
        # A write on the primary answers with the position after it.
        response = requests.post(primary_url + "/items", data={"name": "apple"}, timeout=TIMEOUT)
        assert response.status_code == 201
        txid = txid_cookie(response)
        assert int(txid, 16) == before + 1 == primary.position("db.sqlite3")

        # On the replica a read with that cookie waits: its watcher polls db.sqlite3-pos.
        result = {}

        def read():
            result["response"] = requests.get(replica_url + "/items", cookies={"__txid": txid}, timeout=TIMEOUT)

        with opens(replica.path) as opened:
            reader = threading.Thread(target=read)
            reader.start()
            wait_until(lambda: opened("db.sqlite3-pos") >= 3 or result, 20, "the read to wait on the replica")
        assert reader.is_alive() and "response" not in result
        replica.replicate(primary, "db.sqlite3")  # what LiteFS does, from another process
        reader.join(TIMEOUT + 5)
        assert result["response"].status_code == 200
        assert result["response"].text == "apple\n"

        # A write on the replica is replayed on the primary by Fly.io: the view never runs.
        response = requests.post(replica_url + "/items", data={"name": "pear"}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["fly-replay"] == "instance=node-a"
        assert "__txid" not in response.cookies
    assert rows(primary) == rows(replica) == ["apple"]


def test_read_times_out_and_failing_write_sets_cookie(cluster):
    primary, _ = cluster
    before = primary.position("db.sqlite3")
    with node(primary, TEST_POLL_TIMEOUT="300ms") as url:
        ahead = f"{before + 1:016x}"
        response = requests.get(url + "/items", cookies={"__txid": ahead}, timeout=TIMEOUT)
        assert response.status_code == 504
        assert response.text == "Proxy timeout\n"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"

        response = requests.post(url + "/fail", timeout=TIMEOUT)
        assert response.status_code == 500
        assert int(txid_cookie(response), 16) == before + 1  # committed before the error

        response = requests.get(url + "/items", cookies={"__txid": ahead}, timeout=TIMEOUT)
        assert response.status_code == 200 and response.text == "half\n"


def test_a_get_that_must_write_is_replayed_on_the_primary(cluster):
    """require_primary() in a Django view, through ReplayOnPrimaryMiddleware: the replica
    answers fly-replay without writing; the primary, receiving Fly.io's replay, writes and
    answers with the cookie so that the next read on the replica waits for the write."""
    primary, replica = cluster
    with node(primary) as primary_url, node(replica) as replica_url:
        response = requests.get(replica_url + "/visit", timeout=TIMEOUT)
        assert response.status_code == 200 and response.content == b""
        assert response.headers["fly-replay"] == "instance=node-a"
        assert rows(replica) == [] and rows(primary) == []

        replayed = {"Fly-Replay-Src": "instance=replica;region=ord;t=1"}
        response = requests.get(primary_url + "/visit", headers=replayed, timeout=TIMEOUT)
        assert response.status_code == 200 and response.text == "counted\n"
        assert int(txid_cookie(response), 16) == primary.position("db.sqlite3")
        assert rows(primary) == ["visit"]


def readonly_replica(replica, primary_url: str, **settings):
    """``node(replica)`` with its database read-only, as under LiteFS, forwarding its writes
    over HTTP to the primary at ``primary_url``."""
    forward = {"TEST_FORWARD": "http", "TEST_PRIMARY_URL": primary_url.replace("127.0.0.1", "{hostname}")}
    return node(replica, TEST_READONLY="1", **forward, **settings)


def assert_written_on_the_primary(response, text: str, cluster, written: list[str]) -> None:
    """``response`` is the primary's answer ``text``, with its cookie, and only the primary wrote."""
    primary, replica = cluster
    assert (response.status_code, response.text) == (200, text)
    assert int(txid_cookie(response), 16) == primary.position("db.sqlite3")
    assert rows(primary) == written and rows(replica) == []


def test_a_get_that_writes_on_a_replica_is_replayed_on_the_primary(cluster):
    """No require_primary(): the view just writes. On the replica, whose database is read-only
    as under LiteFS, it fails with SQLite's read-only error; ReplayOnPrimaryMiddleware turns
    that into a replay, forwarded over HTTP; the primary writes and answers with the cookie."""
    primary, replica = cluster
    with node(primary) as primary_url:
        replica.make_replica("127.0.0.1")
        with readonly_replica(replica, primary_url) as replica_url:
            response = requests.get(replica_url + "/touch", timeout=TIMEOUT)
            assert_written_on_the_primary(response, "touched\n", cluster, ["touch"])
            # A read is not affected: the replica serves it from its read-only database.
            replica.replicate(primary, "db.sqlite3")
            assert requests.get(replica_url + "/items", cookies=response.cookies, timeout=TIMEOUT).text == "touch\n"

        with readonly_replica(replica, primary_url, TEST_REPLAY_ON_READONLY="false") as replica_url:
            response = requests.get(replica_url + "/touch", timeout=TIMEOUT)
            assert response.status_code == 500 and "Server Error (500)" in response.text  # Django's own
            assert "__txid" not in response.cookies
    assert rows(primary) == ["touch"]


def test_a_get_whose_middleware_writes_on_a_replica_is_replayed_on_the_primary(cluster):
    """The write is in a middleware (a "last seen" column, a session saved in process_response),
    not the view: Django turns its error into a 500 before ReplayOnPrimaryMiddleware could see it
    in process_exception. It is replayed all the same, and the replica's 500 never reaches the client."""
    primary, replica = cluster
    with node(primary) as primary_url:
        replica.make_replica("127.0.0.1")
        with readonly_replica(replica, primary_url) as replica_url:
            response = requests.get(replica_url + "/seen", timeout=TIMEOUT)
            assert_written_on_the_primary(response, "seen\n", cluster, ["seen"])
            # require_primary() in a middleware, likewise.
            response = requests.get(replica_url + "/asks", timeout=TIMEOUT)
            assert (response.status_code, response.text) == (200, "seen\nseen\n")
            assert int(txid_cookie(response), 16) == primary.position("db.sqlite3")
            # Any other error of a middleware is still the app's own 500.
            response = requests.get(replica_url + "/seen", headers={"X-LiteFS-Forwarded": "1"}, timeout=TIMEOUT)
            assert response.status_code == 500 and "Server Error (500)" in response.text
    assert rows(primary) == ["seen", "seen"]


def django_command(mount: LiteFSMount, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``django-admin ARGS`` for the test project, as ``manage.py ARGS`` runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
    environ.update(DJANGO_SETTINGS_MODULE="django_project.settings", LITEFS_DIR=mount.path, **env)
    command = [sys.executable, "-m", "django", *args]
    return subprocess.run(command, cwd=TESTS, env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("litefs", "message"),
    [
        ({"poll_timeout": "soon"}, "settings.LITEFS['poll_timeout']: 'soon' is not a duration"),
        ({"pol_timeout": "1s"}, "settings.LITEFS: unknown option 'pol_timeout'; did you mean 'poll_timeout'?"),
        # What else is wrong is an error even when db, which wsgi.py may pass, is missing.
        ({"db": None, "poll_timeout": "soon"}, "settings.LITEFS['poll_timeout']: 'soon' is not a duration"),
        ({"target": "localhost:99999"}, "settings.LITEFS['target']: 'localhost:99999' is not a valid URL"),
        (
            {"primary_url": "http://{hostname.vm.myapp.internal}:{port}"},
            "settings.LITEFS['primary_url']: 'http://{hostname.vm.myapp.internal}:{port}' may only use {hostname}",
        ),
    ],
)
def test_manage_py_check_reports_a_bad_litefs_setting(cluster, litefs, message):
    primary, _ = cluster
    proc = django_command(primary, "check", TEST_LITEFS=json.dumps(litefs))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"settings.LITEFS: (litefs_wsgi.E001) {message}" in proc.stderr
    assert "HINT: LITEFS holds litefs-wsgi's options by name" in proc.stderr


def test_manage_py_check_passes_a_good_litefs_setting(cluster):
    primary, _ = cluster
    proc = django_command(primary, "check")
    assert proc.returncode == 0, proc.stderr
    assert "System check identified no issues" in proc.stdout


def test_manage_py_check_only_warns_of_a_db_missing_from_litefs(cluster):
    # manage.py check does not import wsgi.py, which may pass db to get_wsgi_application.
    primary, _ = cluster
    proc = django_command(primary, "check", TEST_LITEFS=json.dumps({"db": None}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "settings.LITEFS: (litefs_wsgi.W001) settings.LITEFS: no 'db': " in proc.stderr
    assert "get_wsgi_application(db=...)" in proc.stderr and "E001" not in proc.stderr


def test_manage_py_check_warns_of_options_only_the_standalone_proxy_reads(cluster):
    primary, _ = cluster
    proc = django_command(primary, "check", TEST_LITEFS=json.dumps({"db": "db.sqlite3", "target": "localhost:8081"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "settings.LITEFS: (litefs_wsgi.W002) settings.LITEFS: 'target' only the standalone proxy reads "
        "(litefs-wsgi serve); in Django the app is the target and its server listens: remove it"
    ) in proc.stderr


def test_check_after_wsgi_py_takes_the_options_it_passed(cluster):
    primary, _ = cluster
    code = "import django_project.wsgi_db; from django.core.management import call_command; call_command('check')"
    proc = django_command(primary, "shell", "-c", code, TEST_LITEFS=json.dumps({"db": None}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout, proc.stdout + proc.stderr


def test_a_bad_litefs_setting_stops_gunicorn_naming_it(cluster):
    primary, _ = cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "FLY_"))}
    env.update(DJANGO_SETTINGS_MODULE="django_project.settings", LITEFS_DIR=primary.path)
    env["TEST_LITEFS"] = json.dumps({"max_lag": "a while"})
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "django_project.wsgi:application",
    ]
    proc = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ConfigError: settings.LITEFS['max_lag']: 'a while' is not a duration" in proc.stdout + proc.stderr
