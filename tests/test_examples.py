"""The examples serve pages on LiteFS-style mounts, wired as the README says."""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import subprocess
import sys
from urllib.parse import urlsplit

from servers import ROOT, form_request, gunicorn, serve

from litefs_wsgi.config import read_yaml
from litefs_wsgi.testing import LiteFSMount

EXAMPLES = os.path.join(ROOT, "examples")
DJANGO_PROJECT = os.path.join(EXAMPLES, "django_project")


def load_flask_example(name: str, mount: LiteFSMount, monkeypatch, **env: str):
    """Import examples/flask_app/app.py afresh, with its environment as a deployment sets it."""
    monkeypatch.setenv("LITEFS_DIR", mount.path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, "flask_app", "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def test_flask_example_on_a_primary_and_a_replica(tmp_path, monkeypatch):
    primary, replica = LiteFSMount(tmp_path / "primary"), LiteFSMount(tmp_path / "replica")
    primary.make_primary()
    replica.make_replica("localhost")
    primary_app = load_flask_example("flask_example_primary", primary, monkeypatch)
    # LiteFS would move app.db-pos at each commit; here the test's stand-in does.
    middleware = primary_app.extensions["litefs"].middleware
    middleware.app = primary.committing(middleware.app, ["app.db"])
    with serve(primary_app) as primary_url:
        replica_app = load_flask_example(
            "flask_example_replica",
            replica,
            monkeypatch,
            LITEFS_PROXY_PRIMARY_URL=f"http://{{hostname}}:{urlsplit(primary_url).port}",
        )
        with serve(replica_app) as replica_url:
            status, _, page = form_request(replica_url)
            assert status == 200 and "No notes yet." in page
            status, headers, _ = form_request(replica_url, "POST", "/notes", body="text=from+the+replica")
            assert status == 303 and headers["Location"] == "/"
            # The primary wrote it and set the cookie for its database, app.db.
            txid = re.match(r"__txid=([0-9a-f]{16});", headers["Set-Cookie"])[1]
            assert int(txid, 16) == primary.position("app.db")
            replica.replicate(primary, "app.db")
            status, _, page = form_request(replica_url, cookie=f"__txid={txid}")
            assert status == 200 and "from the replica" in page
            assert form_request(replica_url, path="/litefs/health")[::2] == (200, "OK\n")


def test_django_example_serves_and_writes(tmp_path):
    mount = LiteFSMount(tmp_path / "litefs")
    mount.make_primary()
    env = {**os.environ, "LITEFS_DIR": mount.path}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=DJANGO_PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert os.path.exists(mount.db_path("db.sqlite3")), "the database lives in the mount"
    mount.sync("db.sqlite3")  # as LiteFS would have after the migration
    with gunicorn(["--threads", "4", "mysite.wsgi"], env=env, cwd=DJANGO_PROJECT) as (url, _):
        status, headers, page = form_request(url)
        assert status == 200 and "Served by the primary." in page and "No notes yet." in page
        csrf_cookie = re.search(r"csrftoken=([^;]+)", " ".join(headers.get_all("Set-Cookie")))[1]
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]
        status, headers, _ = form_request(
            url, "POST", body=f"csrfmiddlewaretoken={token}&text=hello+django", cookie=f"csrftoken={csrf_cookie}"
        )
        assert status == 302 and headers["Location"] == "/"
        cookies = " ".join(headers.get_all("Set-Cookie"))
        assert re.search(r"__txid=[0-9a-f]{16};", cookies), "litefs-wsgi knows db.sqlite3"
        status, _, page = form_request(url)
        assert status == 200 and "hello django" in page
    with sqlite3.connect(mount.db_path("db.sqlite3")) as db:
        assert db.execute("SELECT text FROM notes_note").fetchall() == [("hello django",)]
    db.close()


def test_litefs_yml_reads_as_litefs_would():
    env = {"FLY_REGION": "ams", "PRIMARY_REGION": "ams", "FLY_APP_NAME": "app", "HOSTNAME": "h"}
    options = read_yaml(os.path.join(EXAMPLES, "litefs.yml"), env=env)
    assert options.get("mount_dir") == "/litefs"
